"""DINO (Caron et al. 2021), as facebookresearch/dino trains it."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.backbones import is_vit
from models.heads import DINOHead
from models.methods.base import Method, Progress
from models.optim import cosine_schedule
from models.zoo_losses import dino_center_update, dino_loss


def teacher_temperature_schedule(start: float, end: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """One value per epoch: linear from `start` to `end` over `warmup_epochs`, then `end`."""
    warmup = np.linspace(start, end, warmup_epochs)
    return np.concatenate((warmup, np.full(max(epochs - warmup_epochs, 0), end)))


class DINO(Method):
    """Student (backbone -> DINOHead) on all crops distils an EMA teacher that sees the 2 global crops;
    the teacher's outputs are centred (momentum 0.9, all ranks) and sharpened (temperature warm-up)."""

    name = "dino"
    recipe_preset = "dino"
    EMA_PAIRS = (("teacher_backbone", "backbone"), ("teacher_head", "head"))
    REPLICATED_BUFFERS = ("center",)  # from teacher outputs all-reduced over ranks
    EVAL_BACKBONE = "teacher_backbone"  # upstream evaluates and releases the teacher

    # the ViT recipe (upstream's default); ResNets get upstream's R50 optimiser (`defaults`)
    # upstream's training recipe (a GPU run); lr: x global batch / 256; weight_decay: cosine to weight_decay_end
    paper = dict(optimizer="adamw", lr=5e-4, weight_decay=0.04, warmup_epochs=10.0, epochs=100, batch_size=64,
                 multicrop="2x224+8x96", grad_clip=3.0)
    accepts_local_crops = True
    cpu_overrides = {"multicrop": "2x32+4x16", "epochs": 2, "warmup_epochs": 0.0}

    HEAD_PRESETS = {"paper": dict(hidden_dim=2048, bottleneck_dim=256, out_dim=65536),
                    "small": dict(hidden_dim=512, bottleneck_dim=128, out_dim=4096)}

    @classmethod
    def defaults(cls, on_gpu: bool, backbone: str | None = None) -> dict:
        values = super().defaults(on_gpu, backbone)
        if backbone is not None and not is_vit(backbone):
            values.update(optimizer="sgd", lr=0.03, weight_decay=1e-4, grad_clip=None)
        return values

    @classmethod
    def check_recipe(cls, recipe, batch_size: int) -> None:
        if recipe.groups[0].count != 2:
            raise ValueError(f"dino's teacher sees 2 global crops (the first view group); --multicrop "
                             f"'{recipe.multicrop}' has {recipe.groups[0].count}: use e.g. 2x224+8x96")

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True,
                 head_preset: str | None = None, hidden_dim: int | None = None,
                 bottleneck_dim: int | None = None, out_dim: int | None = None, norm_last_layer: bool = True,
                 freeze_last_layer_epochs: int = 1, momentum: float = 0.996, student_temperature: float = 0.1,
                 warmup_teacher_temperature: float = 0.04, teacher_temperature: float = 0.07,
                 warmup_teacher_temperature_epochs: int = 30, center_momentum: float = 0.9,
                 weight_decay_end: float | None = None, **backbone_options):
        """`weight_decay_end` None: 0.4 for a ViT, the constant weight decay for a ResNet (upstream R50)."""
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        sizes = self.head_sizes(head_preset, on_gpu, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                                out_dim=out_dim)
        self.head = DINOHead(self.feature_dim, sizes["hidden_dim"], sizes["bottleneck_dim"], sizes["out_dim"],
                             norm_last_layer=norm_last_layer)
        self.add_teachers(momentum)
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.student_temperature = student_temperature
        self.teacher_temperatures = (warmup_teacher_temperature, teacher_temperature,
                                     warmup_teacher_temperature_epochs)
        self.center_momentum = center_momentum
        self.weight_decay_end = weight_decay_end if weight_decay_end is not None else (
            0.4 if is_vit(self.backbone) else None)
        self.register_buffer("center", torch.zeros(1, sizes["out_dim"]))
        self._teacher_out: torch.Tensor | None = None

    def teacher_temperature(self, progress: Progress) -> float:
        epochs = -(-progress.total_steps // progress.steps_per_epoch)
        return float(teacher_temperature_schedule(*self.teacher_temperatures[:2], self.teacher_temperatures[2],
                                                  epochs)[progress.epoch])

    def weight_decay_schedule(self, weight_decay: float, total_steps: int) -> np.ndarray | None:
        if self.weight_decay_end is None:
            return None
        return cosine_schedule(weight_decay, self.weight_decay_end, total_steps)

    def final_lr(self, peak_lr: float) -> float:
        return min(1e-6, peak_lr)  # upstream's min_lr

    def training_step(self, batch, progress: Progress):
        student_out = self.head(torch.cat(self.forward_groups(batch.views)))
        with torch.no_grad():
            teacher_out = self.teacher_head(self.teacher_backbone(batch.views[0]))  # the globals
        temperature = self.teacher_temperature(progress)
        loss = dino_loss(student_out, teacher_out, self.center, self.student_temperature, temperature)
        self._teacher_out = teacher_out  # the centre moves with the step (after_step)
        return loss, {"loss": loss.detach(), "teacher_temperature": temperature}

    def after_step(self, progress: Progress) -> None:
        super().after_step(progress)
        if self._teacher_out is not None:
            self.center.copy_(dino_center_update(self.center, self._teacher_out, self.center_momentum))
            self._teacher_out = None

    def before_optimizer_step(self, progress: Progress) -> None:
        if progress.epoch < self.freeze_last_layer_epochs:
            for parameter in self.head.last_layer_parameters():
                parameter.grad = None
