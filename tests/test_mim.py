"""Masked image modeling: MAE and SIM (their masks, targets, losses, relative positions), in process
on tiny random-init ViTs, then `train.py --method mae|sim` end to end with an exact resume."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import timm
import torch

from models.methods import Progress, create_method
from models.methods.base import train_step
from models.methods.sim import relative_patch_positions, relative_position_encoding
from models.mim_losses import masked_patch_loss, normalized_pixel_targets, unigrad_dense_loss, unigrad_global_loss
from models.vit import grid_sincos, patchify, sincos_2d, take, visible_index
from pipelines.masking import block_masks, random_masks
from pipelines.spec import preset
from pipelines.stack import InputStack

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2)  # a 4x4 patch grid
DEMO_VAL = "shards/fashion-mnist-val-2k"


def tiny(name: str, **options):
    torch.manual_seed(0)
    return create_method(name, backbone="vit_tiny_patch16_224", on_gpu=False, backbone_kwargs=TINY_VIT,
                         **options)


def progress(step: int = 0, total_steps: int = 100) -> Progress:
    return Progress(step=step, epoch=0, total_steps=total_steps, steps_per_epoch=10)


def mae_batch(batch_size: int = 8, seed: int = 0) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch_size, 3, 16, 16, generator=generator)]
    masks = random_masks(batch_size, 4, 12, generator, "cpu")
    return SimpleNamespace(views=views, batch_size=batch_size, counts=[1], masks=masks)


def sim_batch(batch_size: int = 8, seed: int = 0) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(2 * batch_size, 3, 16, 16, generator=generator)]
    size = torch.randint(10, 28, (2 * batch_size, 2), generator=generator).float()
    corner = (28 - size) * torch.rand(2 * batch_size, 2, generator=generator)
    boxes = [torch.cat([corner, size], dim=1)]
    flips = [torch.rand(2 * batch_size, generator=generator) < 0.5]
    masks = block_masks(batch_size, 4, 10, generator, "cpu", min_block=4)
    return SimpleNamespace(views=views, batch_size=batch_size, counts=[2], masks=masks, boxes=boxes, flips=flips)


def optimizer_for(method, lr: float = 1e-3) -> torch.optim.Optimizer:
    params = [p for group in method.param_groups(0.0) for p in group["params"]]
    return torch.optim.AdamW(params, lr=lr, betas=method.adamw_betas)


# ---------------------------------------------------------------------------------------------- positions


def test_sincos_table_follows_mae_layout_row_major_with_a_zero_class_row():
    table = grid_sincos(3, 8)[0]  # dim 8: frequencies 1 and 1/100 per axis
    assert table.shape == (10, 8) and table[0].abs().max() == 0
    row, col = 2, 1  # patch 2 * 3 + 1, after the class row
    frequencies = torch.tensor([1.0, 0.01])
    expected = torch.cat([torch.sin(row * frequencies), torch.cos(row * frequencies),
                          torch.sin(col * frequencies), torch.cos(col * frequencies)])
    torch.testing.assert_close(table[1 + row * 3 + col], expected)


def test_mae_and_sim_are_registered_with_their_masked_recipe_presets():
    from models.methods import METHODS

    for name, kind in (("mae", "random"), ("sim", "block")):
        assert METHODS[name].name == name and preset(METHODS[name].recipe_preset).masking.kind == kind


def test_masked_methods_freeze_sincos_positions_in_the_timm_vit():
    for name in ("mae", "sim"):
        method = tiny(name)
        torch.testing.assert_close(method.backbone.pos_embed.detach(), grid_sincos(4, 64))
        assert not method.backbone.pos_embed.requires_grad


# ---------------------------------------------------------------------------------------------- MAE


def test_mae_masks_from_the_stack_hide_exactly_three_quarters_of_each_view():
    method = tiny("mae")
    recipe = method.adapt_recipe(preset("mae").with_multicrop("1x16"))
    assert recipe.masking.patch_size == 4 and method.num_masked == 12  # the count the encoder relies on
    batch = next(InputStack(recipe, DEMO_VAL, 32, num_threads=1))
    assert batch.masks.shape == (32, 16) and (batch.masks.sum(dim=1) == 12).all()
    assert len({tuple(row.tolist()) for row in batch.masks}) > 20  # a fresh random subset per sample
    assert method.visible_index(batch.masks).shape == (32, 4)


@pytest.mark.parametrize("kind", ["random", "block"])
def test_visible_index_takes_the_tokens_boolean_indexing_takes_in_their_order(kind):
    generator = torch.Generator().manual_seed(8)
    tokens = torch.randn(16, 49, 5, generator=generator)
    if kind == "random":
        mask = random_masks(16, 7, 37, generator, "cpu")
    else:
        mask = block_masks(16, 7, 29, generator, "cpu", min_block=4)
    hidden = int(mask[0].sum())
    index = visible_index(mask, 49 - hidden)
    assert (index.diff(dim=1) > 0).all()
    torch.testing.assert_close(take(tokens, index), tokens[~mask].view(16, -1, 5), rtol=0, atol=0)


def reconstruct_through_the_mask(method, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's reconstruction with boolean-mask indexing (the visible tokens out, then back in place)."""
    vit, (b, n) = method.backbone, mask.shape
    tokens = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    tokens = tokens[~mask].view(b, -1, tokens.shape[-1])
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(b, -1, -1)
    latent = method.decoder_embed(vit.norm(vit.blocks(vit.norm_pre(torch.cat([cls, tokens], dim=1)))))
    patches = method.mask_token.expand(b, n, -1).clone()
    patches[~mask] = latent[:, 1:].reshape(-1, latent.shape[-1])
    tokens = torch.cat([latent[:, :1], patches], dim=1) + method.decoder_pos_embed
    return method.decoder_pred(method.decoder_norm(method.decoder(tokens)))[:, 1:]


