"""Write WebDataset shards with DALI indexes and a manifest, from images on disk, MNIST-style IDX files or
another shard set.

    python tools/make_shards.py SOURCE OUT_DIR [--shard-size 256MB] [--max-side N] [--limit N] [--seed 0]
    python tools/make_shards.py shards/fashion-mnist-train-10k fm-5 --keep-labels 0,1,2,3,4
    python tools/make_shards.py --verify OUT_DIR
    python tools/make_shards.py SOURCE s3://bucket/prefix     # write, verify, upload (manifest last)

SOURCE is detected as one of (or forced with --source-kind):
  imagefolder  a folder whose sub-folders are the classes (sorted names -> labels 0..K-1), recursive
  folder       a folder of unlabeled images, searched recursively
  list         a text/CSV file, one `path[,label]` per line (paths relative to the list's folder; labels are
               integers or class names; blank lines and `# comments` skipped)
  idx          an MNIST-style images file (gz or raw); labels from the matching labels-idx1 file or --labels
  shards       a shard set (a folder with manifest.json): its samples, labels and class names
--keep-labels L,L,... keeps the samples of those labels only, renumbered 0..K-1 in the order given.
Names starting with "." are ignored. Every other file is decode-checked; files that are not readable images
are skipped and listed in the manifest. The sources are sorted, then shuffled with the seed, so the output
is byte-identical for the same input, seed and options whatever --workers is. Format: shards/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import io
import json
import math
import multiprocessing
import os
import re
import struct
import sys
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipelines.files import atomic_write_text, commit, target_name, temporary_path  # noqa: E402
from pipelines.shards import (  # noqa: E402
    FORMAT,
    MANIFEST,
    IndexEntry,
    ShardError,
    format_index,
    open_shard_set,
    read_index,
    verify_shard_set,
)

TOOL_VERSION = "make_shards/1"
PROG = "make_shards"
SOURCE_KINDS = ("imagefolder", "folder", "list", "idx", "shards")
IMAGE_SUFFIXES = {
    ".jpg",
    ".jpeg",
    ".png",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
}
# Formats PIL always decodes: a failure to load one of these means the file is damaged. Other formats PIL
# identifies but cannot load (stubs such as BUFR, EPS without Ghostscript...) are "unsupported".
COMMON_FORMATS = {"JPEG", "MPO", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM"}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IDX_IMAGES_MAGIC = b"\x00\x00\x08\x03"  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = b"\x00\x00\x08\x01"  # unsigned bytes, 1 dimension
IDX_MAGIC = {"images": IDX_IMAGES_MAGIC, "labels": IDX_LABELS_MAGIC}
TAR_BLOCK = tarfile.BLOCKSIZE
TAR_RECORD = tarfile.RECORDSIZE  # tarfile pads a closed archive to a whole record
SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}
SUMMARY_EXAMPLES = 3


class CliError(Exception):
    """A one-line, user-facing error: what is wrong with which file or flag, and the fix."""


# --- what to shard ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One would-be sample: a file to read, raw grayscale pixels from an IDX file, or the image of a
    shard set's sample (`member`: its tar, the offset and size of the image's bytes there)."""

    source: str  # how the manifest and the sample's json name it
    label: int | None
    path: str | None = None
    pixels: bytes | None = None
    shape: tuple[int, int] | None = None  # (height, width) of `pixels`
    member: tuple[str, int, int] | None = None


@dataclass
class Source:
    kind: str
    description: dict
    candidates: list[Candidate]
    classes: list[str] | None
    skipped: list[dict]  # files rejected while listing, before any decoding


