"""Open and check a shard set written by tools/make_shards.py (format spec: shards/README.md).

A shard set is a directory with `manifest.json`, `<name>-%06d.tar` WebDataset shards and one DALI
index `<name>-%06d.idx` per tar. `open_shard_set` is the cheap check every reader runs first: DALI's
webdataset reader segfaults on an index entry that points past the end of its tar (a truncated
copy), so that is caught here, from the index lines and the file sizes alone. `verify_shard_set`
is the deep check behind `make_shards.py --verify`: it reads every tar member and decodes every image.
A set in S3 (`s3://bucket/prefix`) opens the same way (pipelines/s3.py): its tars stay in the bucket,
where DALI reads them, and its manifest and indexes come from a local cache.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_TRAIN = REPO_ROOT / "shards" / "fashion-mnist-train-10k"
DEMO_VAL = REPO_ROOT / "shards" / "fashion-mnist-val-2k"

FORMAT = "fastssl-shards/1"
MANIFEST = "manifest.json"
INDEX_VERSION = "v1.2"
# fields per sample component in an index line, by index version: ext offset size [member name]
_INDEX_FIELDS = {"v1.1": 3, "v1.2": 4}


class ShardError(ValueError):
    """A shard set that cannot be read; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class ShardSet:
    """An opened shard set. `root` is its directory, or for a set in S3 its `s3://bucket/prefix` URL
    (a str), and then `tars` are the tars' URLs, `indexes` the cached local copies of the indexes and
    `etags` the ETag of every object of the set as it was opened (manifest included)."""

    root: Path | str
    tars: list[Path] | list[str]
    indexes: list[Path]
    num_samples: int
    counts: list[int]
    classes: list[str] | None
    labeled: bool
    manifest: dict
    etags: dict[str, str] | None = None

    @property
    def remote(self) -> bool:
        return self.etags is not None


@dataclass(frozen=True)
class IndexEntry:
    """One component of one sample as a DALI index line lists it."""

    ext: str
    offset: int
    size: int
    name: str | None


def index_path_for(tar: Path) -> Path:
    return tar.with_suffix(".idx")


def format_index(samples: list[list[IndexEntry]]) -> str:
    """The DALI index text for a tar, byte-identical to what DALI's `wds2idx` writes."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        lines.append(" ".join(f"{c.ext} {c.offset} {c.size} {c.name}" for c in sample))
    return "\n".join(lines) + "\n"


def read_index(index: Path, rebuild: str | None = None) -> list[list[IndexEntry]]:
    """Parse a DALI webdataset index; raises ShardError naming the file (and `rebuild`, the fix) if it is
    malformed."""
    rebuild = rebuild or f"rebuild with tools/make_shards.py or run wds2idx {index.with_suffix('.tar')} {index}"
    try:
        lines = index.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ShardError(f"cannot read index {index} ({error}): {rebuild}") from None
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] not in _INDEX_FIELDS or not header[1].isdigit():
        raise ShardError(f"index {index} has no 'v1.2 N' header: {rebuild}")
    fields = _INDEX_FIELDS[header[0]]
    samples = []
    for line_number, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts or len(parts) % fields:
            raise ShardError(f"index {index} line {line_number} is malformed: {rebuild}")
        try:
            sample = [
                IndexEntry(
                    parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3] if fields == 4 else None
                )
                for i in range(0, len(parts), fields)
            ]
        except ValueError:
            raise ShardError(f"index {index} line {line_number} is malformed: {rebuild}") from None
        samples.append(sample)
    if len(samples) != int(header[1]):
        raise ShardError(f"index {index} header says {header[1]} samples but lists {len(samples)}: {rebuild}")
    return samples


def _load_manifest(root: Path) -> dict:
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        if not any(root.glob("*.tar")):
            raise ShardError(f"no shards in {root}: run tools/make_shards.py SOURCE {root}")
        raise ShardError(
            f"no {MANIFEST} in {root}: rebuild with tools/make_shards.py or write one (see shards/README.md)"
        )
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ShardError(f"cannot read {manifest_path} ({error}): rebuild with tools/make_shards.py") from None
    return parse_manifest(text, manifest_path)


def parse_manifest(text: str, where: Path | str) -> dict:
    """The manifest `where` holds (`text`), checked for its format and its shard entries."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise ShardError(f"cannot read {where} ({error}): rebuild with tools/make_shards.py") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{where} is not a {FORMAT} manifest: rebuild with tools/make_shards.py")
    for entry in manifest.get("shards") or []:
        if not isinstance(entry, dict) or not {"tar", "index", "num_samples"} <= entry.keys():
            raise ShardError(
                f"{where} has a shard entry without tar/index/num_samples: rebuild with tools/make_shards.py"
            )
    return manifest


