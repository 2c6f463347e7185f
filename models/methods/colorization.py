"""Colorful image colorization (Zhang, Isola & Efros 2016): from the lightness of a crop, predict the
distribution of its colours (ab) over Q in-gamut bins at a quarter of the input resolution, trained with
a class-rebalanced cross-entropy against soft-encoded targets; `loss=regression` is the plain L2 on ab
(Larsson et al.'s regression variant) with a 2-channel output.

The input stack makes the input and the target (`pipelines.pretext.lab_inputs`: Kornia's rgb_to_lab on
the device; the backbone sees (L - 50) / 50 in 3 channels, also in evaluation: the recipe's
`lightness_input`). The colour maths are pure functions in `models/colour_losses.py`. The prior over the
bins is estimated at the start of a fresh run from the first `prior_batches` batches of a separate pass
over the training shards (`data_statistics`), kept in checkpointed buffers (restored on resume, never
re-estimated) and written to <run>/colour_prior.json.

    python train.py --method colorization                                  # CPU: 1x32, batch 64, 2 epochs
    python train.py --method colorization --method-options loss=regression
    python train.py --method colorization --method-options grey=false_colour   # grey data (the demo)
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.colour_losses import (IN_GAMUT_BINS, ab_bins, ab_regression_loss, annealed_mean, bin_counts,
                                  rebalanced_cross_entropy, rebalancing_weights, smoothed_prior, soft_encode)
from models.methods.base import Progress
from models.methods.pretext import PretextHead, PretextMethod
from pipelines.spec import Lab

LOSSES = ("classification", "regression")
GREY = ("drop", "keep", "false_colour")
PRIOR_FILE = "colour_prior.json"
FALSE_COLOUR_CHROMA = 30.0  # ab units: inside the sRGB gamut at every lightness the demo's images have


def feature_map(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's spatial output before pooling (timm's `forward_features`), as (B, C, h, w): a CNN's
    last feature map, or a ViT's patch tokens (prefix tokens dropped) laid out on their grid."""
    features = backbone.forward_features(images)
    if features.dim() == 4:
        return features
    if features.dim() != 3:
        raise ValueError(f"colorization: forward_features gave a {features.dim()}-d tensor; it needs a feature "
                         f"map (B, C, h, w) or tokens (B, N, C)")
    tokens = features[:, getattr(backbone, "num_prefix_tokens", 0):]
    side = int(round(tokens.shape[1] ** 0.5))
    if side * side != tokens.shape[1]:
        raise ValueError(f"colorization: {tokens.shape[1]} patch tokens do not make a square grid")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


def false_colour(lightness: torch.Tensor) -> torch.Tensor:
    """ab (B, 2, S, S) for grey images from their own lightness L (B, 1, S, S): a fixed hue ramp, blue
    (240 degrees) at L = 0 through green to yellow (60 degrees) at L = 100, chroma FALSE_COLOUR_CHROMA."""
    angle = torch.deg2rad(240.0 - 1.8 * lightness.clamp(0, 100))
    return FALSE_COLOUR_CHROMA * torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)


class ColourDecoder(nn.Module):
    """A light decoder on the backbone's feature map: 1x1 conv to `dim` (BN, ReLU), bilinear upsampling
    to the prediction's size, two 3x3 convs (BN, ReLU), a 1x1 conv to `outputs` per position."""

    def __init__(self, in_dim: int, dim: int, outputs: int):
        super().__init__()

        def block(inputs: int, kernel: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, dim, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(dim),
                    nn.ReLU(inplace=True)]

        self.reduce = nn.Sequential(*block(in_dim, 1))
        self.refine = nn.Sequential(*block(dim, 3), *block(dim, 3))
        self.predict = nn.Conv2d(dim, outputs, 1)

    def forward(self, features: torch.Tensor, size: int) -> torch.Tensor:
        x = F.interpolate(self.reduce(features), size=(size, size), mode="bilinear", align_corners=False)
        return self.predict(self.refine(x))


