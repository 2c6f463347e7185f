"""BYOL (Grill et al. 2020), as deepmind-research/byol trains it."""

from __future__ import annotations

import torch
from torch import nn

from models.heads import mlp
from models.methods.base import Method, Progress
from models.zoo_losses import negative_cosine_loss


class BYOL(Method):
    """Online backbone -> projector -> predictor regresses the EMA target's projection of the other view."""

    name = "byol"
    recipe_preset = "byol"
    EMA_PAIRS = (("target_backbone", "backbone"), ("target_projector", "projector"))

    # upstream's training recipe (a GPU run); lr: x global batch / 256, for 1000 epochs (0.3 at 300, 0.45 at
    # 40/100); batch_size: per device: 32 x 128 = 4096 upstream
    paper = dict(optimizer="lars", lr=0.2, weight_decay=1.5e-6, warmup_epochs=10.0, epochs=1000, batch_size=128,
                 multicrop="2x224")
    cpu_overrides = {"multicrop": "2x32", "epochs": 2, "warmup_epochs": 0.0, "batch_size": 64}

    HEAD_PRESETS = {"paper": dict(hidden_dim=4096, out_dim=256, momentum=0.996),
                    # 0.99 is upstream's base for 100/300 epochs; a 2-epoch run needs a target that moves
                    "small": dict(hidden_dim=512, out_dim=128, momentum=0.99)}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True,
                 head_preset: str | None = None, hidden_dim: int | None = None, out_dim: int | None = None,
                 momentum: float | None = None, **backbone_options):
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        sizes = self.head_sizes(head_preset, on_gpu, hidden_dim=hidden_dim, out_dim=out_dim, momentum=momentum)
        hidden, out = sizes["hidden_dim"], sizes["out_dim"]
        self.projector = mlp([self.feature_dim, hidden, out], last_bias=False)
        self.predictor = mlp([out, hidden, out], last_bias=False)
        self.add_teachers(sizes["momentum"])

    def training_step(self, batch, progress: Progress):
        p1, p2 = self.two_views(batch, self.backbone, self.projector, self.predictor)
        with torch.no_grad():
            z1, z2 = self.two_views(batch, self.target_backbone, self.target_projector)
        # ||l2n(p) - l2n(z)||^2 = 2 - 2 cos, summed over both view orders
        loss = 4 + 2 * (negative_cosine_loss(p1, z2) + negative_cosine_loss(p2, z1))
        return loss, {"loss": loss.detach()}
