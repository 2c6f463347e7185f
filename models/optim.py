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
    momentum: no adaptation and no weight decay. Parameters without a gradient are skipped.

    The step runs multi-tensor (`torch._foreach_*`) ops over each group's parameters and keeps the trust
    ratios on the device (no host sync): about 20 ops per group plus one multiply per adapted parameter
    (foreach has no fused form for per-tensor device scalars) instead of ~15 ops per adapted parameter.
    timm's `Lars` differs: with |g| = 0 it still applies the decay, g <- g + wd * w (trust ratio 1), where
    LARC leaves g = 0, and it adapts only groups with weight_decay != 0 unless `always_adapt`.
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
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_device.setdefault(p.device, []).append(p)
            for params in by_device.values():
                self._update(params, group)
        return loss

    def _update(self, params: list[torch.Tensor], group: dict) -> None:
        grads = [p.grad for p in params]
        fresh = False  # whether `grads` are new tensors (not the parameters' .grad)
        if not group["lars_exclude"]:
            decay = group["weight_decay"]
            w_norms = torch.stack(torch._foreach_norm(params))
            g_norms = torch.stack(torch._foreach_norm(grads))
            trust = group["eta"] * w_norms / (g_norms + decay * w_norms + group["eps"])
            # g <- scale * (g + wd * w) equals the rule above: both norms > 0 gives the trust ratio; otherwise
            # g stays as it is: |w| = 0 means w = 0 (scale 1 adds nothing), |g| = 0 means g = 0 (scale 0)
            g_positive = g_norms > 0
            scale = torch.where((w_norms > 0) & g_positive, trust, g_positive.to(trust.dtype))
            if decay:
                grads = torch._foreach_add(grads, params, alpha=decay)
                torch._foreach_mul_(grads, scale.unbind())
            else:
                grads = torch._foreach_mul(grads, scale.unbind())
            fresh = True
        buffers, started, started_grads = [], [], []
        for p, grad in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = grad if fresh else grad.clone()
            else:
                started.append(state["momentum_buffer"])
                started_grads.append(grad)
            buffers.append(state["momentum_buffer"])
        if started:
            torch._foreach_mul_(started, group["momentum"])
            torch._foreach_add_(started, started_grads)
        torch._foreach_add_(params, buffers, alpha=-group["lr"])


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
