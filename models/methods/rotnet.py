"""RotNet (Gidaris, Singh & Komodakis 2018): predict which of four rotations an image shows; with labels,
also rotation as an auxiliary task of supervised classification (Hendrycks, Mazeika, Kadavath & Song
2019), whose rotation loss scores out-of-distribution inputs (tools/ood_score.py)."""

from __future__ import annotations

import torch
from torch import nn

from models.methods.pretext import PretextHead, PretextMethod
from models.pretext_losses import classification_loss
from pipelines.spec import Rotation


class RotationHead(PretextHead):
    """A linear 4-way rotation classifier on pooled features; with `num_classes`, also a linear class
    head on the un-rotated copies (rows 0..B-1 of the four), and the loss is
    rotation_weight * rotation CE + supervised_weight * class CE."""

    def __init__(self, feature_dim: int, spec: Rotation, *, num_classes: int = 0, rotation_weight: float = 1.0,
                 supervised_weight: float = 0.0):
        super().__init__()
        if supervised_weight and not num_classes:
            raise ValueError("rotnet supervised_weight needs num_classes=N (the labeled shards' class count)")
        if num_classes and not spec.all_four:
            raise ValueError("rotnet num_classes needs all_four=true: the class head reads the un-rotated copies")
        self.spec = spec
        self.rotation = nn.Linear(feature_dim, 4)
        self.classifier = nn.Linear(feature_dim, num_classes) if num_classes else None
        self.rotation_weight = rotation_weight
        self.supervised_weight = supervised_weight

    @property
    def needs_labels(self) -> bool:
        return self.classifier is not None

    def forward(self, features: torch.Tensor, inputs, batch) -> tuple[torch.Tensor, dict]:
        loss, accuracy = classification_loss(self.rotation(features), inputs.labels)
        metrics = {"accuracy": accuracy}
        if self.classifier is None:
            return loss, metrics
        metrics["rotation_loss"] = loss.detach()
        upright = features[: batch.batch_size]
        class_loss, class_accuracy = classification_loss(self.classifier(upright), batch.labels)
        metrics.update(class_loss=class_loss.detach(), class_accuracy=class_accuracy)
        return self.rotation_weight * loss + self.supervised_weight * class_loss, metrics

    @torch.no_grad()
    def scores(self, features: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        """Per-image out-of-distribution scores from the features of an all-four rotated batch
        (rotation-major): `rotation_loss`, the sum over the four rotations of the rotation cross-entropy
        (Hendrycks et al.'s score: higher = more unusual), and with a class head `max_softmax`, the
        largest class probability of the upright copy (lower = more unusual)."""
        logits = self.rotation(features).float().view(4, batch_size, 4)
        labels = torch.arange(4, device=features.device).view(4, 1).expand(4, batch_size)
        losses = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        scores = {"rotation_loss": losses.view(4, batch_size).sum(dim=0)}
        if self.classifier is not None:
            scores["max_softmax"] = self.classifier(features[:batch_size]).float().softmax(dim=1).amax(dim=1)
        return scores


class RotNet(PretextMethod):
    """The backbone on the crop in all four rotations (one forward of 4B), a linear rotation classifier."""

    name = "rotnet"
    recipe_preset = "rotnet"
    # Gidaris et al.: SGD, momentum 0.9, wd 5e-4, lr 0.1 at batch 192 (-> 0.133 per 256), 30 epochs (AlexNet)
    paper = dict(optimizer="sgd", lr=0.133, weight_decay=5e-4, warmup_epochs=0.0, epochs=30, batch_size=192,
                 multicrop="1x224")
    cpu_overrides = {**PretextMethod.cpu_overrides, "lr": 0.4}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True, all_four: bool = True,
                 num_classes: int = 0, supervised_weight: float = 0.0, rotation_weight: float = 1.0,
                 **backbone_options):
        """`supervised_weight` > 0 with `num_classes`: supervised training with rotation as an auxiliary
        task (Hendrycks et al.: supervised_weight=1, rotation_weight=0.5) on labeled shards."""
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        self.add_task(RotationHead(self.feature_dim, Rotation(all_four=all_four), num_classes=num_classes,
                                   rotation_weight=rotation_weight, supervised_weight=supervised_weight))
