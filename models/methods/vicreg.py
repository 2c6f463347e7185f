"""VICReg (Bardes, Ponce, LeCun 2022), as facebookresearch/vicreg trains it."""

from __future__ import annotations

from torch import nn

from models.heads import mlp
from models.methods.base import Method, Progress
from models.zoo_losses import vicreg_loss


class VICReg(Method):
    """Backbone -> 3-layer expander; invariance (local batch) + variance + covariance (all ranks)."""

    name = "vicreg"
    recipe_preset = "vicreg"

    # upstream's training recipe (a GPU run); lr: x global batch / 256 (B 2048, 1000 epochs; 0.3 at B 512 for
    # 100); batch_size: per GPU: 32 x 64 = 2048 upstream
    paper = dict(optimizer="lars", lr=0.2, weight_decay=1e-6, warmup_epochs=10.0, epochs=1000, batch_size=64,
                 multicrop="2x224")
    final_lr_fraction = 0.001
    cpu_overrides = {"multicrop": "2x32", "epochs": 2, "warmup_epochs": 0.0}

    HEAD_PRESETS = {"paper": dict(dim=8192), "small": dict(dim=1024)}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True,
                 head_preset: str | None = None, dim: int | None = None, sim_coeff: float = 25.0,
                 std_coeff: float = 25.0, cov_coeff: float = 1.0, **backbone_options):
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        dim = self.head_sizes(head_preset, on_gpu, dim=dim)["dim"]
        self.projector = mlp([self.feature_dim, dim, dim, dim], last_bias=False)
        self.coefficients = (sim_coeff, std_coeff, cov_coeff)

    def training_step(self, batch, progress: Progress):
        x, y = self.two_views(batch, self.backbone, self.projector)
        loss = vicreg_loss(x, y, *self.coefficients)
        return loss, {"loss": loss.detach()}
