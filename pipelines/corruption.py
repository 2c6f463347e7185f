"""IPT's corruptions of clean crops, made on the training device (`pipelines.spec.Restoration`): bicubic
downscaling for super-resolution, additive Gaussian noise, synthetic rain streaks. Batched tensor ops,
every random choice from the input stack's seeded generator (an exact resume draws the same ones), no
host round trip: the number of samples per task is fixed by the batch size, not drawn.

Images are (B, C, S, S) RGB in [0, 1] (a recipe that does not normalise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.spec import Restoration, restoration_task


@dataclass
class RestorationInputs:
    """Per task (in the spec's order; tasks without samples are left out): `inputs` the corrupted images
    (n_t, C, s, s), s = S / scale for `srN` and S otherwise; `targets` their clean crops (n_t, C, S, S);
    `samples` (n_t,) each row's sample in the batch (positions of group 0's views)."""

    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    samples: dict[str, torch.Tensor]

    def to(self, device) -> RestorationInputs:
        return RestorationInputs(*({task: tensor.to(device) for task, tensor in part.items()}
                                   for part in (self.inputs, self.targets, self.samples)))


def downscale(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic downscaling by `scale` with antialias (as PIL's and MATLAB's imresize), clipped to [0, 1]."""
    size = (images.shape[-2] // scale, images.shape[-1] // scale)
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0.0, 1.0)


def upscale(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic upscaling by `scale`, clipped to [0, 1]: the trivial super-resolution baseline."""
    size = (images.shape[-2] * scale, images.shape[-1] * scale)
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def add_noise(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Additive white Gaussian noise of standard deviation `sigma` on the 0-255 scale (sigma / 255 here),
    independent per pixel and channel, clipped to [0, 1]."""
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return (images + noise * (sigma / 255.0)).clamp(0.0, 1.0)


def _uniform(low: float, high: float, count: int, generator: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator, device=device)


def motion_kernels(lengths: tuple[int, ...], choice: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """(B, K, K) motion-blur kernels, K = max(lengths): sample i's is Kornia's `get_motion_kernel2d` of
    length lengths[choice[i]] at angles[i] degrees (uniform weights, the line rotated bilinearly: an
    anti-aliased streak, and no host sync, which Kornia's exact nearest rotation makes on a GPU), centred in
    K x K. Kornia's `motion_blur` takes one length per call; this makes every candidate length for the whole
    batch and picks one per sample."""
    from kornia.filters import get_motion_kernel2d

    side = max(lengths)
    candidates = []
    for length in lengths:
        kernel = get_motion_kernel2d(length, angles, torch.zeros_like(angles), mode="bilinear")
        border = (side - length) // 2
        candidates.append(F.pad(kernel, [border] * 4))
    stacked = torch.stack(candidates, dim=1)  # (B, lengths, K, K)
    return stacked[torch.arange(angles.shape[0], device=angles.device), choice]


def rain_streaks(images: torch.Tensor, spec: Restoration, generator: torch.Generator) -> torch.Tensor:
    """Synthetic rain: per image a density, a streak length, an angle and a brightness drawn from the spec's
    ranges; seeds where uniform noise falls under the density are motion-blurred along the angle (Kornia's
    motion kernel, `motion_kernels`) into streaks of that length, scaled so a lone streak's pixels have the
    brightness, overlaps capped at 1; the same white streaks added to every channel, clipped to [0, 1]."""
    from kornia.filters import filter2d

    b, _, height, width = images.shape
    device = images.device
    lengths = spec.rain_lengths(min(height, width))
    density = _uniform(*spec.rain_density, b, generator, device).view(b, 1, 1, 1)
    choice = torch.randint(0, len(lengths), (b,), generator=generator, device=device)
    angles = _uniform(*spec.rain_angle, b, generator, device)
    strength = _uniform(*spec.rain_strength, b, generator, device).view(b, 1, 1, 1)
    seeds = (torch.rand(b, 1, height, width, generator=generator, device=device) < density).float()
    kernels = motion_kernels(lengths, choice, angles)
    blurred = filter2d(seeds, kernels, border_type="constant")
    # a kernel's peak weight falls with the angle (the line's weight spread over more pixels): divided by it,
    # a lone streak's centre line gets `strength`
    streaks = (blurred / kernels.amax(dim=(1, 2)).view(b, 1, 1, 1) * strength).clamp(max=1.0)
    return (images + streaks.to(images.dtype)).clamp(0.0, 1.0)


def corrupt(images: torch.Tensor, name: str, spec: Restoration, generator: torch.Generator) -> torch.Tensor:
    """The corrupted input of task `name` for clean `images`."""
    kind, amount = restoration_task(name)
    if kind == "sr":
        return downscale(images, amount)
    if kind == "noise":
        return add_noise(images, float(amount), generator)
    return rain_streaks(images, spec, generator)


def task_counts(batch: int, tasks: int) -> list[int]:
    """Samples per task when a batch is split among the tasks: as equal as can be, the first tasks one more."""
    return [batch // tasks + (index < batch % tasks) for index in range(tasks)]


def restoration_inputs(images: torch.Tensor, spec: Restoration, generator: torch.Generator) -> RestorationInputs:
    """Every task's inputs for a batch of clean crops. `assign="sample"`: a random permutation of the batch
    split into `task_counts` parts, part t corrupted by task t (each sample one task, drawn at random, every
    task the same share of every batch); `assign="all"`: every task on the whole batch."""
    b = images.shape[0]
    if spec.assign == "all":
        everyone = torch.arange(b, device=images.device)
        samples = {name: everyone for name in spec.tasks}
    else:
        order = torch.randperm(b, generator=generator, device=images.device)
        samples = {name: part for name, part in zip(spec.tasks, order.split(task_counts(b, len(spec.tasks))))
                   if part.numel()}
    inputs, targets = {}, {}
    for name, rows in samples.items():
        targets[name] = images if spec.assign == "all" else images[rows]
        inputs[name] = corrupt(targets[name], name, spec, generator)
    return RestorationInputs(inputs, targets, samples)
