"""Colorization: Lab on the device (round trip, the lightness input), the in-gamut bins (deterministic, the
stated Q, every occupied sRGB cell covered), soft targets, the prior and its rebalancing weights, the
losses, the head's grey handling, the evaluation stack and tools feeding lightness, then train.py runs
(finite losses, checkpoint, export with "input": "lightness", the prior saved and restored on resume
without re-estimation, the regression variant)."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from models.colour_losses import (IN_GAMUT_BINS, _hit_cells, ab_bins, ab_regression_loss, annealed_mean,
                                  bin_counts, rebalanced_cross_entropy, rebalancing_weights, smoothed_prior,
                                  soft_encode)
from models.methods import Progress, create_method
from models.methods.colorization import PRIOR_FILE, Colorization, false_colour
from pipelines.pretext import PretextStage, centred_lightness, lab_inputs, to_lab
from pipelines.spec import Lab, Recipe, RecipeError, ViewGroup, eval_recipe, preset, NO_PHOTOMETRIC

DATA = "shards/fashion-mnist-val-2k"


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def colour_images(batch: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images in [0, 1]: a random colour per 4x4 block, upsampled."""
    small = torch.rand(batch, 3, 4, 4, generator=generator(seed))
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------------- Lab


def test_lab_round_trips_to_rgb_and_the_input_is_centred_lightness_in_three_channels():
    import kornia

    rgb = torch.rand(6, 3, 9, 9, generator=generator(1))
    lab = to_lab(rgb)
    assert lab[:, 0].min() >= 0 and lab[:, 0].max() <= 100
    torch.testing.assert_close(kornia.color.lab_to_rgb(lab, clip=False), rgb, atol=1e-4, rtol=0)
    made = lab_inputs(rgb, Lab())
    assert made.images.shape == (6, 3, 9, 9) and made.labels.shape == (6, 2, 9, 9)
    torch.testing.assert_close(made.images, ((lab[:, :1] - 50) / 50).expand(-1, 3, -1, -1))
    torch.testing.assert_close(made.labels, lab[:, 1:])
    grey = rgb.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    assert to_lab(grey)[:, 1:].abs().max() < 1e-2  # grey has no chroma
    white, black = to_lab(torch.ones(1, 3, 1, 1)), to_lab(torch.zeros(1, 3, 1, 1))
    assert white[0, 0].item() == pytest.approx(100, abs=1e-3) and black[0, 0].item() == pytest.approx(0, abs=1e-3)
    assert centred_lightness(white[:, :1]).flatten().tolist() == pytest.approx([1, 1, 1], abs=1e-4)


def test_the_pretext_stage_makes_lab_and_a_recipe_with_lab_refuses_normalisation():
    rgb = colour_images()
    made = PretextStage([Lab()], "cpu")(rgb, generator())
    assert set(made) == {"colorization"}
    torch.testing.assert_close(made["colorization"].labels, to_lab(rgb)[:, 1:])
    group = (ViewGroup(1, 32, (0.5, 1.0), (NO_PHOTOMETRIC,)),)
    with pytest.raises(RecipeError, match="Lab needs RGB in"):
        Recipe("x", group, pretext=(Lab(),))  # the ImageNet mean and std by default
    with pytest.raises(RecipeError, match="Lab needs RGB in"):
        Recipe("x", group, lightness_input=True)
    recipe = preset("colorization")
    assert recipe.mean is None and recipe.lightness_input and recipe.pretext == (Lab(),)
    assert "input: lightness" in recipe.with_multicrop("1x32").describe()
    assert eval_recipe(recipe).lightness_input and eval_recipe(recipe).pretext == ()


# -------------------------------------------------------------------------------------------------- bins


def test_the_bins_are_deterministic_with_the_stated_q_on_the_10_grid():
    bins = ab_bins()
    assert bins.shape == (IN_GAMUT_BINS, 2) == (262, 2)
    assert torch.equal(ab_bins.__wrapped__(), bins)  # computed again from scratch: the same set
    assert torch.equal(bins, torch.round(bins / 10) * 10)
    assert len({tuple(row) for row in bins.tolist()}) == 262
    assert [0.0, 0.0] in bins.tolist()


def test_every_occupied_srgb_ab_cell_is_a_bin():
    cells = {tuple(row) for row in (ab_bins() / 10).long().tolist()}
    levels = torch.arange(256) / 255.0
    g, b = torch.meshgrid(levels, levels, indexing="ij")
    hit = set()
    for r in levels[::1]:  # every 8-bit colour, a red level at a time
        rgb = torch.stack([torch.full_like(g, float(r)), g, b], dim=-1).reshape(-1, 3)
        hit.update(map(tuple, _hit_cells(rgb).tolist()))
    hit.update(map(tuple, _hit_cells(torch.rand(500_000, 3, generator=generator(2))).tolist()))  # in between
    assert hit <= cells
    assert len(hit) >= 261  # the 8-bit colours alone hit all but one cell (a sliver between 8-bit levels)


