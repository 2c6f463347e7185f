"""IPT (`ipt`): each corruption against its definition (the noise's sigma measured, bicubic down-up shapes,
rain from Kornia's motion kernels and the same for a seed), the task assignment, the patch contrastive
term against its formula written out, the model's shapes per task and its export, then `train.py --method
ipt` (the PSNR evaluation, checkpoints, exact resume, the exported model) and `tools/eval_restoration.py`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from models.methods import METHODS, Progress, create_method
from models.methods.ipt import IPT, export_restoration_model, load_restoration_model
from models.restoration_losses import l1_loss, patch_contrastive_loss
from pipelines.corruption import (add_noise, downscale, motion_kernels, rain_streaks, restoration_inputs, task_counts,
                                  upscale)
from pipelines.pretext import PretextStage
from pipelines.spec import RESTORATION_TASKS, RecipeError, Restoration, preset

DEMO_VAL = "shards/fashion-mnist-val-2k"


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(**options) -> IPT:
    torch.manual_seed(0)
    return create_method("ipt", on_gpu=False, features=8, heads=2, depth=1, **options)


# ------------------------------------------------------------------------------------------- corruptions


def clipped_normal_std(sigma: float, bound: float) -> float:
    """The standard deviation of N(0, sigma²) clipped to [-bound, bound] (the censored normal's variance)."""
    c = bound / sigma
    tail = 0.5 * math.erfc(c / math.sqrt(2))  # P(Z > c)
    density = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    return math.sqrt(sigma ** 2 * (1 - 2 * tail - 2 * c * density) + 2 * bound ** 2 * tail)


def test_noise_has_the_stated_sigma_on_the_0_255_scale_and_is_clipped():
    grey = torch.full((8, 3, 48, 48), 0.5)  # 127.5 of 255: sigma 30 is clipped at 4.25 sigma, 50 at 2.55
    for sigma in (30, 50):
        noise = (add_noise(grey, sigma, generator(sigma)) - grey) * 255
        expected = clipped_normal_std(sigma, 127.5)
        assert abs(noise.std().item() - expected) < 0.01 * expected and abs(noise.mean().item()) < 0.01 * sigma
    assert clipped_normal_std(30, 127.5) == pytest.approx(30, rel=1e-3)
    black = add_noise(torch.zeros(4, 3, 24, 24), 30, generator())
    assert black.min() == 0 and black.max() <= 1 and (black == 0).float().mean() > 0.45  # half the draws clipped
    assert torch.equal(add_noise(grey, 30, generator(1)), add_noise(grey, 30, generator(1)))


def test_bicubic_down_up_shapes_and_the_divisibility_rule():
    clean = torch.rand(2, 3, 24, 24, generator=generator())
    for scale, side in ((2, 12), (3, 8), (4, 6)):
        small = downscale(clean, scale)
        expected = F.interpolate(clean, size=(side, side), mode="bicubic", antialias=True).clamp(0, 1)
        assert small.shape == (2, 3, side, side) and torch.equal(small, expected)
        assert upscale(small, scale).shape == clean.shape
    flat = torch.full((1, 3, 24, 24), 0.25)
    torch.testing.assert_close(upscale(downscale(flat, 3), 3), flat)  # a flat image survives the round trip
    assert Restoration().for_crop(24).tasks == RESTORATION_TASKS and Restoration().for_crop(48)
    with pytest.raises(RecipeError, match="divisible by 12"):
        Restoration().for_crop(32)  # 32 / 3 is not a whole number of pixels
    Restoration(tasks=("sr2", "sr4", "noise30")).for_crop(32)
    with pytest.raises(RecipeError, match="restoration task 'blur9'"):
        Restoration(tasks=("blur9",)).for_crop(24)


def test_rain_streaks_are_kornias_motion_kernels_and_the_same_for_a_seed():
    from kornia.filters import filter2d, get_motion_kernel2d, motion_blur

    angles = torch.tensor([60.0, 90.0, 117.0])
    seeds = (torch.rand(3, 1, 24, 24, generator=generator(2)) < 0.03).float()
    one_length = motion_kernels((7,), torch.zeros(3, dtype=torch.long), angles)
    torch.testing.assert_close(filter2d(seeds, one_length, border_type="constant"),
                               motion_blur(seeds, 7, angles, torch.zeros(3), border_type="constant", mode="bilinear"))
    picked = motion_kernels((5, 7, 9), torch.tensor([0, 2, 1]), angles)
    assert picked.shape == (3, 9, 9)
    torch.testing.assert_close(picked[0, 2:7, 2:7], get_motion_kernel2d(5, angles[:1], mode="bilinear")[0])
    torch.testing.assert_close(picked[1], get_motion_kernel2d(9, angles[1:2], mode="bilinear")[0])
    vertical = motion_kernels((5,), torch.zeros(1, dtype=torch.long), torch.tensor([90.0]))[0]
    torch.testing.assert_close(vertical[:, 2], torch.full((5,), 0.2), atol=1e-6, rtol=0)  # 90 degrees: a column

    spec = Restoration().for_crop(24)
    clean = torch.rand(6, 3, 24, 24, generator=generator(3)) * 0.5
    rainy = rain_streaks(clean, spec, generator(4))
    assert torch.equal(rainy, rain_streaks(clean, spec, generator(4)))
    assert not torch.equal(rainy, rain_streaks(clean, spec, generator(5)))
    added = rainy - clean
    assert (added >= 0).all() and rainy.max() <= 1 and (added > 0.1).float().mean() > 0.02
    unclipped = (rainy < 1).all(dim=1)
    torch.testing.assert_close(added[:, 0][unclipped], added[:, 2][unclipped])  # white streaks: the same in each channel


def test_each_sample_gets_one_task_in_equal_shares_or_every_task_with_assign_all():
    clean = torch.rand(20, 3, 24, 24, generator=generator())
    made = restoration_inputs(clean, Restoration(), generator(1))
    assert list(made.inputs) == list(RESTORATION_TASKS) and task_counts(20, 6) == [4, 4, 3, 3, 3, 3]
    rows = torch.cat(list(made.samples.values()))
    assert sorted(rows.tolist()) == list(range(20))  # every sample exactly once
    for task, inputs in made.inputs.items():
        assert torch.equal(made.targets[task], clean[made.samples[task]])
        side = {"sr2": 12, "sr3": 8, "sr4": 6}.get(task, 24)
        assert inputs.shape == (len(made.samples[task]), 3, side, side)
    assert made.to("meta").targets["derain"].device.type == "meta"  # tools/gpu_check.py moves batches so
    again = restoration_inputs(clean, Restoration(), generator(1))
    assert all(torch.equal(again.inputs[task], made.inputs[task]) for task in made.inputs)
    every = restoration_inputs(clean, Restoration(assign="all"), generator(1))
    assert all(torch.equal(every.targets[task], clean) for task in RESTORATION_TASKS)
    assert restoration_inputs(clean[:2], Restoration(tasks=("sr2", "noise30", "derain")), generator()).inputs.keys() \
        == {"sr2", "noise30"}  # fewer samples than tasks: the last tasks wait for the next batch


def test_the_profilers_peer_corrupts_one_image_at_a_time_into_the_same_layout():
    from tools.pretext_peer import PretextPeer, collate_pretext

    images = torch.rand(5, 3, 24, 24, generator=generator(8))
    for spec in (Restoration(), Restoration(assign="all")):
        peer = PretextPeer(SimpleNamespace(pretext=(spec,)), crop=None)
        made = collate_pretext([peer.from_tensor(image) for image in images])["restoration"]
        assert sum(len(rows) for rows in made.samples.values()) == (5 if spec.assign == "sample" else 30)
        for task, rows in made.samples.items():
            side = {"sr2": 12, "sr3": 8, "sr4": 6}.get(task, 24)
            assert made.inputs[task].shape == (len(rows), 3, side, side) and torch.equal(made.targets[task], images[rows])
        if "sr2" in made.inputs:
            torch.testing.assert_close(made.inputs["sr2"], downscale(made.targets["sr2"], 2))


# ---------------------------------------------------------------------------------------------- losses


def test_the_contrastive_term_is_ipts_formula_written_out():
    features = torch.randn(3, 4, 8, generator=generator(6))
    f = F.normalize(features, dim=-1)
    temperature, total, total_supcon = 0.07, 0.0, 0.0
    b, n = features.shape[:2]
    for i in range(b):
        for j1 in range(n):
            for j2 in range(n):
                positive = math.exp(float(f[i, j1] @ f[i, j2]) / temperature)
                negatives = sum(math.exp(float(f[i, j1] @ f[k, j2]) / temperature) for k in range(b) if k != i)
                total -= math.log(positive / negatives)
                total_supcon -= math.log(positive / (positive + negatives))
    expected = total / (b * n * n)
    assert patch_contrastive_loss(features, temperature).item() == pytest.approx(expected, rel=1e-5)
    supcon = patch_contrastive_loss(features, temperature, form="supcon").item()
    assert supcon == pytest.approx(total_supcon / (b * n * n), rel=1e-5) and supcon > 0
    apart = F.one_hot(torch.arange(3), 8).float().unsqueeze(1).expand(3, 4, 8)  # images orthogonal, patches alike
    assert patch_contrastive_loss(apart).item() == pytest.approx(math.log(2) - 1 / temperature, rel=1e-5)
    with pytest.raises(ValueError, match="contrastive form 'x'"):
        patch_contrastive_loss(features, form="x")
    assert patch_contrastive_loss(features[:1]).item() == 0.0  # one image: no negatives
    same = torch.randn(1, 1, 8).expand(2, 4, 8)  # identical patches everywhere: log(1 / 1)
    assert patch_contrastive_loss(same).item() == pytest.approx(0.0, abs=1e-5)


def test_l1_is_the_mean_over_every_pixel_of_every_task():
    outputs, targets = [torch.rand(2, 3, 6, 6), torch.rand(5, 3, 6, 6)], [torch.rand(2, 3, 6, 6), torch.rand(5, 3, 6, 6)]
    torch.testing.assert_close(l1_loss(outputs, targets), F.l1_loss(torch.cat(outputs), torch.cat(targets)))


# ---------------------------------------------------------------------------------------------- method


def test_heads_body_and_tails_restore_each_task_at_the_clean_size_and_the_export_round_trips(tmp_path):
    method = tiny()
    assert METHODS["ipt"] is IPT and method.evaluation == "restoration" and method.lr_scaling(4096) == 1.0
    network = method.backbone
    assert network.num_features == 8 * 9 and set(network.heads) == set(network.tails) == set(RESTORATION_TASKS)
    recipe = method.adapt_recipe(preset("ipt").with_multicrop("1x24"))
    images = torch.rand(12, 3, 24, 24, generator=generator(7))
    batch = SimpleNamespace(views=[images], batch_size=12, pretext=PretextStage(recipe.pretext, "cpu")(images, generator()))
    for task, inputs in batch.pretext["restoration"].inputs.items():
        restored, decoded = network(inputs, task)
        tokens = math.ceil(inputs.shape[-1] / 3) ** 2  # sr3's 8-px input: padded to a 3x3 grid of patches
        assert restored.shape == (inputs.shape[0], 3, 24, 24) and decoded.shape == (inputs.shape[0], tokens, 72)
    loss, metrics = method(batch, Progress(0, 0, 10, 10))
    torch.testing.assert_close(loss.detach(), metrics["l1_loss"] + 0.1 * metrics["contrastive_loss"])
    loss.backward()
    assert all(p.grad is not None for p in method.parameters())  # every head, the body and every tail

    export_restoration_model(tmp_path, network.eval(), input_size=24)
    loaded, info = load_restoration_model(tmp_path)
    assert info["architecture"]["features"] == 8 and info["input_size"] == 24
    noisy = batch.pretext["restoration"].inputs["noise30"]
    torch.testing.assert_close(loaded(noisy, "noise30")[0], network(noisy, "noise30")[0])
    with pytest.raises(ValueError, match="leave --backbone"):
        create_method("ipt", backbone="resnet10t", on_gpu=False)
    with pytest.raises(RecipeError, match="restoration task 'sr9'"):
        tiny(tasks="sr2+sr9")


def test_the_preset_and_defaults():
    recipe = preset("ipt")
    assert recipe.mean is None and recipe.groups[0].size == 48 and recipe.pretext == (Restoration(),)
    with pytest.raises(RecipeError, match="restoration corrupts RGB in"):
        type(recipe)("x", recipe.groups, pretext=(Restoration(),))
    paper, cpu = IPT.defaults(on_gpu=True), IPT.defaults(on_gpu=False)
    assert (paper["optimizer"], paper["lr"], paper["weight_decay"], paper["multicrop"]) == ("adamw", 5e-5, 0.0, "1x48")
    assert IPT.final_lr_fraction == 0.4 and cpu["multicrop"] == "1x24@0.73-1"
    assert IPT.HEAD_PRESETS["paper"] == dict(features=64, depth=12, heads=12, patch=3, block_kernel=5, mlp_ratio=4.0,
                                             contrastive_form="paper")
    assert tiny().contrastive_form == "supcon" and tiny(contrastive_form="paper").contrastive_form == "paper"


# ---------------------------------------------------------------------------------------------- train.py


@pytest.fixture(scope="module")
def small_val(tmp_path_factory):
    """A 40-image shard set cut from the demo validation shards (the periodic PSNR reads it quickly)."""
    import tarfile

    from tools.make_shards import main as make_shards

    folder = tmp_path_factory.mktemp("images")
    with tarfile.open(next(Path(DEMO_VAL).glob("*.tar"))) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:40]
        for member in members:
            (folder / member.name.replace("/", "_")).write_bytes(tar.extractfile(member).read())
    out = tmp_path_factory.mktemp("shards") / "val-40"
    assert make_shards([str(folder), str(out)]) == 0
    return out


