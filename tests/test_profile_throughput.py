"""tools/profile_throughput.py in its short mode on the demo shards: every stage, the JSON, the chart,
and the speed regression check as a ratio measured in the same run (never an absolute time)."""

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
from tools.profile_throughput import STAGES, Settings, method_and_optimizer, model_stages

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_quick_profile_reports_every_stage_and_the_stack_beats_the_peer_loader(tmp_path):
    json_path, png_path = tmp_path / "profile.json", tmp_path / "profile.png"
    result = subprocess.run(
        [sys.executable, "tools/profile_throughput.py", "--method", "swav", "--multicrop", "2x32+4x16",
         "--batch-size", "16", "--threads", "1", "--quick", "--json", str(json_path), "--png", str(png_path)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(json_path.read_text())
    assert list(report["stages"]) == list(STAGES)
    for stage, row in report["stages"].items():
        assert row["images_per_second"] > 0 and row["seconds_per_batch"] > 0, stage
    assert {"convert + normalise", "jitter", "grayscale", "blur"} <= set(report["photometric_ops"])
    assert "solarize" not in report["photometric_ops"]  # swav has none
    assert png_path.stat().st_size > 10_000
    assert "bottleneck:" in result.stdout and "input stack vs peer baseline" in result.stdout
    # regression check: on small crops the stack measures ~8x the DataLoader + PIL peer on one core; a
    # 2x floor leaves room for a noisy CI machine while still catching a stack that lost its edge
    rate = {stage: row["images_per_second"] for stage, row in report["stages"].items()}
    assert rate[STAGES[3]] > 2 * rate[STAGES[6]]
    pairs = report["stack_vs_peer"]  # stages 4 and 7 timed in alternating blocks, one ratio per pair
    assert len(pairs["pairs"]) == 2 and pairs["median"] == pytest.approx(statistics.median(pairs["pairs"]))
    assert pairs["median"] > 2
    # the input stack never runs faster than its own DALI part
    assert rate[STAGES[3]] <= rate[STAGES[2]] * 1.5


def test_a_bad_method_is_a_one_line_error():
    result = subprocess.run([sys.executable, "tools/profile_throughput.py", "--method", "nope"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "profile_throughput: error: no recipe preset for method 'nope'; known: barlowtwins, byol, dino, mae, "
        "mocov2, mocov3, sim, simclr, simsiam, swav, vicreg"]


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


def test_a_recipe_the_method_cannot_train_on_is_a_one_line_error():
    result = subprocess.run([sys.executable, "tools/profile_throughput.py", "--method", "mae", "--multicrop", "2x32"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("profile_throughput: error: mae trains on 1 masked view(s)")
