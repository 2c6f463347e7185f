"""Losses of the transformation-prediction tasks (RotNet, Jigsaw, DeepPermNet, context prediction):
pure functions of scores and targets."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def classification_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(cross-entropy, top-1 accuracy) of `logits` (N, classes) against integer `labels` (N,); the
    accuracy stays a tensor (no host sync)."""
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, accuracy


def log_sinkhorn(scores: Tensor, iterations: int = 20) -> Tensor:
    """Log of the doubly stochastic matrices Sinkhorn's alternating row and column normalisation makes
    from exp(`scores`) (..., n, n), in log space (no overflow for large scores)."""
    log_p = scores.float()
    for _ in range(iterations):
        log_p = log_p - log_p.logsumexp(dim=-1, keepdim=True)
        log_p = log_p - log_p.logsumexp(dim=-2, keepdim=True)
    return log_p


def permutation_loss(log_p: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """DeepPermNet's loss against the true permutation matrix: the mean negative log of the entries
    (position j, tile order[j]) of the doubly stochastic `log_p` (B, n, n); zero exactly when those entries
    are 1. Returns (loss, the share of positions whose most likely tile is the true one)."""
    true = log_p.gather(-1, order.unsqueeze(-1)).squeeze(-1)
    accuracy = (log_p.detach().argmax(dim=-1) == order).float().mean()
    return -true.mean(), accuracy
