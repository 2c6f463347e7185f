"""Backbones: any timm model, returning pooled features and their dimension, or features of its
intermediate layers (`LayerFeatures`)."""

from __future__ import annotations

import contextlib
import math
import re

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
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


FINAL_LAYER = "final"  # the model's own pooled features (its forward)
MAX_LAYER_DIM = 9216  # a pooled feature map has at most this many values (Goyal et al. 2019)


def layer_names(backbone: nn.Module) -> list[str]:
    """The layers `LayerFeatures` takes: "final", then the points of timm's `feature_info` that
    `forward_intermediates` returns, in forward order: a ResNet's "stem" (after conv1, bn1, act1; before
    the max-pool) and "layer1".."layer4"; a ViT's "block0".."block<depth - 1>"; any other timm model's
    `feature_info` module names (e.g. "stages.0"). Models without `forward_intermediates`: "final" only."""
    points = getattr(backbone, "feature_info", None)
    if not hasattr(backbone, "forward_intermediates") or not isinstance(points, list):
        return [FINAL_LAYER]
    names = [re.sub(r"^blocks\.(\d+)$", r"block\1", info["module"]) for info in points]
    return [FINAL_LAYER, *("stem" if name == "act1" else name for name in names)]


def pooled_grid(channels: int, height: int, width: int) -> tuple[int, int]:
    """The grid a (channels, height, width) feature map is average-pooled to: side
    g = max(1, floor(sqrt(MAX_LAYER_DIM / channels))), so channels * g * g <= 9216 (above 9216 channels:
    1x1), each side capped at the map's own (a map is never upsampled). ResNet-50's stem and stages
    (64, 256, 512, 1024, 2048 channels) get 12, 6, 4, 3, 2: Goyal et al.'s 9216, 9216, 8192, 9216, 8192."""
    side = max(1, math.isqrt(MAX_LAYER_DIM // channels))
    return min(side, height), min(side, width)


class LayerFeatures(nn.Module):
    """`backbone` returning {layer: (B, D) features} for `names` (of `layer_names`), in the order given,
    from one forward per batch (timm's `forward_intermediates`; it stops after the deepest layer asked
    for unless "final" is). "final": the backbone's own output. A feature map (B, C, H, W) is
    adaptive-average-pooled to `pooled_grid(C, H, W)` and flattened (channel-major); a ViT block's output
    is the mean of its patch tokens (class and other prefix tokens left out; no norm, nothing else).
    Unknown names raise ValueError. `backbone` is a submodule: eval() and to() reach it."""

    def __init__(self, backbone: nn.Module, names: list[str] | tuple[str, ...] = (FINAL_LAYER,)):
        super().__init__()
        known = layer_names(backbone)
        for name in names:
            if name not in known:
                raise ValueError(f"unknown layer {name!r}; {type(backbone).__name__} has {', '.join(known)}")
        self.backbone = backbone
        self.names = list(dict.fromkeys(names))
        # forward_intermediates numbers the feature_info points from 0; "final" is known[0]
        self.at_index = {known.index(name) - 1: name for name in self.names if name != FINAL_LAYER}
        self.indices = sorted(self.at_index)
        self.tokens = isinstance(backbone, VisionTransformer)  # its forward_intermediates gives tokens

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.indices:
            return {FINAL_LAYER: self.backbone(images)}
        final = FINAL_LAYER in self.names
        options = {"output_fmt": "NLC"} if self.tokens else {}
        output = self.backbone.forward_intermediates(images, indices=self.indices, stop_early=not final,
                                                     intermediates_only=not final, **options)
        last, maps = output if final else (None, output)
        features = {self.at_index[index]: _pool(x) for index, x in zip(self.indices, maps)}
        if final:
            features[FINAL_LAYER] = self.backbone.forward_head(last)
        return {name: features[name] for name in self.names}


def _pool(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 3:  # (B, patch tokens, D)
        return x.mean(dim=1)
    return F.adaptive_avg_pool2d(x, pooled_grid(*x.shape[1:])).flatten(1)