def check_index_against_tar(tar: Path | str, index: Path, expected_count: int, tar_size: int,
                            rebuild: str | None = None) -> None:
    """Catch stale indexes and truncated tars (a tar of `tar_size` bytes) before DALI reads them."""
    rebuild = rebuild or f"rebuild with tools/make_shards.py or run wds2idx {tar} {index}"
    samples = read_index(index, rebuild)
    if len(samples) != expected_count:
        raise ShardError(
            f"index {index} lists {len(samples)} samples but {MANIFEST} says {expected_count}: {rebuild}"
        )
    for sample_number, sample in enumerate(samples):
        for entry in sample:
            if entry.offset < 0 or entry.size < 0 or entry.offset + entry.size > tar_size:
                raise ShardError(
                    f"{tar} is truncated or its index is stale: sample {sample_number} "
                    f"({entry.name or entry.ext}) ends at byte {entry.offset + entry.size} of a "
                    f"{tar_size}-byte file: re-copy the tar or {rebuild}"
                )


def open_shard_set(path: str | os.PathLike, *, need_labels: bool = False) -> ShardSet:
    """The shard set in directory `path` (or its manifest.json), or at an `s3://bucket/prefix` URL, after
    cheap consistency checks."""
    if isinstance(path, str) and path.startswith("s3://"):
        from pipelines.s3 import open_s3_shard_set  # boto3 is imported only for sets in S3

        return open_s3_shard_set(path, need_labels=need_labels)
    given = Path(path)
    if not given.exists():
        raise ShardError(f"shard directory {given} does not exist: run tools/make_shards.py SOURCE {given}")
    root = (given.parent if given.is_file() and given.name == MANIFEST else given).resolve()
    if not root.is_dir():
        raise ShardError(f"{given} is not a shard directory: pass the directory that holds {MANIFEST}")
    manifest = _load_manifest(root)
    tars, indexes = [], []
    for entry in manifest.get("shards") or []:
        tar, index = root / entry["tar"], root / entry["index"]
        if not tar.is_file():
            raise ShardError(
                f"missing shard {tar} listed in {root / MANIFEST}: rebuild with tools/make_shards.py"
            )
        if not index.is_file():
            raise ShardError(
                f"missing index {index.name} for {tar.name}: rebuild with tools/make_shards.py "
                f"or run wds2idx {tar} {index}"
            )
        check_index_against_tar(tar, index, int(entry["num_samples"]), os.path.getsize(tar))
        tars.append(tar)
        indexes.append(index)
    return make_shard_set(root, manifest, tars, indexes, need_labels=need_labels)


def make_shard_set(root: Path | str, manifest: dict, tars: list, indexes: list[Path], *, need_labels: bool,
                   etags: dict[str, str] | None = None) -> ShardSet:
    """The `ShardSet` of checked shards (`tars`, `indexes` in manifest order), after the set-wide checks."""
    counts = [int(entry["num_samples"]) for entry in manifest.get("shards") or []]
    if not counts:
        raise ShardError(f"no shards in {root}: run tools/make_shards.py SOURCE {root}")
    if sum(counts) != manifest.get("num_samples"):
        raise ShardError(
            f"{root}/{MANIFEST} says num_samples={manifest.get('num_samples')} but its shards hold "
            f"{sum(counts)}: rebuild with tools/make_shards.py"
        )
    labeled = bool(manifest.get("labeled"))
    if need_labels and not labeled:
        raise ShardError(
            f"{root} has no labels; the kNN monitor and evaluation need labeled shards: build them from an "
            "image-folder tree, a labeled list or IDX labels, or disable evaluation"
        )
    return ShardSet(
        root=root,
        tars=tars,
        indexes=indexes,
        num_samples=sum(counts),
        counts=counts,
        classes=manifest.get("classes"),
        labeled=labeled,
        manifest=manifest,
        etags=etags,
    )


# --- sample positions -------------------------------------------------------------------------------


