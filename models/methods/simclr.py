"""SimCLR (Chen et al. 2020), as google-research/simclr (v2) trains it."""

from __future__ import annotations

from torch import nn

from models.heads import mlp
from models.methods.base import Method, Progress
from models.zoo_losses import nt_xent_loss


class SimCLR(Method):
    """Backbone -> 3-layer projector (BN on every layer) -> NT-Xent with negatives from all ranks."""

    name = "simclr"
    recipe_preset = "simclr"

    # upstream's training recipe (a GPU run); lr: x global batch / 256 (= 0.075 * sqrt(4096)); batch_size: per
    # GPU: 32 x 128 = 4096 upstream
    paper = dict(optimizer="lars", lr=0.3, weight_decay=1e-4, warmup_epochs=10.0, epochs=100, batch_size=128,
                 multicrop="2x224")
    cpu_overrides = {"multicrop": "2x32", "epochs": 2, "warmup_epochs": 0.0, "batch_size": 64}

    HEAD_PRESETS = {"paper": dict(hidden_dim=2048, out_dim=128), "small": dict(hidden_dim=512, out_dim=128)}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True,
                 head_preset: str | None = None, hidden_dim: int | None = None, out_dim: int | None = None,
                 temperature: float = 0.1, **backbone_options):
        """`temperature` 0.1 (ImageNet); upstream uses 0.5 for CIFAR-size images."""
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        sizes = self.head_sizes(head_preset, on_gpu, hidden_dim=hidden_dim, out_dim=out_dim)
        # v2: bias + ReLU on the middle layers only, BN on all three
        self.projector = mlp([self.feature_dim, sizes["hidden_dim"], sizes["hidden_dim"], sizes["out_dim"]],
                             last_bias=False, last_batch_norm=True)
        self.temperature = temperature

    def training_step(self, batch, progress: Progress):
        z1, z2 = self.two_views(batch, self.backbone, self.projector)
        loss = nt_xent_loss(z1, z2, self.temperature)
        return loss, {"loss": loss.detach()}