def test_mae_reconstruction_and_its_gradients_equal_boolean_mask_indexing():
    method, batch = tiny("mae"), mae_batch()
    images, mask = batch.views[0], batch.masks
    results = []
    for reconstruct in (method.reconstruct, lambda x, m: reconstruct_through_the_mask(method, x, m)):
        method.zero_grad(set_to_none=True)
        prediction = reconstruct(images, mask)
        (prediction * torch.linspace(-1, 1, prediction.shape[-1])).sum().backward()
        results.append((prediction.detach(), {name: p.grad for name, p in method.named_parameters()
                                              if p.grad is not None}))
    (fast, fast_grads), (reference, reference_grads) = results
    torch.testing.assert_close(fast, reference)
    assert fast_grads.keys() == reference_grads.keys() and "mask_token" in fast_grads
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], reference_grads[name])


def test_mae_encoder_sees_only_the_visible_patches_and_the_class_token():
    method, batch = tiny("mae"), mae_batch()
    seen = []
    method.backbone.blocks[0].register_forward_hook(lambda module, args, output: seen.append(args[0].shape))
    train_step(method, optimizer_for(method), batch, progress())
    assert seen == [torch.Size([8, 1 + 4, 64])]  # 16 patches, 12 hidden


def test_norm_pix_targets_equal_a_direct_per_patch_computation():
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    targets = normalized_pixel_targets(patchify(images, 4))
    for b in range(2):
        for row in range(2):
            for col in range(2):
                pixels = images[b, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].permute(1, 2, 0).flatten()
                expected = (pixels - pixels.mean()) / torch.sqrt(pixels.var() + 1e-6)
                torch.testing.assert_close(targets[b, 2 * row + col], expected)


