"""Context encoder (Pathak, Krähenbühl, Donahue, Darrell & Efros 2016): reconstruct a hole cut out of each
image from its context.

The input stack cuts the hole and fills it with the mean pixel (`pipelines.pretext.inpaint`, from the
recipe's `inpainting` pretext part); this file is the maths: the backbone's feature map (timm's
`forward_features`) -> an up-convolution decoder -> an image, an L2 loss on the hole and a ring of context
around it (10x weight on the ring), and with `adversarial=true` a small discriminator with its own Adam.

The discriminator's step: the loop's optimizer never sees its parameters (`param_groups`). `training_step`
runs the discriminator with its parameters frozen on the composite (the prediction pasted into the image),
so the loop's backward reaches only the backbone and the decoder, and keeps the detached real and
composite images; `after_step` then takes the discriminator's own step on them (its loss in float32, its
gradients averaged over ranks by hand: DDP ignores its parameters). After the step, not in
`training_step`: state that follows the weights changes in `after_step` only, so a step the fp16 grad
scaler skips leaves the discriminator as it was, and its backward never mixes with the loop's (nor its
loss scale). Both updates read the same forward at the weights before the step, as the released code
(train.lua) does: its generator step reuses the discriminator's output of the discriminator step. The
discriminator's Adam state goes into every checkpoint (`checkpoint_state`, models/checkpointing.py).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.distributed import autocast_off, mean_over_ranks_
from models.methods.base import Progress
from models.methods.pretext import PretextHead, PretextMethod
from models.optim import param_groups
from pipelines.spec import Inpainting

PROBE_SIZE = 128  # px: the input that measures the backbone's feature stride


# ------------------------------------------------------------------------------------------------ losses


def region_weights(hole: torch.Tensor, overlap: int, overlap_weight: float = 10.0) -> torch.Tensor:
    """Per-pixel L2 weights (B, 1, S, S) from the hole (B, S, S), True = filled: 1 on the hole,
    `overlap_weight` on the ring of context pixels within `overlap` px of it (the hole dilated by a square
    of side 2 * overlap + 1, minus the hole: the paper's slightly larger predicted region), 0 elsewhere."""
    hole = hole.unsqueeze(1).float()
    grown = F.max_pool2d(hole, kernel_size=2 * overlap + 1, stride=1, padding=overlap) if overlap > 0 else hole
    return hole + overlap_weight * (grown - hole)


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted L2 on the predicted region, over the batch: sum(weights * (prediction - target)²) over
    pixels and channels / (channels * the pixels with weight > 0). That is the paper's mean squared error
    over its predicted region with the overlap weights on each pixel's term; zero where the prediction
    equals the target, whatever the prediction outside the region."""
    squared = (prediction.float() - target.float()).square()
    region = (weights > 0).sum() * prediction.shape[1]
    return (weights * squared).sum() / region.clamp(min=1)


def composite(prediction: torch.Tensor, images: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """`images` with the prediction in place of the pixels where `region` (B, 1, S, S) is True."""
    return torch.where(region, prediction.to(images.dtype), images)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """DCGAN's: binary cross-entropy of real images as 1 plus of composites as 0 (each a batch mean)."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss: binary cross-entropy of the composites as real (1)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


# ------------------------------------------------------------------------------------------------ modules


def dcgan_init_(module: nn.Module) -> nn.Module:
    """The released code's initialisation: convolution weights N(0, 0.02), biases 0, batch-norm weights
    N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


def up_convolutions(in_channels: int, ups: int, width: int) -> nn.Sequential:
    """The paper's decoder: `ups` 4x4 transposed convolutions of stride 2 (each doubles the resolution),
    batch norm and ReLU between them, widths `width`, width / 2, ... (at least 16), the last to 3 channels
    with a linear output (the pixels are normalised: no tanh). `ups` 0: a 1x1 convolution."""
    if ups == 0:
        return nn.Sequential(nn.Conv2d(in_channels, 3, 1))
    layers: list[nn.Module] = []
    channels = in_channels
    for index in range(ups - 1):
        out = max(width >> index, 16)
        layers += [nn.ConvTranspose2d(channels, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        channels = out
    layers.append(nn.ConvTranspose2d(channels, 3, 4, 2, 1))
    return dcgan_init_(nn.Sequential(*layers))


class Discriminator(nn.Module):
    """DCGAN's discriminator as the paper has it: `depth` 4x4 convolutions of stride 2 (widths `width`,
    2 width, ... at most 8 width), batch norm on all but the first, LeakyReLU 0.2; then a 3x3 convolution
    to one channel, averaged over positions: one logit per image, for any input size."""

    def __init__(self, width: int = 64, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        channels = width
        for index in range(1, depth):
            out = width * min(2 ** index, 8)
            layers += [nn.Conv2d(channels, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out),
                       nn.LeakyReLU(0.2, inplace=True)]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 3, 1, 1))
        self.layers = dcgan_init_(nn.Sequential(*layers))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images).mean(dim=(1, 2, 3))


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Inside, `module`'s parameters take no gradient (inputs still get theirs through it)."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in parameters:
            p.requires_grad_(True)


def feature_stride(backbone: nn.Module) -> int:
    """How many input pixels one position of the backbone's `forward_features` map spans (a power of two),
    measured on a PROBE_SIZE-px input in eval mode (the batch norms' statistics stay as they are)."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            features = backbone.forward_features(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE))
    except (RuntimeError, AssertionError, AttributeError) as error:
        raise ValueError(f"inpainting decodes a convolutional feature map: the backbone's forward_features "
                         f"fails on a {PROBE_SIZE}-px input ({str(error).splitlines()[0]}): use a ResNet-like "
                         f"timm model") from None
    finally:
        backbone.train(was_training)
    if features.ndim != 4:
        raise ValueError(f"inpainting decodes a convolutional feature map (B, C, h, w); the backbone's "
                         f"forward_features returns shape {tuple(features.shape)}: use a ResNet-like timm model")
    stride = PROBE_SIZE // features.shape[-1]
    if stride * features.shape[-1] != PROBE_SIZE or stride & (stride - 1):
        raise ValueError(f"inpainting: the backbone's feature map ({features.shape[-1]} px for {PROBE_SIZE}) is "
                         f"not a power-of-two reduction of its input")
    return stride


class InpaintingHead(PretextHead):
    """The decoder: the backbone's feature map -> an image of the input's size (up-convolutions back to
    the input resolution, resized bilinearly if the crop is not a multiple of the stride). The decoder
    predicts the whole image; the loss reads the hole and its overlap ring only."""

    def __init__(self, feature_dim: int, stride: int, spec: Inpainting, width: int, overlap_weight: float = 10.0):
        super().__init__()
        self.spec = spec
        self.overlap_weight = float(overlap_weight)
        self.decoder = up_convolutions(feature_dim, int(math.log2(stride)), width)

    def overlap(self, size: int) -> int:
        """The overlap ring's width in px on a `size`-px crop (the spec's, or its default for the size)."""
        return self.spec.for_crop(size).overlap

    def forward(self, feature_map: torch.Tensor, size: int) -> torch.Tensor:
        prediction = self.decoder(feature_map)
        if prediction.shape[-1] != size or prediction.shape[-2] != size:
            prediction = F.interpolate(prediction, size=(size, size), mode="bilinear", align_corners=False)
        return prediction


# ------------------------------------------------------------------------------------------------ method


class ContextEncoder(PretextMethod):
    """The backbone on the crop with its hole filled, the decoder on its feature map; loss = the weighted
    L2 (`reconstruction_loss`), or with `adversarial=true` (1 - adversarial_weight) * L2 +
    adversarial_weight * the generator's adversarial loss against `Discriminator` (0.999 and 0.001, the
    paper's joint loss). The discriminator judges real crops against composites (the prediction over the
    hole and its overlap ring, the crop elsewhere: it sees the context, as the released code's
    `conditionAdv` variant) and steps in `after_step` (see the module docstring)."""

    name = "inpainting"
    recipe_preset = "inpainting"
    # the released train.lua with the README's centre-inpainting options (wtl2=0.999, overlapPred=4): Adam
    # with beta1 0.5 at a constant LR, 2e-4 for the discriminator and 10x that for the generator (the loop's
    # optimizer here) when the loss is joint, batch 64, 128-px crops, 25 epochs (its niter default)
    paper = dict(optimizer="adamw", lr=2e-3, weight_decay=0.0, warmup_epochs=0.0, epochs=25, batch_size=64,
                 multicrop="1x128")
    adamw_betas = (0.5, 0.999)
    final_lr_fraction = 1.0  # constant, as the paper's Adam
    cpu_overrides = {**PretextMethod.cpu_overrides, "lr": 2e-3}
    HEAD_PRESETS = {"paper": dict(decoder_width=512, discriminator_width=64, discriminator_depth=4),
                    "small": dict(decoder_width=256, discriminator_width=32, discriminator_depth=3)}
    DISCRIMINATOR_BETAS: ClassVar[tuple[float, float]] = (0.5, 0.999)

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True,
                 head_preset: str | None = None, decoder_width: int | None = None,
                 discriminator_width: int | None = None, discriminator_depth: int | None = None,
                 mask: str = "center", ratio: float = 0.25, grid: int = 8, overlap: int | None = None,
                 fill: float = 0.0, overlap_weight: float = 10.0, adversarial: bool = False,
                 adversarial_weight: float = 0.001, discriminator_lr: float = 2e-4, **backbone_options):
        """`mask`, `ratio`, `grid`, `overlap`, `fill`: the hole (`pipelines.spec.Inpainting`);
        `overlap_weight`: the L2 weight of the overlap ring (the hole's is 1); `adversarial`: add the
        discriminator, weighted `adversarial_weight` in the joint loss, trained by its own Adam at the constant
        `discriminator_lr` (betas 0.5, 0.999)."""
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        if not 0.0 <= adversarial_weight < 1.0:
            raise ValueError(f"inpainting adversarial_weight={adversarial_weight}: must be in [0, 1)")
        sizes = self.head_sizes(head_preset, on_gpu, decoder_width=decoder_width,
                                discriminator_width=discriminator_width, discriminator_depth=discriminator_depth)
        spec = Inpainting(mask=mask, ratio=ratio, grid=grid, overlap=overlap, fill=fill)
        self.add_task(InpaintingHead(self.feature_dim, feature_stride(self.backbone), spec, sizes["decoder_width"],
                                     overlap_weight))
        self.adversarial = bool(adversarial)
        self.adversarial_weight = float(adversarial_weight)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (real, composite) for after_step
        if self.adversarial:
            self.discriminator = Discriminator(sizes["discriminator_width"], sizes["discriminator_depth"])
            self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=discriminator_lr,
                                                            betas=self.DISCRIMINATOR_BETAS)
            # DDP neither reduces nor broadcasts them: after_step averages the gradients itself
            self._ddp_params_and_buffers_to_ignore += [
                f"discriminator.{name}" for name, _ in [*self.discriminator.named_parameters(),
                                                         *self.discriminator.named_buffers()]]

    @property
    def head(self) -> InpaintingHead:
        return self.heads["inpainting"]

    def lr_scaling(self, global_batch: int) -> float:
        """Adam at the paper's LR whatever the batch (the paper's is 64): `--lr` is used as given."""
        return 1.0

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The loop's optimizer: everything but the discriminator (which has its own)."""
        own = {id(p) for p in self.discriminator.parameters()} if self.adversarial else set()
        groups = []
        for group in param_groups(self, weight_decay):
            kept = [p for p in group["params"] if id(p) not in own]
            if kept:
                groups.append({**group, "params": kept})
        return groups

    def compile_backbone(self, **options) -> None:
        """The step runs the backbone's `forward_features`: that is what gets compiled (in place)."""
        self.backbone.forward_features = torch.compile(self.backbone.forward_features, **options)

    def predict(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction (B, 3, S, S), L2 weights (B, 1, S, S)) for the batch's inpainting inputs."""
        inputs = batch.pretext.get("inpainting") if getattr(batch, "pretext", None) else None
        if inputs is None:
            raise ValueError("inpainting: the batch has no inpainting inputs; train on a recipe whose pretext part "
                             "makes them (adapt_recipe)")
        size = inputs.images.shape[-1]
        prediction = self.head(self.backbone.forward_features(inputs.images), size)
        weights = region_weights(inputs.labels, self.head.overlap(size), self.head.overlap_weight)
        return prediction, weights

    def training_step(self, batch, progress: Progress):
        images = batch.views[0]
        prediction, weights = self.predict(batch)
        with autocast_off(prediction):
            reconstruction = reconstruction_loss(prediction, images, weights)
        metrics = {"reconstruction_loss": reconstruction.detach()}
        if not self.adversarial:
            metrics["loss"] = reconstruction.detach()
            return reconstruction, metrics
        fake = composite(prediction, images, weights > 0)
        with frozen(self.discriminator):
            fake_logits = self.discriminator(fake)
        with torch.no_grad():
            real_logits = self.discriminator(images)
        with autocast_off(prediction):
            adversarial = generator_adversarial_loss(fake_logits.float())
            loss = (1.0 - self.adversarial_weight) * reconstruction + self.adversarial_weight * adversarial
            judged = discriminator_loss(real_logits.float(), fake_logits.detach().float())
        self._pending = (images.detach(), fake.detach())
        metrics.update(adversarial_loss=adversarial.detach(), discriminator_loss=judged, loss=loss.detach())
        return loss, metrics

    def after_step(self, progress: Progress) -> None:
        super().after_step(progress)
        if self._pending is not None:
            real, fake = self._pending
            self._pending = None
            self.discriminator_step(real, fake)

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One Adam step of the discriminator on real images and (detached) composites, in float32; the
        gradients are averaged over ranks first. Returns the loss it stepped on."""
        optimizer = self.discriminator_optimizer
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(real.device.type, enabled=False):
            loss = discriminator_loss(self.discriminator(real.float()), self.discriminator(fake.float()))
        loss.backward()
        for parameter in self.discriminator.parameters():
            if parameter.grad is not None:
                mean_over_ranks_(parameter.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def checkpoint_state(self) -> dict[str, Any]:
        return {"discriminator_optimizer": self.discriminator_optimizer.state_dict()} if self.adversarial else {}

    def load_checkpoint_state(self, state: dict) -> None:
        if self.adversarial:
            self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])

    @torch.no_grad()
    def inpainted(self, batch) -> dict[str, torch.Tensor]:
        """For pictures, normalised like the views: {"input": the crops with the hole filled, "inpainted":
        the prediction pasted into the hole, "original": the crops}."""
        prediction, weights = self.predict(batch)
        inputs = batch.pretext["inpainting"]
        images = batch.views[0]
        return {"input": inputs.images, "inpainted": composite(prediction, images, inputs.labels.unsqueeze(1)),
                "original": images}