def _printable(path: str | Path) -> str:
    """A path as valid UTF-8 (undecodable bytes in file names become U+FFFD)."""
    return os.fsencode(path).decode("utf-8", "replace")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _files_under(folder: Path) -> list[Path]:
    """All non-hidden files below `folder`, sorted by path."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not _is_hidden(d)]
        found += [Path(parent, f) for f in files if not _is_hidden(f)]
    return sorted(found)


def _top_level(folder: Path) -> tuple[list[Path], list[Path]]:
    """(sub-folders, files) directly inside `folder`, hidden names excluded, sorted."""
    entries = sorted(p for p in folder.iterdir() if not _is_hidden(p.name))
    return [p for p in entries if p.is_dir()], [p for p in entries if not p.is_dir()]


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def _looks_like_idx_images(path: Path) -> bool:
    with open(path, "rb") as file:
        head = file.read(2)
        file.seek(0)
        stream = gzip.GzipFile(fileobj=file) if head == b"\x1f\x8b" else file
        try:
            return stream.read(4) == IDX_IMAGES_MAGIC
        except (OSError, EOFError):
            return False


def detect_kind(path: Path) -> str:
    if path.is_file():
        return "idx" if _looks_like_idx_images(path) else "list"
    if (path / MANIFEST).is_file():
        return "shards"
    subfolders, files = _top_level(path)
    top_images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if subfolders and top_images:
        raise CliError(
            f"SOURCE {path} has both images and sub-folders at its top level: pass --source-kind imagefolder "
            "(sub-folders are classes) or --source-kind folder (unlabeled, recursive)"
        )
    return "imagefolder" if subfolders else "folder"


def _relative(path: Path, root: Path) -> str:
    return _printable(path.relative_to(root).as_posix())


def list_image_folder(root: Path, options: argparse.Namespace) -> Source:
    subfolders, top_files = _top_level(root)
    if not subfolders:
        raise CliError(
            f"SOURCE {root} has no class sub-folders: use --source-kind folder for unlabeled images"
        )
    if options.classes:
        raise CliError(
            "--classes does not apply to an image-folder tree: its class names are the sub-folder names"
        )
    classes = [_printable(folder.name) for folder in subfolders]
    candidates = [
        Candidate(source=_relative(file, root), label=label, path=str(file))
        for label, folder in enumerate(subfolders)
        for file in _files_under(folder)
    ]
    skipped = [{"path": _relative(file, root), "reason": "outside any class folder"} for file in top_files]
    return Source(
        "imagefolder", {"kind": "imagefolder", "path": options.source}, candidates, classes, skipped
    )


def list_folder(root: Path, options: argparse.Namespace) -> Source:
    if options.classes:
        raise CliError("--classes does not apply to a folder of unlabeled images")
    candidates = [
        Candidate(source=_relative(file, root), label=None, path=str(file)) for file in _files_under(root)
    ]
    return Source("folder", {"kind": "folder", "path": options.source}, candidates, None, [])


def _parse_list_lines(path: Path) -> list[tuple[int, str, str | None]]:
    """(line number, path text, label text or None) for every entry of a list file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(
            f"cannot read list file {path} ({error}): give a UTF-8 text file of `path[,label]` lines"
        ) from None
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not entries and line.replace(" ", "").lower() in ("path", "path,label"):
            continue  # a CSV header
        if "," in line:
            file, _, label = line.rpartition(",")
            if not label.strip():
                raise CliError(f"{path} line {number} has an empty label: write `path,label` or just `path`")
            entries.append((number, file.strip(), label.strip()))
        else:
            entries.append((number, line, None))
    return entries


def _label_ids(label_texts: list[str], names: list[str] | None, where: Path) -> tuple[list[int], list[str]]:
    """Integer labels and class names, from integer label texts or from class-name strings."""
    if all(re.fullmatch(r"\d+", text) for text in label_texts):
        labels = [int(text) for text in label_texts]
        classes = names or [str(i) for i in range(max(labels) + 1)]
        if max(labels) >= len(classes):
            raise CliError(
                f"--classes lists {len(classes)} names but {where} has label {max(labels)}: name every class"
            )
        return labels, classes
    classes = names or sorted(set(label_texts))
    unknown = sorted(set(label_texts) - set(classes))
    if unknown:
        raise CliError(f"{where} uses class {unknown[0]!r} that --classes does not list: add it to --classes")
    ids = {name: i for i, name in enumerate(classes)}
    return [ids[text] for text in label_texts], classes


def read_list(path: Path, options: argparse.Namespace) -> Source:
    entries = _parse_list_lines(path)
    labeled = [entry for entry in entries if entry[2] is not None]
    if labeled and len(labeled) != len(entries):
        unlabeled_line = next(number for number, _, label in entries if label is None)
        raise CliError(
            f"{path} line {unlabeled_line} has no label but line {labeled[0][0]} has one: "
            "label every line or none"
        )
    labels, classes = [None] * len(entries), None
    if labeled:
        labels, classes = _label_ids([label for _, _, label in entries], options.classes, path)
    elif options.classes:
        raise CliError(f"--classes given but {path} has no labels: add `,label` to every line")
    folder = path.parent
    candidates = [
        Candidate(source=_printable(file), label=label, path=str(folder / file))
        for (_, file, _), label in zip(entries, labels)
    ]
    return Source("list", {"kind": "list", "path": options.source}, candidates, classes, [])


