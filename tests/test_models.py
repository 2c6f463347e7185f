"""Backbones, heads, LARS, schedules, EMA and the method registry."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from models.backbones import adapt_stem, create_backbone, default_backbone
from models.ema import cosine_momentum, ema_update_
from models.heads import SwAVHead, SwAVPrototypes, mlp
from models.methods import METHODS, create_method, method_class
from models.methods.swav import SwAV
from models.optim import LARS, build_optimizer, cosine_schedule, param_groups

# --- backbones ------------------------------------------------------------------------------------


def test_backbone_returns_pooled_features_and_their_dimension():
    model, dim = create_backbone("resnet18")
    assert dim == 512
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.kernel_size == (7, 7)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    assert default_backbone("cuda") == "resnet50" and default_backbone("cpu") == "resnet10t"


def test_cifar_stem_keeps_the_resolution_and_timm_names():
    model, dim = create_backbone("resnet18", stem="cifar")
    conv = model.conv1
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert isinstance(model.maxpool, nn.Identity) and model.stem == "cifar"
    assert create_backbone("resnet18")[0].stem == "standard"
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 512, 4, 4)  # 32 / 8, not 32 / 32

    model.eval()
    stock = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        stock.load_state_dict(model.state_dict())
    same_stem = adapt_stem(timm.create_model("resnet18", pretrained=False, num_classes=0), "cifar").eval()
    same_stem.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(same_stem(images), model(images))


@pytest.mark.parametrize("name, stem, final_map", [
    ("resnet10t", "standard", 1), ("resnet10t", "no-maxpool", 2), ("resnet10t", "cifar", 4),
    ("resnet18", "no-maxpool", 2),
])
def test_small_image_stems_that_keep_the_weights_load_into_stock_timm(name, stem, final_map):
    model, _ = create_backbone(name, stem=stem)
    assert model.stem == stem
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape[-2:] == (final_map, final_map)
    stock = timm.create_model(name, pretrained=False, num_classes=0)
    stock.load_state_dict(model.state_dict())  # same names and shapes: the exported file loads as is
    images = torch.randn(2, 3, 32, 32)
    model.eval(), adapt_stem(stock, stem).eval()
    torch.testing.assert_close(stock(images), model(images))


def test_an_unknown_stem_is_a_one_line_error():
    with pytest.raises(ValueError, match="^unknown stem 'tiny': one of standard, no-maxpool, cifar$"):
        create_backbone("resnet18", stem="tiny")


def test_vit_takes_image_and_patch_size_and_refuses_the_resnet_stem():
    model, dim = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4)
    assert dim == 192
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    with pytest.raises(ValueError, match="pass img_size=... and patch_size=... instead"):
        create_backbone("vit_tiny_patch16_224", stem="no-maxpool")


def test_unknown_backbone_is_a_one_line_error():
    with pytest.raises(ValueError) as error:
        create_backbone("resnet_nope")
    assert str(error.value) == (
        "unknown backbone 'resnet_nope': any timm model name, e.g. resnet18, resnet50, vit_small_patch16_224"
    )


# --- heads ----------------------------------------------------------------------------------------


def test_mlp_layers():
    head = mlp([8, 16, 16, 4], hidden_bias=False, last_bias=False, last_batch_norm=True, last_bn_affine=False)
    kinds = [type(layer).__name__ for layer in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert head[0].bias is None and head[6].bias is None and not head[7].affine
    plain = mlp([8, 4, 2], batch_norm=False, activation=nn.GELU)
    assert [type(layer).__name__ for layer in plain] == ["Linear", "GELU", "Linear"]
    assert plain[0].bias is not None and plain[2].bias is not None


def test_swav_head_and_prototypes():
    head = SwAVHead(16, 32, 8)
    assert [type(layer).__name__ for layer in head.projection] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    torch.testing.assert_close(head(torch.randn(4, 16)).norm(dim=1), torch.ones(4))
    prototypes = SwAVPrototypes(8, 5)
    assert prototypes.bias is None and prototypes.weight.shape == (5, 8)
    prototypes.normalize_()
    torch.testing.assert_close(prototypes.weight.norm(dim=1), torch.ones(5))
    assert not prototypes.weight.grad_fn


# --- optimisation ---------------------------------------------------------------------------------


def test_param_groups_split_one_dimensional_parameters_and_apply_lr_multipliers():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[2].weight.requires_grad_(False)
    groups = param_groups(model, 0.1, lr_multipliers={"2.": 2.0})
    by_key = {(g["lars_exclude"], g["lr_multiplier"]): g for g in groups}
    assert set(by_key) == {(False, 1.0), (True, 1.0), (True, 2.0)}
    assert by_key[(False, 1.0)]["params"] == [model[0].weight] and by_key[(False, 1.0)]["weight_decay"] == 0.1
    assert by_key[(True, 1.0)]["params"] == [model[0].bias, model[1].weight, model[1].bias]
    assert by_key[(True, 1.0)]["weight_decay"] == 0.0
    assert by_key[(True, 2.0)]["params"] == [model[2].bias]  # the frozen weight is left out
    everything = param_groups(model, 0.1, exclude_bias_and_norm=False)
    assert len(everything) == 1 and len(everything[0]["params"]) == 5


def test_lars_step_matches_a_hand_computation():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(3, 4))
    bias = nn.Parameter(torch.randn(3))
    zero = nn.Parameter(torch.zeros(2))  # |w| = 0: no adaptation, no decay
    lr, wd, eta, momentum = 0.5, 0.01, 0.001, 0.9
    optimizer = LARS([{"params": [weight, zero], "weight_decay": wd},
                      {"params": [bias], "weight_decay": 0.0, "lars_exclude": True}],
                     lr=lr, momentum=momentum, eta=eta)
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    grads = [(torch.randn(3, 4), torch.randn(3), torch.randn(2)) for _ in range(2)]

    def adapted(w, g):
        trust = eta * w.norm() / (g.norm() + wd * w.norm() + 1e-8)
        return trust * (g + wd * w)

    weight.grad, bias.grad, zero.grad = grads[0]
    optimizer.step()
    buffer_w = adapted(w0, grads[0][0])
    w1 = w0 - lr * buffer_w
    b1 = b0 - lr * grads[0][1]
    torch.testing.assert_close(weight.detach(), w1)
    torch.testing.assert_close(bias.detach(), b1)
    torch.testing.assert_close(zero.detach(), -lr * grads[0][2])

    weight.grad, bias.grad, zero.grad = grads[1]
    optimizer.step()
    buffer_w = momentum * buffer_w + adapted(w1, grads[1][0])
    torch.testing.assert_close(weight.detach(), w1 - lr * buffer_w)
    torch.testing.assert_close(bias.detach(), b1 - lr * (momentum * grads[0][1] + grads[1][1]))


def test_lars_leaves_parameters_with_a_zero_gradient_alone():
    weight = nn.Parameter(torch.ones(3))
    optimizer = LARS([weight], lr=1.0, weight_decay=0.1)
    weight.grad = torch.zeros(3)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.ones(3))


def test_build_optimizer():
    model = nn.Linear(4, 2)
    groups = param_groups(model, 1e-4)
    assert isinstance(build_optimizer("lars", groups, lr=0.1), LARS)
    sgd = build_optimizer("sgd", param_groups(model, 1e-4), lr=0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    assert sorted(g["weight_decay"] for g in sgd.param_groups) == [0.0, 1e-4]
    adamw = build_optimizer("adamw", param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="^unknown optimizer 'adam'; known: lars, sgd, adamw$"):
        build_optimizer("adam", groups, lr=0.1)


def test_cosine_schedule_values():
    schedule = cosine_schedule(1.0, 0.01, total_steps=110, warmup_steps=10, warmup_start=0.1)
    assert schedule.shape == (110,)
    assert schedule[0] == pytest.approx(0.1)
    assert schedule[5] == pytest.approx(0.1 + 0.9 * 5 / 9)
    assert schedule[9] == pytest.approx(1.0) and schedule[10] == pytest.approx(1.0)
    assert schedule[60] == pytest.approx(0.01 + 0.99 * 0.5)  # halfway through the cosine
    assert schedule[-1] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert schedule[-1] > 0.01 and (abs(schedule[-1] - 0.01) < 1e-3)
    assert (cosine_schedule(0.6, 0.0006, 50) <= 0.6).all() and cosine_schedule(0.6, 0.0006, 50)[0] == 0.6
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(1.0, 0.0, total_steps=5, warmup_steps=6)


# --- EMA ------------------------------------------------------------------------------------------


def test_ema_update_moves_parameters_and_copies_buffers():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    target = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    online(torch.randn(8, 3))  # updates the online running statistics
    expected = [0.9 * t.detach() + 0.1 * o.detach() for t, o in zip(target.parameters(), online.parameters())]
    ema_update_(target, online, 0.9)
    for got, want in zip(target.parameters(), expected):
        torch.testing.assert_close(got.detach(), want)
    for got, want in zip(target.buffers(), online.buffers()):
        torch.testing.assert_close(got, want)
    ema_update_(target, online, 0.0)
    for got, want in zip(target.parameters(), online.parameters()):
        torch.testing.assert_close(got, want)


def test_cosine_momentum():
    assert cosine_momentum(0.996, 0, 1000) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 500, 1000) == pytest.approx(0.998)
    assert cosine_momentum(0.996, 1000, 1000) == pytest.approx(1.0)


# --- registry -------------------------------------------------------------------------------------


def test_registry():
    assert METHODS["swav"] is SwAV and method_class("swav") is SwAV
    method = create_method("swav", backbone="resnet18", stem="cifar", on_gpu=False)
    assert isinstance(method, SwAV) and method.feature_dim == 512
    with pytest.raises(ValueError, match="^unknown method 'nope'; known: barlowtwins, byol, colorization, decoupling, dino, inpainting, ipt, jigsaw, mae, mocov1, "
                       "mocov2, mocov3, multitask, npid, relloc, rotnet, sim, simclr, simsiam, swav, vicreg$"):
        create_method("nope")
    with pytest.raises(ValueError, match="unknown swav head_preset 'huge'"):
        create_method("swav", backbone="resnet18", head_preset="huge")
