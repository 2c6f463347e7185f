"""tools/make_shards.py and pipelines/shards.py on real files: odd formats, bad files, real DALI reads."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.files import temporary_path
from pipelines.shards import ShardError, open_shard_set, verify_shard_set
from tools.make_shards import main

REPO = Path(__file__).resolve().parents[1]
RED, BLUE = (220, 20, 20), (20, 20, 220)


# --- fixtures -------------------------------------------------------------------------------------------


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random RGB image (compresses like a photo, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def _jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def _rotated_jpeg() -> bytes:
    """Stored 40x20 with a red left half; EXIF orientation 6 says: display rotated 90 degrees clockwise."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg_bytes(image, exif=exif.tobytes())


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _save(path: Path, image: Image.Image, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


GOOD = {  # path -> class, for every file that must become a sample
    "birds/a.jpg": "birds",
    "birds/b.jpg": "birds",
    "cats/plain.jpg": "cats",
    "cats/rotated.jpg": "cats",
    "cats/cmyk.jpg": "cats",
    "cats/deep/gray.png": "cats",
    "dogs/alpha.png": "dogs",
    "dogs/palette.gif": "dogs",
    "dogs/palette_transparent.png": "dogs",
    "dogs/sixteen.png": "dogs",
}
BAD = {
    "cats/corrupt.jpg": "not an image",
    "cats/truncated.jpg": "truncated image",
    "dogs/empty.jpg": "empty file",
    "dogs/fake.png": "not an image",
    "dogs/notes.txt": "not an image",
    "dogs/weather.bufr": "unsupported format",
}


def make_image_tree(root: Path) -> Path:
    _write(root / "birds/a.jpg", _jpeg_bytes(_photo(30, 20, 1)))
    _write(root / "birds/b.jpg", _jpeg_bytes(_photo(20, 30, 2)))
    _write(root / "cats/plain.jpg", _jpeg_bytes(_photo(32, 24, 3)))
    _write(root / "cats/rotated.jpg", _rotated_jpeg())
    _save(root / "cats/cmyk.jpg", _photo(24, 24, 4).convert("CMYK"), format="JPEG")
    _save(root / "cats/deep/gray.png", _photo(16, 16, 5).convert("L"))
    _save(root / "dogs/alpha.png", Image.new("RGBA", (16, 12), (0, 0, 0, 0)))  # fully transparent black
    _save(root / "dogs/palette.gif", _photo(16, 16, 6).convert("P"))
    transparent = Image.new("P", (12, 12), 0)
    transparent.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    _save(root / "dogs/palette_transparent.png", transparent, transparency=0)
    _save(root / "dogs/sixteen.png", Image.fromarray(np.full((10, 14), 32768, dtype=np.uint16)))
    _write(root / "cats/corrupt.jpg", np.random.default_rng(7).bytes(2000))
    whole = _jpeg_bytes(_photo(64, 64, 8))
    _write(root / "cats/truncated.jpg", whole[: len(whole) // 2])
    _write(root / "dogs/empty.jpg", b"")
    _write(root / "dogs/fake.png", b"this is not a png\n")
    _write(root / "dogs/notes.txt", b"some notes\n")
    _write(root / "dogs/weather.bufr", b"BUFR" + bytes(64))  # PIL identifies it but has no decoder
    _write(root / "cats/.hidden.jpg", b"ignored: hidden")
    return root


def write_idx(
    path: Path, images: np.ndarray, labels: np.ndarray | None = None, labels_path: Path | None = None
):
    header = b"\x00\x00\x08\x03" + struct.pack(">3I", *images.shape)
    path.write_bytes(gzip.compress(header + images.astype(np.uint8).tobytes(), mtime=0))
    if labels is not None:
        labels_path = labels_path or path.with_name(path.name.replace("images-idx3", "labels-idx1"))
        labels_path.write_bytes(
            gzip.compress(
                b"\x00\x00\x08\x01" + struct.pack(">I", len(labels)) + labels.astype(np.uint8).tobytes(),
                mtime=0,
            )
        )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_shards.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def build(source: Path, out_dir: Path, *args: str) -> int:
    return main([str(source), str(out_dir), "--workers", "1", *map(str, args)])


def read_samples(out_dir: Path) -> list[dict]:
    """Every sample of a shard set in tar order: {"key", ext: bytes...}."""
    samples = []
    for tar in sorted(out_dir.glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive:
                key, _, ext = member.name.partition(".")
                if not samples or samples[-1]["key"] != key:
                    samples.append({"key": key, "members": []})
                samples[-1][ext] = archive.extractfile(member).read()
                samples[-1]["members"].append(member)
    return samples


def meta(sample: dict) -> dict:
    return json.loads(sample["json"])


def decoded(sample: dict) -> Image.Image:
    image = Image.open(io.BytesIO(sample["jpg"]))
    image.load()
    return image


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("tree") / "src")


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory) -> Path:
    """The tree as shards small enough that the set spans several tars."""
    out_dir = tmp_path_factory.mktemp("built") / "pets"
    assert build(tree, out_dir, "--shard-size", "20k") == 0
    return out_dir


@pytest.fixture(scope="module")
def by_source(built) -> dict[str, dict]:
    return {meta(sample)["source"]: sample for sample in read_samples(built)}


# --- image folder: counts, skips, labels, conversions ------------------------------------------------


def test_counts_skips_and_classes(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["format"] == "fastssl-shards/1" and manifest["name"] == "pets"
    assert manifest["num_samples"] == len(GOOD) and manifest["labeled"] is True
    assert manifest["classes"] == ["birds", "cats", "dogs"]
    assert manifest["source"]["kind"] == "imagefolder"
    assert {s["path"]: s["reason"].split(" (")[0] for s in manifest["skipped"]} == BAD
    assert len(manifest["shards"]) > 1
    assert sum(shard["num_samples"] for shard in manifest["shards"]) == len(GOOD)
    for shard in manifest["shards"]:
        assert (built / shard["tar"]).stat().st_size == shard["bytes"]
        assert shard["bytes"] <= 20_000 or shard["num_samples"] == 1
    assert sorted(p.name for p in built.iterdir() if p.suffix not in (".tar", ".idx")) == ["manifest.json"]


def test_samples_have_labels_members_in_order_and_reproducible_headers(built, by_source):
    classes = ["birds", "cats", "dogs"]
    assert set(by_source) == set(GOOD)
    keys = []
    for source, sample in by_source.items():
        label = classes.index(GOOD[source])
        keys.append(sample["key"])
        assert [m.name.partition(".")[2] for m in sample["members"]] == ["jpg", "cls", "lab.i32", "json"]
        assert sample["cls"] == str(label).encode() and struct.unpack("<i", sample["lab.i32"])[0] == label
        info = meta(sample)
        assert list(info) == ["source", "width", "height", "label", "class"]
        assert (info["label"], info["class"]) == (label, GOOD[source])
        assert decoded(sample).size == (info["width"], info["height"])
        for member in sample["members"]:
            assert (member.mtime, member.uid, member.gid, member.uname, member.gname, member.mode) == (
                0,
                0,
                0,
                "",
                "",
                0o644,
            )
    assert sorted(keys) == [f"{i:09d}" for i in range(len(GOOD))]


def test_every_output_is_an_rgb_jpeg_and_plain_jpegs_keep_their_bytes(tree, by_source):
    for sample in by_source.values():
        image = decoded(sample)
        assert (image.format, image.mode) == ("JPEG", "RGB")
    assert by_source["cats/plain.jpg"]["jpg"] == (tree / "cats/plain.jpg").read_bytes()
    assert by_source["birds/a.jpg"]["jpg"] == (tree / "birds/a.jpg").read_bytes()
    assert by_source["cats/cmyk.jpg"]["jpg"] != (tree / "cats/cmyk.jpg").read_bytes()


def test_exif_orientation_is_applied(by_source):
    image = decoded(by_source["cats/rotated.jpg"])
    assert image.size == (20, 40)  # 40x20 stored, rotated for display
    pixels = np.asarray(image).astype(int)
    assert np.abs(pixels[5, 10] - RED).max() < 40 and np.abs(pixels[35, 10] - BLUE).max() < 40
    assert image.getexif().get(0x0112) is None


def test_alpha_composites_on_white_and_16_bit_scales_to_8_bit(by_source):
    assert np.asarray(decoded(by_source["dogs/alpha.png"])).min() >= 250
    assert np.asarray(decoded(by_source["dogs/palette_transparent.png"])).min() >= 250
    sixteen = np.asarray(decoded(by_source["dogs/sixteen.png"])).astype(int)
    assert np.abs(sixteen - 128).max() <= 2  # 32768 / 65535 of full scale, not clipped to 255


def test_max_side_downscales_and_reencodes(tree, tmp_path):
    assert build(tree, tmp_path / "out", "--max-side", "16", "--quality", "80") == 0
    samples = {meta(s)["source"]: s for s in read_samples(tmp_path / "out")}
    assert len(samples) == len(GOOD)
    for sample in samples.values():
        assert max(decoded(sample).size) <= 16
    assert decoded(samples["cats/plain.jpg"]).size == (16, 12)
    assert samples["cats/plain.jpg"]["jpg"] != (tree / "cats/plain.jpg").read_bytes()


def test_summary_counts_skip_reasons(tree, tmp_path, capsys):
    assert build(tree, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert f"wrote {len(GOOD)} samples (3 classes) in 1 shard(s)" in out
    assert "3 not an image: cats/corrupt.jpg, dogs/fake.png, dogs/notes.txt" in out
    assert "1 truncated image: cats/truncated.jpg" in out and "1 empty file: dogs/empty.jpg" in out
    assert "1 unsupported format: dogs/weather.bufr" in out


# --- the real DALI reader --------------------------------------------------------------------------------


def dali_epoch(shard_set) -> tuple[list[bytes], list[int]]:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=shard_set.num_samples, num_threads=1, device_id=None)
    def read_all():
        jpegs, labels = fn.readers.webdataset(
            paths=[str(path) for path in shard_set.tars],
            index_paths=[str(path) for path in shard_set.indexes],
            ext=["jpg", "lab.i32"],
            dtypes=[types.UINT8, types.INT32],
            missing_component_behavior="error",
            name="reader",
        )
        return jpegs, labels

    pipe = read_all()
    pipe.build()
    assert pipe.epoch_size("reader") == shard_set.num_samples
    jpegs, labels = pipe.run()
    return [np.asarray(jpegs[i]).tobytes() for i in range(len(jpegs))], [
        int(np.asarray(labels[i])[0]) for i in range(len(labels))
    ]


def test_dali_reads_the_indexes_and_sees_the_written_bytes_and_labels(built):
    shard_set = open_shard_set(built, need_labels=True)
    samples = read_samples(built)
    jpegs, labels = dali_epoch(shard_set)
    assert jpegs == [sample["jpg"] for sample in samples]
    assert labels == [meta(sample)["label"] for sample in samples]


def test_indexes_are_byte_identical_to_wds2idx(built, tmp_path):
    wds2idx = shutil.which("wds2idx") or str(Path(sys.executable).with_name("wds2idx"))
    for tar in sorted(built.glob("*.tar")):
        reference = tmp_path / tar.with_suffix(".idx").name
        subprocess.run([wds2idx, str(tar), str(reference)], check=True, capture_output=True)
        assert reference.read_bytes() == tar.with_suffix(".idx").read_bytes()


# --- determinism and overwriting -------------------------------------------------------------------------


def _files(out_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out_dir.iterdir())}


def test_same_seed_is_byte_identical_for_any_worker_count_and_another_seed_reorders(built, tree, tmp_path):
    again = tmp_path / "again" / "pets"
    result = run_cli(tree, again, "--shard-size", "20k", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert _files(again) == _files(built)
    other = tmp_path / "other" / "pets"
    assert build(tree, other, "--shard-size", "20k", "--seed", "1") == 0
    order = [meta(sample)["source"] for sample in read_samples(built)]
    other_order = [meta(sample)["source"] for sample in read_samples(other)]
    assert sorted(order) == sorted(other_order) and order != other_order


def test_refuses_a_non_empty_out_dir_without_force(tree, tmp_path):
    out_dir = tmp_path / "out"
    assert build(tree, out_dir, "--seed", "3") == 0
    result = run_cli(tree, out_dir, "--seed", "4")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("make_shards: error: ")
    assert str(out_dir) in result.stderr and "--force" in result.stderr
    (out_dir / "keep.txt").write_text("not ours")
    assert build(tree, out_dir, "--seed", "4", "--force", "--shard-size", "20k") == 0
    assert json.loads((out_dir / "manifest.json").read_text())["seed"] == 4
    assert (out_dir / "keep.txt").exists()
    assert verify_shard_set(out_dir) == []


def test_force_also_removes_the_temporaries_an_interrupted_run_left(tree, tmp_path):
    out_dir = tmp_path / "out"
    assert build(tree, out_dir, "--seed", "3") == 0
    leftovers = [temporary_path(out_dir / "out-000007.tar"), temporary_path(out_dir / "manifest.json")]
    for leftover in leftovers:
        leftover.write_bytes(b"half a file")
    other = temporary_path(out_dir / "notes.txt")  # not the shard set's: kept
    assert build(tree, out_dir, "--force") == 0
    assert not any(leftover.exists() for leftover in leftovers) and other.exists()
    assert not [path for path in out_dir.iterdir() if path.name.endswith(".tmp") and path != other]
    assert verify_shard_set(out_dir) == []


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["{tmp}/missing", "{tmp}/out"], "{tmp}/missing"),
        (["{tmp}/empty_dir", "{tmp}/out"], "no images found"),
        (["{tmp}/list.txt", "{tmp}/out", "--shard-size", "12 parsecs"], "--shard-size"),
        (["{tmp}/list.txt"], "OUT_DIR"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(tmp_path, args, fragment):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "list.txt").write_text("a.jpg\n")
    result = run_cli(*[arg.format(tmp=tmp_path) for arg in args])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("make_shards: error: ")
    assert fragment.format(tmp=tmp_path) in result.stderr and "Traceback" not in result.stderr


# --- other sources ---------------------------------------------------------------------------------------


def test_list_source_with_class_names_comments_and_a_missing_file(tree, tmp_path):
    listing = tmp_path / "lists" / "train.csv"
    listing.parent.mkdir()
    listing.write_text(
        "path,label\n# a comment\n\n"
        f"{os.path.relpath(tree, listing.parent)}/cats/plain.jpg, tabby\n"
        f"{tree}/birds/a.jpg,robin\n"
        "nowhere.jpg,robin\n"
    )
    assert build(listing, tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "list" and manifest["classes"] == ["robin", "tabby"]
    assert manifest["skipped"] == [{"path": "nowhere.jpg", "reason": "missing file"}]
    labels = {meta(s)["source"].rsplit("/", 1)[-1]: meta(s)["label"] for s in read_samples(tmp_path / "out")}
    assert labels == {"plain.jpg": 1, "a.jpg": 0}


def test_list_source_with_integer_labels_and_names_from_classes(tree, tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text(f"{tree}/cats/plain.jpg,2\n{tree}/birds/a.jpg,0\n")
    assert build(listing, tmp_path / "out", "--classes", "zero,one,two") == 0
    samples = read_samples(tmp_path / "out")
    assert sorted((meta(s)["label"], meta(s)["class"]) for s in samples) == [(0, "zero"), (2, "two")]


def test_unlabeled_folder(tree, tmp_path, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    for name in ("cats/plain.jpg", "birds/a.jpg", "dogs/alpha.png"):
        shutil.copy(tree / name, folder / name.replace("/", "_"))
    assert build(folder, tmp_path / "flat_out") == 0
    assert json.loads((tmp_path / "flat_out" / "manifest.json").read_text())["source"]["kind"] == "folder"

    (folder / "nested").mkdir()
    shutil.copy(tree / "birds/b.jpg", folder / "nested" / "b.jpg")
    assert build(folder, tmp_path / "out") == 2  # images and a sub-folder at the top: ambiguous
    assert "--source-kind folder" in capsys.readouterr().err
    assert build(folder, tmp_path / "out", "--source-kind", "folder") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "folder" and manifest["num_samples"] == 4
    assert manifest["labeled"] is False and manifest["classes"] is None
    for sample in read_samples(tmp_path / "out"):
        assert "cls" not in sample and struct.unpack("<i", sample["lab.i32"])[0] == -1
        assert (meta(sample)["label"], meta(sample)["class"]) == (None, None)
    shard_set = open_shard_set(tmp_path / "out")
    assert not shard_set.labeled and dali_epoch(shard_set)[1] == [-1] * 4
    with pytest.raises(ShardError, match="has no labels"):
        open_shard_set(tmp_path / "out", need_labels=True)


def test_idx_source(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, size=(30, 8, 6)), np.arange(30) % 3
    write_idx(tmp_path / "fashion-train-images-idx3-ubyte.gz", images, labels)
    assert build(tmp_path / "fashion-train-images-idx3-ubyte.gz", tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "idx" and manifest["num_samples"] == 30
    assert (
        manifest["classes"][:3] == ["T-shirt/top", "Trouser", "Pullover"] and len(manifest["classes"]) == 10
    )
    for sample in read_samples(tmp_path / "out"):
        info = meta(sample)
        index = int(info["source"].rsplit("#", 1)[1])
        assert info["source"] == f"idx:fashion-train-images-idx3-ubyte.gz#{index}"
        assert (info["width"], info["height"], info["label"]) == (6, 8, labels[index])
        image = decoded(sample)
        assert (image.mode, image.size) == ("RGB", (6, 8))
        assert np.abs(np.asarray(image)[..., 0].astype(int) - images[index]).mean() < 12


def test_idx_digit_classes_explicit_labels_and_count_mismatch(tmp_path):
    images = np.zeros((5, 4, 4))
    write_idx(
        tmp_path / "digits.idx3", images, np.array([0, 1, 2, 3, 9]), labels_path=tmp_path / "digit-labels"
    )
    assert build(tmp_path / "digits.idx3", tmp_path / "out", "--labels", tmp_path / "digit-labels") == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["classes"] == [
        str(i) for i in range(10)
    ]
    write_idx(tmp_path / "short.idx3", images, np.array([0, 1, 2]), labels_path=tmp_path / "short-labels")
    result = run_cli(tmp_path / "short.idx3", tmp_path / "out2", "--labels", tmp_path / "short-labels")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "short-labels has 3 labels" in result.stderr and "--labels" in result.stderr


def test_limit_is_stratified_and_seeded(tmp_path):
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    write_idx(tmp_path / "images-idx3", np.zeros((100, 2, 2)), labels)
    picks = []
    for seed in (0, 1):
        out_dir = tmp_path / f"seed{seed}"
        assert build(tmp_path / "images-idx3", out_dir, "--limit", "10", "--seed", str(seed)) == 0
        chosen = [meta(s) for s in read_samples(out_dir)]
        assert np.bincount([info["label"] for info in chosen]).tolist() == [5, 3, 2]
        picks.append(sorted(info["source"] for info in chosen))
    assert picks[0] != picks[1]


def test_a_shard_set_source_keeps_the_bytes_and_keep_labels_renumbers(built, tmp_path):
    original = {meta(s)["source"]: s for s in read_samples(built)}
    assert build(built, tmp_path / "all", "--shard-size", "1MB") == 0
    again = {meta(s)["source"]: s for s in read_samples(tmp_path / "all")}
    assert again.keys() == original.keys()
    assert all(again[k]["jpg"] == original[k]["jpg"] and again[k]["cls"] == original[k]["cls"] for k in again)
    assert json.loads((tmp_path / "all" / "manifest.json").read_text())["source"]["kind"] == "shards"

    assert build(built, tmp_path / "kept", "--keep-labels", "2,0") == 0  # dogs, birds
    manifest = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    assert manifest["classes"] == ["dogs", "birds"] and manifest["source"]["keep_labels"] == [2, 0]
    kept = {meta(s)["source"]: s for s in read_samples(tmp_path / "kept")}
    expected = {k for k, s in original.items() if meta(s)["label"] in (0, 2)}
    assert kept.keys() == expected and manifest["num_samples"] == len(expected) > 0
    for key, sample in kept.items():
        new_label = {2: 0, 0: 1}[meta(original[key])["label"]]
        assert (meta(sample)["label"], meta(sample)["class"]) == (new_label, manifest["classes"][new_label])
        assert struct.unpack("<i", sample["lab.i32"])[0] == new_label and sample["jpg"] == original[key]["jpg"]
    assert run_cli("--verify", tmp_path / "kept").returncode == 0


def test_keep_labels_errors_are_one_line(built, tree, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(tree / "cats/plain.jpg", flat / "plain.jpg")
    for source, labels, fragment in ((built, "0,3", "--keep-labels 3:"), (flat, "0", "is unlabeled")):
        result = run_cli(source, tmp_path / "out", "--keep-labels", labels)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("make_shards: error: ") and fragment in result.stderr
    result = run_cli(built, tmp_path / "out", "--keep-labels", "1,1")
    assert result.returncode == 2 and "distinct integer labels" in result.stderr


# --- verification and open_shard_set -------------------------------------------------------------------


def _copy(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "copy"))


def _truncate(tar: Path) -> None:
    with open(tar, "r+b") as file:
        file.truncate(tar.stat().st_size // 2)


def test_verify_passes_on_good_output_and_names_a_truncated_tar(built, tmp_path):
    result = run_cli("--verify", built)
    assert result.returncode == 0 and result.stdout.startswith("OK")
    copy = _copy(built, tmp_path)
    tar = sorted(copy.glob("*.tar"))[1]
    _truncate(tar)
    result = run_cli("--verify", copy)
    assert result.returncode != 0 and tar.name in result.stderr and "truncated" in result.stderr


def test_verify_catches_a_label_that_disagrees_with_the_metadata(built, tmp_path):
    copy = _copy(built, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["classes"] = ["birds", "dogs", "cats"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_shard_set(copy)
    assert problems and all("labels disagree" in problem for problem in problems)


def test_open_shard_set_errors_for_a_missing_or_empty_directory(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        open_shard_set(tmp_path / "nowhere")
    with pytest.raises(
        ShardError, match=f"no shards in {tmp_path}: run tools/make_shards.py SOURCE {tmp_path}"
    ):
        open_shard_set(tmp_path)


def _remove_an_index(root: Path) -> str:
    index = sorted(root.glob("*.idx"))[0]
    index.unlink()
    tar = index.with_suffix(".tar")
    fix = f"rebuild with tools/make_shards.py or run wds2idx {tar} {index}"
    return f"missing index {index.name} for {tar.name}: {fix}"


def _truncate_a_tar(root: Path) -> str:
    tar = sorted(root.glob("*.tar"))[-1]
    _truncate(tar)
    return f"{tar} is truncated"


def _drop_an_index_line(root: Path) -> str:
    index = sorted(root.glob("*.idx"))[0]
    header, *lines = index.read_text().splitlines()
    index.write_text("\n".join([f"v1.2 {len(lines) - 1}", *lines[:-1]]) + "\n")
    return f"index {index} lists {len(lines) - 1} samples but manifest.json says {len(lines)}"


@pytest.mark.parametrize("damage", [_remove_an_index, _truncate_a_tar, _drop_an_index_line])
def test_open_shard_set_refuses_a_damaged_set_in_one_line(built, tmp_path, damage):
    copy = _copy(built, tmp_path)
    expected = damage(copy)
    with pytest.raises(ShardError) as error:
        open_shard_set(copy)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_verify_catches_an_index_offset_that_open_cannot(built, tmp_path):
    copy = _copy(built, tmp_path)
    index = sorted(copy.glob("*.idx"))[0]
    header, first, *rest = index.read_text().splitlines()
    fields = first.split()
    fields[1] = str(int(fields[1]) + 512)  # still inside the tar, but not where the jpg is
    index.write_text("\n".join([header, " ".join(fields), *rest]) + "\n")
    open_shard_set(copy)
    assert any("stale index" in problem and index.name in problem for problem in verify_shard_set(copy))


def test_open_shard_set_returns_the_set(built):
    shard_set = open_shard_set(built / "manifest.json")
    assert shard_set.root == built.resolve() and shard_set.labeled
    assert shard_set.num_samples == sum(shard_set.counts) == len(GOOD)
    assert [path.suffix for path in shard_set.tars] == [".tar"] * len(shard_set.counts)
    assert [path.with_suffix(".tar") for path in shard_set.indexes] == shard_set.tars
    assert shard_set.classes == ["birds", "cats", "dogs"]
