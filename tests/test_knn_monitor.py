"""The kNN monitor across processes: every rank extracts its share, the bank is gathered once per
evaluation with each sample exactly once, and one and two processes give the same random-init kNN.

Real runs only: `train.py` in one process and under `accelerate launch` (gloo, two CPU processes), and
this file itself launched in three processes (its `__main__` block) to gather a bank of uneven shares.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if __name__ == "__main__":  # launched as a script: the repository root is not on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.features import evaluation_stack, extract_features, gather_features  # noqa: E402
from pipelines.spec import preset  # noqa: E402
from test_train import (DATA, ENV, ROOT, assert_ok, launch_two_processes, metrics, shard_keys,  # noqa: E402
                        tail, train)

BASELINE = "knn_top1_random_init"
# 2,000 samples over 3 ranks are shares of 666, 667 and 667; batches of 18 end the 666 share on an
# empty batch (DALI pads every share to 38 batches and cuts the repeats)
GATHER_PROCESSES, GATHER_BATCH = 3, 18


def pixels(images: torch.Tensor) -> torch.Tensor:
    """A 'backbone' whose features are the image itself (4x4-pooled): a row identifies its sample."""
    return F.avg_pool2d(images, 4).flatten(1)


def pixel_recipe():
    return preset("swav").with_multicrop("1x32")


def gather_rounds(output: str) -> None:
    """In each launched process: two evaluations' worth of one reused stack, gathered; rank 0 saves them."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    accelerator = Accelerator(cpu=True)
    stack = evaluation_stack(pixel_recipe(), ROOT / DATA, GATHER_BATCH, rank=accelerator.process_index,
                             world_size=accelerator.num_processes, num_threads=1)
    rounds = []
    for _ in range(2):  # the second epoch of a stack reads the next rank's shard
        local = extract_features(pixels, stack, keep_keys=True)
        bank = gather_features(local)
        rounds.append({"features": bank.features, "labels": bank.labels, "keys": gather_object(local.keys),
                       "shares": gather_object([len(local.keys)])})
    if accelerator.is_main_process:
        torch.save(rounds, output)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def launch(script: Path, *args, processes: int, timeout: float = 240) -> subprocess.CompletedProcess:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(script), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def row_multiset(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.cat([features, labels[:, None].to(features.dtype)], dim=1)
    return torch.unique(rows, dim=0, return_counts=True)


@pytest.mark.slow
def test_the_gathered_bank_holds_every_sample_exactly_once_with_uneven_shares(tmp_path):
    output = tmp_path / "rounds.pt"
    result = launch(Path(__file__), output, processes=GATHER_PROCESSES)
    assert result.returncode == 0, tail(result.stderr, 40)
    rounds = torch.load(output, weights_only=True)

    reference = extract_features(pixels, evaluation_stack(pixel_recipe(), ROOT / DATA, GATHER_BATCH,
                                                          num_threads=1))
    assert reference.features.shape[0] == 2000
    expected_rows, expected_counts = row_multiset(reference.features, reference.labels)
    keys = shard_keys(DATA)
    assert [r["shares"] for r in rounds] == [[666, 667, 667], [667, 667, 666]]
    for gathered in rounds:
        assert len(gathered["keys"]) == 2000 and set(gathered["keys"]) == keys  # each rank read its share once
        assert gathered["features"].shape == reference.features.shape
        rows, counts = row_multiset(gathered["features"], gathered["labels"])
        assert torch.equal(rows, expected_rows) and torch.equal(counts, expected_counts)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """A 2-step run with the kNN monitor (bank and queries: the 2k shards), checkpoints at steps 1 and 2."""
    output = tmp_path_factory.mktemp("knn")
    result = train("--val-data", DATA, "--max-steps", 2, "--checkpoint-every", 1, "--output-dir", output,
                   "--name", "run")
    assert_ok(result)
    return result, output / "run"


@pytest.mark.slow
def test_one_and_two_processes_log_the_same_random_init_knn(one_process, tmp_path):
    # the model before its first step depends on the seed alone (DDP starts every rank from rank 0's
    # weights), and each query's features do not depend on which rank or batch computed them: the same
    # correct votes, so the same number
    result, run = one_process
    two = launch_two_processes("--val-data", DATA, "--max-steps", 1, "--output-dir", tmp_path, "--name", "run")
    assert_ok(two)
    (one_baseline,) = [r[BASELINE] for r in metrics(run) if BASELINE in r]
    (two_baseline,) = [r[BASELINE] for r in metrics(tmp_path / "run") if BASELINE in r]
    assert two_baseline == one_baseline and 10 < one_baseline < 100
    assert f"kNN top-1 at random init: {one_baseline:.2f}%" in two.stdout
    (knn,) = [r["knn_top1"] for r in metrics(tmp_path / "run") if "knn_top1" in r]
    assert f"kNN top-1 {knn:.2f}% (random init {one_baseline:.2f}%)" in two.stdout


@pytest.mark.slow
def test_the_random_init_baseline_comes_before_step_one_and_a_resume_reads_it_back(one_process, tmp_path):
    result, run = one_process
    records = metrics(run)
    baseline = records[0]
    assert baseline.keys() == {"step", "epoch", BASELINE} and (baseline["step"], baseline["epoch"]) == (0, 0)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [r.get(BASELINE) for r in records].count(None) == len(records) - 1
    (knn,) = [r["knn_top1"] for r in records if "knn_top1" in r]
    assert f"kNN top-1 at random init: {baseline[BASELINE]:.2f}%" in result.stdout
    assert f"kNN top-1 {knn:.2f}% (random init {baseline[BASELINE]:.2f}%)" in result.stdout

    # resume from step 1 with another value in the record: printed as read, not evaluated again
    resumed = Path(shutil.copytree(run, tmp_path / "run"))
    shutil.rmtree(resumed / "checkpoints" / "step-00000002")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**baseline, BASELINE: 12.34})
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    again = train("--val-data", DATA, "--max-steps", 2, "--checkpoint-every", 1, "--output-dir", tmp_path,
                  "--name", "run", "--resume", "auto")
    assert_ok(again)
    assert "resumed from" in again.stdout and "at random init" not in again.stdout
    assert "(random init 12.34%)" in again.stdout
    records = metrics(resumed)
    assert [r.get(BASELINE) for r in records if BASELINE in r] == [12.34] and records[0][BASELINE] == 12.34
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


if __name__ == "__main__":
    gather_rounds(sys.argv[1])
