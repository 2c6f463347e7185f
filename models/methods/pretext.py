"""Transformation-prediction methods (RotNet, Jigsaw, context prediction and their multi-task sum): a
shared backbone, one head per task, a weighted sum of the tasks' losses.

The input stack makes every task's inputs (`pipelines.pretext`, from the recipe's `pretext` part); a
head only turns the backbone's features of those inputs into a loss. Inputs of one shape go through the
backbone together: one forward per shape, never one per task or per tile.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from models.methods.base import Method, Progress


class PretextHead(nn.Module):
    """A task's head: `spec` is its recipe part (a `pipelines.spec` pretext dataclass, geometry and
    options); `forward(features, inputs, batch)` returns (loss, metrics) for that task's inputs."""

    spec: Any
    needs_labels: bool = False  # trains on the shards' class labels too


class PretextMethod(Method):
    """A backbone and the heads in `self.heads` (task name -> PretextHead), trained on
    sum(weight * task loss). Subclasses add their heads in `__init__`."""

    # one crop per image, no colour augmentation unless the task's paper has it
    cpu_overrides: ClassVar[dict[str, Any]] = {"multicrop": "1x32", "epochs": 2, "batch_size": 64}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True, **backbone_options):
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        self.heads = nn.ModuleDict()
        self.weights: dict[str, float] = {}

    @property
    def needs_labels(self) -> bool:
        return any(head.needs_labels for head in self.heads.values())

    def add_task(self, head: PretextHead, weight: float = 1.0) -> None:
        self.heads[head.spec.task] = head
        self.weights[head.spec.task] = float(weight)

    @classmethod
    def check_recipe(cls, recipe, batch_size: int) -> None:
        if len(recipe.groups) != 1 or recipe.groups[0].count != 1:
            raise ValueError(f"{cls.name} makes its inputs from one crop per image; --multicrop "
                             f"'{recipe.multicrop}' is not that: use e.g. 1x224 (1x32 on CPU)")

    def adapt_recipe(self, recipe):
        """The recipe with this method's tasks as its pretext part (each head's spec, options included)."""
        return recipe.with_pretext([head.spec for head in self.heads.values()])

    def features_by_shape(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Backbone features of each tensor in `images`, with one forward per distinct input shape."""
        shapes: dict[tuple[int, ...], list[int]] = {}
        for index, tensor in enumerate(images):
            shapes.setdefault(tuple(tensor.shape[1:]), []).append(index)
        features: list[torch.Tensor | None] = [None] * len(images)
        for indices in shapes.values():
            together = self.backbone(torch.cat([images[i] for i in indices]) if len(indices) > 1
                                     else images[indices[0]])
            for index, part in zip(indices, together.split([images[i].shape[0] for i in indices])):
                features[index] = part
        return features

    def training_step(self, batch, progress: Progress):
        tasks = list(self.heads)
        missing = [task for task in tasks if task not in batch.pretext]
        if missing:
            raise ValueError(f"{self.name}: the batch has no {', '.join(missing)} inputs; train on a recipe "
                             f"whose pretext part makes them (adapt_recipe)")
        features = self.features_by_shape([batch.pretext[task].images for task in tasks])
        total, metrics = 0.0, {}
        for task, task_features in zip(tasks, features):
            loss, task_metrics = self.heads[task](task_features, batch.pretext[task], batch)
            total = total + self.weights[task] * loss
            if len(tasks) > 1:
                metrics[f"{task}_loss"] = loss.detach()
            metrics.update({f"{task}_{name}": value for name, value in task_metrics.items()})
        metrics["loss"] = total.detach()
        return total, metrics
