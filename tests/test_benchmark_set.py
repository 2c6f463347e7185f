"""tools/make_benchmark_set.py: ImageNet-like JPEG shards that the real DALI reader reads."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipelines.shards import open_shard_set, verify_shard_set
from pipelines.spec import preset
from pipelines.stack import InputStack
from tools.make_benchmark_set import main, pink_noise


def test_pink_noise_has_a_one_over_f_amplitude_spectrum():
    field = pink_noise(np.random.default_rng(0), 256, 256, exponent=1.0)
    amplitude = np.abs(np.fft.fft2(field))
    fy, fx = np.meshgrid(np.fft.fftfreq(256), np.fft.fftfreq(256), indexing="ij")
    radius = np.sqrt(fx**2 + fy**2)
    low = amplitude[(radius > 0.02) & (radius < 0.04)].mean()
    high = amplitude[(radius > 0.16) & (radius < 0.32)].mean()
    assert 5 < low / high < 13  # 1/f: 8x between bands 8x apart in frequency


def test_writes_photo_sized_jpeg_shards_that_the_stack_reads(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main([str(out), "--count", "6", "--seed", "1"]) == 0
    shards = open_shard_set(out)
    assert verify_shard_set(out) == []
    sizes, dims = [], []
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()
                    image = Image.open(io.BytesIO(data))
                    sizes.append(len(data))
                    dims.append(image.size)
                    assert image.format == "JPEG" and image.mode == "RGB"
    assert len(sizes) == 6
    assert all(40_000 < size < 250_000 for size in sizes), sizes
    assert all(250 <= w <= 560 and 220 <= h <= 480 for w, h in dims), dims
    stack = InputStack(preset("swav").with_multicrop("2x48+2x32"), shards, 2, device="cpu", num_threads=1)
    batch = next(stack)
    assert [tuple(v.shape) for v in batch.views] == [(4, 3, 48, 48), (4, 3, 32, 32)]


def test_a_non_empty_output_folder_is_refused_without_force(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--count", "1"])
    assert exit_.value.code == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"