# ---------------------------------------------------------------------------------- targets, prior, losses


def test_soft_targets_sum_to_one_over_five_bins_and_peak_at_the_nearest():
    bins = ab_bins()
    ab = torch.cat([torch.rand(200, 2, generator=generator(3)) * 120 - 60, bins[:5] + 0.0])
    targets, nearest = soft_encode(ab, bins, k=5, sigma=5.0)
    assert targets.shape == (205, 262)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(205))
    assert ((targets > 0).sum(dim=1) == 5).all() and (targets >= 0).all()
    assert torch.equal(targets.argmax(dim=1), nearest)
    assert torch.equal(nearest, torch.cdist(ab, bins).argmin(dim=1))
    # at a bin centre inside the gamut: 1 : e^-2 for its four neighbours at 10 ab units
    centre = soft_encode(torch.zeros(1, 2), bins)[0][0]
    assert centre.max().item() == pytest.approx(1 / (1 + 4 * math.exp(-2)), rel=1e-5)


def test_rebalancing_weights_have_mean_one_under_the_prior_and_favour_rare_colours():
    bins = ab_bins()
    counts = torch.rand(262, generator=generator(4)) ** 8 * 1000
    prior = smoothed_prior(counts, bins, sigma=5.0)
    assert prior.sum().item() == pytest.approx(1.0) and (prior > 0).all()
    weights = rebalancing_weights(prior, 0.5)
    assert (prior * weights).sum().item() == pytest.approx(1.0, rel=1e-9)
    order = prior.argsort()
    assert (weights[order].diff() <= 1e-12).all()  # the rarer the colour, the larger its weight
    uniform = smoothed_prior(torch.zeros(262), bins)
    torch.testing.assert_close(rebalancing_weights(uniform, 0.5), torch.ones(262, dtype=torch.float64))
    torch.testing.assert_close(rebalancing_weights(prior, 1.0), torch.ones(262, dtype=torch.float64))
    assert bin_counts(bins[[3, 3, 7]] + 1.0, bins).tolist() == [0] * 3 + [2] + [0] * 3 + [1] + [0] * 254


def test_the_rebalanced_cross_entropy_and_the_l2_match_their_definitions():
    bins = ab_bins()
    ab = torch.rand(12, 2, generator=generator(5)) * 80 - 40
    logits = torch.randn(12, 262, generator=generator(6), requires_grad=True)
    targets, nearest = soft_encode(ab, bins)
    weights = torch.rand(262, generator=generator(7)) + 0.5
    keep = torch.tensor([1.0] * 8 + [0.0] * 4)
    loss = rebalanced_cross_entropy(logits, targets, nearest, weights, keep)
    by_hand = sum(weights[nearest[i]] * -(targets[i] * logits[i].log_softmax(0)).sum() for i in range(8)) / 8
    torch.testing.assert_close(loss, by_hand)
    loss.backward()
    assert logits.grad[8:].abs().max() == 0  # the left-out positions give no gradient
    assert rebalanced_cross_entropy(logits, targets, nearest, weights, torch.zeros(12)).item() == 0.0
    predicted = torch.randn(12, 2, generator=generator(8))
    expected = ((predicted - ab / 100) ** 2).sum(dim=1)[:8].mean()
    torch.testing.assert_close(ab_regression_loss(predicted, ab, keep), expected)


def test_the_annealed_mean_goes_from_the_mean_to_the_mode():
    bins = ab_bins()
    logits = torch.randn(3, 262, generator=generator(9))
    logits[torch.arange(3), torch.tensor([5, 100, 200])] += 3  # a clear mode each
    torch.testing.assert_close(annealed_mean(logits, bins, 1.0), logits.softmax(1) @ bins)
    torch.testing.assert_close(annealed_mean(logits, bins, 1e-3), bins[logits.argmax(1)])
    assert annealed_mean(logits, bins, 0.38).shape == (3, 2)


# ------------------------------------------------------------------------------------------------ method


def batch_of(images: torch.Tensor) -> SimpleNamespace:
    made = lab_inputs(images, Lab())
    return SimpleNamespace(pretext={"colorization": made}, views=[made.images], batch_size=images.shape[0])


