"""tools/benchmark_quality.py end to end on a tiny Fashion-MNIST look-alike (IDX files written here), and
its one-line error when the dataset is missing. The real dataset is never needed. The tool runs in this
process (`main(argv)`); the train.py runs it starts are processes of their own, their output on this
process's file descriptors (`capfd`)."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tools.benchmark_quality import main

ROOT = Path(__file__).resolve().parents[1]


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


def run(capfd, *args) -> subprocess.CompletedProcess:
    """benchmark_quality's `main(args)` in the repository root, with one OpenMP thread for its train.py
    runs: its exit code and what it and they printed."""
    capfd.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        patch.setenv("OMP_NUM_THREADS", "1")
        code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["benchmark_quality", *args], code, out, err)


TINY_TRAIN = "--backbone resnet10t --stem standard --multicrop 2x32+2x16 --data-threads 1 --log-every 1"


def run_on_look_alike(capfd, tmp_path: Path, *args) -> subprocess.CompletedProcess:
    """benchmark_quality on 320 training and 80 test images of the look-alike, one thread, work dir
    tmp_path/work; `args` give the budget, --train-options and --name."""
    data = tmp_path / "idx"
    data.mkdir()
    write_idx(data, "train", 320, seed=0)
    write_idx(data, "t10k", 80, seed=1)
    result = run(capfd, "--method", "swav", "--fashion-mnist", data, "--work-dir", tmp_path / "work",
                 "--threads", 1, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_missing_dataset_is_one_line_naming_the_folder_and_the_package(tmp_path, capfd):
    result = run(capfd, "--fashion-mnist", tmp_path / "nowhere", "--work-dir", tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(tmp_path / "nowhere") in lines[0]
    assert "apt-get install dataset-fashion-mnist" in lines[0]


@pytest.mark.slow
def test_pretrains_then_reports_knn_linear_random_init_and_pixels(tmp_path, capfd):
    run_on_look_alike(capfd, tmp_path, "--epochs", 1, "--train-options", TINY_TRAIN + " --batch-size 32",
                      "--name", "tiny")
    report = json.loads((tmp_path / "work" / "tiny" / "quality.json").read_text())
    assert report["budget"]["steps"] == 10 and report["budget"]["epochs"] == pytest.approx(1.0)
    for part in ("pretrained", "random_init", "pixels"):
        assert set(report[part]["knn"]) == {"20", "200"}
        linear = report[part]["linear"]
        # a bright square per class: any of these features tell the 10 classes apart (chance is 10 %)
        assert 50 < linear["top1"] <= linear["top5"] <= 100, (part, linear)
        assert str(linear["weight_decay"]) in linear["held_out_top1"]  # chosen from the sweep it reports
    # the look-alike's classes are separable in pixel space
    assert report["pixels"]["knn"]["20"]["top1"] == 100.0 and report["pixels"]["linear"]["top1"] == 100.0
    row = (tmp_path / "work" / "tiny" / "quality.md").read_text().splitlines()[-1]
    assert row.startswith("| swav | resnet10t | 10 steps") and "| 100.0 / 100.0 |" in row
    manifest = json.loads((tmp_path / "work" / "shards" / "fashion-mnist-test" / "manifest.json").read_text())
    assert manifest["num_samples"] == 80


@pytest.mark.slow
def test_a_minutes_budget_trains_on_the_clock_and_ends_annealed_within_it(tmp_path, capfd):
    result = run_on_look_alike(capfd, tmp_path, "--minutes", 0.3,
                               "--train-options", TINY_TRAIN + " --batch-size 16 --warmup-epochs 0",
                               "--name", "timed")
    run_dir = tmp_path / "work" / "timed"
    report = json.loads((run_dir / "quality.json").read_text())
    assert report["config"]["time_limit"] == 0.3 and report["config"]["schedule_by_time"] is True
    budget = report["budget"]
    assert budget["planned_steps"] == report["config"]["max_steps"] and budget["steps"] > 1
    # the run ended at the limit (counted from its process's start), not at its planned steps
    steps, planned = budget["steps"], budget["planned_steps"]
    assert f"--time-limit 0.3 min reached at step {steps} (the schedule has {planned})" in result.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    assert last["step"] == budget["steps"]
    # the last step ran at (or next to) the end of the schedule, whatever the machine's speed did
    assert last["schedule_step"] >= 0.8 * budget["planned_steps"]
