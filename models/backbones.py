"""Backbones: any timm model, returning pooled features and their dimension."""

from __future__ import annotations

import contextlib

import timm
import torch
from torch import nn

UNKNOWN_BACKBONE = (
    "unknown backbone {!r}: any timm model name, e.g. resnet18, resnet50, vit_small_patch16_224"
)
# standard: as timm builds it. no-maxpool: a ResNet without the max-pool after its stem (2x the
# resolution in every stage, same weights as timm's). cifar: also a stride-1 stem (4x the resolution):
# a 7x7 stride-2 conv1 becomes 3x3 stride 1 as in CIFAR ResNets (it then no longer loads into a stock
# timm model); a deep 3-conv stem (resnet*d, resnet*t) keeps its weights, its first conv loses the stride.
STEMS = ("standard", "no-maxpool", "cifar")
SMALL_IMAGE_CROPS = 64  # crops at most this large get a small-image ResNet stem by default


def default_backbone(device_type: str) -> str:
    # CPU: resnet10t (3-conv stem, 4.9M parameters) trains ~2x faster than resnet18 on 32-px crops and
    # scored higher on the demo kNN in the same 2 epochs (README, "Training")
    return "resnet50" if device_type == "cuda" else "resnet10t"


def is_vit(backbone: str | nn.Module) -> bool:
    """A vision transformer (timm's ViT family, DeiT included), by name or by its patch embedding."""
    if isinstance(backbone, str):
        return backbone in timm.list_models(module=["vision_transformer", "deit"])
    return hasattr(backbone, "patch_embed")


def default_stem(backbone: str, crop_size: int, on_gpu: bool) -> str:
    """Small crops through a stock ResNet end in 1x1 maps, so timm ResNets keep more resolution for them.
    The cifar stem costs ~16x the compute of the standard one, no-maxpool ~4x: on CPU speed wins."""
    if crop_size > SMALL_IMAGE_CROPS or backbone not in timm.list_models(module="resnet"):
        return "standard"
    return "cifar" if on_gpu else "no-maxpool"


def options_for_crops(backbone: str, options: dict, crop_sizes: list[int]) -> dict:
    """`options` (`timm.create_model` keyword arguments) with what the crops need: a ViT's position table
    is built for one input size, the first crops' (`img_size`), and resampled for the others
    (`dynamic_img_size` when there are several sizes). Values in `options` win."""
    options = dict(options)
    if is_vit(backbone):
        options.setdefault("img_size", crop_sizes[0])
        if len(crop_sizes) > 1:
            options.setdefault("dynamic_img_size", True)
    return options


def create_backbone(name: str, *, stem: str = "standard", **kwargs) -> tuple[nn.Module, int]:
    """A randomly initialised timm model without classifier (its forward returns pooled features)
    and its feature dimension. Extra keyword arguments go to `timm.create_model` (e.g. `img_size`,
    `patch_size` for ViTs). `stem` adapts a ResNet to small images (see `STEMS`, `adapt_stem`).
    """
    if not timm.is_model(name):
        raise ValueError(UNKNOWN_BACKBONE.format(name))
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    adapt_stem(model, stem, name)
    return model, model.num_features


def adapt_stem(model: nn.Module, stem: str, name: str = "this model") -> nn.Module:
    """Apply one of `STEMS` in place and record it as `model.stem` (backbone.json repeats it).

    Parameter names stay timm's: weights load into `timm.create_model(name, num_classes=0)` after the
    same call on that model (for "standard" and "no-maxpool", into the stock model itself).
    """
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}: one of {', '.join(STEMS)}")
    if stem != "standard":
        conv = getattr(model, "conv1", None)
        if not hasattr(model, "maxpool") or not isinstance(conv, (nn.Conv2d, nn.Sequential)):
            raise ValueError(
                f"stem {stem!r} needs a ResNet stem (conv1 + max-pool), which {name} lacks; "
                "for a ViT pass img_size=... and patch_size=... instead"
            )
        model.maxpool = nn.Identity()
        if stem == "cifar" and isinstance(conv, nn.Conv2d):
            model.conv1 = nn.Conv2d(
                conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=conv.bias is not None
            )
        elif stem == "cifar":
            conv[0].stride = (1, 1)
    model.stem = stem
    return model


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module):
    """Inside, batch norms still normalise with batch statistics (in train mode) but leave their running
    estimates, and their batch count, as they were.

    The buffers are saved on entry and written back on exit (a few kernels, no host sync); the modules'
    attributes never change, so a compiled backbone keeps its graphs (toggling `momentum`, a float
    that torch.compile guards on, would not)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        yield
        return
    stats = [stat for m in norms for stat in (m.running_mean, m.running_var)]
    counts = [m.num_batches_tracked for m in norms]
    with torch.no_grad():
        saved_stats = torch.cat([stat.view(-1) for stat in stats])
        saved_counts = torch.stack(counts)
    try:
        yield
    finally:
        # through `.data`: a training-mode batch norm keeps its running buffers for backward (unread there),
        # and a tracked in-place write would fail that backward's version check
        with torch.no_grad():
            saved = saved_stats.split([stat.numel() for stat in stats])
            torch._foreach_copy_([stat.data for stat in stats], saved)
            torch._foreach_copy_([count.data for count in counts], saved_counts.unbind())
