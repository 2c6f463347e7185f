"""Rotation feature decoupling (Feng, Xu & Tao 2019), as philiptheother/FeatureDecoupling trains it.

Each image in all four rotations (RotNet's input, `pipelines.pretext.rotate`) goes through the backbone;
a fully connected block splits the pooled feature into a rotation-related part and a rotation-unrelated
part. The related part predicts the rotation (cross-entropy, each rotated copy weighted by how surely its
rotation can be told, positive-unlabeled learning); the unrelated parts of an image's four copies are pulled
to their mean (MSE) and that mean, embedded in 128-d, discriminates the image from the others against NPID's
memory bank (`models.methods.npid.MemoryBank`, imported, not copied).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.distributed import at_least_fp32, autocast_off
from models.methods.base import Progress
from models.methods.npid import L2Normalize, MemoryBank, batch_indices
from models.methods.pretext import PretextMethod
from pipelines.spec import Rotation

ROTATIONS = 4


# ------------------------------------------------------------------------------------------- pure losses


def pu_weights(upright_logits: Tensor, upright: Tensor, gamma: float = 2.0) -> Tensor:
    """Per-copy weights of the rotation loss (Feng et al., positive-unlabeled learning of rotation labels):
    an upright copy (a positive) weighs 1; a rotated copy weighs 1 - p^gamma, p = sigmoid(`upright_logits`)
    the PU classifier's probability that it is upright (a rotation that cannot be told carries a noisy
    label). As the released code: weight = 1 if upright else 1 - p ** gamma, gamma = 2. No gradient."""
    p = torch.sigmoid(at_least_fp32(upright_logits.detach()))
    return torch.where(upright, torch.ones_like(p), 1 - p.pow(gamma))


def pu_classifier_loss(upright_logits: Tensor, upright: Tensor) -> Tensor:
    """The PU classifier's loss: upright copies are the labelled positives, rotated copies the unlabelled
    set, taken as negatives (binary cross-entropy; Elkan & Noto's non-traditional classifier)."""
    with autocast_off(upright_logits):
        return F.binary_cross_entropy_with_logits(at_least_fp32(upright_logits), upright.to(torch.float32))


def weighted_rotation_loss(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean over the copies of weight * cross-entropy (the released code: dot(loss, weight) / copies);
    `weights` None: every copy weighs 1."""
    with autocast_off(logits):
        each = F.cross_entropy(at_least_fp32(logits), labels, reduction="none")
        return each.mean() if weights is None else (each * weights).mean()


def rotation_irrelevance_loss(unrelated: Tensor, copies: int = ROTATIONS) -> Tensor:
    """MSE between each copy's rotation-unrelated feature and the mean over the image's `copies` copies
    (a constant target: no gradient through the mean, as the released code), averaged over every value.
    `unrelated` is copy-major, (copies * B, d): copy r of sample i is row r * B + i. Zero when the copies agree."""
    with autocast_off(unrelated):
        parts = at_least_fp32(unrelated).view(copies, -1, unrelated.shape[1])
        return F.mse_loss(parts, parts.mean(dim=0, keepdim=True).detach().expand_as(parts))


# ------------------------------------------------------------------------------------------- the method


class Part(nn.Module):
    """Columns [start, start + width) of a (rows, features) tensor."""

    def __init__(self, start: int, width: int):
        super().__init__()
        self.start, self.width = start, width

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.start : self.start + self.width]


class Decoupling(PretextMethod):
    """The backbone on the crop in its four rotations (one forward of 4B), a split block (Linear without bias
    -> BN -> ReLU to 2 x `part_dim`, the paper's fc7 of 2 x 2048; `part_dim=0`: the pooled feature itself cut
    in halves), then:

    - rotation: a linear 4-way classifier on the related part; from epoch `pu_start_epoch` each copy's
      cross-entropy is weighted by `pu_weights` (gamma `pu_gamma`); before, every copy weighs 1;
    - the PU classifier: a linear upright-or-not classifier on the pooled feature (no gradient into the
      backbone), trained throughout so its probabilities are ready when the weights switch on (the paper
      trains it apart, on a RotNet's features, and reads its probabilities from a file);
    - rotation irrelevance: `rotation_irrelevance_loss` on the unrelated parts;
    - instance discrimination: NPID on the mean of the four unrelated parts, through Linear(part_dim, 128)
      and L2 normalisation, against the memory bank (NCE on a GPU, as the paper; the softmax form on CPU).

    loss = rotation_weight * rotation + mse_weight * irrelevance + nce_weight * NPID + the PU classifier's BCE.
    """

    name = "decoupling"
    recipe_preset = "decoupling"
    needs_sample_indices = True
    REPLICATED_BUFFERS = ("bank.memory", "bank.nce_z")
    # Feng et al.'s released config: SGD (Nesterov) 0.1 at batch 192 (-> 0.133 per 256), momentum 0.9, wd 5e-4,
    # 245 epochs with steps (here cosine), PU weights from epoch 210
    paper = dict(optimizer="sgd", lr=0.133, weight_decay=5e-4, warmup_epochs=0.0, epochs=245, batch_size=192,
                 multicrop="1x224")
    # CPU: RotNet's base LR 0.4, measured best of 0.03-0.4 for 2 epochs on the demo (docs/RESULTS.md)
    cpu_overrides: ClassVar[dict[str, Any]] = {**PretextMethod.cpu_overrides, "lr": 0.4}
    # loss: the paper's NCE on a GPU, the softmax form on CPU (as NPID's presets)
    HEAD_PRESETS = {"paper": dict(part_dim=2048, out_dim=128, num_negatives=4096, pu_start_epoch=210, loss="nce"),
                    "small": dict(part_dim=256, out_dim=128, num_negatives=4096, pu_start_epoch=1, loss="softmax")}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True, head_preset: str | None = None,
                 part_dim: int | None = None, out_dim: int | None = None, num_negatives: int | None = None,
                 pu_start_epoch: int | None = None, pu_gamma: float = 2.0, rotation_weight: float = 1.0,
                 mse_weight: float = 1.0, nce_weight: float = 1.0, loss: str | None = None, temperature: float = 0.07,
                 bank_momentum: float = 0.5, exclude_positive: bool = False, seed: int | None = None,
                 num_samples: int | None = None, **backbone_options):
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        sizes = self.head_sizes(head_preset, on_gpu, part_dim=part_dim, out_dim=out_dim, num_negatives=num_negatives,
                                pu_start_epoch=pu_start_epoch, loss=loss)
        part = sizes["part_dim"]
        if not isinstance(part, int) or part < 0:
            raise ValueError(f"decoupling part_dim={part!r}: give a whole number >= 0 (0: the pooled feature cut in "
                             f"halves)")
        if part:
            self.split = nn.Sequential(nn.Linear(self.feature_dim, 2 * part, bias=False), nn.BatchNorm1d(2 * part),
                                       nn.ReLU(inplace=True))
        else:
            if self.feature_dim % 2:
                raise ValueError(f"decoupling part_dim=0 cuts the {self.feature_dim}-d pooled feature in halves: it "
                                 f"must be even; give part_dim > 0")
            self.split = nn.Identity()
            part = self.feature_dim // 2
        if not isinstance(sizes["pu_start_epoch"], int) or sizes["pu_start_epoch"] < 0:
            raise ValueError(f"decoupling pu_start_epoch={sizes['pu_start_epoch']!r}: give an epoch >= 0")
        if not pu_gamma > 0:
            raise ValueError(f"decoupling pu_gamma={pu_gamma!r}: must be positive")
        self.part_dim = part
        self.rotation = nn.Linear(part, ROTATIONS)
        self.embedding = nn.Sequential(nn.Linear(part, sizes["out_dim"]), L2Normalize())
        self.upright = nn.Linear(self.feature_dim, 1)  # the PU classifier
        self.bank = MemoryBank(sizes["out_dim"], loss=sizes["loss"], num_negatives=sizes["num_negatives"],
                               temperature=temperature, momentum=bank_momentum, exclude_positive=exclude_positive,
                               seed=seed, method=self.name)
        self.pu_start_epoch = sizes["pu_start_epoch"]
        self.pu_gamma = float(pu_gamma)
        self.loss_weights = {"rotation": float(rotation_weight), "mse": float(mse_weight), "nce": float(nce_weight)}
        if num_samples is not None:
            self.adapt_to_data(num_samples)

    def adapt_recipe(self, recipe):
        return recipe.with_pretext([Rotation(all_four=True)])

    def adapt_to_data(self, num_samples: int) -> None:
        if self.bank.num_samples != num_samples:
            self.bank.resize(num_samples)

    def memory_bank(self) -> tuple[Tensor, nn.Module]:
        encoder = nn.Sequential(self.backbone, self.split, Part(self.part_dim, self.part_dim), self.embedding)
        return self.bank.memory, encoder

    def pu_active(self, progress: Progress) -> bool:
        return progress.epoch >= self.pu_start_epoch

    def training_step(self, batch, progress: Progress):
        indices = batch_indices(batch, self.name)
        inputs = batch.pretext.get("rotation")
        b = batch.batch_size
        if inputs is None or inputs.images.shape[0] != ROTATIONS * b:
            raise ValueError(f"{self.name}: the batch needs each image in all four rotations; train on a recipe "
                             f"whose pretext part makes them (adapt_recipe)")
        features = self.backbone(inputs.images)  # (4B, F), rotation-major
        related, unrelated = self.split(features).split(self.part_dim, dim=1)
        upright = inputs.labels == 0
        upright_logits = self.upright(features.detach()).squeeze(1)
        pu_loss = pu_classifier_loss(upright_logits, upright)
        weights = pu_weights(upright_logits, upright, self.pu_gamma) if self.pu_active(progress) else None
        logits = self.rotation(related)
        rotation_loss = weighted_rotation_loss(logits, inputs.labels, weights)
        mse_loss = rotation_irrelevance_loss(unrelated)
        mean_unrelated = at_least_fp32(unrelated).view(ROTATIONS, b, self.part_dim).mean(dim=0)
        nce, bank_metrics = self.bank.loss(self.embedding(mean_unrelated), indices, progress.step)
        w = self.loss_weights
        total = w["rotation"] * rotation_loss + w["mse"] * mse_loss + w["nce"] * nce + pu_loss
        metrics = {"loss": total.detach(), "rotation_loss": rotation_loss.detach(), "mse_loss": mse_loss.detach(),
                   "nce_loss": nce.detach(), "pu_loss": pu_loss.detach(),
                   "rotation_accuracy": (logits.detach().argmax(dim=1) == inputs.labels).float().mean(),
                   **bank_metrics}
        if weights is not None:
            metrics["pu_weight"] = weights[~upright].mean()
        return total, metrics

    def after_step(self, progress: Progress) -> None:
        super().after_step(progress)
        self.bank.update_()
