"""Weighted k-nearest-neighbour classification on frozen features (the DINO protocol).

The memory bank's rows are L2-normalised once, in place (`l2_normalize_`); queries are normalised a
chunk at a time. Each of the k most cosine-similar bank samples votes for its class with weight
exp(similarity / T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# similarities computed at once: a chunk of queries against the whole bank (2**28 = 512 MB in float16)
MAX_SIMILARITIES = 2**28


def bank_dtype(device: torch.device | str) -> torch.dtype:
    """float16 on CUDA: half the memory of a bank (2048-d ImageNet features: 5.2 GB instead of 10.5) and
    unit-vector cosines keep three decimals, plenty for a top-k vote. float32 elsewhere: half-precision
    matmul on a CPU is slow or unsupported."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


@torch.no_grad()
def l2_normalize_(features: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Scale each row of `features` to unit length in place (no copy of the bank; zero rows stay zero)."""
    for rows in features.split(chunk):
        rows.div_(torch.linalg.vector_norm(rows.float(), dim=1, keepdim=True).clamp_min(1e-12))
    return features


def _check_normalised(bank: torch.Tensor) -> None:
    sample = bank[:: max(1, bank.shape[0] // 64)].float()
    norms = torch.linalg.vector_norm(sample, dim=1)
    if not (((norms - 1).abs() < 1e-2) | (norms == 0)).all():
        raise ValueError("knn_predict: the bank's rows must be L2-normalised (models.knn.l2_normalize_)")


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
    max_similarities: int = MAX_SIMILARITIES,
) -> torch.Tensor:
    """Class scores (queries, num_classes) of float32; the top-1 prediction is their argmax.

    `bank` rows must be unit vectors (any float dtype; similarities are computed in its dtype);
    `queries` may have any length. At most `chunk` queries, and (but for one query against a larger
    bank) at most `max_similarities` similarities, are in memory at once.
    """
    _check_normalised(bank)
    k = min(k, bank.shape[0])
    rows = max(1, min(chunk, max_similarities // max(1, bank.shape[0])))
    scores = []
    for start in range(0, queries.shape[0], rows):
        query = F.normalize(queries[start : start + rows].float(), dim=1).to(bank.dtype)
        similarity, index = (query @ bank.T).topk(k, dim=1)
        weights = (similarity.float() / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, device=query.device)
        votes.scatter_add_(1, bank_labels[index], weights)
        scores.append(votes)
    if not scores:
        return torch.zeros(0, num_classes, device=queries.device)
    return torch.cat(scores)


def top_k_accuracies(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(top-1, top-5) accuracy in percent of class `scores` (n, classes) against `labels` (n,); 0 for n = 0."""
    top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
    count = max(1, labels.shape[0])
    top1 = (top5[:, 0] == labels).sum().item() / count * 100
    return top1, (top5 == labels[:, None]).any(dim=1).sum().item() / count * 100


def knn_accuracies(bank, bank_labels, queries, query_labels, num_classes: int, ks=(20, 200),
                   temperature: float = 0.07) -> dict[str, dict[str, float]]:
    """Top-1 and top-5 in percent of the weighted kNN for each k of `ks` (`bank` rows L2-normalised), keyed
    as the JSON reports write them: {"20": {"top1": ..., "top5": ...}, ...}."""
    results = {}
    for k in ks:
        scores = knn_predict(bank, bank_labels, queries, num_classes, k=k, temperature=temperature)
        top1, top5 = top_k_accuracies(scores, query_labels)
        results[str(k)] = {"top1": top1, "top5": top5}
    return results


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, k=20, temperature=0.07) -> float:
    """Top-1 accuracy in percent (`bank` rows L2-normalised)."""
    return knn_accuracies(bank, bank_labels, queries, query_labels, num_classes, (k,), temperature)[str(k)]["top1"]