def load_idx(path: Path, what: str) -> np.ndarray:
    """An MNIST-style IDX file (gz or raw) of `what`, "images" (N, H, W) or "labels" (N,), as uint8;
    CliError (one line) when it cannot be read or is not such a file."""
    magic = IDX_MAGIC[what]
    try:
        raw = _read_maybe_gzip(path)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise CliError(
            f"cannot read IDX {what} file {path} ({error}): give an MNIST-style idx file (gz or raw)"
        ) from None
    if raw[:4] != magic:
        raise CliError(f"{path} is not an IDX {what} file (magic {raw[:4].hex()}, expected {magic.hex()})")
    ndim = magic[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise CliError(
            f"{path} holds {data.size} bytes of {what}, its header promises {math.prod(dims)}: re-download it"
        )
    return data.reshape(dims)


def _idx_labels_path(images: Path, options: argparse.Namespace) -> Path | None:
    if options.labels:
        return Path(options.labels)
    if "images-idx3" not in images.name:
        return None
    derived = images.with_name(images.name.replace("images-idx3", "labels-idx1"))
    return derived if derived.exists() else None


def _idx_classes(images: Path, labels: np.ndarray, options: argparse.Namespace) -> list[str]:
    if options.classes:
        classes = options.classes
    elif "fashion" in str(images).lower():
        classes = FASHION_MNIST_CLASSES
    else:
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    if int(labels.max()) >= len(classes):
        raise CliError(
            f"--classes lists {len(classes)} names but the labels go up to {int(labels.max())}: "
            "name every class"
        )
    return classes


def read_idx(path: Path, options: argparse.Namespace) -> Source:
    images = load_idx(path, "images")
    labels_path = _idx_labels_path(path, options)
    description = {"kind": "idx", "path": options.source}
    labels, classes = None, None
    if labels_path is not None:
        if not labels_path.exists():
            raise CliError(f"--labels {labels_path} does not exist: give the labels-idx1 file of {path.name}")
        labels = load_idx(labels_path, "labels")
        if len(labels) != len(images):
            raise CliError(
                f"{labels_path} has {len(labels)} labels but {path} has {len(images)} images: "
                "pass the matching file with --labels"
            )
        classes = _idx_classes(path, labels, options)
        description["labels"] = _printable(labels_path)
    elif options.classes:
        raise CliError(f"--classes given but no labels file found for {path}: pass --labels LABELS_FILE")
    height, width = images.shape[1:]
    candidates = [
        Candidate(
            source=f"idx:{_printable(path.name)}#{i}",
            label=None if labels is None else int(labels[i]),
            pixels=images[i].tobytes(),
            shape=(height, width),
        )
        for i in range(len(images))
    ]
    return Source("idx", description, candidates, classes, [])


def read_shard_set(path: Path, options: argparse.Namespace) -> Source:
    """The samples of a shard set in reading order: where each image's bytes are, its label and the
    source its json names (the sample key when it names none). The images are read when prepared."""
    if options.classes:
        raise CliError(f"--classes does not apply to a shard set: {path} names its classes in {MANIFEST}")
    try:
        shard_set = open_shard_set(path)
        candidates = []
        for tar, index in zip(shard_set.tars, shard_set.indexes):
            with open(tar, "rb") as archive:
                for sample in read_index(index):
                    entries = {entry.ext: entry for entry in sample}
                    data = {}
                    for ext in ("lab.i32", "json"):
                        if ext in entries:
                            archive.seek(entries[ext].offset)
                            data[ext] = archive.read(entries[ext].size)
                    key = sample[0].name.partition(".")[0]
                    label = struct.unpack("<i", data["lab.i32"])[0] if "lab.i32" in data else -1
                    meta = json.loads(data["json"]) if "json" in data else {}
                    image = entries.get("jpg", IndexEntry("jpg", 0, 0, None))
                    candidates.append(Candidate(source=meta.get("source") or key,
                                                label=label if shard_set.labeled else None,
                                                member=(str(tar), image.offset, image.size)))
    except (ShardError, OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        raise CliError(f"cannot read shard set {path} ({error}): check it with --verify") from None
    classes = shard_set.classes if shard_set.labeled else None
    return Source("shards", {"kind": "shards", "path": options.source}, candidates, classes, [])


def keep_labels(source: Source, labels: list[int]) -> Source:
    """Only the candidates whose label is in `labels`, renumbered 0..K-1 in the order of `labels`."""
    if source.classes is None:
        raise CliError(f"--keep-labels needs labeled samples, SOURCE {source.description['path']} is unlabeled")
    unknown = [label for label in labels if label >= len(source.classes)]
    if unknown:
        raise CliError(f"--keep-labels {unknown[0]}: SOURCE {source.description['path']} has labels "
                       f"0..{len(source.classes) - 1}")
    new_label = {label: i for i, label in enumerate(labels)}
    candidates = [dataclasses.replace(c, label=new_label[c.label]) for c in source.candidates if c.label in new_label]
    if not candidates:
        raise CliError(f"--keep-labels {','.join(map(str, labels))}: SOURCE {source.description['path']} "
                       "has no sample of these labels")
    return Source(source.kind, {**source.description, "keep_labels": labels}, candidates,
                  [source.classes[label] for label in labels], source.skipped)


def discover(options: argparse.Namespace) -> Source:
    path = Path(options.source)
    if not path.exists():
        raise CliError(
            f"SOURCE {path} does not exist: give an image folder, a list file, an IDX images file or a shard set"
        )
    kind = options.source_kind or detect_kind(path)
    if kind in ("imagefolder", "folder") and not path.is_dir():
        raise CliError(f"--source-kind {kind} needs a folder, but SOURCE {path} is a file")
    if kind == "shards" and not (path / MANIFEST).is_file():
        raise CliError(f"--source-kind shards needs a shard set, but SOURCE {path} has no {MANIFEST}")
    if kind in ("list", "idx") and not path.is_file():
        raise CliError(f"--source-kind {kind} needs a file, but SOURCE {path} is a folder")
    if options.labels and kind != "idx":
        raise CliError(f"--labels only applies to IDX sources, SOURCE {path} is a {kind}")
    readers = {"imagefolder": list_image_folder, "folder": list_folder, "list": read_list, "idx": read_idx,
               "shards": read_shard_set}
    source = readers[kind](path, options)
    if options.keep_labels:
        source = keep_labels(source, options.keep_labels)
    if not source.candidates:
        raise CliError(
            f"no images found in SOURCE {path} ({kind}): point SOURCE at the images or fix --source-kind"
        )
    return source


# --- which samples, in which order ------------------------------------------------------------------


def _class_quotas(counts: dict[int, int], limit: int) -> dict[int, int]:
    """Per-class sample counts proportional to `counts`, summing to `limit` (largest remainders win)."""
    total = sum(counts.values())
    exact = {label: limit * count / total for label, count in counts.items()}
    quotas = {label: math.floor(share) for label, share in exact.items()}
    by_remainder = sorted(counts, key=lambda label: (-(exact[label] - quotas[label]), label))
    for label in by_remainder[: limit - sum(quotas.values())]:
        quotas[label] += 1
    return quotas


def choose(candidates: list[Candidate], limit: int | None, rng: np.random.Generator) -> list[Candidate]:
    """`limit` candidates (all if None), stratified by label when labeled, kept in sorted order."""
    if limit is None or limit >= len(candidates):
        return candidates
    if candidates[0].label is None:
        picked = rng.choice(len(candidates), size=limit, replace=False)
    else:
        by_label: dict[int, list[int]] = {}
        for i, candidate in enumerate(candidates):
            by_label.setdefault(candidate.label, []).append(i)
        quotas = _class_quotas({label: len(members) for label, members in by_label.items()}, limit)
        picked = np.concatenate(
            [rng.choice(by_label[label], size=quotas[label], replace=False) for label in sorted(by_label)]
        )
    return [candidates[i] for i in sorted(picked.tolist())]


# --- one sample: decode-check and encode (runs in the worker processes) -----------------------------


@dataclass(frozen=True)
class Prepared:
    jpeg: bytes
    width: int
    height: int


@dataclass(frozen=True)
class Skipped:
    reason: str


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the image
        return 1


def _sixteen_bit_to_8(image: Image.Image) -> Image.Image:
    """16-bit grey (I;16*, or I holding 16-bit values) scaled to 0..255; PIL's convert would clip at 255."""
    values = np.asarray(image).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with EXIF orientation applied; transparency composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        image = _sixteen_bit_to_8(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def fit_within(image: Image.Image, max_side: int | None) -> Image.Image:
    if not max_side or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _encode(image: Image.Image, quality: int) -> Prepared:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Prepared(buffer.getvalue(), image.width, image.height)


def _open_checked(encoded: bytes) -> Image.Image | Skipped:
    """The fully decoded image, or why it cannot be used."""
    try:
        image = Image.open(io.BytesIO(encoded))
    except UnidentifiedImageError:
        return Skipped("not an image")
    except Exception as error:  # noqa: BLE001 - e.g. a decompression-bomb refusal
        return Skipped(f"unreadable image ({type(error).__name__}: {error})")
    try:
        image.load()
    except Exception as error:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError...
        if image.format not in COMMON_FORMATS:
            return Skipped(f"unsupported format ({image.format}: {error})")
        kind = "truncated image" if "truncated" in str(error).lower() else "corrupt image"
        return Skipped(f"{kind} ({error})")
    if image.width == 0 or image.height == 0:
        return Skipped(f"zero-size image ({image.width}x{image.height})")
    return image


def prepare_file(path: str, max_side: int | None, quality: int) -> Prepared | Skipped:
    try:
        encoded = Path(path).read_bytes()
    except FileNotFoundError:
        return Skipped("missing file")
    except OSError as error:
        return Skipped(f"unreadable file ({error.strerror})")
    return prepare_encoded(encoded, max_side, quality)


def prepare_encoded(encoded: bytes, max_side: int | None, quality: int) -> Prepared | Skipped:
    """An encoded image checked, and kept as it is when it is an RGB JPEG needing no change."""
    if not encoded:
        return Skipped("empty file")
    image = _open_checked(encoded)
    if isinstance(image, Skipped):
        return image
    keep_original = (
        image.format == "JPEG"
        and image.mode == "RGB"
        and _exif_orientation(image) == 1
        and (not max_side or max(image.size) <= max_side)
    )
    if keep_original:
        return Prepared(encoded, image.width, image.height)
    try:
        return _encode(fit_within(to_rgb(image), max_side), quality)
    except Exception as error:  # noqa: BLE001 - an exotic mode PIL cannot convert is a skip, not a crash
        return Skipped(f"unsupported image mode ({image.mode}: {error})")


def prepare(candidate: Candidate, max_side: int | None, quality: int) -> Prepared | Skipped:
    if candidate.pixels is not None:
        height, width = candidate.shape
        grey = Image.frombytes("L", (width, height), candidate.pixels)
        return _encode(fit_within(grey.convert("RGB"), max_side), quality)
    if candidate.member is not None:
        tar, offset, size = candidate.member
        try:
            with open(tar, "rb") as archive:
                archive.seek(offset)
                encoded = archive.read(size)
        except OSError as error:
            return Skipped(f"unreadable file ({error.strerror})")
        return prepare_encoded(encoded, max_side, quality)
    return prepare_file(candidate.path, max_side, quality)


def prepared_in_order(candidates: list[Candidate], options: argparse.Namespace):
    """Results of `prepare` in candidate order, computed on `options.workers` processes."""
    work = functools.partial(prepare, max_side=options.max_side, quality=options.quality)
    workers = min(options.workers, len(candidates))
    if workers <= 1:
        yield from map(work, candidates)
        return
    chunksize = max(1, min(64, len(candidates) // (workers * 8)))
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap(work, candidates, chunksize=chunksize)


# --- writing ----------------------------------------------------------------------------------------


def _tar_bytes(size: int) -> int:
    """Bytes a member of `size` bytes takes in a tar: header block plus data padded to whole blocks."""
    return TAR_BLOCK + math.ceil(size / TAR_BLOCK) * TAR_BLOCK


def sample_members(
    key: str, prepared: Prepared, candidate: Candidate, classes: list[str] | None
) -> list[tuple[str, bytes]]:
    label = candidate.label
    meta = {
        "source": candidate.source,
        "width": prepared.width,
        "height": prepared.height,
        "label": label,
        "class": None if label is None else classes[label],
    }
    members = [(f"{key}.jpg", prepared.jpeg)]
    if label is not None:
        members.append((f"{key}.cls", str(label).encode("ascii")))
    members.append((f"{key}.lab.i32", struct.pack("<i", -1 if label is None else label)))
    members.append((f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8")))
    return members


class ShardWriter:
    """Writes `<name>-%06d.tar` plus its DALI index, each under a temporary name renamed when complete
    (`pipelines.files`).

    A shard is closed when adding the next sample would make it larger than `max_bytes` (a sample larger
    than that on its own gets a shard of its own).
    """

    def __init__(self, out_dir: Path, name: str, max_bytes: int):
        self.out_dir, self.name, self.max_bytes = out_dir, name, max_bytes
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._tar_temporary: Path | None = None
        self._samples: list[list[IndexEntry]] = []
        self._content_bytes = 0

    def _paths(self) -> tuple[Path, Path]:
        stem = f"{self.name}-{len(self.shards):06d}"
        return self.out_dir / f"{stem}.tar", self.out_dir / f"{stem}.idx"

    def _closed_size(self, content_bytes: int) -> int:
        """Final tar size: two zero end blocks, then padding to a whole record."""
        return math.ceil((content_bytes + 2 * TAR_BLOCK) / TAR_RECORD) * TAR_RECORD

    def add(self, members: list[tuple[str, bytes]]) -> None:
        sample_bytes = sum(_tar_bytes(len(payload)) for _, payload in members)
        if self._tar is not None and self._closed_size(self._content_bytes + sample_bytes) > self.max_bytes:
            self._close_shard()
        if self._tar is None:
            self._tar_temporary = temporary_path(self._paths()[0])
            self._tar = tarfile.open(  # noqa: SIM115 - stays open across add() calls
                self._tar_temporary, "w", format=tarfile.USTAR_FORMAT
            )
        entries = []
        for filename, payload in members:
            self._tar.addfile(self._member_info(filename, len(payload)), io.BytesIO(payload))
            data_offset = self._tar.offset - math.ceil(len(payload) / TAR_BLOCK) * TAR_BLOCK
            entries.append(IndexEntry(filename.partition(".")[2], data_offset, len(payload), filename))
        self._samples.append(entries)
        self._content_bytes += sample_bytes

    @staticmethod
    def _member_info(filename: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(filename)
        info.size, info.mtime, info.mode = size, 0, 0o644
        info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
        return info

    def _close_shard(self) -> None:
        tar_path, index_path = self._paths()
        self._tar.close()
        tar_size = self._tar_temporary.stat().st_size
        bad = [e for sample in self._samples for e in sample if e.offset + e.size > tar_size]
        if bad:  # would make DALI read past the end of the file
            raise RuntimeError(f"index entry {bad[0]} lies beyond the end of {tar_path} ({tar_size} bytes)")
        commit(self._tar_temporary, tar_path)
        atomic_write_text(index_path, format_index(self._samples))
        self.shards.append(
            {
                "tar": tar_path.name,
                "index": index_path.name,
                "num_samples": len(self._samples),
                "bytes": tar_size,
            }
        )
        self._tar, self._tar_temporary, self._samples, self._content_bytes = None, None, [], 0

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar_temporary.unlink(missing_ok=True)
            self._tar, self._tar_temporary = None, None


def _old_output(out_dir: Path, name: str) -> list[Path]:
    """A previous run's shards, indexes and manifest in `out_dir`, and the temporaries of any of them."""
    pattern = re.compile(rf"{re.escape(name)}-\d{{6}}\.(tar|idx)|{re.escape(MANIFEST)}")
    return [p for p in out_dir.iterdir() if pattern.fullmatch(target_name(p.name) or p.name)]


def check_out_dir(out_dir: Path, source: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"OUT_DIR {out_dir} is a file: give a directory")
    if source.is_dir() and out_dir.resolve().is_relative_to(source.resolve()):
        raise CliError(
            f"OUT_DIR {out_dir} is inside SOURCE {source}: write the shards outside the source folder"
        )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise CliError(f"OUT_DIR {out_dir} exists and is not empty: choose another directory or pass --force")


def clear_old_output(out_dir: Path, name: str) -> None:
    """Remove a previous run's shards; the manifest goes first so a half-cleared set never looks valid."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(_old_output(out_dir, name), key=lambda p: p.name != MANIFEST):
        path.unlink()


def write_shards(
    source: Source, ordered: list[Candidate], options: argparse.Namespace
) -> tuple[list[dict], list[dict]]:
    """Decode, encode and write every candidate in order; returns (shard entries, skipped files)."""
    writer = ShardWriter(Path(options.out_dir), options.name, options.shard_size)
    skipped = list(source.skipped)
    written = 0
    results = prepared_in_order(ordered, options)
    try:
        for candidate, result in tqdm(
            zip(ordered, results), total=len(ordered), desc=PROG, unit="img", file=sys.stderr
        ):
            if isinstance(result, Skipped):
                skipped.append({"path": candidate.source, "reason": result.reason})
                continue
            writer.add(sample_members(f"{written:09d}", result, candidate, source.classes))
            written += 1
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        results.close()
    return shards, sorted(skipped, key=lambda entry: entry["path"])


def build_manifest(
    source: Source, shards: list[dict], skipped: list[dict], options: argparse.Namespace
) -> dict:
    return {
        "format": FORMAT,
        "name": options.name,
        "num_samples": sum(shard["num_samples"] for shard in shards),
        "labeled": source.classes is not None,
        "classes": source.classes,
        "shards": shards,
        "skipped": skipped,
        "source": source.description,
        "seed": options.seed,
        "tool_version": TOOL_VERSION,
        "options": {
            "shard_size": options.shard_size,
            "max_side": options.max_side,
            "quality": options.quality,
            "limit": options.limit,
            "source_kind": source.kind,
            "keep_labels": options.keep_labels,
        },
    }


def _reason_kind(reason: str) -> str:
    return reason.split(" (", 1)[0]


def summary_lines(manifest: dict, out_dir: Path | str, limit: int | None, available: int) -> list[str]:
    total_bytes = sum(shard["bytes"] for shard in manifest["shards"])
    classes = f"{len(manifest['classes'])} classes" if manifest["labeled"] else "unlabeled"
    lines = [
        f"wrote {manifest['num_samples']} samples ({classes}) in {len(manifest['shards'])} shard(s), "
        f"{total_bytes / 1e6:.1f} MB, to {out_dir}"
    ]
    skipped = manifest["skipped"]
    if skipped:
        lines.append(f"skipped {len(skipped)} file(s) (listed in {out_dir}/{MANIFEST}):")
        for kind, count in sorted(Counter(_reason_kind(s["reason"]) for s in skipped).items()):
            examples = [s["path"] for s in skipped if _reason_kind(s["reason"]) == kind][:SUMMARY_EXAMPLES]
            more = ", ..." if count > len(examples) else ""
            lines.append(f"  {count} {kind}: {', '.join(examples)}{more}")
    if limit and limit > available:
        lines.append(f"note: --limit {limit} is more than the {available} files found, so all were taken")
    return lines


def make_shards(options: argparse.Namespace) -> list[str]:
    source_path, out_dir = Path(options.source), Path(options.out_dir)
    if not source_path.exists():
        raise CliError(
            f"SOURCE {source_path} does not exist: give an image folder, a list file, an IDX images file or a shard set"
        )
    check_out_dir(out_dir, source_path, options.force)
    source = discover(options)
    rng = np.random.default_rng(options.seed)
    chosen = choose(source.candidates, options.limit, rng)
    ordered = [chosen[i] for i in rng.permutation(len(chosen))]
    clear_old_output(out_dir, options.name)
    try:
        shards, skipped = write_shards(source, ordered, options)
    except OSError as error:
        raise CliError(
            f"writing to OUT_DIR {out_dir} failed ({error}): free space or choose another OUT_DIR"
        ) from None
    if not shards:
        kinds = ", ".join(sorted({_reason_kind(s["reason"]) for s in skipped}))
        raise CliError(
            f"none of the {len(ordered)} files in SOURCE {source_path} is a usable image ({kinds})"
        )
    manifest = build_manifest(source, shards, skipped, options)
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return summary_lines(manifest, out_dir, options.limit, len(source.candidates))


# --- command line -----------------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def parse_size(text: str) -> int:
    """Bytes from e.g. `256MB`, `12M`, `500k`, `1GiB` (k/M/G are powers of 1000, Ki/Mi/Gi of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 256MB, 12M or 500k")
    value = float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").lower()]
    if value < TAR_RECORD:
        raise argparse.ArgumentTypeError(f"{text!r} is below the {TAR_RECORD}-byte minimum")
    return int(value)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _seed(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def _quality(text: str) -> int:
    value = _positive_int(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a JPEG quality in 1..100")
    return value


def _label_list(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts) or len(set(map(int, parts))) != len(parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of distinct integer labels")
    return [int(part) for part in parts]


def _class_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of distinct, non-empty class names")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG,
        description=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", nargs="?", metavar="SOURCE", help="image folder, list file, IDX images file or shard set"
    )
    parser.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help="directory to write the shard set to")
    parser.add_argument(
        "--verify", metavar="OUT_DIR", help="check an existing shard set instead of writing one"
    )
    parser.add_argument(
        "--source-kind",
        choices=SOURCE_KINDS,
        metavar="KIND",
        help="imagefolder, folder, list, idx or shards (default: detected)",
    )
    parser.add_argument("--name", help="shard file prefix (default: OUT_DIR's name)")
    parser.add_argument(
        "--shard-size",
        type=parse_size,
        metavar="SIZE",
        default="256MB",
        help="target bytes per tar (default 256MB)",
    )
    parser.add_argument(
        "--max-side", type=_positive_int, metavar="N", help="downscale so the longer side is at most N pixels"
    )
    parser.add_argument(
        "--quality", type=_quality, metavar="Q", default=95, help="JPEG quality when re-encoding (default 95)"
    )
    parser.add_argument(
        "--seed", type=_seed, metavar="N", default=0, help="shuffle and --limit seed (default 0)"
    )
    parser.add_argument(
        "--limit", type=_positive_int, metavar="N", help="take N samples (stratified by class when labeled)"
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        default=os.cpu_count() or 1,
        help="decode processes (default: all cores)",
    )
    parser.add_argument(
        "--labels", metavar="FILE", help="IDX labels file (default: the images file with labels-idx1)"
    )
    parser.add_argument(
        "--classes", type=_class_list, metavar="A,B,...", help="comma list of class names, indexed by label"
    )
    parser.add_argument(
        "--keep-labels",
        type=_label_list,
        metavar="L,L,...",
        help="keep only the samples of these labels, renumbered 0..K-1 in this order",
    )
    parser.add_argument("--force", action="store_true", help="overwrite the shards in a non-empty OUT_DIR")
    return parser


def _check_arguments(parser: argparse.ArgumentParser, options: argparse.Namespace) -> None:
    if options.verify:
        if options.source or options.out_dir:
            parser.error("--verify OUT_DIR takes no SOURCE or second OUT_DIR")
        return
    if not options.out_dir:
        parser.error("SOURCE and OUT_DIR are required (or --verify OUT_DIR)")
    options.name = options.name or (options.out_dir.rstrip("/").rsplit("/", 1)[-1]
                                    if options.out_dir.startswith("s3://") else Path(options.out_dir).resolve().name)
    if "/" in options.name or options.name.startswith(".") or not options.name:
        parser.error(f"--name {options.name!r} must be a plain file-name prefix")


def verify(out_dir: str) -> int:
    problems = verify_shard_set(out_dir)
    for problem in problems:
        print(f"{PROG}: {problem}", file=sys.stderr)
    if problems:
        print(f"{PROG}: error: {out_dir} failed verification ({len(problems)} problem(s))", file=sys.stderr)
        return 1
    manifest = json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8"))
    print(
        f"OK {out_dir}: {manifest['num_samples']} samples in {len(manifest['shards'])} shard(s); "
        "indexes match the tars, every image decodes, labels agree"
    )
    return 0


def make_shards_in_s3(options: argparse.Namespace) -> list[str]:
    """Write the set into a local staging folder (under the fastssl cache), verify it, upload it to
    OUT_DIR's prefix with the manifest last, then remove the staging folder."""
    from pipelines.s3 import S3Prefix, cache_root, list_objects, upload_shard_set

    url = options.out_dir
    try:
        where = S3Prefix.parse(url)
        existing = list_objects(where)  # the bucket and the credentials are checked before any work
    except ShardError as error:
        raise CliError(str(error)) from None
    if existing and not options.force:
        raise CliError(f"OUT_DIR {url} already holds {len(existing)} object(s): choose another prefix or pass "
                       "--force (replaces the set there)")
    (cache_root() / "staging").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{options.name}-", dir=cache_root() / "staging") as staging:
        lines = make_shards(argparse.Namespace(**{**vars(options), "out_dir": staging, "force": True}))
        problems = verify_shard_set(staging)
        if problems:
            raise CliError(f"the set written to {staging} failed verification ({problems[0]}); nothing was "
                           "uploaded")
        manifest = json.loads((Path(staging) / MANIFEST).read_text(encoding="utf-8"))
        files = [name for shard in manifest["shards"] for name in (shard["tar"], shard["index"])] + [MANIFEST]
        print(f"uploading {len(files)} files to {url}", file=sys.stderr)
        try:
            # a replaced set's manifest, tars and indexes go; other objects under the prefix stay
            stale = [name for name in existing if name == MANIFEST or re.fullmatch(r".+-\d{6}\.(tar|idx)", name)]
            upload_shard_set(Path(staging), where, files, stale)
        except ShardError as error:
            raise CliError(f"{error} (the upload is incomplete: {url} has no {MANIFEST})") from None
    return [line.replace(staging, url) for line in lines]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    _check_arguments(parser, options)
    if options.verify:
        return verify(options.verify)
    try:
        lines = make_shards_in_s3(options) if options.out_dir.startswith("s3://") else make_shards(options)
    except CliError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted; OUT_DIR {options.out_dir} is incomplete (no {MANIFEST})", file=sys.stderr
        )
        return 130
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
