"""The profiler's peer baseline (stage 7) for recipes with pretext tasks: their inputs made as VISSL
(Jigsaw: `ImgPatchesFromTensor` + `ShuffleImgPatches`) and mmselfsup (`RelativeLoc`) make them, per
image in PyTorch DataLoader workers with PIL/torchvision: decode, the recipe's crop and photometric ops
in torchvision (random resized crop, flip, grayscale for jigsaw, normalisation), then the grid's patches
cut at random offsets within their cells one at a time, and for

- jigsaw: the tiles shuffled by a permutation drawn from the same set as the input stack's
  (`pipelines.pretext.permutation_set`), each tile standardised per channel;
- relloc: the centre patch and a random neighbour (or all eight), the neighbour's position the label,
  with the spec's anti-shortcut options (colour dropping, projection, chroma blur, yoked jitter, aperture);
- rotation: the crop in its four quarter turns (or one at random).
- inpainting: the hole (the centred square, or random cells) filled with the mean pixel.
- colorization: the crop converted to Lab, one image at a time (Kornia's rgb_to_lab on the CPU, as the
  paper's PyTorch ports call skimage's rgb2lab per image): the centred lightness and the ab target.
- restoration (IPT): one task drawn per image (or every task), the crop corrupted alone (bicubic
  downscaling, noise, rain streaks: `pipelines.corruption` on a batch of one).

`collate_pretext` stacks the samples into the shapes of the input stack's `Batch.pretext`
(`pipelines.pretext.PretextInputs`), so both sides end with the same tensors.
"""

from __future__ import annotations

import math
import random

import torch

from pipelines.pretext import (CENTRE, NEIGHBOURS, PretextInputs, against_shortcuts, permutation_set, standardise_tiles)
from pipelines.corruption import RestorationInputs, corrupt
from pipelines.spec import GridPatches, Inpainting, Jigsaw, Lab, RelativeLocation, Restoration, Rotation


def cut_patches(image: torch.Tensor, spec: GridPatches, yoked: bool = False) -> torch.Tensor:
    """The grid's patches of one (C, H, W) image, (grid * grid, C, patch, patch), row-major: the grid
    centred on the image, each patch at a random offset inside its cell (`yoked`: one offset for all),
    sliced one cell at a time."""
    _, height, width = image.shape
    g, cell, patch = spec.grid, spec.cell, spec.patch
    top, left = (height - g * cell) // 2, (width - g * cell) // 2
    shared = (random.randint(0, cell - patch), random.randint(0, cell - patch)) if yoked else None
    patches = []
    for row in range(g):
        for column in range(g):
            dy, dx = shared or (random.randint(0, cell - patch), random.randint(0, cell - patch))
            y, x = top + row * cell + dy, left + column * cell + dx
            patches.append(image[:, y:y + patch, x:x + patch])
    return torch.stack(patches)


def jigsaw_sample(image: torch.Tensor, spec: Jigsaw, permutations: torch.Tensor | None):
    """(tiles (T, C, p, p) with position j showing tile order[j], label, order (T,)): the label is the
    permutation's index in `permutations`, or -1 with a uniformly random order when it is None."""
    tiles = cut_patches(image, spec)
    if permutations is None:
        label, order = -1, torch.randperm(len(tiles))
    else:
        label = random.randrange(len(permutations))
        order = permutations[label]
    shuffled = tiles[order]
    if spec.normalise_tiles:
        shuffled = standardise_tiles(shuffled)
    return shuffled, label, order


def relloc_sample(image: torch.Tensor, spec: RelativeLocation):
    """(centres (P, C, p, p), neighbours (P, C, p, p), labels (P,)): one random neighbour (P = 1) or all
    eight (`all_pairs`), the label the neighbour's position 0-7 around the centre; the spec's
    anti-shortcut options applied to every patch of the pairs."""
    patches = cut_patches(image, spec, yoked=spec.yoked_jitter)
    labels = list(range(8)) if spec.all_pairs else [random.randrange(8)]
    centres = patches[CENTRE].expand(len(labels), *patches.shape[1:])
    neighbours = patches[[NEIGHBOURS[label] for label in labels]]
    pairs = against_shortcuts(torch.cat([centres, neighbours]), spec, None)
    centres, neighbours = pairs.chunk(2)
    return centres, neighbours, torch.tensor(labels)


def rotation_sample(image: torch.Tensor, spec: Rotation):
    """(rotations (R, C, S, S), labels (R,)): all four quarter turns, or one drawn at random."""
    turns = list(range(4)) if spec.all_four else [random.randrange(4)]
    return torch.stack([torch.rot90(image, k, dims=(1, 2)) for k in turns]), torch.tensor(turns)