def test_mae_loss_counts_hidden_patches_only():
    generator = torch.Generator().manual_seed(4)
    prediction = torch.randn(4, 16, 48, generator=generator, requires_grad=True)
    target = torch.randn(4, 16, 48, generator=generator)
    mask = random_masks(4, 4, 12, generator, "cpu")
    loss = masked_patch_loss(prediction, target, mask)
    expected = ((prediction - target) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert prediction.grad[~mask].abs().max() == 0 and prediction.grad[mask].abs().min() > 0
    changed = target.clone()
    changed[~mask] += 100.0  # visible patches: any target, same loss
    torch.testing.assert_close(masked_patch_loss(prediction, changed, mask), loss)


def test_mae_overfits_a_tiny_batch():
    method, batch = tiny("mae"), mae_batch(batch_size=4)
    optimizer = optimizer_for(method, lr=2e-3)
    losses = [train_step(method, optimizer, batch, progress(step, 300)).item() for step in range(300)]
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])


# ---------------------------------------------------------------------------------------------- SIM


def boxes(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_relative_positions_of_an_identical_view_are_the_grid():
    box, flip = boxes([3, 5, 10, 12]), torch.tensor([False])
    rows, cols, scale_h, scale_w = relative_patch_positions(box, flip, box, flip, 2)
    torch.testing.assert_close(rows[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(cols[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert scale_h.item() == 1 and scale_w.item() == 1
    flipped = torch.tensor([True])  # both mirrored: still the identity
    rows, cols, *_ = relative_patch_positions(box, flipped, box, flipped, 2)
    torch.testing.assert_close(cols[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))


def test_relative_positions_follow_offsets_scales_and_flips():
    # view 1 shows x, y in [0, 8); view 2 the lower-right quarter-width strip x in [4, 8), y in [4, 8)
    view1, view2 = boxes([0, 0, 8, 8]), boxes([4, 4, 4, 4])
    no, yes = torch.tensor([False]), torch.tensor([True])
    # view-2 patch centres at x (and y) = 5 and 7 -> view-1 units 5/8 * 2 - 0.5 = 0.75 and 1.25
    rows, cols, scale_h, scale_w = relative_patch_positions(view1, no, view2, no, 2)
    torch.testing.assert_close(rows[0], torch.tensor([0.75, 0.75, 1.25, 1.25]))
    torch.testing.assert_close(cols[0], torch.tensor([0.75, 1.25, 0.75, 1.25]))
    assert scale_h.item() == 0.5 and scale_w.item() == 0.5
    # view 2 mirrored: its first column now shows x = 7
    _, cols, _, _ = relative_patch_positions(view1, no, view2, yes, 2)
    torch.testing.assert_close(cols[0], torch.tensor([1.25, 0.75, 1.25, 0.75]))
    # view 1 mirrored: x = 5 sits at 1 - 5/8 of its width -> 3/8 * 2 - 0.5 = 0.25; x = 7 -> -0.25
    rows, cols, _, _ = relative_patch_positions(view1, yes, view2, no, 2)
    torch.testing.assert_close(cols[0], torch.tensor([0.25, -0.25, 0.25, -0.25]))
    torch.testing.assert_close(rows[0], torch.tensor([0.75, 0.75, 1.25, 1.25]))  # flips never move rows
    # a view 2 larger than view 1 and partly outside it: x in [-4, 12) -> centres -2, 2, 6, 10 of [0, 8)
    _, cols, _, scale_w = relative_patch_positions(view1, no, boxes([0, -4, 8, 16]), no, 4)
    torch.testing.assert_close(cols[0, :4], torch.tensor([-1.5, 0.5, 2.5, 4.5]))
    assert scale_w.item() == 2.0


def test_relative_encoding_is_sincos_of_positions_then_of_log_scales():
    view1, view2, no = boxes([0, 0, 8, 8]), boxes([4, 4, 4, 4]), torch.tensor([False])
    encoding = relative_position_encoding(view1, no, view2, no, 2, 8)
    assert encoding.shape == (1, 4, 16)
    torch.testing.assert_close(encoding[0, 1, :8], sincos_2d(torch.tensor(0.75), torch.tensor(1.25), 8))
    scale = 10 * math.log(0.5)
    torch.testing.assert_close(encoding[0, 1, 8:], sincos_2d(torch.tensor(scale), torch.tensor(scale), 8))


def test_unigrad_dense_matches_its_formula():
    generator = torch.Generator().manual_seed(5)
    p = torch.randn(3, 7, 16, generator=generator, dtype=torch.float64)
    t = torch.randn(3, 7, 16, generator=generator, dtype=torch.float64)
    rows_p, rows_t = p.reshape(-1, 16), t.reshape(-1, 16)
    correlation = rows_t.T @ rows_t / 21
    positive = ((rows_p - rows_t) ** 2).sum(1).mean()
    negative = torch.diagonal(rows_p @ correlation @ rows_p.T).mean()
    torch.testing.assert_close(unigrad_dense_loss(p, t, 0.02), (positive + 0.02 * negative) / 16)


def _largest_allocation(function) -> int:
    """The most memory one operator call allocated (bytes) while `function` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    return max(event.cpu_memory_usage for event in prof.events())


def test_unigrad_dense_memory_grows_with_d_squared_not_tokens_squared():
    dim, generator = 32, torch.Generator().manual_seed(6)

    def largest(tokens: int) -> int:
        p = torch.randn(tokens, dim, generator=generator, requires_grad=True)
        t = torch.randn(tokens, dim, generator=generator)
        return _largest_allocation(lambda: unigrad_dense_loss(p, t).backward())

    small, large = largest(1024), largest(4096)
    assert large <= 2 * (4096 * dim + dim * dim) * 4, large  # two (tokens, D) float32 buffers at most
    assert large <= 5 * small  # 4x the tokens: ~4x the memory (a tokens^2 term would give 16x)


def test_unigrad_global_updates_its_correlation_and_pulls_with_minus_z2_plus_lambda_f_z1():
    generator = torch.Generator().manual_seed(7)
    online = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator, dtype=torch.float64), dim=1)
    target = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator, dtype=torch.float64), dim=1)
    start = torch.randn(8, 8, generator=generator, dtype=torch.float64)
    correlation = start.clone()
    online.requires_grad_(True)
    loss = unigrad_global_loss(online, target, correlation, lambda_=100.0, rho=0.99)
    expected_f = 0.99 * start + 0.01 * (online.detach().T @ online.detach() + target.T @ target) / 12
    torch.testing.assert_close(correlation, expected_f)
    pull = -target + 100.0 * online.detach() @ expected_f
    torch.testing.assert_close(loss, (pull * online.detach()).sum(1).mean())
    loss.backward()
    z = online.detach()  # unit rows: normalisation passes the tangential part of the pull, over the batch
    tangential = pull - (pull * z).sum(1, keepdim=True) * z
    torch.testing.assert_close(online.grad, tangential / 6)


def test_sim_step_trains_the_online_path_and_moves_the_target_by_ema():
    method, batch = tiny("sim"), sim_batch()
    assert not any(p.requires_grad for p in method.backbone.patch_embed.parameters())
    before = {name: p.detach().clone() for name, p in method.named_parameters()}
    loss = train_step(method, optimizer_for(method), batch, progress(step=0, total_steps=100))
    assert torch.isfinite(loss)
    after = dict(method.named_parameters())
    assert not torch.equal(before["backbone.blocks.0.attn.qkv.weight"], after["backbone.blocks.0.attn.qkv.weight"])
    assert torch.equal(before["backbone.patch_embed.proj.weight"], after["backbone.patch_embed.proj.weight"])
    momentum = method.momentum(progress(step=0, total_steps=100))
    assert momentum == pytest.approx(0.995)
    name = "blocks.1.mlp.fc1.weight"
    expected = momentum * before[f"target_backbone.{name}"] + (1 - momentum) * after[f"backbone.{name}"]
    torch.testing.assert_close(after[f"target_backbone.{name}"], expected)
    assert method.global_correlation.abs().sum() > 0


def test_sim_encoder_sees_the_visible_part_of_view_one_and_the_target_all_of_view_two():
    method, batch = tiny("sim"), sim_batch()
    online, target = [], []
    method.backbone.blocks[0].register_forward_hook(lambda m, args, out: online.append(args[0].shape))
    method.target_backbone.blocks[0].register_forward_hook(lambda m, args, out: target.append(args[0].shape))
    method(batch, progress())
    assert online == [torch.Size([8, 1 + 6, 64])] and target == [torch.Size([8, 1 + 16, 64])]


def test_sim_dense_only_weighting_is_upstreams_loss():
    method, batch = tiny("sim", alpha_global=0.0, alpha_dense=1.0), sim_batch()
    loss, metrics = method(batch, progress())
    assert "global_loss" not in metrics and loss.item() == pytest.approx(metrics["dense_loss"].item())
    _, weighted = tiny("sim")(batch, progress())  # defaults (1, 4)
    assert weighted["loss"].item() == pytest.approx(4 * weighted["dense_loss"].item() + weighted["global_loss"].item())


def test_masked_methods_refuse_other_backbones_and_view_counts():
    with pytest.raises(ValueError, match="needs a ViT"):
        create_method("mae", backbone="resnet10t", on_gpu=False)
    for name, multicrop in (("mae", "2x32"), ("sim", "1x32"), ("sim", "2x32+2x16")):
        method_class = type(tiny(name))
        with pytest.raises(ValueError, match="masked view"):
            method_class.check_recipe(preset(name).with_multicrop(multicrop), 8)


# ---------------------------------------------------------------------------------------------- train.py


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mae", "sim"])
def test_train_py_runs_mae_and_sim_and_resumes_exactly(name, tmp_path):
    from safetensors.torch import load_file
    from test_train import assert_four_steps_resume_exactly_from_step_two, assert_ok, checkpoints, losses, train

    args = ["--method", name, "--multicrop", "1x32" if name == "mae" else "2x32", "--max-steps", 4,
            "--checkpoint-every", 2, "--backbone", "vit_tiny_patch16_224",
            "--backbone-options", "patch_size=8,depth=2", "--val-data", "shards/fashion-mnist-val-2k"]
    result = train(*args, "--output-dir", tmp_path / "full", "--name", "run")
    assert_ok(result)
    assert "kNN top-1" in result.stdout
    run = tmp_path / "full" / "run"
    full = losses(run)
    assert list(full) == [1, 2, 3, 4] and all(math.isfinite(value) for value in full.values())
    assert checkpoints(run) == ["step-00000002", "step-00000004"]
    spec = json.loads((run / "backbone.json").read_text())
    assert spec["model_kwargs"] == {"patch_size": 8, "depth": 2, "img_size": 32}
    model = timm.create_model(spec["timm_name"], num_classes=0, **spec["model_kwargs"])
    model.load_state_dict(load_file(run / "backbone.safetensors"))

    assert_four_steps_resume_exactly_from_step_two(args, run, tmp_path)  # the EMA target, F, the stack


# ---------------------------------------------------------------------------------------------- show_views


def test_show_views_shades_exactly_the_masked_patches_and_draws_a_png(tmp_path):
    from PIL import Image

    from tools.show_views import main, shade_masked

    images = torch.rand(2, 8, 8, 3)
    masks = torch.tensor([[True, False, False, True], [False, False, False, False]])
    shaded = shade_masked(images, masks, 4)
    torch.testing.assert_close(shaded[0, :4, :4], 0.35 * images[0, :4, :4] + torch.tensor([0.1, 0.1, 0.45]))
    torch.testing.assert_close(shaded[0, :4, 4:], images[0, :4, 4:])  # patch 1: visible
    torch.testing.assert_close(shaded[0, 4:, 4:], 0.35 * images[0, 4:, 4:] + torch.tensor([0.1, 0.1, 0.45]))
    torch.testing.assert_close(shaded[1], images[1])
    out = tmp_path / "views.png"
    assert main(["--method", "sim", "--multicrop", "2x32", "--patch-size", "4", "--samples", "2",
                 "--data", DEMO_VAL, "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 100
