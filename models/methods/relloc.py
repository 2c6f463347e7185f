"""Context prediction (Doersch, Gupta & Efros 2015): from a centre patch and one of its eight neighbours,
predict where the neighbour sits."""

from __future__ import annotations

import torch
from torch import nn

from models.heads import mlp
from models.methods.pretext import PretextHead, PretextMethod
from models.pretext_losses import classification_loss
from pipelines.spec import RelativeLocation


class RelativeLocationHead(PretextHead):
    """The centre's and the neighbour's features concatenated -> Linear + BN + ReLU (`hidden_dim`) ->
    8-way classifier (mmselfsup's RelativeLoc head)."""

    def __init__(self, feature_dim: int, spec: RelativeLocation, *, hidden_dim: int = 4096):
        super().__init__()
        self.spec = spec
        self.classifier = mlp([2 * feature_dim, hidden_dim, 8])

    def forward(self, features: torch.Tensor, inputs, batch) -> tuple[torch.Tensor, dict]:
        centres, neighbours = features.chunk(2)
        loss, accuracy = classification_loss(self.classifier(torch.cat([centres, neighbours], dim=1)),
                                             inputs.labels)
        return loss, {"accuracy": accuracy}


class RelativeLocationMethod(PretextMethod):
    """Context prediction on one crop per image: a 3x3 grid of cells, a patch at a random offset in each
    (`--method-options cell=85,patch=64,all_pairs=true,color_dropping=true,projection=true`, and
    Mundhenk et al.'s `chroma_blur`, `yoked_jitter`, `aperture`)."""

    name = "relloc"
    recipe_preset = "relloc"
    # mmselfsup's RelativeLoc (ResNet-50): SGD, lr 0.2 at batch 512 (0.1 per 256), wd 1e-4, 70 epochs
    paper = dict(optimizer="sgd", lr=0.1, weight_decay=1e-4, warmup_epochs=0.0, epochs=70, batch_size=64,
                 multicrop="1x255")
    cpu_overrides = {**PretextMethod.cpu_overrides, "multicrop": "1x48", "lr": 0.4}
    HEAD_PRESETS = {"paper": dict(hidden_dim=4096), "small": dict(hidden_dim=512)}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True, cell: int | None = None,
                 patch: int | None = None, all_pairs: bool = False, color_dropping: bool = False,
                 projection: bool = False, chroma_blur: bool = False, yoked_jitter: bool = False,
                 aperture: bool = False, head_preset: str | None = None, hidden_dim: int | None = None,
                 **backbone_options):
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        spec = RelativeLocation(cell=cell, patch=patch, all_pairs=all_pairs, color_dropping=color_dropping,
                                projection=projection, chroma_blur=chroma_blur, yoked_jitter=yoked_jitter,
                                aperture=aperture)
        sizes = self.head_sizes(head_preset, on_gpu, hidden_dim=hidden_dim)
        self.add_task(RelativeLocationHead(self.feature_dim, spec, **sizes))
