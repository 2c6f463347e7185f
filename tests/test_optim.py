"""LARS's multi-tensor step against a per-parameter reference implementation of the same rule."""

from __future__ import annotations

import copy

import torch
from torch import nn

from models.optim import LARS, param_groups


class ReferenceLARS(torch.optim.Optimizer):
    """The rule one parameter at a time, as LARC states it (see `models.optim.LARS`)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, eps: float = 1e-8):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    decay = group["weight_decay"]
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    if w_norm > 0 and g_norm > 0:
                        trust = group["eta"] * w_norm / (g_norm + decay * w_norm + group["eps"])
                        grad = (grad + decay * p) * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 5), nn.Linear(5, 3, bias=False))
    with torch.no_grad():
        model[5].weight.zero_()  # |w| = 0 at first: the gradient passes unadapted (and |g| = 0 upstream)
    return model


def run(optimizer_class, model: nn.Sequential, steps: int, **options) -> list[torch.Tensor]:
    groups = param_groups(model, weight_decay=0.05)
    for group in groups:  # three groups: adapted with decay, adapted without, excluded
        if group["lars_exclude"]:
            group["lr"] = 0.3
    groups.append({"params": [groups[0]["params"].pop()], "weight_decay": 0.0})
    optimizer = optimizer_class(groups, lr=0.5, momentum=0.9, eta=0.02, **options)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        images = torch.randn(4, 3, 6, 6, generator=generator)
        targets = torch.randn(4, 3, generator=generator)
        (model(images) - targets).square().mean().backward()
        if step in (0, 2):
            model[4].weight.grad = None  # no gradient this step: no update, no momentum change
        if step == 3:
            model[0].weight.grad.zero_()  # |g| = 0: no adaptation and no decay either
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def test_lars_multi_tensor_step_matches_the_per_parameter_rule():
    model = small_model()
    reference = run(ReferenceLARS, copy.deepcopy(model), steps=5)
    fast = run(LARS, model, steps=5)
    start = [p.detach() for p in small_model().parameters()]
    assert all(not torch.equal(after, before) for after, before in zip(reference, start))
    for expected, got in zip(reference, fast):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_lars_keeps_a_zero_gradient_weight_and_leaves_the_gradient_tensor_alone():
    weight = nn.Parameter(torch.ones(3))
    other = nn.Parameter(torch.full((2,), 2.0))
    optimizer = LARS([weight, other], lr=1.0, weight_decay=0.1)
    weight.grad = torch.zeros(3)
    other.grad = torch.ones(2)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.ones(3))
    torch.testing.assert_close(other.grad, torch.ones(2))  # adapted into a new tensor, not in place
    trust = 0.001 * other.detach().new_tensor(8.0).sqrt() / (2 ** 0.5 + 0.1 * 8 ** 0.5 + 1e-8)
    torch.testing.assert_close(other.detach(), torch.full((2,), 2.0) - trust * (1 + 0.1 * 2.0))
