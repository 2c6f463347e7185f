"""tools/benchmark_quality.py end to end on a tiny Fashion-MNIST look-alike (IDX files written here), and
its one-line error when the dataset is missing. The real dataset is never needed."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_idx(folder: Path, prefix: str, count: int, seed: int) -> None:
    """`count` 28x28 images of 10 classes, each class a bright square at its own place, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count, dtype=np.uint8) % 10
    images = rng.integers(0, 40, size=(count, 28, 28), dtype=np.uint8)
    for index, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        images[index, 4 + 12 * row : 12 + 12 * row, 1 + 5 * col : 6 + 5 * col] = 230
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as stream:
        stream.write(struct.pack(">4B3I", 0, 0, 8, 3, count, 28, 28) + images.tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as stream:
        stream.write(struct.pack(">4BI", 0, 0, 8, 1, count) + labels.tobytes())


def run(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "tools/benchmark_quality.py", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


TINY_TRAIN = "--backbone resnet10t --stem standard --multicrop 2x32+2x16 --data-threads 1 --log-every 1"


def run_on_look_alike(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    """benchmark_quality on 320 training and 80 test images of the look-alike, one thread, work dir
    tmp_path/work; `args` give the budget, --train-options and --name."""
    data = tmp_path / "idx"
    data.mkdir()
    write_idx(data, "train", 320, seed=0)
    write_idx(data, "t10k", 80, seed=1)
    result = run("--method", "swav", "--fashion-mnist", data, "--work-dir", tmp_path / "work", "--threads", 1,
                 *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_missing_dataset_is_one_line_naming_the_folder_and_the_package(tmp_path):
    result = run("--fashion-mnist", tmp_path / "nowhere", "--work-dir", tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(tmp_path / "nowhere") in lines[0]
    assert "apt-get install dataset-fashion-mnist" in lines[0]


@pytest.mark.slow
def test_pretrains_then_reports_knn_linear_random_init_and_pixels(tmp_path):
    run_on_look_alike(tmp_path, "--epochs", 1, "--train-options", TINY_TRAIN + " --batch-size 32",
                      "--name", "tiny")
    report = json.loads((tmp_path / "work" / "tiny" / "quality.json").read_text())
    assert report["budget"]["steps"] == 10 and report["budget"]["epochs"] == pytest.approx(1.0)
    for part in ("pretrained", "random_init", "pixels"):
        assert set(report[part]["knn"]) == {"20", "200"}
        assert 0 <= report[part]["linear"]["top1"] <= 100
    # the look-alike's classes are separable in pixel space
    assert report["pixels"]["knn"]["20"]["top1"] == 100.0 and report["pixels"]["linear"]["top1"] == 100.0
    row = (tmp_path / "work" / "tiny" / "quality.md").read_text().splitlines()[-1]
    assert row.startswith("| swav | resnet10t | 10 steps") and "| 100.0 / 100.0 |" in row
    manifest = json.loads((tmp_path / "work" / "shards" / "fashion-mnist-test" / "manifest.json").read_text())
    assert manifest["num_samples"] == 80


@pytest.mark.slow
def test_a_minutes_budget_trains_on_the_clock_and_ends_annealed_within_it(tmp_path):
    run_on_look_alike(tmp_path, "--minutes", 0.4,
                      "--train-options", TINY_TRAIN + " --batch-size 16 --warmup-epochs 0", "--name", "timed")
    run_dir = tmp_path / "work" / "timed"
    report = json.loads((run_dir / "quality.json").read_text())
    assert report["config"]["time_limit"] == 0.4 and report["config"]["schedule_by_time"] is True
    budget = report["budget"]
    assert budget["planned_steps"] == report["config"]["max_steps"] and budget["steps"] > 1
    # the limit counts from process start; after it come one checkpoint and the export
    assert budget["train_minutes"] < 0.4 + 0.25
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    assert last["step"] == budget["steps"]
    # the last step ran at (or next to) the end of the schedule, whatever the machine's speed did
    assert last["schedule_step"] >= 0.8 * budget["planned_steps"]
