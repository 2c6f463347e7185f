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


class DINOHead(nn.Module):
    """MLP (GELU, no BN) -> L2-normalised bottleneck -> weight-normalised Linear without bias.

    The last layer is weight normalisation written out: rows of `last_weight` are L2-normalised and
    scaled by `last_scale` (weight_g), which stays 1 when `norm_last_layer` (DINO's default).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, out_dim: int = 65536,
                 n_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        self.mlp = mlp([in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim], batch_norm=False,
                       activation=nn.GELU)
        for layer in self.mlp.modules():
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_weight = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.last_weight, a=5**0.5)  # nn.Linear's initialisation
        self.last_scale = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return [self.last_weight, self.last_scale]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        bottleneck = F.normalize(self.mlp(features), dim=-1)
        return F.linear(bottleneck, F.normalize(self.last_weight, dim=1) * self.last_scale)
