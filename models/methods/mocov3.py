"""MoCo v3 (Chen, Xie, He 2021), as facebookresearch/moco-v3 trains it."""

from __future__ import annotations

import torch
from torch import nn

from models.backbones import is_vit
from models.heads import mlp
from models.methods.base import Method, Progress
from models.zoo_losses import mocov3_loss


def moco_mlp(dims: list[int], last_batch_norm: bool) -> nn.Sequential:
    """MoCo v3's MLP: bias-free Linear -> BN -> ReLU per hidden layer; the last BN has no affine."""
    return mlp(dims, hidden_bias=False, last_bias=False, last_batch_norm=last_batch_norm, last_bn_affine=False)


class MoCoV3(Method):
    """Backbone -> projector -> predictor against a momentum backbone -> projector; in-batch negatives
    of all ranks, symmetric loss scaled by 2T. A ViT's patch embedding stays at its random init."""

    name = "mocov3"
    recipe_preset = "mocov3"
    EMA_PAIRS = (("momentum_backbone", "backbone"), ("momentum_projector", "projector"))

    # upstream's training recipe (a GPU run); lr: x global batch / 256 (300 and 1000 epochs; 0.6 for 100);
    # batch_size: per GPU: 32 x 128 = 4096 upstream
    paper = dict(optimizer="lars", lr=0.3, weight_decay=1e-6, warmup_epochs=10.0, epochs=300, batch_size=128,
                 multicrop="2x224")
    vit_overrides = {"optimizer": "adamw", "lr": 1.5e-4, "weight_decay": 0.1, "warmup_epochs": 40.0}
    cpu_overrides = {"multicrop": "2x32", "epochs": 2, "warmup_epochs": 0.0, "batch_size": 64}
    ema_base_momentum = 0.99

    HEAD_PRESETS = {"paper": dict(hidden_dim=4096, out_dim=256), "small": dict(hidden_dim=512, out_dim=128)}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True,
                 head_preset: str | None = None, hidden_dim: int | None = None, out_dim: int | None = None,
                 momentum: float = 0.99, temperature: float | None = None, freeze_patch_embed: bool = True,
                 **backbone_options):
        """`temperature` None: 1.0 for a ResNet, 0.2 for a ViT."""
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        sizes = self.head_sizes(head_preset, on_gpu, hidden_dim=hidden_dim, out_dim=out_dim)
        hidden, out = sizes["hidden_dim"], sizes["out_dim"]
        vit = is_vit(self.backbone)
        # ViT: a 3-layer projector and a predictor ending in BN; ResNet: 2 layers, predictor without
        projector_dims = [self.feature_dim, hidden, hidden, out] if vit else [self.feature_dim, hidden, out]
        self.projector = moco_mlp(projector_dims, last_batch_norm=True)
        self.predictor = moco_mlp([out, hidden, out], last_batch_norm=vit)
        if vit and freeze_patch_embed:
            self.backbone.patch_embed.requires_grad_(False)
        self.add_teachers(momentum)
        self.temperature = temperature if temperature is not None else (0.2 if vit else 1.0)

    def training_step(self, batch, progress: Progress):
        q1, q2 = self.two_views(batch, self.backbone, self.projector, self.predictor)
        with torch.no_grad():
            k1, k2 = self.two_views(batch, self.momentum_backbone, self.momentum_projector)
        loss = mocov3_loss(q1, q2, k1, k2, self.temperature)
        return loss, {"loss": loss.detach()}
