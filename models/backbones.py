"""Backbones: any timm model, returning pooled features and their dimension."""

from __future__ import annotations

import timm
from torch import nn

UNKNOWN_BACKBONE = (
    "unknown backbone {!r}: any timm model name, e.g. resnet18, resnet50, vit_small_patch16_224"
)


def default_backbone(device_type: str) -> str:
    return "resnet50" if device_type == "cuda" else "resnet18"


def create_backbone(name: str, *, small_images: bool = False, **kwargs) -> tuple[nn.Module, int]:
    """A randomly initialised timm model without classifier (its forward returns pooled features)
    and its feature dimension. Extra keyword arguments go to `timm.create_model` (e.g. `img_size`,
    `patch_size` for ViTs). `small_images=True` gives a ResNet the CIFAR stem (see `use_small_image_stem`).
    """
    if not timm.is_model(name):
        raise ValueError(UNKNOWN_BACKBONE.format(name))
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if small_images:
        use_small_image_stem(model, name)
    return model, model.num_features


def use_small_image_stem(model: nn.Module, name: str = "this model") -> nn.Module:
    """CIFAR-style ResNet stem, in place: conv1 becomes 3x3 stride 1 and the max-pool goes.

    Parameter names stay timm's, so the weights load into `timm.create_model(name, num_classes=0)`
    after the same call on that model (a stock timm ResNet has a 7x7 conv1 and would reject them).
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(
            f"small_images=True needs a ResNet stem (conv1 + maxpool), which {name} lacks; "
            "for a ViT pass img_size=... and patch_size=... instead"
        )
    model.conv1 = nn.Conv2d(
        conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=conv.bias is not None
    )
    model.maxpool = nn.Identity()
    model.small_image_stem = True  # recorded in backbone.json next to exported weights
    return model
