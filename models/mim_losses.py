"""Losses of the masked-image methods: MAE's masked pixel regression and SIM's UniGrad terms.

Pure functions (tensors in, tensors out); the only collectives are UniGrad's correlation averages,
which carry no gradient (upstream all-reduces a target-side statistic). fp32 with autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.distributed import at_least_fp32, mean_over_ranks_


def normalized_pixel_targets(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's `norm_pix_loss` target: each patch (B, N, P) becomes (t - mean) / sqrt(var + eps) over
    its own P values (unbiased variance, as upstream's `Tensor.var`)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_patch_loss(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over hidden patches (mask True) of the per-patch mean squared error; visible patches
    contribute nothing."""
    with torch.autocast(prediction.device.type, enabled=False):
        error = (at_least_fp32(prediction) - at_least_fp32(target)).pow(2).mean(dim=-1)
        weight = mask.to(error.dtype)
        return (error * weight).sum() / weight.sum()


def unigrad_dense_loss(prediction: Tensor, target: Tensor, negative_weight: float = 0.02) -> Tensor:
    """SIM's dense UniGrad: with p, t the (tokens, D) rows of prediction and target (no gradient on t),
    C = t^T t / tokens averaged over ranks, loss = (mean ||p - t||^2 + w * mean p C p^T) / D.

    p C p^T is evaluated row by row as sum((p @ C) * p): memory O(tokens * D + D^2), never tokens^2.
    """
    with torch.autocast(prediction.device.type, enabled=False):
        p = at_least_fp32(prediction).reshape(-1, prediction.shape[-1])
        t = at_least_fp32(target.detach()).reshape(-1, target.shape[-1])
        positive = (p - t).pow(2).sum(dim=1).mean()
        with torch.no_grad():
            correlation = mean_over_ranks_(t.t() @ t / t.shape[0])
        negative = ((p @ correlation) * p).sum(dim=1).mean()
        return (positive + negative_weight * negative) / p.shape[1]


def unigrad_global_loss(online: Tensor, target: Tensor, correlation: Tensor, lambda_: float = 100.0,
                        rho: float = 0.99) -> Tensor:
    """UniGrad on pooled features (Tao et al. 2022), one direction: z1 = l2n(online), z2 = l2n(target)
    (no gradient). `correlation` F (D, D) is updated in place first, F <- rho F + (1 - rho)
    (z1^T z1 + z2^T z2) / 2N over all ranks; then the gradient on z1 is -z2 + lambda F z1, written as
    the surrogate mean <sg(-z2 + lambda F z1), z1>."""
    with torch.autocast(online.device.type, enabled=False):
        z1 = F.normalize(at_least_fp32(online), dim=1)
        z2 = F.normalize(at_least_fp32(target.detach()), dim=1)
        with torch.no_grad():
            batch = (z1.t() @ z1 + z2.t() @ z2) / (2 * z1.shape[0])
            correlation.mul_(rho).add_(mean_over_ranks_(batch), alpha=1 - rho)
            gradient = -z2 + lambda_ * z1 @ correlation
        return (gradient * z1).sum(dim=1).mean()