class ColorizationHead(PretextHead):
    """The decoder, the bins and the prior (buffers: `bins` (Q, 2), `prior` (Q,), `class_weights` (Q,),
    `prior_pixels` the count it came from), and the loss."""

    def __init__(self, feature_dim: int, spec: Lab, *, loss: str = "classification", decoder_dim: int = 256,
                 output_stride: int = 4, neighbours: int = 5, sigma: float = 5.0, rebalance: float = 0.5,
                 grey: str = "drop", grey_threshold: float = 2.0):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"colorization loss={loss!r}: use one of {', '.join(LOSSES)}")
        if grey not in GREY:
            raise ValueError(f"colorization grey={grey!r}: use one of {', '.join(GREY)}")
        if output_stride < 1 or neighbours < 1 or sigma <= 0 or not 0 <= rebalance <= 1:
            raise ValueError("colorization: output_stride and neighbours must be positive, sigma > 0, "
                             "rebalance in [0, 1]")
        self.spec = spec
        self.loss = loss
        self.output_stride = output_stride
        self.neighbours = neighbours
        self.sigma = sigma
        self.rebalance = rebalance
        self.grey = grey
        self.grey_threshold = grey_threshold
        bins = ab_bins()
        q = bins.shape[0]
        self.register_buffer("bins", bins.clone())
        self.register_buffer("prior", torch.full((q,), 1.0 / q))
        self.register_buffer("class_weights", torch.ones(q))
        self.register_buffer("prior_pixels", torch.zeros((), dtype=torch.float64))
        self.decoder = ColourDecoder(feature_dim, decoder_dim, q if loss == "classification" else 2)

    @property
    def num_bins(self) -> int:
        return self.bins.shape[0]

    def prediction_size(self, images: torch.Tensor) -> int:
        return max(1, images.shape[-1] // self.output_stride)

    def targets(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(ab at the prediction's size (B, 2, s, s), which images the loss sees (B,) as 0/1 float). An image
        is grey when the mean chroma sqrt(a^2 + b^2) of its pixels is under `grey_threshold`; grey images
        are left out (`grey=drop`, the paper's choice), kept with their near-zero ab (`keep`), or given
        `false_colour` from their own lightness (`false_colour`)."""
        ab = inputs.labels.float()
        grey = ab.square().sum(dim=1).sqrt().mean(dim=(1, 2)) < self.grey_threshold
        if self.grey == "false_colour":
            lightness = inputs.images[:, :1].float() * 50.0 + 50.0
            ab = torch.where(grey.view(-1, 1, 1, 1), false_colour(lightness), ab)
        keep = torch.ones_like(grey) if self.grey != "drop" else ~grey
        size = self.prediction_size(inputs.images)
        return F.interpolate(ab, size=(size, size), mode="area"), keep.float()

    def forward(self, features: torch.Tensor, inputs, batch) -> tuple[torch.Tensor, dict]:
        ab, keep = self.targets(inputs)
        size = ab.shape[-1]
        output = self.decoder(features, size)
        outputs = output.shape[1]
        flat_ab = ab.permute(0, 2, 3, 1).reshape(-1, 2)
        flat_out = output.permute(0, 2, 3, 1).reshape(-1, outputs)
        flat_keep = keep.repeat_interleave(size * size)
        metrics = {"coloured": keep.mean()}
        if self.loss == "regression":
            loss = ab_regression_loss(flat_out, flat_ab, flat_keep)
            error = (flat_out.detach().float() * 100 - flat_ab).square().sum(dim=1).sqrt()
            metrics["ab_error"] = (error * flat_keep).sum() / flat_keep.sum().clamp_min(1)
            return loss, metrics
        targets, nearest = soft_encode(flat_ab, self.bins, self.neighbours, self.sigma)
        loss = rebalanced_cross_entropy(flat_out, targets, nearest, self.class_weights, flat_keep)
        correct = (flat_out.detach().argmax(dim=1) == nearest).float()
        metrics["bin_accuracy"] = (correct * flat_keep).sum() / flat_keep.sum().clamp_min(1)
        return loss, metrics

    @torch.no_grad()
    def colour_counts(self, inputs) -> torch.Tensor:
        """Nearest-bin counts of the ab the loss sees in one batch, then the images kept and seen:
        (Q + 2,) float64."""
        ab, keep = self.targets(inputs)
        positions = ab.shape[-1] ** 2
        flat_ab = ab.permute(0, 2, 3, 1).reshape(-1, 2)[keep.repeat_interleave(positions) > 0]
        counts = bin_counts(flat_ab, self.bins)
        seen = torch.tensor([keep.sum().item(), keep.numel()], dtype=torch.float64, device=counts.device)
        return torch.cat([counts, seen])

    @torch.no_grad()
    def set_prior(self, counts: torch.Tensor) -> None:
        """The smoothed prior (`smoothed_prior`, the same sigma as the soft encoding) and its rebalancing
        weights from nearest-bin `counts` (Q,)."""
        counts = counts.to(self.bins.device)
        prior = smoothed_prior(counts, self.bins, self.sigma)
        self.prior.copy_(prior.float())
        self.class_weights.copy_(rebalancing_weights(prior, self.rebalance).float())
        self.prior_pixels.fill_(float(counts.sum()))

    @torch.no_grad()
    def predict_ab(self, features: torch.Tensor, size: int, temperature: float = 0.38) -> torch.Tensor:
        """Predicted ab (B, 2, s, s) at the prediction's size `size`: the annealed mean of the predicted
        distribution at `temperature` (classification), or the regressed ab."""
        output = self.decoder(features, size).float()
        if self.loss == "regression":
            return output * 100.0
        return annealed_mean(output.permute(0, 2, 3, 1), self.bins, temperature).permute(0, 3, 1, 2)


class Colorization(PretextMethod):
    """A backbone and `ColorizationHead` on one crop per image, in lightness."""

    name = "colorization"
    recipe_preset = "colorization"
    # Zhang et al.: Adam, betas (0.9, 0.99), weight decay 1e-3, LR 3e-5 at batch 40 (dropped to 1e-5 and
    # 3e-6 at 200k and 375k iterations; here a cosine), ~450k iterations (~14 ImageNet epochs); lr is per
    # 256 images: 3e-5 x 256 / 40 = 1.92e-4. AdamW's decay is decoupled, Caffe's Adam added it to the gradient.
    paper = dict(optimizer="adamw", lr=1.92e-4, weight_decay=1e-3, warmup_epochs=0.0, epochs=14, batch_size=40,
                 multicrop="1x224")
    adamw_betas = (0.9, 0.99)
    # CPU: base LR 4e-3 (1e-3 at batch 64); on the demo with grey=false_colour, 2 epochs, kNN 76.0 / 76.35 / 74.8
    # at base 1e-3 / 4e-3 / 1.6e-2 (docs/RESULTS.md)
    cpu_overrides: ClassVar[dict[str, Any]] = {**PretextMethod.cpu_overrides, "lr": 4e-3}
    HEAD_PRESETS = {"paper": dict(decoder_dim=256), "small": dict(decoder_dim=128)}
    REPLICATED_BUFFERS = tuple(f"heads.colorization.{name}" for name in ("bins", "prior", "class_weights",
                                                                          "prior_pixels"))

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True,
                 loss: str = "classification", grey: str = "drop", grey_threshold: float = 2.0,
                 prior_batches: int = 100, output_stride: int = 4, neighbours: int = 5, sigma: float = 5.0,
                 rebalance: float = 0.5, head_preset: str | None = None, decoder_dim: int | None = None,
                 **backbone_options):
        """`prior_batches`: batches of training data the prior is estimated from at the start of a fresh run
        (classification only). `rebalance` is the paper's lambda (0: weights from the prior alone, 1: none)."""
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        if prior_batches < 1:
            raise ValueError(f"colorization prior_batches={prior_batches}: needs at least 1")
        sizes = self.head_sizes(head_preset, on_gpu, decoder_dim=decoder_dim)
        self.add_task(ColorizationHead(self.feature_dim, Lab(), loss=loss, output_stride=output_stride,
                                       neighbours=neighbours, sigma=sigma, rebalance=rebalance, grey=grey,
                                       grey_threshold=grey_threshold, **sizes))
        self.prior_batches = prior_batches

    @property
    def head(self) -> ColorizationHead:
        return self.heads["colorization"]

    def training_step(self, batch, progress: Progress):
        if "colorization" not in batch.pretext:
            raise ValueError("colorization: the batch has no colorization inputs; train on a recipe whose "
                             "pretext part makes them (adapt_recipe)")
        inputs = batch.pretext["colorization"]
        loss, metrics = self.head(feature_map(self.backbone, inputs.images), inputs, batch)
        metrics["loss"] = loss.detach()
        return loss, metrics

    def compile_backbone(self, **options) -> None:
        """What the step runs through the backbone is its `forward_features`: that is compiled (in place)."""
        self.backbone.forward_features = torch.compile(self.backbone.forward_features, **options)

    @torch.no_grad()
    def colourise(self, images: torch.Tensor, temperature: float = 0.38) -> torch.Tensor:
        """Predicted ab (B, 2, S, S) for centred-lightness `images` (B, 3, S, S): the head's prediction at its
        resolution, upsampled bilinearly to the input's."""
        size = images.shape[-1]
        ab = self.head.predict_ab(feature_map(self.backbone, images), self.head.prediction_size(images),
                                  temperature)
        return F.interpolate(ab, size=(size, size), mode="bilinear", align_corners=False)

    # ---- the colour prior: estimated once per run, before the first step (train.py), checkpointed

    @property
    def data_statistics_batches(self) -> int:
        return self.prior_batches if self.head.loss == "classification" else 0

    def data_statistics(self, batch) -> torch.Tensor:
        return self.head.colour_counts(batch.pretext["colorization"])

    def fit_data_statistics(self, total: torch.Tensor) -> str:
        counts, (kept, seen) = total[:-2], total[-2:].tolist()
        self.head.set_prior(counts)
        line = (f"colour prior: {int(counts.sum())} ab values of {int(kept)} of {int(seen)} images (the rest "
                f"grey, grey={self.head.grey}) over {self.head.num_bins} bins")
        if counts.sum() <= 0:
            line += "; no colour seen: uniform prior, every weight 1"
        if kept == 0:
            line += (f"\nwarning: every image read is grey (mean chroma under grey_threshold="
                     f"{self.head.grey_threshold:g}): the loss is zero and the backbone does not train; a grey "
                     f"data set (the demo's) needs --method-options grey=false_colour")
        return line

    def run_files(self) -> dict[str, str]:
        if self.head.loss != "classification":
            return {}
        head = self.head
        document = {"bins": head.bins.tolist(), "prior": head.prior.tolist(),
                    "class_weights": head.class_weights.tolist(), "pixels": float(head.prior_pixels),
                    "sigma": head.sigma, "rebalance": head.rebalance, "expected_bins": IN_GAMUT_BINS}
        return {PRIOR_FILE: json.dumps(document)}