@pytest.mark.parametrize("loss", ["classification", "regression"])
def test_the_head_predicts_at_a_quarter_of_the_input_and_trains(loss):
    method = create_method("colorization", backbone="resnet10t", stem="no-maxpool", on_gpu=False, loss=loss)
    assert method.head.num_bins == 262 and method.head.decoder.predict.out_channels == (262 if loss ==
                                                                                          "classification" else 2)
    images = colour_images(4, 32)
    loss_value, metrics = method(batch_of(images), Progress(0, 0, 1, 1))
    assert math.isfinite(loss_value.item()) and loss_value.item() > 0 and metrics["coloured"].item() == 1.0
    loss_value.backward()
    assert method.backbone.conv1[0].weight.grad.abs().sum() > 0
    ab = method.eval().colourise(centred_lightness(to_lab(images)[:, :1]))
    assert ab.shape == (4, 2, 32, 32) and method.head.prediction_size(images) == 8


def test_grey_images_are_left_out_kept_or_false_coloured():
    grey = torch.rand(3, 1, 32, 32, generator=generator(10)).expand(-1, 3, -1, -1)
    images = torch.cat([colour_images(1, 32), grey])
    inputs = batch_of(images).pretext["colorization"]
    heads = {mode: create_method("colorization", backbone="resnet10t", on_gpu=False, grey=mode).head
             for mode in ("drop", "keep", "false_colour")}
    ab, keep = heads["drop"].targets(inputs)
    assert ab.shape == (4, 2, 8, 8) and keep.tolist() == [1, 0, 0, 0]
    assert heads["keep"].targets(inputs)[1].tolist() == [1, 1, 1, 1]
    ab, keep = heads["false_colour"].targets(inputs)
    assert keep.tolist() == [1, 1, 1, 1]
    lightness = to_lab(images)[:, :1]
    expected = torch.nn.functional.interpolate(false_colour(lightness[1:]), size=(8, 8), mode="area")
    torch.testing.assert_close(ab[1:], expected, atol=1e-3, rtol=0)
    assert (false_colour(lightness).square().sum(1).sqrt() - 30).abs().max() < 1e-3  # chroma 30 everywhere
    counts = heads["drop"].colour_counts(inputs)  # the prior counts what the loss sees: the colour image
    assert counts[:-2].sum().item() == 64 and counts[-2:].tolist() == [1, 4]


def test_the_prior_and_weights_are_checkpointed_buffers():
    method = create_method("colorization", backbone="resnet10t", on_gpu=False)
    counts = torch.zeros(264, dtype=torch.float64)
    counts[:262] = torch.arange(262).double()
    counts[-2:] = torch.tensor([5.0, 6.0])
    line = method.fit_data_statistics(counts)
    assert "of 5 of 6 images" in line and "262 bins" in line and "warning" not in line
    grey = create_method("colorization", backbone="resnet10t", on_gpu=False)
    assert "warning: every image read is grey" in grey.fit_data_statistics(torch.zeros(264, dtype=torch.float64))
    state = method.state_dict()
    for name in ("bins", "prior", "class_weights", "prior_pixels"):
        assert f"heads.colorization.{name}" in state and f"heads.colorization.{name}" in method.REPLICATED_BUFFERS
    fresh = create_method("colorization", backbone="resnet10t", on_gpu=False)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.head.class_weights, method.head.class_weights)
    assert (method.head.prior * method.head.class_weights).sum().item() == pytest.approx(1.0, rel=1e-5)
    document = json.loads(method.run_files()[PRIOR_FILE])
    assert len(document["prior"]) == 262 and document["pixels"] == sum(range(262))
    regression = create_method("colorization", backbone="resnet10t", on_gpu=False, loss="regression")
    assert regression.data_statistics_batches == 0 and regression.run_files() == {}
    assert method.data_statistics_batches == 100


# ---------------------------------------------------------------------------------- stack and evaluation


def test_the_training_and_evaluation_stacks_feed_lightness():
    from pipelines.features import evaluation_stack
    from pipelines.stack import InputStack

    method = create_method("colorization", backbone="resnet10t", on_gpu=False)
    recipe = method.adapt_recipe(preset("colorization").with_multicrop("1x32"))
    batch = next(InputStack(recipe, DATA, 8, num_threads=1, seed=1))
    made = batch.pretext["colorization"]
    assert batch.views[0] is made.images and made.labels.shape == (8, 2, 32, 32)
    assert made.labels.abs().max() < 0.1  # the demo images are grey
    evaluation = next(evaluation_stack(recipe, DATA, 8, num_threads=1))
    rgb = next(evaluation_stack(Recipe("rgb", recipe.groups, mean=None, std=None), DATA, 8, num_threads=1))
    view = evaluation.views[0]
    assert view.shape == (8, 3, 32, 32) and view.min() >= -1 and view.max() <= 1
    torch.testing.assert_close(view, centred_lightness(to_lab(rgb.views[0])[:, :1]))
    assert not torch.allclose(view, rgb.views[0])


