"""MoCo v1 (He et al. 2019): MoCo v2's code with the v1 recipe, as facebookresearch/moco trains it."""

from __future__ import annotations

from models.methods.mocov2 import MoCoV2


class MoCoV1(MoCoV2):
    """A linear 128-d head (no MLP), T = 0.07, key momentum 0.999, a queue of 65,536; its views (the
    `mocov1` recipe preset): crops (0.2, 1), colour jitter 0.4 on every view (hue 0.4), grayscale 0.2,
    no blur. SGD at 0.03 x batch / 256, weight decay 1e-4, shuffle-BN: as MoCo v2."""

    name = "mocov1"
    recipe_preset = "mocov1"
    default_temperature = 0.07
    HEAD_PRESETS = {"paper": dict(hidden_dim=None, out_dim=128, queue_length=65536, momentum=0.999),
                    "small": dict(hidden_dim=None, out_dim=128, queue_length=4096, momentum=0.99)}