def inpainting_sample(image: torch.Tensor, spec: Inpainting):
    """(filled (C, S, S), hole (S, S) bool): the context encoder's hole of one image, the centred square
    of round(ratio * grid²) cells or (`random`, `block`) that many cells drawn with `random.sample`, filled
    with the spec's fill."""
    size = image.shape[-1]
    cell, count = size // spec.grid, round(spec.ratio * spec.grid ** 2)
    hole = torch.zeros(size, size, dtype=torch.bool)
    if spec.mask == "center":
        side = math.isqrt(count)
        start = (spec.grid - side) // 2 * cell
        hole[start:start + side * cell, start:start + side * cell] = True
    else:
        for index in random.sample(range(spec.grid ** 2), count):
            row, column = divmod(index, spec.grid)
            hole[row * cell:(row + 1) * cell, column * cell:(column + 1) * cell] = True
    return image.masked_fill(hole, spec.fill), hole


def lab_sample(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(centred lightness (3, S, S), ab (2, S, S)) of one (3, S, S) crop in [0, 1]."""
    from pipelines.pretext import lab_inputs

    made = lab_inputs(image.unsqueeze(0), Lab())
    return made.images[0], made.labels[0]


def restoration_sample(image: torch.Tensor, spec: Restoration) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """[(task, corrupted input, clean crop)]: one task drawn with `random.choice` (every task with
    `assign="all"`), the crop corrupted on its own."""
    names = spec.tasks if spec.assign == "all" else [random.choice(spec.tasks)]
    return [(name, corrupt(image.unsqueeze(0), name, spec, None)[0], image) for name in names]


class PretextPeer:
    """PIL image -> {task: that task's sample} for every pretext task of `recipe`, from one crop of it
    made by `crop` (a callable PIL image -> (C, S, S) tensor: the recipe's group 0 in torchvision)."""

    def __init__(self, recipe, crop):
        self.tasks = recipe.pretext
        self.crop = crop
        self.permutations = {task.task: permutation_set(task.permutations, task.grid ** 2, task.permutation_seed)
                             for task in self.tasks if isinstance(task, Jigsaw) and task.permutations}

    def from_tensor(self, image: torch.Tensor) -> dict:
        samples = {}
        for task in self.tasks:
            if isinstance(task, Jigsaw):
                samples[task.task] = jigsaw_sample(image, task, self.permutations.get(task.task))
            elif isinstance(task, RelativeLocation):
                samples[task.task] = relloc_sample(image, task)
            elif isinstance(task, Rotation):
                samples[task.task] = rotation_sample(image, task)
            elif isinstance(task, Inpainting):
                samples[task.task] = inpainting_sample(image, task)
            elif isinstance(task, Lab):
                samples[task.task] = lab_sample(image)
            elif isinstance(task, Restoration):
                samples[task.task] = restoration_sample(image, task)
            else:
                raise TypeError(f"unknown pretext task {task!r}")
        return samples

    def __call__(self, image) -> dict:
        return self.from_tensor(self.crop(image))


def collate_pretext(samples: list[dict]) -> dict[str, PretextInputs]:
    """A batch of `PretextPeer` samples in the layout of the input stack's `Batch.pretext`: jigsaw tiles
    sample-major (B * T rows), relloc centres then neighbours (2P rows), rotations rotation-major. Keys
    that start with "__" (webdataset's `map` adds the sample's `__key__`) are left out."""
    batch = {}
    for task in samples[0]:
        if task.startswith("__"):
            continue
        parts = [sample[task] for sample in samples]
        if task == "jigsaw":
            batch[task] = PretextInputs(torch.cat([tiles for tiles, _, _ in parts]),
                                        torch.tensor([label for _, label, _ in parts], dtype=torch.long),
                                        torch.stack([order for _, _, order in parts]))
        elif task == "relloc":
            batch[task] = PretextInputs(torch.cat([c for c, _, _ in parts] + [n for _, n, _ in parts]),
                                        torch.cat([labels for _, _, labels in parts]))
        elif task == "rotation":
            images = torch.stack([rotations for rotations, _ in parts], dim=1)  # (R, B, C, S, S)
            labels = torch.stack([labels for _, labels in parts], dim=1)
            batch[task] = PretextInputs(images.flatten(0, 1), labels.flatten())
        elif task == "inpainting":
            batch[task] = PretextInputs(torch.stack([filled for filled, _ in parts]),
                                        torch.stack([hole for _, hole in parts]))
        elif task == "colorization":
            batch[task] = PretextInputs(torch.stack([lightness for lightness, _ in parts]),
                                        torch.stack([ab for _, ab in parts]))
        elif task == "restoration":  # grouped by task, as `pipelines.corruption.RestorationInputs`
            grouped: dict[str, list] = {}
            for index, made in enumerate(parts):
                for name, corrupted, clean in made:
                    grouped.setdefault(name, []).append((corrupted, clean, index))
            batch[task] = RestorationInputs(*({name: torch.stack([entry[at] for entry in entries]) if at < 2 else
                                               torch.tensor([entry[2] for entry in entries])
                                               for name, entries in grouped.items()} for at in range(3)))
        else:
            raise TypeError(f"unknown pretext task {task!r}")
    return batch
