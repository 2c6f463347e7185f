"""PSNR and SSIM per restoration task on held-out shards, for a model and for the trivial baselines
(bicubic upscaling for super-resolution, the corrupted input itself for denoising and deraining).

Each evaluation reads one pass of an evaluation stack (one clean view per image: the whole image resized to
the training crop size, in shard order), corrupts every image by every task (`pipelines.corruption`) with a
generator seeded afresh (the same corruptions at every evaluation), restores them with a callable
`restore(inputs, task)` and scores per image: PSNR (`kornia.metrics.psnr`, peak 1) and SSIM
(`kornia.metrics.ssim`, 11-px Gaussian window, the map's mean) on RGB in [0, 1], outputs clipped to [0, 1], the
whole image (no border shaved). This module does not depend on the models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from pipelines.corruption import corrupt, upscale
from pipelines.features import shard_size
from pipelines.shards import ShardSet
from pipelines.spec import Recipe, Restoration, eval_recipe, restoration_task
from pipelines.stack import InputStack

EVALUATION_SEED = 0
SSIM_WINDOW = 11
# per task: summed model PSNR, model SSIM, baseline PSNR, baseline SSIM, and the image count
SUMS = ("psnr", "ssim", "baseline_psnr", "baseline_ssim", "images")
BASELINES = {"sr": "bicubic", "noise": "noisy input", "derain": "rainy input"}


def restoration_stack(recipe: Recipe, data: str | Path | ShardSet, batch_size: int, *, rank: int = 0,
                      world_size: int = 1, device: torch.device | str = "cpu", num_threads: int = 2) -> InputStack:
    """Clean evaluation images: the whole image (the centred square of its short side) resized to the recipe's
    first crop size, unflipped, in shard order, rank `rank`'s share once per epoch; no labels needed."""
    return InputStack(eval_recipe(recipe, crop_fraction=1.0), data, batch_size, rank=rank, world_size=world_size,
                      device=device, num_threads=num_threads, training=False)


def trivial_baseline(inputs: torch.Tensor, task: str) -> torch.Tensor:
    """What restoring without a model gives: bicubic upscaling of an SR input, any other input as it is."""
    kind, amount = restoration_task(task)
    return upscale(inputs, amount) if kind == "sr" else inputs


def baseline_name(task: str) -> str:
    return BASELINES[restoration_task(task)[0]]


def image_psnr(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image (n,), peak 1."""
    from kornia.metrics import psnr

    return torch.stack([psnr(output, target, 1.0) for output, target in zip(outputs.float(), targets.float())])


def image_ssim(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SSIM of each image (n,): the mean of Kornia's SSIM map over pixels and channels."""
    from kornia.metrics import ssim

    return ssim(outputs.float(), targets.float(), SSIM_WINDOW, max_val=1.0).mean(dim=(1, 2, 3))


def clean_images(stack: InputStack):
    """This rank's share of the stack's images, one epoch, each once (a padding repeat past the share's
    end is dropped): yields (images (n, 3, S, S), keys)."""
    if stack.step_in_epoch not in (0, stack.steps_per_epoch):
        raise ValueError(f"restoration scores: the stack is {stack.step_in_epoch} batches into an epoch; it must be "
                         f"at an epoch boundary")
    expected, filled = None, 0
    for _ in range(stack.steps_per_epoch):
        batch = next(stack)
        if expected is None:
            world = stack.dali.num_shards
            expected = shard_size(stack.shards.num_samples, world, (stack.rank + stack.epoch) % world)
        take = min(batch.batch_size, expected - filled)
        if take > 0:
            yield batch.views[0][:take].float(), batch.keys[:take]
            filled += take


@torch.no_grad()
def score_restoration(restore: Callable[[torch.Tensor, str], torch.Tensor] | None, stack: InputStack,
                      spec: Restoration, seed: int = EVALUATION_SEED,
                      examples: int = 0) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """(sums (tasks, len(SUMS)) over this rank's share of `stack` in `spec.tasks` order, examples): every image
    corrupted by every task; `restore` None scores the baselines only (model columns 0). `examples` > 0 keeps
    the first that many images per task: {task: {"input", "output", "clean"}} on the CPU."""
    generator = torch.Generator(device=stack.device).manual_seed(seed)
    sums = torch.zeros(len(spec.tasks), len(SUMS), dtype=torch.float64, device=stack.device)
    kept: dict[str, dict[str, list[torch.Tensor]]] = {task: {"input": [], "output": [], "clean": []}
                                                      for task in spec.tasks}
    shown = 0
    for images, _ in clean_images(stack):
        for index, task in enumerate(spec.tasks):
            inputs = corrupt(images, task, spec, generator)
            baseline = trivial_baseline(inputs, task)
            row = [torch.zeros(()), torch.zeros(()), image_psnr(baseline, images).sum(),
                   image_ssim(baseline, images).sum(), torch.tensor(float(images.shape[0]))]
            outputs = None
            if restore is not None:
                outputs = restore(inputs, task).float().clamp(0.0, 1.0)
                row[0], row[1] = image_psnr(outputs, images).sum(), image_ssim(outputs, images).sum()
            sums[index] += torch.stack([value.to(sums) for value in row])
            if shown < examples:
                take = examples - shown
                kept[task]["input"].append(inputs[:take].cpu())
                kept[task]["output"].append((outputs if outputs is not None else baseline)[:take].cpu())
                kept[task]["clean"].append(images[:take].cpu())
        shown += images.shape[0]
    pictures = {task: {name: torch.cat(parts) for name, parts in columns.items()} for task, columns in kept.items()
                if columns["clean"]} if examples else {}
    return sums, pictures


def mean_scores(sums: torch.Tensor, tasks) -> dict[str, dict[str, float]]:
    """{task: {"psnr", "ssim", "baseline_psnr", "baseline_ssim", "images"}}: the means over images of `sums`
    (summed over ranks or not)."""
    scores = {}
    for task, row in zip(tasks, sums.tolist()):
        count = max(row[-1], 1.0)
        scores[task] = {name: value / count for name, value in zip(SUMS[:-1], row[:-1])}
        scores[task]["images"] = int(row[-1])
    return scores
