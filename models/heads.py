"""Projection heads and prototype layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(
    dims: list[int],
    *,
    batch_norm: bool = True,
    hidden_bias: bool = True,
    last_bias: bool = True,
    last_batch_norm: bool = False,
    last_bn_affine: bool = True,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Linear -> [BN] -> activation for every hidden layer, then a last Linear [-> BN].

    `dims` lists the widths from input to output, e.g. [2048, 2048, 128] is one hidden layer.
    """
    if len(dims) < 2:
        raise ValueError(f"mlp needs at least an input and an output width, got {dims}")
    layers: list[nn.Module] = []
    for in_dim, out_dim in zip(dims[:-2], dims[1:-1]):
        layers.append(nn.Linear(in_dim, out_dim, bias=hidden_bias))
        if batch_norm:
            layers.append(nn.BatchNorm1d(out_dim))
        layers.append(activation())
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    if last_batch_norm:
        layers.append(nn.BatchNorm1d(dims[-1], affine=last_bn_affine))
    return nn.Sequential(*layers)


class SwAVHead(nn.Module):
    """Linear -> BN -> ReLU -> Linear, then L2-normalise (SwAV's projection)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128):
        super().__init__()
        self.projection = mlp([in_dim, hidden_dim, out_dim])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(features), dim=1)


class SwAVPrototypes(nn.Linear):
    """Bias-free prototype vectors; scores = embeddings @ prototypesᵀ (cosines once both are unit)."""

    def __init__(self, out_dim: int, n_prototypes: int):
        super().__init__(out_dim, n_prototypes, bias=False)

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1))
