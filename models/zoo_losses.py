"""Losses of the method zoo (pure: tensors in, tensors out; collectives only where the maths is global).

Gradient convention under DDP: every collective that carries gradients is autograd-aware, so a rank's
gradient is world_size x the single-process gradient of its slice and DDP's gradient averaging then
reproduces one process on the global batch. All losses run in at least fp32 with autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.distributed import (
    all_reduce_sum_,
    all_reduce_with_grad,
    at_least_fp32,
    autocast_off,
    gather_with_grad,
    rank,
    world_size,
)


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR NT-Xent. With a = l2n(z1), b = l2n(z2), global keys A, B and j = rank*N + i:
    l_a(i) = -log softmax([a_i.B^T, a_i.A^T with a_i.A_j dropped] / T)_j, l_b likewise with a <-> b;
    returns the mean over the 2N local rows (upstream SimCLR returns mean(l_a) + mean(l_b), 2x this)."""
    with autocast_off(z1):
        a, b = F.normalize(at_least_fp32(z1), dim=1), F.normalize(at_least_fp32(z2), dim=1)
        big_a, big_b = gather_with_grad(a), gather_with_grad(b)
        n = a.shape[0]
        labels = torch.arange(n, device=a.device) + rank() * n
        self_mask = F.one_hot(labels, big_a.shape[0]).bool()
        logits_a = torch.cat([a @ big_b.t(), (a @ big_a.t()).masked_fill(self_mask, float("-inf"))], dim=1)
        logits_b = torch.cat([b @ big_a.t(), (b @ big_b.t()).masked_fill(self_mask, float("-inf"))], dim=1)
        logits = torch.cat([logits_a, logits_b]) / temperature
        return F.cross_entropy(logits, labels.repeat(2))


def info_nce_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo v2 InfoNCE: CE([l2n(q).l2n(k), l2n(q).queue^T] / T, label 0); queue (K, dim) holds normalised
    keys; no gradient reaches k or the queue."""
    with autocast_off(q):
        q = F.normalize(at_least_fp32(q), dim=1)
        k = F.normalize(at_least_fp32(k.detach()), dim=1)
        positives = (q * k).sum(dim=1, keepdim=True)
        negatives = q @ queue.detach().to(q.dtype).t()
        logits = torch.cat([positives, negatives], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def mocov3_loss(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, temperature: float = 1.0) -> Tensor:
    """MoCo v3: ctr(q1, k2) + ctr(q2, k1), ctr(q, k) = 2T * CE(l2n(q).l2n(K)^T / T, i -> rank*N + i),
    K = keys all-gathered without gradient; only cross-view negatives."""

    def ctr(q: Tensor, k: Tensor) -> Tensor:
        q = F.normalize(at_least_fp32(q), dim=1)
        keys = gather_with_grad(F.normalize(at_least_fp32(k.detach()), dim=1))
        labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
        return F.cross_entropy(q @ keys.t() / temperature, labels) * (2 * temperature)

    with autocast_off(q1):
        return ctr(q1, k2) + ctr(q2, k1)


def negative_cosine_loss(p: Tensor, z: Tensor) -> Tensor:
    """-mean_i cos(p_i, sg(z_i)). SimSiam: (ncl(p1, z2) + ncl(p2, z1)) / 2; BYOL's 2 - 2cos = 2 + 2 * this."""
    with autocast_off(p):
        return -F.cosine_similarity(at_least_fp32(p), at_least_fp32(z.detach()), dim=1).mean()


