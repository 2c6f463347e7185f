"""Pretext-task inputs made on the training device from a batch of views (after the photometric pass):
rotated copies (RotNet), shuffled grid tiles (Jigsaw / DeepPermNet) and centre-neighbour patch pairs
(context prediction). Batched tensor ops only: no host round trip, no per-image Python loop; every
random choice comes from the input stack's seeded generator, so an exact resume draws the same ones.

Shapes: `images` are the (B, C, S, S) views of group 0. Grid patches are indexed row-major: cell
(r, c) of a g x g grid is patch r * g + c.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipelines.spec import GridPatches, Jigsaw, RelativeLocation, Rotation
from pipelines.spec import Inpainting
from pipelines.masking import make_masks
from pipelines.spec import Lab
from pipelines.spec import RecipeError, Restoration
from pipelines.corruption import restoration_inputs

# The 8 neighbours of the centre cell of a 3x3 grid, row-major: label k is the patch at NEIGHBOURS[k]
# (0 top-left, 1 top, 2 top-right, 3 left, 4 right, 5 bottom-left, 6 bottom, 7 bottom-right)
NEIGHBOURS = (0, 1, 2, 3, 5, 6, 7, 8)
CENTRE = 4
EXHAUSTIVE_LIMIT = 9  # tiles: up to 9! candidate orders are enumerated; beyond, a seeded random pool
CANDIDATE_POOL = 100_000


@dataclass
class PretextInputs:
    """One task's input: `images` go through the backbone in one forward; `labels` are its targets.

    rotation: images (4B or B, C, S, S), rotation-major for all four (rotation r of sample i is row
    r * B + i), labels the quarter turns (counter-clockwise). jigsaw: images (B * T, C, p, p) sample-major
    (position j of sample i is row i * T + j), labels (B,) the permutation's index in the set, `order`
    (B, T) the tile each position shows. relloc: images (2P, C, p, p), the P centre patches then their P
    neighbours, labels (P,) the neighbour's position 0-7 (`NEIGHBOURS`); P = B, or 8B sample-major with
    `all_pairs`. inpainting: images (B, C, S, S) the crops with their hole filled, labels (B, S, S) bool the
    hole (True = filled).
    """

    images: torch.Tensor
    labels: torch.Tensor
    order: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------ rotation


def rotate(images: torch.Tensor, spec: Rotation, generator: torch.Generator) -> PretextInputs:
    """The batch in four rotations (`spec.all_four`) or each image in one random rotation."""
    b = images.shape[0]
    if spec.all_four:
        rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
        labels = torch.arange(4, device=images.device).repeat_interleave(b)
        return PretextInputs(rotated, labels)
    labels = torch.randint(0, 4, (b,), generator=generator, device=images.device)
    every = torch.stack([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])  # (4, B, C, S, S)
    return PretextInputs(every[labels, torch.arange(b, device=images.device)], labels)


# ------------------------------------------------------------------------------------------- grid patches


def patch_offsets(spec: GridPatches, batch: int, generator: torch.Generator, device,
                  yoked: bool = False) -> torch.Tensor:
    """Each patch's random offset inside its cell: (B, grid * grid, 2) as (y, x), in [0, cell - patch];
    `yoked`: one offset per image, shared by all its patches."""
    per_image = 1 if yoked else spec.grid ** 2
    offsets = torch.randint(0, spec.cell - spec.patch + 1, (batch, per_image, 2), generator=generator,
                            device=device)
    return offsets.expand(batch, spec.grid ** 2, 2)


def grid_patches(images: torch.Tensor, spec: GridPatches, offsets: torch.Tensor) -> torch.Tensor:
    """The grid's patches, (B, grid * grid, C, patch, patch): the grid (grid * cell px square) centred
    on the crop, the patch of cell (r, c) starting at (r * cell, c * cell) + `offsets` within it. One
    gather for the whole batch."""
    b, _, height, width = images.shape
    g, cell, patch = spec.grid, spec.cell, spec.patch
    top, left = (height - g * cell) // 2, (width - g * cell) // 2
    cells = torch.arange(g * g, device=images.device)
    starts_y = top + (cells // g) * cell + offsets[..., 0]  # (B, T)
    starts_x = left + (cells % g) * cell + offsets[..., 1]
    span = torch.arange(patch, device=images.device)
    rows = (starts_y.unsqueeze(-1) + span).unsqueeze(-1)  # (B, T, p, 1)
    cols = (starts_x.unsqueeze(-1) + span).unsqueeze(-2)  # (B, T, 1, p)
    sample = torch.arange(b, device=images.device).view(b, 1, 1, 1)
    return images.permute(0, 2, 3, 1)[sample, rows, cols].permute(0, 1, 4, 2, 3)  # (B, T, C, p, p)


def standardise_tiles(tiles: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """Each tile and channel to zero mean and unit std over its pixels (`eps` is added to the variance:
    a flat tile stays near zero instead of amplifying its rounding noise)."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    var = tiles.var(dim=(-2, -1), keepdim=True, unbiased=False)
    return (tiles - mean) / torch.sqrt(var + eps)


