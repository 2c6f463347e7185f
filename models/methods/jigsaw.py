"""Jigsaw puzzles (Noroozi & Favaro 2016) and DeepPermNet (Santa Cruz et al. 2017): the backbone sees each
shuffled tile; from the tiles' features a head predicts the shuffle, as the index of a fixed permutation
set (`head=classifier`) or as a doubly stochastic matrix learnt against the true permutation matrix
(`head=sinkhorn`, any order of the tiles)."""

from __future__ import annotations

import math

import torch
from torch import nn

from models.heads import mlp
from models.methods.pretext import PretextHead, PretextMethod
from models.pretext_losses import classification_loss, log_sinkhorn, permutation_loss
from pipelines.spec import Jigsaw

HEADS = ("classifier", "sinkhorn")


class JigsawHead(PretextHead):
    """Each tile's features -> a shared Linear + ReLU (`tile_dim`, the paper's fc6) -> the tiles
    concatenated in position order -> Linear + BN + ReLU (`hidden_dim`, fc7) -> the permutation's index
    (`classifier`) or tiles x tiles scores made doubly stochastic by `sinkhorn_iterations` of Sinkhorn
    (`sinkhorn`)."""

    def __init__(self, feature_dim: int, spec: Jigsaw, *, head: str = "classifier", tile_dim: int = 512,
                 hidden_dim: int = 4096, sinkhorn_iterations: int = 20):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"jigsaw head={head!r}: use one of {', '.join(HEADS)}")
        if head == "classifier" and spec.permutations == 0:
            raise ValueError("jigsaw head=classifier needs a permutation set: permutations=N (N >= 1)")
        self.spec = spec
        self.head = head
        self.tiles = spec.grid ** 2
        self.tile = nn.Sequential(nn.Linear(feature_dim, tile_dim), nn.ReLU(inplace=True))
        outputs = spec.permutations if head == "classifier" else self.tiles ** 2
        self.puzzle = mlp([self.tiles * tile_dim, hidden_dim, outputs])
        self.sinkhorn_iterations = sinkhorn_iterations

    def forward(self, features: torch.Tensor, inputs, batch) -> tuple[torch.Tensor, dict]:
        scores = self.puzzle(self.tile(features).view(-1, self.tiles * self.tile[0].out_features))
        if self.head == "classifier":
            loss, accuracy = classification_loss(scores, inputs.labels)
            return loss, {"accuracy": accuracy}
        log_p = log_sinkhorn(scores.view(-1, self.tiles, self.tiles), self.sinkhorn_iterations)
        loss, accuracy = permutation_loss(log_p, inputs.order)
        return loss, {"tile_accuracy": accuracy}


class JigsawMethod(PretextMethod):
    """Jigsaw on one crop per image; the geometry and the permutation set are recipe options (`--method-options
    grid=3,cell=85,patch=64,permutations=1000`)."""

    name = "jigsaw"
    recipe_preset = "jigsaw"
    # VISSL's ResNet-50 Jigsaw: SGD, lr 0.1 per 256 images, wd 1e-4, 90 epochs, batch 32 x 8 GPUs
    paper = dict(optimizer="sgd", lr=0.1, weight_decay=1e-4, warmup_epochs=0.0, epochs=90, batch_size=32,
                 multicrop="1x255")
    # 28-px images upsampled to 48: 3x3 cells of 16 px, 12-px tiles
    cpu_overrides = {**PretextMethod.cpu_overrides, "multicrop": "1x48", "lr": 0.4}
    HEAD_PRESETS = {"paper": dict(tile_dim=512, hidden_dim=4096), "small": dict(tile_dim=128, hidden_dim=512)}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True, head: str = "classifier",
                 grid: int = 3, cell: int | None = None, patch: int | None = None, permutations: int | None = None,
                 permutation_seed: int = 0, normalise_tiles: bool = True, sinkhorn_iterations: int = 20,
                 head_preset: str | None = None, tile_dim: int | None = None, hidden_dim: int | None = None,
                 **backbone_options):
        """`permutations`: the set's size (default 1000, capped at grid²!); with head=sinkhorn the default is
        0, every order of the tiles."""
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        if permutations is None:
            permutations = 0 if head == "sinkhorn" else min(1000, math.factorial(grid ** 2))
        spec = Jigsaw(grid=grid, cell=cell, patch=patch, permutations=permutations,
                      permutation_seed=permutation_seed, normalise_tiles=normalise_tiles)
        sizes = self.head_sizes(head_preset, on_gpu, tile_dim=tile_dim, hidden_dim=hidden_dim)
        self.add_task(JigsawHead(self.feature_dim, spec, head=head, sinkhorn_iterations=sinkhorn_iterations,
                                 **sizes))