def dino_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    center: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    n_global: int = 2,
) -> Tensor:
    """DINO: mean over pairs (iq < n_global, v != iq) of mean_b -sum_d t_iq log s_v, with
    t = sg(softmax((teacher - center) / teacher_temp)) and s = log_softmax(student / student_temp).
    Rows are crop-major: crop c is rows c*B..(c+1)*B (student: all crops, globals first; teacher: globals)."""
    if teacher_out.shape[0] % n_global or student_out.shape[0] % (teacher_out.shape[0] // n_global):
        raise ValueError(f"dino_loss: {teacher_out.shape[0]} teacher / {student_out.shape[0]} student rows "
                         f"do not split into {n_global} global crops of one batch size")
    batch = teacher_out.shape[0] // n_global
    n_crops = student_out.shape[0] // batch
    if n_crops < 2 or n_crops < n_global:
        raise ValueError(f"dino_loss needs >= 2 student crops including the {n_global} globals, got {n_crops}")
    with autocast_off(student_out):
        t = F.softmax((at_least_fp32(teacher_out.detach()) - center) / teacher_temp, dim=-1).chunk(n_global)
        s = F.log_softmax(at_least_fp32(student_out) / student_temp, dim=-1).chunk(n_crops)
        total, n_pairs = s[0].new_zeros(()), 0
        for iq, t_iq in enumerate(t):
            for v, s_v in enumerate(s):
                if v != iq:
                    total = total - (t_iq * s_v).sum(dim=-1).mean()
                    n_pairs += 1
        return total / n_pairs


@torch.no_grad()
def dino_center_update(center: Tensor, teacher_out: Tensor, momentum: float = 0.9) -> Tensor:
    """New center = m * center + (1 - m) * mean of teacher_out rows over all ranks (sum all-reduced)."""
    batch_sum = at_least_fp32(teacher_out).sum(dim=0, keepdim=True)
    all_reduce_sum_(batch_sum)
    batch_mean = batch_sum / (teacher_out.shape[0] * world_size())
    return center * momentum + batch_mean.reshape(center.shape) * (1 - momentum)


def _off_diagonal(m: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix, flattened (a view)."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def _global_batch_norm(z: Tensor, n_global: int, eps: float = 1e-5) -> Tensor:
    """BatchNorm1d(affine=False) in training mode with statistics over all ranks (biased variance)."""
    mean = all_reduce_with_grad(z.sum(dim=0)) / n_global
    var = all_reduce_with_grad(((z - mean) ** 2).sum(dim=0)) / n_global
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambda_: float = 0.0051) -> Tensor:
    """Barlow Twins: c = BN(z1)^T BN(z2) / N_global summed over ranks (BN statistics global);
    L = sum_i (1 - c_ii)^2 + lambda * sum_{i != j} c_ij^2. (Upstream's c all-reduce carries no gradient,
    so its DDP gradient is 1/world_size of this one; identical in one process.)"""
    with autocast_off(z1):
        z1, z2 = at_least_fp32(z1), at_least_fp32(z2)
        n_global = z1.shape[0] * world_size()
        c = all_reduce_with_grad(_global_batch_norm(z1, n_global).t() @ _global_batch_norm(z2, n_global))
        c = c / n_global
        on_diag = (1 - torch.diagonal(c)).pow(2).sum()
        return on_diag + lambda_ * _off_diagonal(c).pow(2).sum()


def vicreg_loss(x: Tensor, y: Tensor, sim: float = 25.0, var: float = 25.0, cov: float = 1.0,
                eps: float = 1e-4) -> Tensor:
    """VICReg: sim * MSE(x, y) (local batch) + var * [mean_d relu(1 - sqrt(Var_d + eps))]_(x,y averaged)
    + cov * [sum_{i != j} Cov_ij^2 / D]_(x + y), Cov = X^T X / (N - 1) of centred, all-gathered X."""
    with autocast_off(x):
        x, y = at_least_fp32(x), at_least_fp32(y)
        invariance = F.mse_loss(x, y)
        x, y = gather_with_grad(x), gather_with_grad(y)
        n, d = x.shape
        x, y = x - x.mean(dim=0), y - y.mean(dim=0)
        std_x, std_y = torch.sqrt(x.var(dim=0) + eps), torch.sqrt(y.var(dim=0) + eps)
        variance = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
        covariance = sum(_off_diagonal(m.t() @ m / (n - 1)).pow(2).sum() / d for m in (x, y))
        return sim * invariance + var * variance + cov * covariance
