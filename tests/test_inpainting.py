"""The context encoder (`inpainting`): its holes (the masking module's `center` kind, random cells and
blocks) and their mean-pixel fill in the input stack, the overlap-weighted L2, the discriminator outside
the loop's optimizer with its own step and saved Adam state, then `train.py --method inpainting` with and
without the adversarial term (checkpoints, export, exact resume) and the reconstruction picture."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from models.methods import METHODS, Progress, create_method
from models.methods.inpainting import (
    ContextEncoder,
    composite,
    feature_stride,
    reconstruction_loss,
    region_weights,
)
from pipelines.masking import make_masks
from pipelines.pretext import PretextStage, inpaint
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, Inpainting, Masking, RecipeError, eval_recipe, preset

DEMO_VAL = "shards/fashion-mnist-val-2k"


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(**options) -> ContextEncoder:
    """The CPU default backbone (resnet10t, stride-16 no-maxpool stem) with narrow heads."""
    torch.manual_seed(0)
    return create_method("inpainting", backbone="resnet10t", stem="no-maxpool", on_gpu=False,
                         decoder_width=32, discriminator_width=8, **options)


def batch_of(images: torch.Tensor, spec: Inpainting = Inpainting(), seed: int = 0) -> SimpleNamespace:
    pretext = PretextStage([spec.for_crop(images.shape[-1])], "cpu")(images, generator(seed))
    return SimpleNamespace(views=[images], batch_size=images.shape[0], counts=[1], pretext=pretext)


def progress(step: int = 0) -> Progress:
    return Progress(step=step, epoch=0, total_steps=100, steps_per_epoch=10)


# ------------------------------------------------------------------------------------------------ holes


def test_center_masks_hide_exactly_the_central_quarter_of_the_grid_and_of_the_pixels():
    masks = make_masks(Masking("center", 0.25, patch_size=4), 3, 32, generator(), "cpu")
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True  # half the side, centred
    assert masks.shape == (3, 64) and all(torch.equal(row.view(8, 8), expected) for row in masks)
    hole = inpaint(torch.randn(3, 3, 32, 32), Inpainting().for_crop(32), generator()).labels
    pixels = torch.zeros(32, 32, dtype=torch.bool)
    pixels[8:24, 8:24] = True
    assert hole.shape == (3, 32, 32) and all(torch.equal(image, pixels) for image in hole)
    assert int(hole[0].sum()) == 32 * 32 // 4
    paper = inpaint(torch.zeros(1, 3, 128, 128), Inpainting().for_crop(128), generator()).labels[0]
    assert paper[32:96, 32:96].all() and int(paper.sum()) == 64 * 64  # the paper's 64-px hole in 128 px


@pytest.mark.parametrize("mask, ratio", [("random", 0.25), ("random", 0.5), ("block", 0.25)])
def test_random_cells_and_blocks_hide_exactly_the_stated_share_in_whole_cells(mask, ratio):
    spec = Inpainting(mask=mask, ratio=ratio, grid=8).for_crop(32)
    hole = inpaint(torch.randn(16, 3, 32, 32), spec, generator(1)).labels
    assert (hole.sum(dim=(1, 2)) == round(ratio * 64) * 16).all()  # round(ratio * cells) cells of 4x4 px
    cells = hole.view(16, 8, 4, 8, 4)
    assert (cells.all(dim=(2, 4)) == cells.any(dim=(2, 4))).all()  # every 4x4 cell all in or all out
    assert len({tuple(image.flatten().tolist()) for image in hole}) > 8  # drawn per image
    again = inpaint(torch.randn(16, 3, 32, 32), spec, generator(1)).labels
    assert torch.equal(again, hole)  # from the stack's generator


def test_holes_that_do_not_fit_are_one_line_recipe_errors():
    with pytest.raises(RecipeError, match="not a centred square"):
        Inpainting(grid=6).for_crop(36)  # 9 of 36 cells: a 3x3 square cannot be centred in 6
    with pytest.raises(RecipeError, match="divides 30"):
        Inpainting(grid=8).for_crop(30)
    with pytest.raises(RecipeError, match="mask kind 'ring'"):
        Inpainting(mask="ring").for_crop(32)
    assert Inpainting().for_crop(32).overlap == 1 and Inpainting().for_crop(128).overlap == 4
    assert Inpainting(overlap=0).for_crop(128).overlap == 0


def test_the_input_stack_fills_the_hole_with_the_mean_pixel_and_leaves_the_context():
    from pipelines.stack import InputStack

    recipe = tiny().adapt_recipe(preset("inpainting").with_multicrop("1x32"))
    assert recipe.mean == IMAGENET_MEAN and recipe.std == IMAGENET_STD and recipe.pretext[0].fill == 0.0
    batch = next(InputStack(recipe, DEMO_VAL, 4, num_threads=1))
    view, made = batch.views[0], batch.pretext["inpainting"]
    hole = made.labels.unsqueeze(1).expand_as(view)
    assert torch.equal(made.images[~hole], view[~hole])  # the context as it is
    assert (made.images[hole] == 0).all() and (view[hole] != 0).any()
    # 0 in the normalised space is the recipe's mean pixel: the hole shows the ImageNet mean colour
    shown = made.images[:, :, 16, 16] * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)
    torch.testing.assert_close(shown, torch.tensor(IMAGENET_MEAN).expand(4, 3))


# ------------------------------------------------------------------------------------------------ loss


def test_region_weights_are_one_on_the_hole_ten_on_the_overlap_ring_zero_elsewhere():
    hole = torch.zeros(1, 8, 8, dtype=torch.bool)
    hole[0, 2:6, 2:6] = True
    expected = torch.tensor([  # the 4x4 hole, dilated by 1 px (a 3x3 square): its 20-px ring weighs 10
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 10, 10, 10, 10, 10, 10, 0],
        [0, 10, 1, 1, 1, 1, 10, 0],
        [0, 10, 1, 1, 1, 1, 10, 0],
        [0, 10, 1, 1, 1, 1, 10, 0],
        [0, 10, 1, 1, 1, 1, 10, 0],
        [0, 10, 10, 10, 10, 10, 10, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ], dtype=torch.float32)
    weights = region_weights(hole, overlap=1, overlap_weight=10.0)
    assert weights.shape == (1, 1, 8, 8) and torch.equal(weights[0, 0], expected)
    assert torch.equal(region_weights(hole, overlap=0), hole.unsqueeze(1).float())
    wide = region_weights(hole, overlap=2)[0, 0]
    assert wide[0].tolist() == [10] * 8 and wide[2, 2] == 1 and int((wide == 10).sum()) == 64 - 16  # to the border
    corner = torch.zeros(1, 4, 4, dtype=torch.bool)
    corner[0, 0, 0] = True
    assert region_weights(corner, 1)[0, 0].tolist() == [[1, 10, 0, 0], [10, 10, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_the_loss_is_zero_where_the_prediction_equals_the_image_and_weighted_mean_elsewhere():
    images = torch.randn(2, 3, 8, 8, generator=generator(2))
    hole = torch.zeros(2, 8, 8, dtype=torch.bool)
    hole[:, 2:6, 2:6] = True
    weights = region_weights(hole, 1)
    garbage = torch.randn(2, 3, 8, 8, generator=generator(3)) * 100
    region = (weights > 0).expand_as(images)
    exact_inside = torch.where(region, images, garbage)
    assert reconstruction_loss(exact_inside, images, weights) == 0  # outside the region nothing counts
    # off by 1 everywhere: (16 hole px * 1 + 20 ring px * 10) / 36 region px, in every channel and image
    assert reconstruction_loss(images + 1, images, weights).item() == pytest.approx(216 / 36)
    off_in_hole = images + hole.unsqueeze(1) * 2.0  # 2 in the hole only: 16 * 4 / 36
    assert reconstruction_loss(off_in_hole, images, weights).item() == pytest.approx(64 / 36)
    torch.testing.assert_close(composite(garbage, images, hole.unsqueeze(1))[~hole.unsqueeze(1).expand_as(images)],
                               images[~hole.unsqueeze(1).expand_as(images)])


# ---------------------------------------------------------------------------------------------- method


def test_the_decoder_maps_the_feature_map_back_to_the_crop_for_each_stem():
    for stem, stride in (("no-maxpool", 16), ("standard", 32)):
        torch.manual_seed(0)
        method = create_method("inpainting", backbone="resnet10t", stem=stem, on_gpu=False, decoder_width=32, grid=4)
        assert feature_stride(method.backbone) == stride
        assert len([m for m in method.head.decoder if isinstance(m, torch.nn.ConvTranspose2d)]) == math.log2(stride)
        for size in (32, 28):  # 28: not a multiple of the stride, resized to the crop
            prediction, weights = method.predict(batch_of(torch.randn(2, 3, size, size), Inpainting(grid=4)))
            assert prediction.shape == (2, 3, size, size) and weights.shape == (2, 1, size, size)
    with pytest.raises(ValueError, match="convolutional feature map"):
        create_method("inpainting", backbone="vit_tiny_patch16_224", on_gpu=False,
                      backbone_kwargs=dict(img_size=32, patch_size=4, depth=1))


def test_l2_only_trains_backbone_and_decoder_with_no_discriminator():
    method = tiny()
    assert METHODS["inpainting"] is ContextEncoder and not hasattr(method, "discriminator")
    assert method.checkpoint_state() == {} and method.lr_scaling(4096) == 1.0
    batch = batch_of(torch.randn(4, 3, 32, 32, generator=generator(4)))
    loss, metrics = method(batch, progress())
    assert set(metrics) == {"loss", "reconstruction_loss"} and math.isfinite(loss.item())
    loss.backward()
    assert method.backbone.conv1[0].weight.grad.abs().sum() > 0
    assert method.head.decoder[0].weight.grad.abs().sum() > 0


def test_the_discriminator_is_outside_the_loops_optimizer_and_steps_in_after_step_only():
    method = tiny(adversarial=True)
    discriminator = {id(p) for p in method.discriminator.parameters()}
    main = [p for group in method.param_groups(0.0) for p in group["params"]]
    assert not discriminator & {id(p) for p in main}
    assert len(main) + len(discriminator) == len(list(method.parameters()))
    assert all(f"discriminator.{name}" in method._ddp_params_and_buffers_to_ignore
               for name, _ in method.discriminator.named_parameters())
    optimizer = torch.optim.AdamW(main, lr=1e-3, betas=method.adamw_betas)
    before = {name: p.detach().clone() for name, p in method.discriminator.named_parameters()}
    batch = batch_of(torch.randn(8, 3, 32, 32, generator=generator(5)))

    loss, metrics = method(batch, progress())
    assert {"reconstruction_loss", "adversarial_loss", "discriminator_loss"} <= set(metrics)
    expected = 0.999 * metrics["reconstruction_loss"] + 0.001 * metrics["adversarial_loss"]
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()  # the loop's backward reaches the generator only
    assert all(p.grad is None for p in method.discriminator.parameters())
    assert all(p.requires_grad for p in method.discriminator.parameters())
    assert method.backbone.conv1[0].weight.grad.abs().sum() > 0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert all(torch.equal(p, before[name]) for name, p in method.discriminator.named_parameters())

    backbone = {name: p.detach().clone() for name, p in method.backbone.named_parameters()}
    method.after_step(progress())  # the discriminator's own Adam step on the kept real and composite
    assert any(not torch.equal(p, before[name]) for name, p in method.discriminator.named_parameters())
    assert all(torch.equal(p, backbone[name]) for name, p in method.backbone.named_parameters())
    assert all(p.grad is None for p in method.discriminator.parameters()) and method._pending is None
    state = method.checkpoint_state()["discriminator_optimizer"]
    assert state["param_groups"][0]["lr"] == 2e-4 and state["param_groups"][0]["betas"] == (0.5, 0.999)
    assert all(int(entry["step"]) == 1 for entry in state["state"].values())
    method.after_step(progress(1))  # nothing kept: no second step
    assert all(int(entry["step"]) == 1 for entry in method.checkpoint_state()["discriminator_optimizer"]["state"].values())

    fresh = tiny(adversarial=True)
    fresh.load_checkpoint_state(method.checkpoint_state())
    restored = fresh.discriminator_optimizer.state_dict()["state"]
    for index, entry in state["state"].items():
        torch.testing.assert_close(restored[index]["exp_avg"], entry["exp_avg"])
        torch.testing.assert_close(restored[index]["exp_avg_sq"], entry["exp_avg_sq"])


def test_inpainted_pastes_the_prediction_into_the_hole_only():
    method = tiny().eval()
    batch = batch_of(torch.randn(2, 3, 32, 32, generator=generator(6)))
    shown = method.inpainted(batch)
    hole = batch.pretext["inpainting"].labels.unsqueeze(1).expand(2, 3, 32, 32)
    assert list(shown) == ["input", "inpainted", "original"]
    assert torch.equal(shown["inpainted"][~hole], batch.views[0][~hole])
    assert not torch.equal(shown["inpainted"][hole], batch.views[0][hole])
    assert torch.equal(shown["input"], batch.pretext["inpainting"].images)


def test_the_preset_is_the_papers_square_128_px_crop_with_a_64_px_centre_hole():
    recipe = preset("inpainting")
    group = recipe.groups[0]
    assert (group.count, group.size, group.ratio, group.flip_p) == (1, 128, (1.0, 1.0), 0.5)
    assert group.photometric[0].is_identity and recipe.pretext == (Inpainting(),)
    assert "pretext inpainting: center hole, 0.25 of a 8x8 grid" in recipe.describe()
    assert eval_recipe(recipe).pretext == ()
    defaults = ContextEncoder.defaults(on_gpu=True)
    assert (defaults["optimizer"], defaults["lr"], defaults["weight_decay"], defaults["batch_size"]) == \
        ("adamw", 2e-3, 0.0, 64)
    assert ContextEncoder.adamw_betas == (0.5, 0.999) and ContextEncoder.final_lr_fraction == 1.0
    cpu = ContextEncoder.defaults(on_gpu=False)
    assert (cpu["multicrop"], cpu["batch_size"], cpu["epochs"]) == ("1x32", 64, 2)


# ---------------------------------------------------------------------------------------------- train.py


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["l2", "adversarial"])
def test_train_py_runs_inpainting_exports_and_resumes_exactly(variant, tmp_path):
    import timm
    from safetensors.torch import load_file
    from test_train import BACKBONE, assert_four_steps_resume_exactly_from_step_two, assert_ok, checkpoints, losses
    from test_train import metrics as read_metrics
    from test_train import train

    args = ["--method", "inpainting", "--multicrop", "1x32", "--max-steps", 4, "--checkpoint-every", 2,
            "--method-options", f"decoder_width=64,adversarial={'true' if variant == 'adversarial' else 'false'}"]
    result = train(*args, "--output-dir", tmp_path / "full", "--name", "run")
    assert_ok(result)
    assert "pretext inpainting: center hole" in result.stdout
    run = tmp_path / "full" / "run"
    full = losses(run)
    assert list(full) == [1, 2, 3, 4] and all(math.isfinite(value) for value in full.values())
    assert checkpoints(run) == ["step-00000002", "step-00000004"]
    model = timm.create_model(BACKBONE, num_classes=0)
    model.load_state_dict(load_file(run / "backbone.safetensors"))
    records = [record for record in read_metrics(run) if "loss" in record]
    state_file = run / "checkpoints" / "step-00000004" / "method_state.pt"
    if variant == "adversarial":
        assert all("adversarial_loss" in record and "discriminator_loss" in record for record in records)
        saved = torch.load(state_file, weights_only=True)["discriminator_optimizer"]
        assert all(int(entry["step"]) == 4 for entry in saved["state"].values())
        # the loop's optimizer holds the backbone and the decoder only
        weights = load_file(run / "checkpoints" / "step-00000004" / "model.safetensors")
        assert any(name.startswith("discriminator.") for name in weights)
    else:
        assert not state_file.exists() and all("adversarial_loss" not in record for record in records)

    assert_four_steps_resume_exactly_from_step_two(args, run, tmp_path)
    if variant == "adversarial":  # the discriminator's Adam came back from step 2 and took the same steps
        resumed = torch.load(tmp_path / "resumed" / "run" / "checkpoints" / "step-00000004" / "method_state.pt",
                             weights_only=True)["discriminator_optimizer"]
        for index, entry in saved["state"].items():
            for key, value in entry.items():
                assert torch.equal(resumed["state"][index][key], value), (index, key)
        assert resumed["param_groups"] == saved["param_groups"]

        from test_train import copy_run

        broken = copy_run(run, tmp_path / "broken")
        (broken / "checkpoints" / "step-00000004" / "method_state.pt").unlink()
        result = train(*args, "--output-dir", tmp_path / "broken", "--name", "run", "--resume", "auto",
                       "--max-steps", 6)
        assert result.returncode == 2 and "method_state.pt is missing" in result.stderr
    else:
        from PIL import Image

        from tools.show_views import main as show_views

        picture = tmp_path / "inpainted.png"
        assert show_views(["--run", str(run), "--data", DEMO_VAL, "--samples", "3", "--out", str(picture)]) == 0
        assert Image.open(picture).size[0] > 200
        assert show_views(["--run", str(tmp_path), "--out", str(picture)]) == 2  # not a run


def test_show_views_refuses_a_run_of_a_method_without_reconstructions(tmp_path, capsys):
    from tools.show_views import main as show_views

    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000001"
    checkpoint.mkdir(parents=True)
    config = {"method": "rotnet", "backbone": "resnet10t", "stem": "no-maxpool", "multicrop": "1x32",
              "batch_size": 8, "epochs": 1, "lr": 0.1, "optimizer": "sgd", "warmup_epochs": 0.0,
              "weight_decay": 0.0}
    (checkpoint / "meta.json").write_text(json.dumps({"step": 1, "device": "cpu", "config": config}))
    torch.manual_seed(0)
    from safetensors.torch import save_file

    rotnet = create_method("rotnet", backbone="resnet10t", stem="no-maxpool", on_gpu=False)
    save_file({k: v.contiguous() for k, v in rotnet.state_dict().items()}, str(checkpoint / "model.safetensors"))
    assert show_views(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "x.png")]) == 2
    assert "a rotnet run draws no reconstructions (inpainting runs do)" in capsys.readouterr().err


def test_the_profilers_peer_cuts_the_same_hole_one_image_at_a_time():
    from tools.pretext_peer import PretextPeer, collate_pretext

    images = torch.randn(3, 3, 32, 32, generator=generator(7))
    for spec in (Inpainting().for_crop(32), Inpainting(mask="random", grid=4).for_crop(32)):
        peer = PretextPeer(SimpleNamespace(pretext=(spec,)), crop=None)
        made = collate_pretext([peer.from_tensor(image) for image in images])["inpainting"]
        assert made.images.shape == images.shape and made.labels.shape == (3, 32, 32)
        assert (made.labels.sum(dim=(1, 2)) == 256).all()
        hole = made.labels.unsqueeze(1).expand_as(images)
        assert (made.images[hole] == 0).all() and torch.equal(made.images[~hole], images[~hole])
        if spec.mask == "center":
            assert torch.equal(made.labels, inpaint(images, spec, generator()).labels)
