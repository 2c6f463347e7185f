"""Weighted k-nearest-neighbour classification on frozen features (the DINO protocol).

Features are L2-normalised; each of the k most cosine-similar training samples votes for its class
with weight exp(similarity / T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (queries, num_classes); the top-1 prediction is their argmax."""
    train = F.normalize(train_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, query_features.shape[0], chunk):
        query = F.normalize(query_features[start : start + chunk].float(), dim=1)
        similarity, index = (query @ train.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, device=query.device)
        votes.scatter_add_(1, train_labels[index], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_features, train_labels, query_features, query_labels, num_classes, k=20, temperature=0.07):
    """Top-1 accuracy in percent."""
    scores = knn_predict(train_features, train_labels, query_features, num_classes, k, temperature)
    return (scores.argmax(1) == query_labels).float().mean().item() * 100