# ------------------------------------------------------------------------------------------------- jigsaw


@functools.lru_cache(maxsize=8)
def permutation_set(count: int, tiles: int, seed: int = 0) -> torch.Tensor:
    """`count` permutations of `tiles` tiles (count, tiles), int64, by Noroozi & Favaro's greedy algorithm:
    start from one drawn at random, then repeatedly add the candidate with the largest average Hamming
    distance to those chosen (ties: the first in lexicographic order). Candidates: all tiles! orders up to
    EXHAUSTIVE_LIMIT tiles, else CANDIDATE_POOL random ones. Deterministic in (count, tiles, seed)."""
    generator = torch.Generator().manual_seed(seed)
    if tiles <= EXHAUSTIVE_LIMIT:
        candidates = torch.tensor(list(itertools.permutations(range(tiles))), dtype=torch.int8)
    else:
        candidates = torch.stack([torch.randperm(tiles, generator=generator) for _ in range(CANDIDATE_POOL)])
        candidates = torch.unique(candidates.to(torch.int8), dim=0)
    if count > len(candidates):
        raise ValueError(f"permutation_set: {count} permutations asked, {len(candidates)} candidates")
    first = int(torch.randint(len(candidates), (1,), generator=generator))
    chosen = [first]
    columns = candidates.t().contiguous()  # a column at a time: twice as fast as a row-wise reduction
    total_distance = torch.zeros(len(candidates), dtype=torch.int32)
    for _ in range(count - 1):
        last = candidates[chosen[-1]]
        for position in range(tiles):
            total_distance += columns[position] != last[position]
        total_distance[chosen[-1]] = -(2 ** 30)  # chosen: out of reach of any later total
        chosen.append(int(total_distance.argmax()))
    return candidates[chosen].long()


def minimum_hamming(permutations: torch.Tensor) -> int:
    """The smallest Hamming distance between two permutations of the set (the puzzle's hardest pair)."""
    distances = (permutations.unsqueeze(0) != permutations.unsqueeze(1)).sum(dim=-1)
    distances.fill_diagonal_(permutations.shape[1] + 1)
    return int(distances.min())


def jigsaw(images: torch.Tensor, spec: Jigsaw, permutations: torch.Tensor | None,
           generator: torch.Generator) -> PretextInputs:
    """The grid's tiles of each image, shuffled by a random permutation of the set (its index the label),
    or with `permutations` None by a uniformly random order (label -1): position j shows tile
    `order[i, j]`; standardised per tile when the spec says so."""
    b = images.shape[0]
    tiles = grid_patches(images, spec, patch_offsets(spec, b, generator, images.device))
    if permutations is None:
        order = torch.rand(b, tiles.shape[1], generator=generator, device=images.device).argsort(dim=1)
        labels = torch.full((b,), -1, dtype=torch.long, device=images.device)
    else:
        labels = torch.randint(0, len(permutations), (b,), generator=generator, device=images.device)
        order = permutations[labels]
    shuffled = tiles.gather(1, order.view(b, -1, 1, 1, 1).expand_as(tiles))
    if spec.normalise_tiles:
        shuffled = standardise_tiles(shuffled)
    return PretextInputs(shuffled.flatten(0, 1), labels, order)


# ------------------------------------------------------------------------------------- context prediction


