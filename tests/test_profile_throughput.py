"""tools/profile_throughput.py in its short mode on the demo shards: every stage, the JSON, the chart,
and the stack-vs-peer ratio measured in the same run, as reported (how fast is the profiler's to say:
no speed threshold here)."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.pretext import NEIGHBOURS, jigsaw, permutation_set
from pipelines.shards import DEMO_TRAIN, open_shard_set
from pipelines.spec import NO_PHOTOMETRIC, preset
from pipelines.stack import InputStack
from tools.pretext_peer import PretextPeer
from tools.profile_throughput import (STAGES, Settings, main, method_and_optimizer, model_stages, peer_loader,
                                      synthetic_batch, torchvision_views)

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
        "profile_throughput: error: no recipe preset for method 'nope'; known: barlowtwins, byol, colorization, decoupling, dino, inpainting, ipt, jigsaw, "
        "mae, mocov1, mocov2, mocov3, multitask, npid, relloc, rotnet, sim, simclr, simsiam, swav, vicreg"]


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


# ------------------------------------------------------------------------------------ pretext methods


@pytest.mark.parametrize("method", ["jigsaw", "relloc"])
def test_a_pretext_method_profiles_every_stage_against_the_per_image_pretext_peer(method, tmp_path):
    json_path = tmp_path / "profile.json"
    result = subprocess.run(
        [sys.executable, "tools/profile_throughput.py", "--method", method, "--multicrop", "1x48",
         "--batch-size", "8", "--threads", "1", "--quick", "--json", str(json_path)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(json_path.read_text())
    assert list(report["stages"]) == list(STAGES)
    assert report["baseline"].startswith(f"{method} per image in torchvision")
    assert report["photometric_ops"][f"pretext {method}"] > 0
    pairs = report["stack_vs_peer"]
    assert len(pairs["pairs"]) == 2 and pairs["median"] == pytest.approx(statistics.median(pairs["pairs"]))
    assert f"input stack vs peer baseline: {pairs['median']:.2f}x (median of 2 interleaved" in result.stdout


def _cpu(batch_size: int, threads: int) -> Settings:
    return Settings(batch_size=batch_size, threads=threads, warmup=1, batches=1, repeats=1,
                    device=torch.device("cpu"))


@pytest.mark.parametrize("method, multicrop", [("jigsaw", "1x48"), ("relloc", "1x48"), ("rotnet", "1x32"),
                                               ("multitask", "1x48")])
def test_the_peer_batch_has_the_stacks_pretext_tensors(method, multicrop):
    _, _, recipe, _ = method_and_optimizer(method, preset(method).with_multicrop(multicrop), torch.device("cpu"), 4)
    shards = open_shard_set(DEMO_TRAIN)
    ours = next(InputStack(recipe, shards, 4, num_threads=1)).pretext
    _, loader = peer_loader(recipe, shards, _cpu(4, threads=0))  # no workers: made in this process
    theirs = next(iter(loader))
    assert list(theirs) == list(ours) == [task.task for task in recipe.pretext]
    for task in ours:
        for field in ("images", "labels", "order"):
            mine, peer = getattr(ours[task], field), getattr(theirs[task], field)
            assert (mine is None) == (peer is None), (task, field)
            if mine is not None:
                assert (peer.shape, peer.dtype) == (mine.shape, mine.dtype), (task, field)
    if "jigsaw" in theirs:
        puzzle = theirs["jigsaw"]
        assert torch.equal(puzzle.order, permutation_set(1000, 9)[puzzle.labels])
        assert puzzle.images.mean(dim=(-2, -1)).abs().max() < 1e-4  # every tile standardised per channel


def _position_image(size: int = 48) -> Image.Image:
    """Red = 5 * row, green = 5 * column: every pixel names where it is."""
    rows, columns = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([5 * rows, 5 * columns, np.zeros_like(rows)], axis=-1).astype(np.uint8))


def _position_recipe(method: str):
    """The preset at 1x48 with a crop that is the whole image (no flip, no grey, no normalisation) and
    tiles left unstandardised, so a tile's pixels still say where in the image it was cut."""
    base = preset(method).with_multicrop("1x48")
    group = dataclasses.replace(base.groups[0], scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0,
                                photometric=(NO_PHOTOMETRIC,))
    pretext = tuple(dataclasses.replace(task, normalise_tiles=False) if task.task == "jigsaw" else task
                    for task in base.pretext)
    return dataclasses.replace(base, groups=(group,), mean=None, std=None, pretext=pretext)


def _cell_of(patch: torch.Tensor) -> int:
    """The grid cell (row-major, 16-px cells) a 12-px patch of a position image was cut from, after
    checking it is one contiguous block at an offset of 0-4 px inside that cell."""
    rows, columns = (torch.round(patch[channel] * 255 / 5).long() for channel in (0, 1))
    top, left = int(rows[0, 0]), int(columns[0, 0])
    assert torch.equal(rows, top + torch.arange(12).view(12, 1).expand(12, 12))
    assert torch.equal(columns, left + torch.arange(12).view(1, 12).expand(12, 12))
    assert top % 16 <= 4 and left % 16 <= 4
    return (top // 16) * 3 + left // 16


def test_the_peers_tiles_are_the_grid_cells_in_the_labelled_permutations_order():
    recipe = _position_recipe("jigsaw")
    crop = torchvision_views(recipe)[0]
    image = _position_image()
    assert torch.equal(torch.round(crop(image) * 255), torch.from_numpy(np.array(image)).permute(2, 0, 1).float())
    peer, permutations = PretextPeer(recipe, crop), permutation_set(1000, 9)
    labels = set()
    for _ in range(10):
        tiles, label, order = peer(image)["jigsaw"]
        labels.add(label)
        assert torch.equal(order, permutations[label])
        assert [_cell_of(tile) for tile in tiles] == order.tolist()  # position j shows cell order[j]
    assert len(labels) > 1
    # the input stack's convention is the same: position j of sample i shows tile order[i, j]
    made = jigsaw(crop(image)[None], recipe.pretext[0], permutations, torch.Generator().manual_seed(0))
    assert [_cell_of(tile) for tile in made.images] == made.order[0].tolist()


def test_the_peers_relloc_pairs_are_the_centre_and_the_labelled_neighbour():
    recipe = _position_recipe("relloc")
    peer = PretextPeer(recipe, torchvision_views(recipe)[0])
    image = _position_image()
    for _ in range(10):
        centres, neighbours, labels = peer(image)["relloc"]
        assert _cell_of(centres[0]) == 4 and _cell_of(neighbours[0]) == NEIGHBOURS[int(labels[0])]


@pytest.mark.parametrize("method, multicrop", [("rotnet", "1x32"), ("multitask", "1x48")])
def test_the_model_stages_train_a_pretext_method_on_synthetic_pretext_inputs(method, multicrop):
    settings = _cpu(8, threads=1)
    model, optimizer, recipe, _ = method_and_optimizer(method, preset(method).with_multicrop(multicrop),
                                                       settings.device, settings.batch_size)
    assert set(synthetic_batch(recipe, 8, settings.device).pretext) == set(model.heads)
    seconds = model_stages(model, optimizer, recipe, open_shard_set(DEMO_TRAIN), settings)
    assert list(seconds) == [STAGES[4], STAGES[5]]
    assert optimizer.state  # SGD's momentum buffers: the step ran
