"""What the losses and methods share around torch.distributed and numeric precision.

Without an initialised process group every function is the single-process case: world size 1, rank 0,
gathers and reductions return their input. Collectives that carry gradients are autograd-aware: a rank's
gradient is world_size x the single-process gradient of its slice, so DDP's gradient averaging
reproduces one process on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate x of every rank along dim 0; gradients flow back into the local slice (summed over ranks)."""
    if world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


def all_reduce_with_grad(x: Tensor) -> Tensor:
    """Sum over ranks; the backward all-reduces (sums) the gradient too."""
    return dist_fn.all_reduce(x) if world_size() > 1 else x


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum over ranks in place, no gradient (statistics such as Sinkhorn's marginals); returns `tensor`."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def mean_over_ranks_(tensor: Tensor) -> Tensor:
    """The mean over ranks in place, no gradient; returns `tensor`."""
    if world_size() > 1:
        all_reduce_sum_(tensor)
        tensor /= world_size()
    return tensor


def at_least_fp32(tensor: Tensor) -> Tensor:
    """`tensor` in float32 when its dtype is narrower (float16, bfloat16); float64 stays float64."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def autocast_off(tensor: Tensor) -> torch.autocast:
    """A context with autocast disabled on `tensor`'s device type (losses compute in at least fp32)."""
    return torch.autocast(tensor.device.type, enabled=False)