def drop_colours(patches: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Doersch's colour dropping: each patch keeps one random channel; the others become Gaussian noise of
    1/100 the kept channel's standard deviation over the patch."""
    n, channels = patches.shape[:2]
    keep = torch.randint(0, channels, (n,), generator=generator, device=patches.device)
    kept = patches[torch.arange(n, device=patches.device), keep].unsqueeze(1)  # (n, 1, p, p)
    noise = torch.randn(patches.shape, generator=generator, device=patches.device, dtype=patches.dtype)
    noise = noise * kept.std(dim=(-2, -1), keepdim=True) / 100
    is_kept = (torch.arange(channels, device=patches.device) == keep.unsqueeze(1)).view(n, channels, 1, 1)
    return torch.where(is_kept, patches, noise)


GREEN_MAGENTA = torch.tensor([-1.0, 2.0, -1.0]) / math.sqrt(6.0)


def project_out_green_magenta(patches: torch.Tensor) -> torch.Tensor:
    """Doersch's projection: every pixel's component along the green-magenta axis (-1, 2, -1) removed."""
    axis = GREEN_MAGENTA.to(patches.device, patches.dtype).view(1, 3, 1, 1)
    return patches - (patches * axis).sum(dim=1, keepdim=True) * axis


def blur_chroma(patches: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Mundhenk et al.'s chroma blurring: each pixel keeps its grey level (the channel mean) and its chroma
    (the rest) is area-downsampled by `factor` and upsampled bilinearly."""
    grey = patches.mean(dim=1, keepdim=True)
    size = patches.shape[-2:]
    small = F.interpolate(patches - grey, scale_factor=1 / factor, mode="area")
    return grey + F.interpolate(small, size=size, mode="bilinear", align_corners=False)


def random_aperture(patches: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each patch seen through a random square window (side uniform in [patch/2, patch], uniformly placed),
    zero outside it."""
    n, size = patches.shape[0], patches.shape[-1]
    device = patches.device
    side = size / 2 + torch.rand(n, generator=generator, device=device) * (size / 2)
    top = torch.rand(n, generator=generator, device=device) * (size - side)
    left = torch.rand(n, generator=generator, device=device) * (size - side)
    pixels = torch.arange(size, device=device)
    inside_y = (pixels >= top.view(n, 1).floor()) & (pixels < (top + side).view(n, 1).ceil())
    inside_x = (pixels >= left.view(n, 1).floor()) & (pixels < (left + side).view(n, 1).ceil())
    window = (inside_y.view(n, 1, size, 1) & inside_x.view(n, 1, 1, size)).to(patches.dtype)
    return patches * window


@functools.lru_cache(maxsize=None)
def _neighbours(device: str) -> torch.Tensor:
    return torch.tensor(NEIGHBOURS, device=device)  # made once per device: no host-to-device copy per batch


def relative_location(images: torch.Tensor, spec: RelativeLocation, generator: torch.Generator) -> PretextInputs:
    """Centre patches and one random neighbour each (or all eight, `all_pairs`), with the anti-shortcut
    options of the spec applied to every patch."""
    b = images.shape[0]
    device = images.device
    offsets = patch_offsets(spec, b, generator, device, yoked=spec.yoked_jitter)
    patches = grid_patches(images, spec, offsets)
    neighbours = _neighbours(str(device))
    if spec.all_pairs:
        labels = torch.arange(8, device=device).repeat(b)
        sample = torch.arange(b, device=device).repeat_interleave(8)
    else:
        labels = torch.randint(0, 8, (b,), generator=generator, device=device)
        sample = torch.arange(b, device=device)
    pairs = torch.cat([patches[sample, CENTRE], patches[sample, neighbours[labels]]])
    return PretextInputs(against_shortcuts(pairs, spec, generator), labels)


def against_shortcuts(patches: torch.Tensor, spec: RelativeLocation, generator: torch.Generator | None) -> torch.Tensor:
    """The spec's anti-shortcut options applied to every patch, in a fixed order."""
    if spec.color_dropping:
        patches = drop_colours(patches, generator)
    if spec.projection:
        patches = project_out_green_magenta(patches)
    if spec.chroma_blur:
        patches = blur_chroma(patches)
    if spec.aperture:
        patches = random_aperture(patches, generator)
    return patches


# ------------------------------------------------------------------------------------------- colorization


LIGHTNESS_CHANNELS = 3  # the centred lightness is replicated to an RGB backbone's 3 input channels


def centred_lightness(lightness: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) CIE L in [0, 100] -> the backbone's input (L - 50) / 50 in [-1, 1], (B, 3, S, S)."""
    return ((lightness - 50.0) / 50.0).repeat(1, LIGHTNESS_CHANNELS, 1, 1)


def to_lab(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) sRGB in [0, 1] (clamped: interpolation overshoots a little) -> CIE Lab (D65), float32."""
    import kornia

    return kornia.color.rgb_to_lab(images.float().clamp(0.0, 1.0))


def lab_inputs(images: torch.Tensor, spec: Lab) -> PretextInputs:
    """Colorization's input: images the centred lightness (`centred_lightness`), labels the ab channels
    (B, 2, S, S) in Lab units."""
    lab = to_lab(images)
    return PretextInputs(centred_lightness(lab[:, :1]), lab[:, 1:])


def lightness_views(views: list[torch.Tensor], pretext: dict[str, PretextInputs]) -> list[torch.Tensor]:
    """Every group's views as the centred lightness a colorization backbone sees (a recipe's
    `lightness_input`); group 0's is colorization's pretext input when the batch has it (no second
    conversion)."""
    made = pretext.get("colorization")
    return [made.images if index == 0 and made is not None else centred_lightness(to_lab(group)[:, :1])
            for index, group in enumerate(views)]


# ------------------------------------------------------------------------------------------------ inpainting


def inpaint(images: torch.Tensor, spec: Inpainting, generator: torch.Generator) -> PretextInputs:
    """The context encoder's input: each crop with its hole (a mask of `pipelines.masking`, cells of
    crop // grid px) filled with `spec.fill`; labels the hole per pixel, (B, S, S) bool, True = filled."""
    b, size = images.shape[0], images.shape[-1]
    masking = spec.masking(size)
    grid, cell = masking.grid(size), masking.patch_size
    cells = make_masks(masking, b, size, generator, images.device).view(b, grid, grid)
    hole = cells.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)
    return PretextInputs(images.masked_fill(hole.unsqueeze(1), spec.fill), hole)


