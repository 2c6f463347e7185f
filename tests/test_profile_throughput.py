"""tools/profile_throughput.py in its short mode on the demo shards: every stage, the JSON, the chart,
and the stack-vs-peer ratio measured in the same run, as reported (how fast is the profiler's to say:
no speed threshold here)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.shards import DEMO_TRAIN, open_shard_set
from pipelines.spec import preset
from tools.profile_throughput import STAGES, Settings, main, method_and_optimizer, model_stages

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_quick_profile_reports_every_stage_the_stack_vs_peer_ratio_and_the_bottleneck(tmp_path):
    json_path, png_path = tmp_path / "profile.json", tmp_path / "profile.png"
    result = subprocess.run(
        [sys.executable, "tools/profile_throughput.py", "--method", "swav", "--multicrop", "2x32+4x16",
         "--batch-size", "16", "--threads", "1", "--quick", "--json", str(json_path), "--png", str(png_path)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(json_path.read_text())
    assert list(report["stages"]) == list(STAGES)
    for stage, row in report["stages"].items():
        assert row["seconds_per_batch"] > 0, stage
        assert row["images_per_second"] == pytest.approx(16 / row["seconds_per_batch"]), stage  # batch 16
    assert {"convert + normalise", "jitter", "grayscale", "blur"} <= set(report["photometric_ops"])
    assert "solarize" not in report["photometric_ops"]  # swav has none
    assert png_path.stat().st_size > 10_000
    pairs = report["stack_vs_peer"]  # stages 4 and 7 timed in alternating blocks, one ratio per pair
    assert len(pairs["pairs"]) == 2 and pairs["median"] == pytest.approx(statistics.median(pairs["pairs"]))
    assert f"input stack vs peer baseline: {pairs['median']:.2f}x (median of 2 interleaved" in result.stdout
    rate = {stage: row["images_per_second"] for stage, row in report["stages"].items()}
    bottleneck = "the input stack" if rate[STAGES[3]] < rate[STAGES[4]] else "the model"
    assert f"bottleneck: {bottleneck};" in result.stdout


def test_a_bad_method_is_a_one_line_error(capsys):
    assert main(["--method", "nope"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "profile_throughput: error: no recipe preset for method 'nope'; known: barlowtwins, byol, dino, jigsaw, "
        "mae, mocov1, mocov2, mocov3, multitask, relloc, rotnet, sim, simclr, simsiam, swav, vicreg"]


@pytest.mark.parametrize("method, multicrop", [("mae", "1x32"), ("sim", "2x32")])
def test_the_model_stages_train_a_masked_method_on_its_own_vit_with_the_recipes_masks(method, multicrop):
    settings = Settings(batch_size=8, threads=1, warmup=1, batches=1, repeats=1, device=torch.device("cpu"))
    model, optimizer, recipe, described = method_and_optimizer(method, preset(method).with_multicrop(multicrop),
                                                                settings.device, settings.batch_size)
    assert described.startswith("vit_tiny_patch16_224, patch_size=4") and "img_size=32" in described
    assert recipe.masking.patch_size == 4  # the mask grid follows the ViT's patches, as in training
    seconds = model_stages(model, optimizer, recipe, open_shard_set(DEMO_TRAIN), settings)
    assert list(seconds) == [STAGES[4], STAGES[5]]
    assert optimizer.state  # AdamW stepped


def test_a_recipe_the_method_cannot_train_on_is_a_one_line_error(capsys):
    assert main(["--method", "mae", "--multicrop", "2x32", "--threads", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("profile_throughput: error: mae trains on 1 masked view(s)")
