"""Exponential moving average of a network (momentum encoders, EMA teachers)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online for parameters; buffers (BN running
    statistics) are copied. Both modules must have the same architecture."""
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError(
            f"ema_update_: target has {len(target_params)} parameters, online {len(online_params)}"
        )
    if target_params:
        torch._foreach_mul_(target_params, momentum)
        torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)
    for target_buffer, online_buffer in zip(target.buffers(), online.buffers()):
        target_buffer.copy_(online_buffer)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """1 - (1 - base) * (cos(pi * step / total) + 1) / 2: base at step 0, 1 at the end (BYOL, MoCo v3)."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total_steps) + 1.0) / 2.0


def frozen_copy(module: nn.Module) -> nn.Module:
    """A teacher: a deep copy of `module` whose parameters take no gradient (EMA updates only)."""
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    return teacher