def test_the_eval_tools_feed_what_backbone_json_or_the_checkpoint_says(tmp_path):
    from tools.eval_knn import _stack

    def first(info):
        return next(_stack(info, DATA, 16, 4, "cpu")).views[0]

    lightness = first({"method": "colorization"})
    rgb = first({"method": "colorization", "input": "rgb"})
    assert torch.allclose(lightness[:, 0], lightness[:, 1]) and rgb.min() >= 0
    torch.testing.assert_close(lightness, centred_lightness(to_lab(rgb)[:, :1]))
    torch.testing.assert_close(first({"method": "swav", "input": "lightness"}), lightness)  # normalisation off too


# ---------------------------------------------------------------------------------------------- train.py


def prior_of(path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")["heads.colorization.prior"]


@pytest.mark.slow
def test_train_py_trains_checkpoints_exports_lightness_and_resumes_with_the_saved_prior(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import load_file
    from test_train import assert_ok, assert_same_tensors, checkpoints, losses, train

    from tools.eval_knn import evaluate
    from tools.export import export

    args = ["--method", "colorization", "--multicrop", "1x32", "--max-steps", 4, "--checkpoint-every", 2,
            "--method-options", "grey=false_colour,prior_batches=2"]
    result = train(*args, "--output-dir", tmp_path / "full", "--name", "run")
    assert_ok(result)
    assert "colour prior: 2048 ab values of 32 of 32 images" in result.stdout  # 2 batches of 16, 8x8 each
    run = tmp_path / "full" / "run"
    full = losses(run)
    assert list(full) == [1, 2, 3, 4] and all(math.isfinite(v) and v > 0 for v in full.values())
    assert checkpoints(run) == ["step-00000002", "step-00000004"]
    written = json.loads((run / PRIOR_FILE).read_text())
    saved = prior_of(run / "checkpoints" / "step-00000002")
    torch.testing.assert_close(torch.tensor(written["prior"]), saved)
    assert saved.max() < 1 and saved.sum().item() == pytest.approx(1.0, rel=1e-5)
    info = json.loads((run / "backbone.json").read_text())
    assert info["input"] == "lightness" and info["method"] == "colorization"
    model = timm.create_model("resnet10t", num_classes=0)
    model.load_state_dict(load_file(run / "backbone.safetensors"))
    assert json.loads((export(run / "checkpoints" / "step-00000004", tmp_path / "out").parent
                       / "backbone.json").read_text())["input"] == "lightness"
    knn = evaluate(run, DATA, DATA, ks=(1,), batch_size=256)
    assert knn["k"]["1"]["top1"] > 99  # the bank is the query set

    # a stop after step 2 (its checkpoint kept, step 4's gone), resumed: the prior comes from the
    # checkpoint, the data is not read for it again, and the run continues exactly
    def no_estimate(self, batch):
        raise AssertionError("the colour prior was estimated again on resume")

    monkeypatch.setattr(Colorization, "data_statistics", no_estimate)
    resumed = tmp_path / "resumed" / "run"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    (resumed / PRIOR_FILE).unlink()
    (resumed / "backbone.safetensors").unlink()
    result = train(*args, "--output-dir", resumed.parent, "--name", "run", "--resume", "auto")
    assert_ok(result)
    assert "colour prior:" not in result.stdout
    assert losses(resumed) == full
    final = "checkpoints/step-00000004/model.safetensors"
    assert_same_tensors(load_file(resumed / final), load_file(run / final))
    assert json.loads((resumed / PRIOR_FILE).read_text()) == written  # rewritten from the restored buffers


@pytest.mark.slow
def test_train_py_runs_the_regression_variant_without_a_prior(tmp_path):
    from test_train import assert_ok, losses, metrics, train

    result = train("--method", "colorization", "--multicrop", "1x32", "--max-steps", 2,
                   "--method-options", "loss=regression,grey=false_colour", "--output-dir", tmp_path, "--name", "run")
    assert_ok(result)
    run = tmp_path / "run"
    assert all(math.isfinite(v) and v > 0 for v in losses(run).values()) and len(losses(run)) == 2
    last = [record for record in metrics(run) if "loss" in record][-1]
    assert last["ab_error"] > 0 and last["coloured"] == 1.0
    assert not (run / PRIOR_FILE).exists() and "colour prior" not in result.stdout
