"""Optimisers, parameter groups and per-iteration schedules."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio: SwAV's LARC with clip=False.

    For each parameter w with gradient g (both nonzero):
        g <- eta * |w| / (|g| + wd * |w| + eps) * (g + wd * w)
    then the usual SGD momentum step. Groups with `lars_exclude=True` (biases, norms) get plain SGD
    momentum: no adaptation and no weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, eps: float = 1e-8):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    decay = group["weight_decay"]
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    trust = group["eta"] * w_norm / (g_norm + decay * w_norm + group["eps"])
                    adapted = (grad + decay * p) * trust
                    # torch.where instead of an `if`: no host sync per parameter
                    grad = torch.where((w_norm > 0) & (g_norm > 0), adapted, grad)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    exclude_bias_and_norm: bool = True,
    lr_multipliers: dict[str, float] | None = None,
    bias_and_norm_lr_multiplier: float = 1.0,
    fixed_lr: tuple[str, ...] = (),
) -> list[dict]:
    """Trainable parameters split into optimiser groups.

    With `exclude_bias_and_norm`, 1-D parameters (biases, norm weights) get no weight decay and
    `lars_exclude=True`. `lr_multipliers` maps parameter-name prefixes to a factor stored as the
    group's `lr_multiplier` (the longest matching prefix wins; the loop applies it to the scheduled LR);
    1-D parameters also get `bias_and_norm_lr_multiplier` (Barlow Twins). Parameters under a prefix in
    `fixed_lr` get `fixed_lr=True`: the loop holds them at the peak LR (SimSiam's predictor).
    """
    lr_multipliers = lr_multipliers or {}
    grouped: dict[tuple[bool, float, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        one_dimensional = parameter.ndim <= 1
        excluded = exclude_bias_and_norm and one_dimensional
        prefixes = [prefix for prefix in lr_multipliers if name.startswith(prefix)]
        multiplier = lr_multipliers[max(prefixes, key=len)] if prefixes else 1.0
        if one_dimensional:
            multiplier *= bias_and_norm_lr_multiplier
        fixed = name.startswith(fixed_lr) if fixed_lr else False
        grouped.setdefault((excluded, multiplier, fixed), []).append(parameter)
    return [
        {"params": params, "weight_decay": 0.0 if excluded else weight_decay, "lars_exclude": excluded,
         "lr_multiplier": multiplier, "fixed_lr": fixed}
        for (excluded, multiplier, fixed), params in grouped.items()
    ]


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """One value per iteration: linear warmup from `warmup_start` to `base` over `warmup_steps`
    (both ends included), then a half cosine from `base` towards `final` (as SwAV/DINO build it)."""
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    warmup = np.linspace(warmup_start, base, warmup_steps)
    decay_steps = total_steps - warmup_steps
    t = np.arange(decay_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(math.pi * t / max(decay_steps, 1)))
    return np.concatenate((warmup, cosine))


def build_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Groups carry their own weight decay (see `param_groups`)."""
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"unknown optimizer {name!r}; known: lars, sgd, adamw")