class SamplePositions:
    """Each sample's fixed position in a shard set, 0..num_samples - 1: the manifest's shard order, then
    the order of the shard's index (the tar's member order). The same on every rank and in every run of the
    set, so per-sample state (a memory bank) can be indexed by it.

    Built once from the index files (the JPEG member's byte offset of every sample, one int64 array per
    tar); `__call__` maps DALI's `source_info` keys ("<tar path>:<offset>:<member>", what `Batch.raw_keys`
    holds) to positions with a dictionary look-up of the tar and a binary search of the offset. No tar is
    read."""

    def __init__(self, shards: ShardSet, ext: str = "jpg"):
        self.root = shards.root
        self.tar_numbers = {str(tar): number for number, tar in enumerate(shards.tars)}
        self.starts = np.cumsum([0, *shards.counts[:-1]]).tolist()
        self.offsets, self.orders = [], []  # per tar: the offsets sorted, and each one's place in the index
        for index in shards.indexes:
            offsets = np.asarray([entry.offset for sample in read_index(index) for entry in sample
                                  if entry.ext == ext], dtype=np.int64)
            order = np.argsort(offsets, kind="stable")
            self.offsets.append(offsets[order])
            self.orders.append(order)
        self.num_samples = shards.num_samples

    def __call__(self, raw_keys) -> np.ndarray:
        """Positions (int64) of a batch of keys: `raw_keys` (B, L) uint8, NUL-padded `source_info` strings."""
        rows = np.asarray(raw_keys)
        positions = np.empty(rows.shape[0], dtype=np.int64)
        for row_number, row in enumerate(rows):
            source = bytes(row).rstrip(b"\0").decode(errors="replace")
            parts = source.rsplit(":", 2)
            number = self.tar_numbers.get(parts[0]) if len(parts) == 3 and parts[1].isdigit() else None
            offsets = self.offsets[number] if number is not None else None
            at = int(np.searchsorted(offsets, int(parts[1]))) if offsets is not None else -1
            if offsets is None or at >= len(offsets) or offsets[at] != int(parts[1]):
                raise ShardError(f"sample {source} is not in the index files of {self.root}: the shards changed "
                                 f"while reading; rebuild the index with tools/make_shards.py")
            positions[row_number] = self.starts[number] + int(self.orders[number][at])
        return positions


def sample_labels(shards: ShardSet) -> np.ndarray:
    """Every sample's `lab.i32` label (int64, -1 for unlabeled samples), in `SamplePositions` order: 4 bytes
    read at each sample's index offset, one open file per tar (no image is read)."""
    labels = np.full(shards.num_samples, -1, dtype=np.int64)
    at = 0
    for tar, index in zip(shards.tars, shards.indexes):
        if shards.remote:  # one streamed pass over each tar in S3, instead of a request per label
            from pipelines.s3 import open_stream

            opened = open_stream(shards, tar)
        else:
            opened = open(tar, "rb")
        with opened as handle:
            for sample in read_index(index):
                entry = next((entry for entry in sample if entry.ext == "lab.i32"), None)
                if entry is not None and entry.size == 4:
                    handle.seek(entry.offset)
                    labels[at] = struct.unpack("<i", handle.read(4))[0]
                at += 1
    return labels


# --- deep verification ------------------------------------------------------------------------------


def _tar_samples(archive: tarfile.TarFile):
    """Yield (components, member bytes by name) per sample: consecutive regular members sharing a key."""
    components: list[IndexEntry] = []
    data: dict[str, bytes] = {}
    for member in archive:
        if not member.isreg():
            continue
        key, _, ext = member.name.partition(".")
        if components and components[0].name.partition(".")[0] != key:
            yield components, data
            components, data = [], {}
        components.append(IndexEntry(ext, member.offset_data, member.size, member.name))
        data[member.name] = archive.extractfile(member).read()
    if components:
        yield components, data


