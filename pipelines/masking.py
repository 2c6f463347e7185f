"""Patch masks for masked-image methods, drawn on the training device without host round trips.

A mask is a bool tensor (B, grid * grid), row-major over patches, True = hidden from the encoder.
Every kind masks exactly `num_masked` patches per sample: `random` and `block` anywhere, `center` as the
centred square (the context encoder's hole).
"""

from __future__ import annotations

import math

import torch

from pipelines.spec import Masking, center_square


def random_masks(batch: int, grid: int, num_masked: int, generator: torch.Generator, device) -> torch.Tensor:
    """MAE masking: a uniformly random subset of exactly `num_masked` patches per sample."""
    noise = torch.rand(batch, grid * grid, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < num_masked


def block_masks(
    batch: int,
    grid: int,
    num_masked: int,
    generator: torch.Generator,
    device,
    min_block: int = 16,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 24,
) -> torch.Tensor:
    """BEiT-style block-wise masking, vectorised over the batch.

    Each attempt proposes one rectangle per sample (area in [min_block, remaining], log-uniform
    aspect); it is accepted when it adds at least one new patch and does not overshoot the target.
    The remainder is then topped up with uniformly random patches, so every sample has exactly
    `num_masked` masked patches.
    """
    rows = torch.arange(grid, device=device).view(1, grid, 1)
    cols = torch.arange(grid, device=device).view(1, 1, grid)
    mask = torch.zeros(batch, grid, grid, dtype=torch.bool, device=device)
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])

    def uniform() -> torch.Tensor:
        return torch.rand(batch, generator=generator, device=device)

    min_block = min(min_block, num_masked)
    for _ in range(attempts):
        remaining = num_masked - mask.sum(dim=(1, 2))
        high = remaining.clamp(min=min_block).float()
        area = min_block + (high - min_block) * uniform()
        ratio = torch.exp(log_low + (log_high - log_low) * uniform())
        height = torch.sqrt(area * ratio).round().clamp(1, grid).long()
        width = torch.sqrt(area / ratio).round().clamp(1, grid).long()
        top = (uniform() * (grid - height + 1)).floor().long()
        left = (uniform() * (grid - width + 1)).floor().long()
        block = (
            (rows >= top.view(-1, 1, 1))
            & (rows < (top + height).view(-1, 1, 1))
            & (cols >= left.view(-1, 1, 1))
            & (cols < (left + width).view(-1, 1, 1))
        )
        added = (block & ~mask).sum(dim=(1, 2))
        accept = (added > 0) & (added <= remaining)
        mask |= block & accept.view(-1, 1, 1)
    return _top_up(mask.view(batch, -1), num_masked, generator)


def _top_up(mask: torch.Tensor, num_masked: int, generator: torch.Generator) -> torch.Tensor:
    """Add random unmasked patches until each row has exactly `num_masked` (never removes any)."""
    priority = torch.rand(mask.shape, generator=generator, device=mask.device) + mask.float() * 2.0
    ranks = priority.argsort(dim=1, descending=True).argsort(dim=1)
    return ranks < num_masked


def center_masks(batch: int, grid: int, side: int, device) -> torch.Tensor:
    """The centred `side` x `side` square of the grid, the same for every sample (no random draw)."""
    start = (grid - side) // 2
    cells = torch.arange(grid, device=device)
    inside = (cells >= start) & (cells < start + side)
    return (inside.view(grid, 1) & inside.view(1, grid)).view(1, -1).expand(batch, -1).clone()


def make_masks(masking: Masking, batch: int, crop_size: int, generator: torch.Generator, device) -> torch.Tensor:
    """Masks for `masking.views` views of `batch` samples each: (views * batch, grid * grid), view-major."""
    grid = masking.grid(crop_size)
    count = masking.num_masked(crop_size)
    total = masking.views * batch
    if masking.kind == "center":
        return center_masks(total, grid, center_square(grid, count), device)
    if masking.kind == "random":
        return random_masks(total, grid, count, generator, device)
    return block_masks(
        total, grid, count, generator, device, min_block=masking.min_block_patches, aspect=masking.block_aspect
    )
