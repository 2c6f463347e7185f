"""IPT's losses (Chen et al. 2021): L1 to the clean image and the supervised contrastive term on the
transformer decoder's patch features. Pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def l1_loss(outputs: list[Tensor], targets: list[Tensor]) -> Tensor:
    """The mean absolute error over every pixel and channel of every (output, target) pair: the L1 of
    the whole batch, whatever the split into tasks (all targets have the clean crop's size)."""
    total = sum((output.float() - target.float()).abs().sum() for output, target in zip(outputs, targets))
    return total / sum(target.numel() for target in targets)


CONTRASTIVE_FORMS = ("paper", "supcon")


def patch_contrastive_loss(features: Tensor, temperature: float = 0.07, form: str = "paper") -> Tensor:
    """IPT's supervised contrastive loss (their eq. 6) on decoder features `features` (B, N, D) of N patches
    of each of B images, d the cosine similarity:

        -1 / (B N²) sum_i sum_j1 sum_j2 log( exp(d(f_i,j1, f_i,j2) / T) / sum_{k != i} exp(d(f_i,j1, f_k,j2) / T) )

    Patches of one image are positives; the same patch position j2 in the other images the negatives. `form`
    "paper": the positive is not in the denominator, as the paper writes it (the loss goes below zero once
    images are told apart: log(B - 1) - 1 / T when their features are orthogonal, lower when opposed); "supcon": the denominator sums over every k, the
    positive included (InfoNCE's and SupCon's form: at least 0, its gradient fades once images are told
    apart). Needs B >= 2 (zero otherwise: no negatives)."""
    if form not in CONTRASTIVE_FORMS:
        raise ValueError(f"contrastive form {form!r}: use one of {', '.join(CONTRASTIVE_FORMS)}")
    b = features.shape[0]
    if b < 2:
        return features.float().sum() * 0.0
    f = F.normalize(features.float(), dim=-1)
    logits = torch.einsum("ajd,bkd->ajbk", f, f) / temperature  # (B, N, B, N): image a patch j vs image b patch k
    positives = logits.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (B, N, N): [i, j1, j2]
    if form == "paper":
        same = torch.eye(b, dtype=torch.bool, device=f.device).view(b, 1, b, 1)
        logits = logits.masked_fill(same, float("-inf"))
    return (torch.logsumexp(logits, dim=2) - positives).mean()  # the denominator over k: (B, N, N)