def _decoded_size(name: str, encoded: bytes) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) of a JPEG that decodes to RGB, or (None, the problem)."""
    from PIL import Image, UnidentifiedImageError  # deep verification only: `open_shard_set` stays light

    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image.load()
            if image.format != "JPEG" or image.mode != "RGB":
                return None, f"{name} is {image.format} {image.mode}, not an RGB JPEG"
            return image.size, None
    except UnidentifiedImageError:  # its message is the repr of the BytesIO
        return None, f"{name} does not decode (no image format recognised)"
    except Exception as error:  # noqa: BLE001 - any decoder failure is the problem to report
        return None, f"{name} does not decode ({error})"


def _label_problem(key: str, label: int, cls: bytes | None, meta: dict, shard_set: ShardSet) -> str | None:
    if not shard_set.labeled:
        if label != -1 or cls is not None or meta.get("label") is not None:
            return f"sample {key} of an unlabeled set carries a label"
        return None
    classes = shard_set.classes or []
    if not 0 <= label < len(classes):
        return f"sample {key}: lab.i32 label {label} is outside the {len(classes)} classes"
    cls_text = (cls or b"").decode("ascii", "replace").strip()
    if cls_text != str(label) or meta.get("label") != label or meta.get("class") != classes[label]:
        return (
            f"sample {key} labels disagree: lab.i32={label} cls={cls_text!r} "
            f"json={meta.get('label')!r}/{meta.get('class')!r}"
        )
    return None


def _sample_problems(components: list[IndexEntry], data: dict[str, bytes], shard_set: ShardSet) -> list[str]:
    """What is wrong with one sample: missing components, undecodable image, inconsistent labels."""
    names = {entry.ext: entry.name for entry in components}
    key = components[0].name.partition(".")[0]
    problems = [] if key.isdigit() else [f"key {key!r} is not a decimal sample number"]
    problems += [f"sample {key} has no .{ext}" for ext in ("jpg", "lab.i32", "json") if ext not in names]
    if problems:
        return problems
    size, problem = _decoded_size(names["jpg"], data[names["jpg"]])
    if problem:
        return [problem]
    raw_label = data[names["lab.i32"]]
    if len(raw_label) != 4:
        return [f"{names['lab.i32']} has {len(raw_label)} bytes, expected 4"]
    try:
        meta = json.loads(data[names["json"]].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return [f"{names['json']} is not JSON ({error})"]
    if (meta.get("width"), meta.get("height")) != size:
        problems.append(
            f"{names['json']} says {meta.get('width')}x{meta.get('height')}, image is {size[0]}x{size[1]}"
        )
    label = struct.unpack("<i", raw_label)[0]
    cls = data[names["cls"]] if "cls" in names else None
    problem = _label_problem(key, label, cls, meta, shard_set)
    return problems + ([problem] if problem else [])


def _shard_problems(tar: Path, index: Path, entry: dict, shard_set: ShardSet, keys: set[str]) -> list[str]:
    problems = []
    if os.path.getsize(tar) != entry.get("bytes"):
        problems.append(f"{tar}: {os.path.getsize(tar)} bytes but {MANIFEST} says {entry.get('bytes')}")
    indexed = read_index(index)
    found = 0
    try:
        with tarfile.open(tar) as archive:
            for components, data in _tar_samples(archive):
                if found >= len(indexed) or indexed[found] != components:
                    problems.append(
                        f"{index}: entry for sample {found} does not match the tar members (stale index)"
                    )
                    indexed = []  # report a stale index once
                key = components[0].name.partition(".")[0]
                if key in keys:
                    problems.append(f"{tar}: key {key} occurs more than once in the set")
                keys.add(key)
                problems += [f"{tar}: {problem}" for problem in _sample_problems(components, data, shard_set)]
                found += 1
    except (OSError, tarfile.TarError) as error:
        return problems + [f"{tar}: cannot read the tar ({error})"]
    if found != entry["num_samples"]:
        problems.append(f"{tar}: holds {found} samples but {MANIFEST} says {entry['num_samples']}")
    return problems


def _problems(path: str | os.PathLike) -> Iterator[str]:
    """The problems of the set at `path`, tar by tar in the manifest's order."""
    try:
        shard_set = open_shard_set(path)
    except ShardError as error:
        yield str(error)
        return
    if shard_set.remote:
        yield (f"{path}: --verify reads a local set (make_shards.py verifies every set before it uploads it); "
               f"to re-check this one, copy it down (aws s3 cp --recursive {path} DIR) and verify DIR")
        return
    keys: set[str] = set()
    for tar, index, entry in zip(shard_set.tars, shard_set.indexes, shard_set.manifest["shards"]):
        yield from _shard_problems(tar, index, entry, shard_set, keys)


def verify_shard_set(path: str | os.PathLike) -> list[str]:
    """Every problem found by reading all members of all tars (an empty list: the set is sound)."""
    return list(_problems(path))


def first_problem(path: str | os.PathLike) -> str | None:
    """The first problem `verify_shard_set` finds, or None: the tars are read in order up to the first bad one."""
    return next(_problems(path), None)
