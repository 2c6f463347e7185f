"""Loss functions (pure: tensors in, tensors out; all-reduces only where the maths is global)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.distributed import all_reduce_sum_, at_least_fp32, world_size


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """SwAV's distributed_sinkhorn: soft codes (B, K) from prototype scores (B, K).

    Samples are spread over all ranks (global B = local B x world size). Each returned row sums to 1;
    the prototype marginals are only pushed towards B/K (exactly so only as iterations grow).
    """
    # No log-domain stabilisation upstream: exp(1 / 0.05) = 4.9e8 overflows fp16, so at least fp32.
    with torch.autocast(scores.device.type, enabled=False):
        q = torch.exp(at_least_fp32(scores) / epsilon).t()
        n_prototypes, n_samples = q.shape[0], q.shape[1] * world_size()
        total = q.sum()
        all_reduce_sum_(total)
        q /= total
        for _ in range(iterations):
            rows = q.sum(dim=1, keepdim=True)
            all_reduce_sum_(rows)
            q /= rows
            q /= n_prototypes
            q /= q.sum(dim=0, keepdim=True)
            q /= n_samples
        q *= n_samples
        return q.t()


@torch.no_grad()
def swav_codes(
    scores: list[Tensor],
    n_assign: int = 2,
    epsilon: float = 0.05,
    iterations: int = 3,
    queue_scores: list[Tensor | None] | None = None,
) -> list[Tensor]:
    """Sinkhorn codes of the first `n_assign` crops. Queue scores for crop i, if given, join the
    Sinkhorn problem (prepended, as upstream) and only the batch's rows are kept."""
    codes = []
    for i in range(n_assign):
        crop = at_least_fp32(scores[i].detach())
        queued = queue_scores[i] if queue_scores is not None else None
        if queued is None:
            codes.append(sinkhorn(crop, epsilon, iterations))
        else:
            joint = torch.cat((queued.detach().to(crop.dtype), crop))
            codes.append(sinkhorn(joint, epsilon, iterations)[-crop.shape[0] :])
    return codes


def swapped_prediction_loss(scores: list[Tensor], codes: list[Tensor], temperature: float = 0.1) -> Tensor:
    """Codes of crop i predicted from every other crop v: the mean over v != i of
    -sum_k q_ik log softmax(s_v / T)_k (batch mean), then the mean over the assign crops."""
    n_crops = len(scores)
    total = at_least_fp32(scores[0]).new_zeros(())
    for i, q in enumerate(codes):
        subloss = total.new_zeros(())
        for v in range(n_crops):
            if v != i:
                # fp32 before dividing by T: bf16 scores/T lose the precision log_softmax needs
                log_p = F.log_softmax(at_least_fp32(scores[v]) / temperature, dim=1)
                subloss = subloss - (q * log_p).sum(dim=1).mean()
        total = total + subloss / (n_crops - 1)
    return total / len(codes)


def swav_loss(
    scores: list[Tensor],
    n_assign: int = 2,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
    queue_scores: list[Tensor | None] | None = None,
) -> Tensor:
    """SwAV's swapped-prediction loss from per-crop prototype scores (each (B, K)), upstream's
    normalisation: sum over assign crops of [sum over the other crops / (n_crops - 1)], / n_assign."""
    if not 1 <= n_assign <= len(scores) or len(scores) < 2:
        raise ValueError(
            f"swav_loss needs >= 2 crops and 1 <= n_assign <= crops, got {len(scores)} and {n_assign}"
        )
    codes = swav_codes(scores, n_assign, epsilon, iterations, queue_scores)
    return swapped_prediction_loss(scores, codes, temperature)