@pytest.mark.slow
def test_train_py_trains_ipt_with_psnr_evaluation_checkpoints_resumes_exactly_and_exports(small_val, tmp_path):
    from safetensors.torch import load_file
    from test_train import assert_ok, assert_same_tensors, checkpoints, losses, metrics, train

    args = ["--method", "ipt", "--backbone", "", "--multicrop", "1x24", "--max-steps", 4, "--checkpoint-every", 2,
            "--val-data", small_val, "--method-options", "features=8,heads=2,depth=1"]
    result = train(*args, "--output-dir", tmp_path / "full", "--name", "run")
    assert_ok(result)
    assert "pretext restoration: sr2+sr3+sr4+noise30+noise50+derain" in result.stdout
    assert "restoration baselines on --val-data (PSNR dB / SSIM): sr2 bicubic" in result.stdout
    assert "| sr2 PSNR" in result.stdout and "(bicubic " in result.stdout and "kNN" not in result.stdout
    run = tmp_path / "full" / "run"
    records = metrics(run)
    assert "baseline_psnr_noise30" in records[0] and all(f"psnr_{task}" in records[-1] for task in RESTORATION_TASKS)
    assert checkpoints(run) == ["step-00000002", "step-00000004"] and not (run / "backbone.safetensors").exists()
    network, info = load_restoration_model(run)
    assert info["method_options"] == "features=8,heads=2,depth=1" and network.tasks == RESTORATION_TASKS

    resumed = tmp_path / "resumed" / "run"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    (resumed / "ipt.safetensors").unlink()
    assert_ok(train(*args, "--output-dir", resumed.parent, "--name", "run", "--resume", "auto"))
    assert losses(resumed) == losses(run)
    final = "checkpoints/step-00000004/model.safetensors"
    assert_same_tensors(load_file(resumed / final), load_file(run / final))
    assert_same_tensors(load_file(resumed / "ipt.safetensors"), load_file(run / "ipt.safetensors"))

    from tools.eval_restoration import main as eval_restoration

    scores, picture = tmp_path / "scores.json", tmp_path / "restored.png"
    assert eval_restoration([str(run), "--val", str(small_val), "--json", str(scores), "--picture", str(picture),
                             "--samples", "2"]) == 0
    saved = json.loads(scores.read_text())["scores"]
    last = records[-1]
    for task in RESTORATION_TASKS:  # the same numbers as train.py's last evaluation (same images, seed 0)
        assert saved[task]["images"] == 40 and saved[task]["psnr"] == pytest.approx(last[f"psnr_{task}"], abs=1e-3)
    assert picture.stat().st_size > 10_000
    assert eval_restoration([str(run / "checkpoints" / "step-00000002"), "--val", str(small_val)]) == 0
    assert eval_restoration([str(tmp_path)]) == 2

    from tools.eval_knn import EvalError, load_backbone

    for source in (run, run / "checkpoints" / "step-00000002"):  # the backbone tools point to eval_restoration
        with pytest.raises(EvalError, match=f"restores images and has no backbone to score: use "
                                            f"tools/eval_restoration.py {source}$"):
            load_backbone(source)


def test_a_batch_smaller_than_the_task_count_is_a_one_line_error():
    from test_train import assert_one_line_error, train

    assert_one_line_error(
        train("--method", "ipt", "--backbone", "", "--multicrop", "1x24", "--batch-size", 4, "--max-steps", 1,
              "--val-data", "", "--method-options", "features=8,heads=2,depth=1"),
        "--batch-size 4 is smaller than the 6 restoration tasks (sr2+sr3+sr4+noise30+noise50+derain), one per "
        "sample: use a batch of at least 6 per process, fewer tasks, or --method-options assign=all")
