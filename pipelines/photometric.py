"""The photometric stage: Kornia ops on the training device, one call chain per view group.

Input is the uint8 crops of one size group (all its views stacked view-major); output is float,
normalised last. Every random quantity is drawn per sample from one seeded `torch.Generator`, so a
stream is reproducible from the run's seed and step, and per-view parameters (BYOL/DINO asymmetries)
become per-sample tensors. Ops run only on the samples their coin flip selected (conditional, not
compute-and-discard). Semantics are torchvision/PIL's: multiplicative brightness, contrast blended
with the grey mean, saturation blended with the grey image, hue shifted in HSV (in turns), the four
jitter ops in an independent random order per image, BT.601 grey, solarize above 0.5 (128/255).
"""

from __future__ import annotations

import math

import kornia
import torch

from pipelines.spec import Recipe, ViewGroup

_JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def _adjust_hue_turns(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    return kornia.enhance.adjust_hue(images, turns * (2 * math.pi))


_JITTER_FUNCTIONS = {
    "brightness": kornia.enhance.adjust_brightness_accumulative,
    "contrast": kornia.enhance.adjust_contrast_with_mean_subtraction,
    "saturation": kornia.enhance.adjust_saturation_with_gray_subtraction,
    "hue": _adjust_hue_turns,
}


def blur_kernel_size(sigma_max: float, crop_size: int) -> int:
    """An odd Gaussian window covering +-3 sigma, never wider than the crop (reflect padding needs less)."""
    size = 2 * math.ceil(3 * sigma_max) + 1
    largest = crop_size if crop_size % 2 else crop_size - 1
    return max(3, min(size, largest))


class _GroupParameters:
    """Per-view photometric parameters of one group as tensors, expanded per sample on demand."""

    def __init__(self, group: ViewGroup, device: torch.device):
        views = [group.view_photometric(view) for view in range(group.count)]

        def column(getter) -> torch.Tensor:
            return torch.tensor([float(getter(view)) for view in views], device=device)

        self.jitter_p = column(lambda v: v.jitter_p)
        self.strength = {op: column(lambda v, op=op: getattr(v, op)) for op in _JITTER_OPS}
        self.grayscale_p = column(lambda v: v.grayscale_p)
        self.blur_p = column(lambda v: v.blur_p)
        self.sigma_low = column(lambda v: v.blur_sigma[0])
        self.sigma_high = column(lambda v: v.blur_sigma[1])
        self.solarize_p = column(lambda v: v.solarize_p)
        self.blur_kernel = blur_kernel_size(max(v.blur_sigma[1] for v in views), group.size)
        self.uses = {
            "jitter": any(v.jitter_p > 0 for v in views),
            "grayscale": any(v.grayscale_p > 0 for v in views),
            "blur": any(v.blur_p > 0 for v in views),
            "solarize": any(v.solarize_p > 0 for v in views),
        }
        self.jitter_ops = [op for op in _JITTER_OPS if any(getattr(v, op) > 0 for v in views)]


class PhotometricStage:
    """Applies a recipe's photometric ops and normalisation to one view group at a time."""

    def __init__(self, recipe: Recipe, device: torch.device | str, generator: torch.Generator):
        self.recipe = recipe
        self.device = torch.device(device)
        self.generator = generator
        self._groups = [_GroupParameters(group, self.device) for group in recipe.groups]
        if recipe.mean is not None:
            self._mean = torch.tensor(recipe.mean, device=self.device)
            self._std = torch.tensor(recipe.std, device=self.device)

    def _uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=self.device)

    def _coin(self, probability: torch.Tensor) -> torch.Tensor:
        return self._uniform(probability.numel()) < probability

    def __call__(self, crops: torch.Tensor, group_index: int, record: dict | None = None) -> torch.Tensor:
        """`crops`: uint8 (views * B, H, W, 3) or (views * B, 3, H, W), view-major.

        Returns float (views * B, 3, H, W). When `record` is a dict, the per-sample decisions and
        factors are stored in it (used by the statistical tests and the view inspector).
        """
        if crops.dtype != torch.uint8:
            raise TypeError(f"photometric stage expects uint8 crops, got {crops.dtype}")
        if crops.shape[-1] == 3 and crops.shape[1] != 3:
            crops = crops.permute(0, 3, 1, 2)
        images = crops.float().div_(255.0)
        params = self._groups[group_index]
        count = self.recipe.groups[group_index].count
        per_view = images.shape[0] // count

        def per_sample(values: torch.Tensor) -> torch.Tensor:
            return values.repeat_interleave(per_view)

        if params.uses["jitter"]:
            images = self._color_jitter(images, params, per_sample, record)
        if params.uses["grayscale"]:
            chosen = self._coin(per_sample(params.grayscale_p))
            images = self._apply(images, chosen, lambda x: kornia.color.rgb_to_grayscale(x).expand_as(x))
            _record(record, grayscale=chosen)
        if params.uses["blur"]:
            chosen = self._coin(per_sample(params.blur_p))
            low, high = per_sample(params.sigma_low), per_sample(params.sigma_high)
            sigma = low + (high - low) * self._uniform(images.shape[0])
            images = self._apply(
                images,
                chosen,
                lambda x, s: kornia.filters.gaussian_blur2d(
                    x, (params.blur_kernel, params.blur_kernel), torch.stack([s, s], dim=1)
                ),
                sigma,
            )
            _record(record, blur=chosen, blur_sigma=sigma)
        if params.uses["solarize"]:
            chosen = self._coin(per_sample(params.solarize_p))
            images = self._apply(images, chosen, lambda x: kornia.enhance.solarize(x, thresholds=0.5))
            _record(record, solarize=chosen)
        if self.recipe.mean is not None:
            images = kornia.enhance.normalize(images, self._mean, self._std)
        return images

    def _color_jitter(self, images, params: _GroupParameters, per_sample, record):
        n = images.shape[0]
        chosen = self._coin(per_sample(params.jitter_p))
        factors = {}
        for op in _JITTER_OPS:
            strength = per_sample(params.strength[op])
            if op == "hue":
                factors[op] = (2 * self._uniform(n) - 1) * strength
            else:
                low = (1 - strength).clamp(min=0)
                factors[op] = low + (1 + strength - low) * self._uniform(n)
        order = torch.argsort(self._uniform(n * 4).view(n, 4), dim=1)  # a random op order per image
        for position in range(4):
            for op_index, op in enumerate(_JITTER_OPS):
                if op not in params.jitter_ops:
                    continue
                selected = chosen & (order[:, position] == op_index)
                images = self._apply(images, selected, _JITTER_FUNCTIONS[op], factors[op])
        _record(record, jitter=chosen, jitter_order=order, **{f"jitter_{op}": f for op, f in factors.items()})
        return images

    @staticmethod
    def _apply(images: torch.Tensor, selected: torch.Tensor, op, *per_sample_args) -> torch.Tensor:
        index = selected.nonzero().squeeze(1)
        if index.numel() == 0:
            return images
        if index.numel() == images.shape[0]:
            return op(images, *per_sample_args)
        images[index] = op(images[index], *(arg[index] for arg in per_sample_args))
        return images


def _record(record: dict | None, **values) -> None:
    if record is not None:
        record.update(values)