# ------------------------------------------------------------------------------------------ the stack's part


class PretextStage:
    """Makes every pretext task of a recipe from group 0's views; the jigsaw permutation set is made once,
    at construction, on the device. Given the `batch_size` it will see (a training stack's), it refuses one
    too small for a task (restoration with one task per sample needs a sample for every task)."""

    def __init__(self, tasks, device: torch.device | str, batch_size: int | None = None):
        self.tasks = tuple(tasks)
        for task in self.tasks:
            if (isinstance(task, Restoration) and task.assign == "sample" and batch_size is not None
                    and batch_size < len(task.tasks)):
                raise RecipeError(f"--batch-size {batch_size} is smaller than the {len(task.tasks)} restoration "
                                  f"tasks ({'+'.join(task.tasks)}), one per sample: use a batch of at least "
                                  f"{len(task.tasks)} per process, fewer tasks, or --method-options assign=all")
        self.permutations = {
            task.task: permutation_set(task.permutations, task.grid ** 2, task.permutation_seed).to(device)
            for task in self.tasks if isinstance(task, Jigsaw) and task.permutations
        }

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, PretextInputs]:
        made = {}
        for task in self.tasks:
            if isinstance(task, Rotation):
                made[task.task] = rotate(images, task, generator)
            elif isinstance(task, Jigsaw):
                made[task.task] = jigsaw(images, task, self.permutations.get(task.task), generator)
            elif isinstance(task, RelativeLocation):
                made[task.task] = relative_location(images, task, generator)
            elif isinstance(task, Lab):
                made[task.task] = lab_inputs(images, task)
            elif isinstance(task, Inpainting):
                made[task.task] = inpaint(images, task, generator)
            elif isinstance(task, Restoration):  # IPT: `pipelines.corruption.RestorationInputs`
                made[task.task] = restoration_inputs(images, task, generator)
            else:
                raise TypeError(f"unknown pretext task {task!r}")
        return made
