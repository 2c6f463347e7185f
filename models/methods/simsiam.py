"""SimSiam (Chen & He 2021), as facebookresearch/simsiam trains it."""

from __future__ import annotations

from torch import nn

from models.heads import mlp
from models.methods.base import Method, Progress
from models.optim import param_groups
from models.zoo_losses import negative_cosine_loss


class SimSiam(Method):
    """Backbone -> 3-layer projector -> predictor; each view's prediction matches the other view's
    stop-gradient projection. The predictor keeps the peak LR (upstream's --fix-pred-lr)."""

    name = "simsiam"
    recipe_preset = "simsiam"

    # upstream's training recipe (a GPU run); lr: x global batch / 256; batch_size: per GPU: 8 x 64 = 512 upstream
    paper = dict(optimizer="sgd", lr=0.05, weight_decay=1e-4, epochs=100, batch_size=64, multicrop="2x224")
    cpu_overrides = {"multicrop": "2x32", "epochs": 2}

    HEAD_PRESETS = {"paper": dict(dim=2048, predictor_dim=512), "small": dict(dim=512, predictor_dim=128)}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True,
                 head_preset: str | None = None, dim: int | None = None, predictor_dim: int | None = None,
                 **backbone_options):
        # timm ResNets already zero-initialise the last BN of each residual block (zero_init_residual)
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        sizes = self.head_sizes(head_preset, on_gpu, dim=dim, predictor_dim=predictor_dim)
        dim = sizes["dim"]
        self.projector = mlp([self.feature_dim, dim, dim, dim], hidden_bias=False, last_batch_norm=True,
                             last_bn_affine=False)
        self.projector[-2].bias.requires_grad_(False)  # upstream: the bias before the affine-free BN is frozen
        self.predictor = mlp([dim, sizes["predictor_dim"], dim], hidden_bias=False)

    def param_groups(self, weight_decay: float) -> list[dict]:
        # upstream decays every parameter, biases and BN included
        return param_groups(self, weight_decay, exclude_bias_and_norm=False, fixed_lr=("predictor.",))

    def training_step(self, batch, progress: Progress):
        z = self.projector(self.backbone(batch.views[0]))
        z1, z2 = z.split(batch.batch_size)
        p1, p2 = self.predictor(z).split(batch.batch_size)
        loss = (negative_cosine_loss(p1, z2) + negative_cosine_loss(p2, z1)) / 2
        return loss, {"loss": loss.detach()}
