"""Frozen features: one epoch of an evaluation `InputStack` through a backbone, and the gather that
gives every rank the features all ranks read.

With `world_size` ranks, DALI's reader gives rank r, in epoch e of its stack, shard (r + e) % world_size
of the samples: samples floor(i * n / world_size) up to floor((i + 1) * n / world_size) for shard i, so
shard sizes differ by at most one. `pad_last_batch` pads every shard to the same number of batches by
repeating its last sample and the PARTIAL last-batch policy cuts those repeats again (a shard may end on
an empty batch). `extract_features` keeps exactly its shard's size of rows (dropping any repeat that got
through), so a bank gathered from all ranks holds each sample once, whichever epoch a stack is in.

The backbone is any callable from a batch of images to (batch, dim) features, or to a dict of them
(`extract_feature_sets`, e.g. features of several layers from one forward): this module does not
depend on the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pipelines.shards import ShardSet
from pipelines.spec import Recipe, eval_recipe
from pipelines.stack import InputStack

WHOLE_IMAGE_MAX = 64  # evaluation crops this small see the whole image (CIFAR-style protocols)


def evaluation_stack(recipe: Recipe, data: str | Path | ShardSet, batch_size: int, *, rank: int = 0,
                     world_size: int = 1, device: torch.device | str = "cpu",
                     num_threads: int = 2) -> InputStack:
    """An input stack of one un-augmented view per sample at `recipe`'s first crop size, in shard order,
    reading rank `rank`'s share of `data` once per epoch: crops of at most WHOLE_IMAGE_MAX px see the
    whole image, larger ones the centred 87.5% (resize 256 / centre-crop 224 in proportion)."""
    crop_fraction = 1.0 if recipe.groups[0].size <= WHOLE_IMAGE_MAX else 0.875
    return InputStack(eval_recipe(recipe, crop_fraction=crop_fraction), data, batch_size, rank=rank,
                      world_size=world_size, device=device, num_threads=num_threads, need_labels=True,
                      training=False)


def shard_size(num_samples: int, world_size: int, shard: int) -> int:
    """The number of samples DALI's reader puts in `shard` of `world_size`."""
    return (shard + 1) * num_samples // world_size - shard * num_samples // world_size


@dataclass
class Features:
    features: torch.Tensor  # (n, dim)
    labels: torch.Tensor  # (n,) int64, -1 for unlabeled samples
    keys: list[str] | None = None  # sample keys, when asked for


@torch.no_grad()
def extract_features(backbone: Callable[[torch.Tensor], torch.Tensor], stack: InputStack, *,
                     dtype: torch.dtype = torch.float32, normalize: bool = False,
                     keep_keys: bool = False) -> Features:
    """Features of this rank's share of `stack`'s samples (one epoch, each sample once), in `dtype`,
    each row L2-normalised first if `normalize`. A module backbone runs in eval mode (its mode is
    restored). The rows are written into one tensor of the share's size: no concatenated copy."""
    outputs, labels, keys = _extract(backbone, stack, dtype, normalize, keep_keys)
    features = outputs[None] if outputs else torch.empty(0, 0, dtype=dtype, device=stack.device)
    return Features(features, labels, keys)


@torch.no_grad()
def extract_feature_sets(backbone: Callable[[torch.Tensor], dict[str, torch.Tensor]], stack: InputStack, *,
                         dtype: torch.dtype = torch.float32, normalize: bool = False,
                         keep_keys: bool = False) -> dict[str, Features]:
    """As `extract_features`, for a backbone returning several (batch, dim) features per batch, a dict
    (e.g. one per layer): one pass over the stack, one `Features` per key (they share the labels);
    empty if this rank's share is."""
    outputs, labels, keys = _extract(backbone, stack, dtype, normalize, keep_keys, several=True)
    return {name: Features(features, labels, keys) for name, features in outputs.items()}


def _extract(backbone, stack: InputStack, dtype: torch.dtype, normalize: bool, keep_keys: bool,
             several: bool = False) -> tuple[dict, torch.Tensor, list[str] | None]:
    """({name: (share, dim)} features, labels, keys or None); a single-output backbone's under None."""
    if stack.step_in_epoch not in (0, stack.steps_per_epoch):
        raise ValueError(f"extract_features: the stack is {stack.step_in_epoch} batches into an epoch; "
                         "it must be at an epoch boundary")
    module = backbone if isinstance(backbone, torch.nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    features, labels, keys, expected, filled = {}, None, [], 0, 0
    try:
        for _ in range(stack.steps_per_epoch):
            batch = next(stack)
            if labels is None:  # the epoch (so the shard) is known once its first batch is read
                world = stack.dali.num_shards
                expected = shard_size(stack.shards.num_samples, world, (stack.rank + stack.epoch) % world)
                labels = torch.empty(expected, dtype=torch.long, device=stack.device)
            take = min(batch.batch_size, expected - filled)  # a repeat past the share's end is dropped
            if take <= 0:
                continue
            outputs = backbone(batch.views[0][:take])
            for name, output in (outputs.items() if several else [(None, outputs)]):
                output = output.float()
                if normalize:
                    output = F.normalize(output, dim=1)
                if name not in features:
                    features[name] = torch.empty(expected, output.shape[1], dtype=dtype, device=output.device)
                features[name][filled : filled + take] = output
            labels[filled : filled + take] = batch.labels[:take]
            if keep_keys:
                keys.extend(batch.keys[:take])
            filled += take
    finally:
        if module is not None:
            module.train(was_training)
    if filled != expected:
        raise RuntimeError(f"extract_features: read {filled} samples of {stack.shards.root}, expected this "
                           f"rank's share of {expected}")
    return features, labels, keys if keep_keys else None


def _gather_into(output: torch.Tensor, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    # all_gather_into_tensor: its name in older torch
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor.contiguous())


@torch.no_grad()
def gather_features(local: Features) -> Features:
    """Every rank's `Features`, on every rank, in the same order (keys are not gathered).

    The first min-share rows of each rank in rank order, then each longer share's remaining rows; the
    result is allocated once at its full size. Without an initialised torch.distributed (one process)
    it is `local` itself.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    world, rank = dist.get_world_size(), dist.get_rank()
    device = local.features.device
    size = torch.tensor([local.features.shape[0], local.features.shape[1]], device=device)
    shapes = torch.empty(world * 2, dtype=size.dtype, device=device)
    _gather_into(shapes, size)
    shapes = shapes.view(world, 2)
    sizes, dim = shapes[:, 0].tolist(), int(shapes[:, 1].max())
    common, longest = min(sizes), max(sizes)
    features = local.features.new_empty((sum(sizes), dim))
    labels = local.labels.new_empty(sum(sizes))
    _gather_into(features[: world * common], local.features[:common])
    _gather_into(labels[: world * common], local.labels[:common])
    if longest > common:
        extra = longest - common
        own = sizes[rank] - common
        tail_features = local.features.new_zeros((extra, dim))
        tail_labels = local.labels.new_full((extra,), -1)
        tail_features[:own] = local.features[common:]
        tail_labels[:own] = local.labels[common:]
        gathered_features = local.features.new_empty((world * extra, dim))
        gathered_labels = local.labels.new_empty(world * extra)
        _gather_into(gathered_features, tail_features)
        _gather_into(gathered_labels, tail_labels)
        at = world * common
        for other in range(world):
            count = sizes[other] - common
            features[at : at + count] = gathered_features[other * extra : other * extra + count]
            labels[at : at + count] = gathered_labels[other * extra : other * extra + count]
            at += count
    return Features(features, labels)
