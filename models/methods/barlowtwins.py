"""Barlow Twins (Zbontar et al. 2021), as facebookresearch/barlowtwins trains it."""

from __future__ import annotations

from torch import nn

from models.heads import mlp
from models.methods.base import Method, Progress
from models.optim import param_groups
from models.zoo_losses import barlow_twins_loss


class BarlowTwins(Method):
    """Backbone -> 3-layer projector; the cross-correlation of the two views' batch-normalised
    projections (statistics over all ranks) is pushed towards the identity."""

    name = "barlowtwins"
    recipe_preset = "barlowtwins"

    # upstream's training recipe (a GPU run); lr: x global batch / 256 for weights; biases and BN get 0.0048
    # (bias_lr_multiplier); batch_size: per GPU: 16 x 128 = 2048 upstream
    paper = dict(optimizer="lars", lr=0.2, weight_decay=1e-6, warmup_epochs=10.0, epochs=1000, batch_size=128,
                 multicrop="2x224")
    final_lr_fraction = 0.001
    cpu_overrides = {"multicrop": "2x32", "epochs": 2, "warmup_epochs": 0.0, "batch_size": 64}

    HEAD_PRESETS = {"paper": dict(dim=8192), "small": dict(dim=1024)}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True,
                 head_preset: str | None = None, dim: int | None = None, lambda_: float = 0.0051,
                 bias_lr_multiplier: float = 0.0048 / 0.2, **backbone_options):
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        dim = self.head_sizes(head_preset, on_gpu, dim=dim)["dim"]
        self.projector = mlp([self.feature_dim, dim, dim, dim], hidden_bias=False, last_bias=False)
        self.lambda_ = lambda_
        self.bias_lr_multiplier = bias_lr_multiplier

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self, weight_decay, bias_and_norm_lr_multiplier=self.bias_lr_multiplier)

    def training_step(self, batch, progress: Progress):
        z1, z2 = self.two_views(batch, self.backbone, self.projector)
        loss = barlow_twins_loss(z1, z2, self.lambda_)
        return loss, {"loss": loss.detach()}
