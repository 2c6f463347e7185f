"""View recipes as data: view groups, photometric parameters, masking, the `--multicrop` parser and
one preset per method (values from shared/reference/RECIPES.md).

A recipe is a tuple of view groups; every view of one group has the same crop size, so the whole group
is one tensor and one backbone forward. Per-view asymmetries (BYOL/DINO blur 1.0 vs 0.1, solarize on
the second view only) live in `ViewGroup.photometric`, one entry per view.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SWAV_STD = (0.228, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
SMALL_GLOBAL_CROP = 64  # px: global crops this small take a recipe's small_global_scale (see Recipe)
MASK_KINDS = ("random", "block")


class RecipeError(ValueError):
    """A recipe or `--multicrop` value that cannot be used; the message is one line naming the flag."""


@dataclass(frozen=True)
class Photometric:
    """Photometric parameters of one view. Every `*_p` is a per-sample probability.

    Colour jitter follows torchvision's ColorJitter: brightness/contrast/saturation factors are drawn
    from [max(0, 1 - s), 1 + s], hue from [-h, h] (in turns), the four ops in random per-image order,
    all gated together by `jitter_p`. Solarize inverts values >= 0.5 (128 on the 0-255 scale).
    """

    jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise RecipeError(f"photometric {name}={value} is not a probability in [0, 1]")
        if not 0.0 <= self.hue <= 0.5:
            raise RecipeError(f"photometric hue={self.hue} must be in [0, 0.5]")
        low, high = self.blur_sigma
        if not 0.0 < low <= high:
            raise RecipeError(f"photometric blur_sigma={self.blur_sigma} must satisfy 0 < low <= high")

    @property
    def is_identity(self) -> bool:
        return self.jitter_p == 0 and self.grayscale_p == 0 and self.blur_p == 0 and self.solarize_p == 0

    def with_blur_scaled(self, factor: float) -> Photometric:
        """The same view for a crop `factor` times as wide: the blur sigmas are in pixels, so they scale."""
        if factor == 1.0:
            return self
        return dataclasses.replace(self, blur_sigma=(self.blur_sigma[0] * factor, self.blur_sigma[1] * factor))


NO_PHOTOMETRIC = Photometric()


@dataclass(frozen=True)
class ViewGroup:
    """`count` views of `size`x`size` pixels, each an independent random-resized crop + flip.

    `scale` is the crop area as a fraction of the image area and `ratio` the aspect range (w/h) of
    the crop. `photometric` holds one entry per view, or a single entry shared by all views.
    """

    count: int
    size: int
    scale: tuple[float, float]
    photometric: tuple[Photometric, ...]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"
    flip_p: float = 0.5
    center_crop: float | None = None  # evaluation: the centred square of this fraction of the short side

    def __post_init__(self) -> None:
        if self.count < 1 or self.size < 1:
            raise RecipeError(f"view group {self.count}x{self.size}: count and size must be positive")
        low, high = self.scale
        if not 0.0 < low <= high <= 1.0:
            raise RecipeError(f"view group {self.count}x{self.size}: scale {self.scale} must satisfy 0 < low <= high <= 1")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise RecipeError(f"view group {self.count}x{self.size}: ratio {self.ratio} must satisfy 0 < low <= high")
        if self.interpolation not in INTERPOLATIONS:
            raise RecipeError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if self.center_crop is not None and not 0.0 < self.center_crop <= 1.0:
            raise RecipeError(f"view group {self.count}x{self.size}: center_crop {self.center_crop} must be in (0, 1]")
        if len(self.photometric) not in (1, self.count):
            raise RecipeError(
                f"view group {self.count}x{self.size}: {len(self.photometric)} photometric entries, "
                f"expected 1 or {self.count}"
            )

    def view_photometric(self, view: int) -> Photometric:
        return self.photometric[view % len(self.photometric)]

    @property
    def spec(self) -> str:
        return f"{self.count}x{self.size}@{_number(self.scale[0])}-{_number(self.scale[1])}"


@dataclass(frozen=True)
class Masking:
    """Patch masks for masked-image methods, drawn for the first `views` views of group 0.

    `random`: exactly round(ratio * patches) masked patches per sample (MAE). `block`: BEiT-style
    rectangular blocks of at least `min_block_patches` with aspect in `block_aspect`, topped up at
    random to exactly round(ratio * patches) (SIM). True in a mask means "hidden from the encoder".
    """

    kind: str
    ratio: float
    patch_size: int
    views: int = 1
    min_block_patches: int = 16
    block_aspect: tuple[float, float] = (0.3, 1 / 0.3)

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise RecipeError(f"mask kind {self.kind!r} is not one of {', '.join(MASK_KINDS)}")
        if not 0.0 < self.ratio < 1.0:
            raise RecipeError(f"mask ratio {self.ratio} must be in (0, 1)")
        if self.patch_size < 1 or self.views < 1:
            raise RecipeError("mask patch_size and views must be positive")

    def grid(self, size: int) -> int:
        if size % self.patch_size:
            raise RecipeError(
                f"crop size {size} is not a multiple of the patch size {self.patch_size}: "
                f"choose --multicrop sizes divisible by {self.patch_size}"
            )
        return size // self.patch_size

    def num_masked(self, size: int) -> int:
        return round(self.ratio * self.grid(size) ** 2)


PRETEXT_TASKS = ("rotation", "jigsaw", "relloc")


@dataclass(frozen=True)
class Rotation:
    """RotNet's input: the crop rotated by 0, 90, 180 and 270 degrees, labels 0-3. `all_four`: every
    image in all four rotations (Gidaris et al.); False: one random rotation per image (VISSL's form)."""

    all_four: bool = True
    task: str = field(default="rotation", init=False)

    def for_crop(self, size: int) -> Rotation:
        return self

    def describe(self) -> str:
        return f"rotation: {'all four' if self.all_four else 'one random'} of 0/90/180/270 per image"


@dataclass(frozen=True)
class GridPatches:
    """A `grid` x `grid` grid of square cells of `cell` px laid over the crop's centre, one `patch`-px
    patch at a uniformly random offset inside each cell (the jitter is cell - patch). None: from the crop
    size, cell = size // grid and patch = round(cell * 64 / 85) (the papers' 255-px crop: 85-px cells,
    64-px patches, jitter 21)."""

    grid: int = 3
    cell: int | None = None
    patch: int | None = None

    def for_crop(self, size: int):
        """The geometry on a `size`-px crop, every size filled in; RecipeError if it does not fit."""
        if self.grid < 2:
            raise RecipeError(f"{self.task} grid={self.grid}: needs at least a 2x2 grid")
        cell = self.cell if self.cell is not None else size // self.grid
        patch = self.patch if self.patch is not None else round(cell * 64 / 85)
        if patch < 1 or patch > cell:
            raise RecipeError(f"{self.task} patch={patch} px must be between 1 and the {cell}-px cell: change "
                              f"the patch or cell --method-options")
        if cell * self.grid > size:
            raise RecipeError(f"{self.task} grid {self.grid} x {cell}-px cells is {cell * self.grid} px, larger "
                              f"than the {size}-px crop: use a larger --multicrop size or smaller cells")
        return dataclasses.replace(self, cell=cell, patch=patch)

    def _describe_grid(self) -> str:
        return f"{self.grid}x{self.grid} cells of {self.cell} px, {self.patch}-px patches (jitter {self.cell - self.patch})"


@dataclass(frozen=True)
class Jigsaw(GridPatches):
    """Noroozi & Favaro's puzzle: the grid's patches (tiles) shuffled by one of `permutations`
    permutations (the greedy maximal-Hamming set drawn from `permutation_seed`), the label its index, or
    (`permutations=0`, DeepPermNet) by a uniformly random order of all the tiles; each tile standardised on
    its own (per-tile, per-channel mean and std) when `normalise_tiles`."""

    permutations: int = 1000
    permutation_seed: int = 0
    normalise_tiles: bool = True
    task: str = field(default="jigsaw", init=False)

    def for_crop(self, size: int) -> Jigsaw:
        resolved = super().for_crop(size)
        possible = math.factorial(self.grid ** 2)
        if not 0 <= self.permutations <= possible:
            raise RecipeError(f"jigsaw permutations={self.permutations}: a {self.grid}x{self.grid} grid has "
                              f"{possible} orders; choose 1 to {possible}, or 0 for all of them")
        return resolved

    def describe(self) -> str:
        shuffles = (f"{self.permutations} permutations (seed {self.permutation_seed})" if self.permutations
                    else "every order")
        return f"jigsaw: {self._describe_grid()}, {shuffles}{', tiles standardised' if self.normalise_tiles else ''}"


@dataclass(frozen=True)
class RelativeLocation(GridPatches):
    """Doersch et al.'s context prediction: the grid's centre patch and one of its 8 neighbours (label
    0-7, row-major around the centre), or all 8 pairs per image (`all_pairs`). Against shortcuts:
    `color_dropping` keeps one random channel per patch and fills the others with Gaussian noise (std 1/100
    of the kept channel's); `projection` removes the green-magenta component of every pixel (Doersch's
    fix for chromatic aberration); and Mundhenk et al.'s three: `chroma_blur` keeps each pixel's grey
    level and blurs its colour (the chroma, pixel minus its channel mean, area-downsampled 4x and
    upsampled bilinearly), `yoked_jitter` gives all patches of an image the same offset in their cells
    (the gap between patches carries no cue), `aperture` shows each patch through a random square window
    (side U(patch/2, patch)), zero (the data's mean) outside it."""

    all_pairs: bool = False
    color_dropping: bool = False
    projection: bool = False
    chroma_blur: bool = False
    yoked_jitter: bool = False
    aperture: bool = False
    task: str = field(default="relloc", init=False)

    SHORTCUT_OPTIONS = ("color_dropping", "projection", "chroma_blur", "yoked_jitter", "aperture")

    def for_crop(self, size: int) -> RelativeLocation:
        if self.grid != 3:
            raise RecipeError(f"relloc grid={self.grid}: context prediction uses a 3x3 grid (a centre and 8 "
                              f"neighbours)")
        return super().for_crop(size)

    def describe(self) -> str:
        extras = [name for name in ("all_pairs", *self.SHORTCUT_OPTIONS) if getattr(self, name)]
        return f"relloc: {self._describe_grid()}" + (f", {', '.join(extras)}" if extras else "")


PRETEXT_SPECS = {"rotation": Rotation, "jigsaw": Jigsaw, "relloc": RelativeLocation}


@dataclass(frozen=True)
class Lab:
    """Zhang, Isola & Efros's colorization input: the crop, RGB in [0, 1] (the recipe does not normalise),
    converted to CIE Lab (D65) by Kornia's `rgb_to_lab`. The backbone sees the lightness centred and
    scaled, (L - 50) / 50 in [-1, 1], replicated to 3 channels (any RGB backbone takes it as it is); the
    target is the ab channels (B, 2, S, S) in Lab units, at the crop's resolution (the method downsamples)."""

    task: str = field(default="colorization", init=False)

    def for_crop(self, size: int) -> Lab:
        return self

    def describe(self) -> str:
        return "colorization: input (L - 50) / 50 in 3 channels, target ab (B, 2, S, S) (Kornia rgb_to_lab, D65)"


PRETEXT_TASKS += ("colorization",)
PRETEXT_SPECS["colorization"] = Lab


def center_square(grid: int, count: int) -> int:
    """The side (in cells) of the centred square of `count` cells of a `grid` x `grid` grid (the `center`
    mask kind); RecipeError when `count` is not a square whose border is the same on both sides."""
    side = math.isqrt(count)
    if side * side != count or (grid - side) % 2:
        raise RecipeError(f"center mask: {count} of {grid}x{grid} cells are not a centred square; choose a ratio "
                          f"and grid with ratio * grid² = side² and grid - side even (0.25 with a grid divisible by 4)")
    return side


MASK_KINDS += ("center",)  # the central square of round(ratio * grid²) cells (`center_square`)


@dataclass(frozen=True)
class Inpainting:
    """Pathak et al.'s context-encoder input: a hole cut out of the crop and filled with `fill`, in the
    space the backbone sees: 0 is the recipe's mean pixel when it normalises (the inpainting preset uses the
    ImageNet mean and std, so the hole shows the ImageNet mean colour, as the paper fills its hole). The
    hole is a mask of the masking module (`pipelines.masking`) on a `grid` x `grid` grid of cells of
    crop // grid px: `center` the centred square of `ratio` of the area (0.25: half the side, the paper's
    64-px hole in a 128-px crop), `random` round(ratio * grid²) cells at random (the paper's random
    blocks), `block` BEiT-style rectangles of cells topped up at random to that count. The method
    reconstructs the hole and an `overlap`-px ring of context around it (None: 4 px per 128 px of crop,
    the paper's 4 px at 128; 1 px at 32)."""

    mask: str = "center"
    ratio: float = 0.25
    grid: int = 8
    overlap: int | None = None
    fill: float = 0.0
    task: str = field(default="inpainting", init=False)

    def masking(self, size: int) -> Masking:
        """The masking-module spec of the hole on a `size`-px crop (cells of size // grid px)."""
        return Masking(self.mask, self.ratio, patch_size=max(size // self.grid, 1), min_block_patches=4)

    def for_crop(self, size: int) -> Inpainting:
        if self.grid < 2 or size % self.grid:
            raise RecipeError(f"inpainting grid={self.grid}: the {size}-px crop must split into grid x grid cells "
                              f"of whole pixels: choose a grid of 2 or more that divides {size}")
        masking = self.masking(size)
        if self.mask == "center":
            center_square(self.grid, masking.num_masked(size))
        overlap = self.overlap if self.overlap is not None else round(size * 4 / 128)
        if overlap < 0:
            raise RecipeError(f"inpainting overlap={overlap}: give 0 or more pixels")
        return dataclasses.replace(self, overlap=overlap)

    def describe(self) -> str:
        overlap = "4 px per 128" if self.overlap is None else f"{self.overlap} px"
        return (f"inpainting: {self.mask} hole, {self.ratio:g} of a {self.grid}x{self.grid} grid, filled with "
                f"{self.fill:g}; reconstructed with a {overlap} overlap ring")


PRETEXT_TASKS += ("inpainting",)
PRETEXT_SPECS["inpainting"] = Inpainting


RESTORATION_TASKS = ("sr2", "sr3", "sr4", "noise30", "noise50", "derain")  # the IPT paper's six
RESTORATION_ASSIGN = ("sample", "all")
_RESTORATION_TASK = re.compile(r"^(?:sr(?P<scale>[2-8])|noise(?P<sigma>\d+)|(?P<derain>derain))$")


def restoration_task(name: str) -> tuple[str, int]:
    """("sr", scale) for `srN` (N 2-8), ("noise", sigma on the 0-255 scale) for `noiseN`, ("derain", 0);
    RecipeError for any other name."""
    match = _RESTORATION_TASK.match(name)
    if match is None:
        raise RecipeError(f"restoration task {name!r}: use srN (N 2-8: bicubic x N), noiseN (Gaussian sigma N of 255) "
                          f"or derain, e.g. tasks={'+'.join(RESTORATION_TASKS)}")
    if match["scale"]:
        return "sr", int(match["scale"])
    if match["sigma"]:
        return "noise", int(match["sigma"])
    return "derain", 0


@dataclass(frozen=True)
class Restoration:
    """IPT's corruptions (Chen et al. 2021), made from clean crops on the device (`pipelines.corruption`):
    `srN` bicubic downscaling by N with antialias (the low-resolution input; the clean crop the target),
    `noiseN` additive Gaussian noise of sigma N on the 0-255 scale, clipped to [0, 1], `derain` synthetic
    rain: sparse seeds (a share `rain_density` of the pixels) motion-blurred into streaks of a random length
    (`rain_length`, a share of the crop side) at a random angle (`rain_angle`, degrees anticlockwise from
    horizontal: 90 is vertical), brightness `rain_strength`, added and clipped. `assign`: `sample` gives
    each sample one task (the batch split into equal parts at random), `all` every task to every sample
    (the official training's task loop). The recipe must not normalise (inputs in [0, 1]); the crop side
    must be divisible by every SR scale."""

    tasks: tuple[str, ...] = RESTORATION_TASKS
    assign: str = "sample"
    rain_density: tuple[float, float] = (0.01, 0.03)
    rain_length: tuple[float, float] = (0.2, 0.5)
    rain_angle: tuple[float, float] = (60.0, 120.0)
    rain_strength: tuple[float, float] = (0.3, 0.8)
    task: str = field(default="restoration", init=False)

    def for_crop(self, size: int) -> Restoration:
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise RecipeError(f"restoration tasks={'+'.join(self.tasks)}: name each task once, at least one")
        if self.assign not in RESTORATION_ASSIGN:
            raise RecipeError(f"restoration assign={self.assign!r}: use one of {', '.join(RESTORATION_ASSIGN)}")
        scales = [amount for kind, amount in map(restoration_task, self.tasks) if kind == "sr"]
        multiple = math.lcm(*scales) if scales else 1
        if size % multiple:
            raise RecipeError(f"restoration tasks {'+'.join(self.tasks)}: the {size}-px crop must be divisible by "
                              f"every SR scale: choose a --multicrop size divisible by {multiple} (e.g. 1x24, 1x48)")
        for name, (low, high) in (("rain_density", self.rain_density), ("rain_length", self.rain_length),
                                  ("rain_strength", self.rain_strength)):
            if not 0.0 < low <= high <= 1.0:
                raise RecipeError(f"restoration {name}={low}-{high}: needs 0 < low <= high <= 1")
        return self

    def rain_lengths(self, size: int) -> tuple[int, ...]:
        """The streak lengths in px on a `size`-px crop: every odd length (a motion kernel's side) from
        rain_length's low to high share of the side, at least 3."""
        low = max(3, round(self.rain_length[0] * size) | 1)
        high = max(low, round(self.rain_length[1] * size) | 1)
        return tuple(range(low, high + 1, 2))

    def describe(self) -> str:
        return (f"restoration: {'+'.join(self.tasks)}, one task per sample" if self.assign == "sample" else
                f"restoration: {'+'.join(self.tasks)}, every task on every sample")


PRETEXT_TASKS += ("restoration",)
PRETEXT_SPECS["restoration"] = Restoration


@dataclass(frozen=True)
class Recipe:
    """Everything the input stack needs to turn a decoded image into views.

    `mean`/`std` of None means no normalisation (inputs stay in [0, 1], as SimCLR does).
    `global_only_scale` is the scale used when the user keeps only the first group (SwAV: 2x224
    alone uses (0.08, 1) instead of the multi-crop (0.14, 1)). `small_global_scale` is the first
    group's scale in a multi-crop spec whose global crops are at most SMALL_GLOBAL_CROP px: crops
    that small mean small images (the 28-px demo set, CIFAR), where the paper's lower bound, set
    for ~400-px photos, leaves a patch of a few pixels (0.14 of a 28-px image is 10 px square).
    """

    name: str
    groups: tuple[ViewGroup, ...]
    mean: tuple[float, float, float] | None = IMAGENET_MEAN
    std: tuple[float, float, float] | None = IMAGENET_STD
    masking: Masking | None = None
    global_only_scale: tuple[float, float] | None = None
    small_global_scale: tuple[float, float] | None = None
    # pretext-task inputs made from group 0's views after the photometric pass (`pipelines.pretext`)
    pretext: tuple[Rotation | Jigsaw | RelativeLocation, ...] = ()
    # the views the backbone sees are the centred lightness of the photometric output, (L - 50) / 50 in 3
    # channels (`pipelines.pretext.lightness_views`): what a colorization backbone trains and is evaluated on
    lightness_input: bool = False
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.groups:
            raise RecipeError(f"recipe {self.name}: needs at least one view group")
        if (self.mean is None) != (self.std is None):
            raise RecipeError(f"recipe {self.name}: give both mean and std, or neither")
        if self.masking is not None:
            if self.masking.views > self.groups[0].count:
                raise RecipeError(
                    f"recipe {self.name}: masking needs {self.masking.views} views in the first group, "
                    f"it has {self.groups[0].count}"
                )
            self.masking.grid(self.groups[0].size)
        for task in self.pretext:
            task.for_crop(self.groups[0].size)
        if len({task.task for task in self.pretext}) != len(self.pretext):
            raise RecipeError(f"recipe {self.name}: each pretext task may appear once")
        if (self.lightness_input or any(isinstance(task, Lab) for task in self.pretext)) and self.mean is not None:
            raise RecipeError(f"recipe {self.name}: Lab needs RGB in [0, 1]: give no mean and std (normalisation)")
        if any(isinstance(task, Restoration) for task in self.pretext) and self.mean is not None:
            raise RecipeError(f"recipe {self.name}: restoration corrupts RGB in [0, 1]: give no mean and std")

    @property
    def num_views(self) -> int:
        return sum(group.count for group in self.groups)

    @property
    def multicrop(self) -> str:
        return format_multicrop(self.groups)

    def with_multicrop(self, spec: str) -> Recipe:
        """The same photometric recipe over the crops `spec` describes (see `parse_multicrop`).

        Group i of the spec takes its photometric parameters from group i of this recipe (the last
        group for extra groups); per-view entries are cycled when the count changes. A scale left
        out in the spec comes from the same group of this recipe, except for `global_only_scale` and
        `small_global_scale` (see the class). Blur sigmas are in pixels of the
        crop, so a group resized from the template's size scales them by new / old size: a 32-px crop
        gets the blur its 224-px template would have at that scale (the paper's 2x224+6x96 keeps
        (0.1, 2.0) as is; the CPU recipe 2x32+4x16 gets (0.0143, 0.286) and (0.0167, 0.333)).
        """
        parsed = parse_multicrop(spec)
        groups = []
        for index, (count, size, scale) in enumerate(parsed):
            template = self.groups[min(index, len(self.groups) - 1)]
            if scale is None:
                scale = self._default_scale(index, parsed, template)
            photometric = tuple(view.with_blur_scaled(size / template.size) for view in template.photometric)
            if len(photometric) > 1:
                photometric = tuple(photometric[i % len(photometric)] for i in range(count))
            groups.append(dataclasses.replace(template, count=count, size=size, scale=scale, photometric=photometric))
        return dataclasses.replace(self, groups=tuple(groups)).with_pretext(self.pretext)

    def with_pretext(self, tasks) -> Recipe:
        """This recipe making the pretext inputs of `tasks`, their geometry resolved for the first group's
        crop size (`GridPatches.for_crop`)."""
        size = self.groups[0].size
        return dataclasses.replace(self, pretext=tuple(task.for_crop(size) for task in tasks))

    def _default_scale(self, index, parsed, template: ViewGroup) -> tuple[float, float]:
        if index == 0 and len(self.groups) > 1:
            if len(parsed) == 1 and self.global_only_scale:
                return self.global_only_scale
            if len(parsed) > 1 and self.small_global_scale and parsed[0][1] <= SMALL_GLOBAL_CROP:
                return self.small_global_scale
        return template.scale

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """A few human-readable lines, printed at start-up."""
        lines = [f"recipe {self.name}: {self.multicrop}"]
        for group in self.groups:
            lines.append(f"  {group.count}x{group.size} scale={group.scale} ratio=({group.ratio[0]:.3f}, "
                         f"{group.ratio[1]:.3f}) interp={group.interpolation} flip_p={group.flip_p}")
            for view in range(group.count if len(group.photometric) > 1 else 1):
                label = f"view {view + 1}" if len(group.photometric) > 1 else "every view"
                lines.append(f"    {label}: {_describe_photometric(group.view_photometric(view))}")
        lines.append(f"  normalise: mean={self.mean} std={self.std}" if self.mean else "  normalise: none ([0, 1])")
        if self.masking:
            m = self.masking
            lines.append(f"  masking: {m.kind} ratio={m.ratio} patch={m.patch_size} on {m.views} view(s)")
        lines += [f"  pretext {task.describe()}" for task in self.pretext]
        if self.lightness_input:
            lines.append("  input: lightness (L - 50) / 50 in 3 channels, for training and evaluation")
        return "\n".join(lines)


def _describe_photometric(p: Photometric) -> str:
    if p.is_identity:
        return "none"
    parts = []
    if p.jitter_p:
        parts.append(f"jitter({p.brightness},{p.contrast},{p.saturation},{p.hue})@{p.jitter_p}")
    if p.grayscale_p:
        parts.append(f"gray@{p.grayscale_p}")
    if p.blur_p:
        parts.append(f"blur({p.blur_sigma[0]:.3g}, {p.blur_sigma[1]:.3g})@{p.blur_p}")
    if p.solarize_p:
        parts.append(f"solarize@{p.solarize_p}")
    return " ".join(parts)


def _number(value: float) -> str:
    return f"{value:g}"


_GROUP = re.compile(r"^(\d+)x(\d+)(?:@(\d*\.?\d+)-(\d*\.?\d+))?$")
MULTICROP_HELP = "expected COUNTxSIZE[@LOW-HIGH] joined by '+', e.g. 2x224+6x96 or 2x224@0.14-1+6x96@0.05-0.14"


def parse_multicrop(spec: str) -> list[tuple[int, int, tuple[float, float] | None]]:
    """Parse `2x224+6x96` or `2x224@0.14-1+6x96@0.05-0.14` into (count, size, scale or None) triples."""
    if not isinstance(spec, str) or not spec.strip():
        raise RecipeError(f"--multicrop is empty: {MULTICROP_HELP}")
    groups = []
    for part in spec.replace(" ", "").split("+"):
        match = _GROUP.match(part)
        if not match:
            raise RecipeError(f"--multicrop {spec!r}: cannot read {part!r}; {MULTICROP_HELP}")
        count, size = int(match.group(1)), int(match.group(2))
        if count < 1 or size < 1:
            raise RecipeError(f"--multicrop {spec!r}: count and size in {part!r} must be positive")
        scale = None
        if match.group(3) is not None:
            scale = (float(match.group(3)), float(match.group(4)))
            if not 0.0 < scale[0] <= scale[1] <= 1.0:
                raise RecipeError(f"--multicrop {spec!r}: scale in {part!r} must satisfy 0 < LOW <= HIGH <= 1")
        groups.append((count, size, scale))
    sizes = [size for _, size, _ in groups]
    if len(set(sizes)) != len(sizes):
        raise RecipeError(f"--multicrop {spec!r}: each crop size may appear once; merge groups of equal size")
    return groups


def format_multicrop(groups) -> str:
    """The inverse of `parse_multicrop` for view groups (always with explicit scales)."""
    return "+".join(group.spec for group in groups)


# ---------------------------------------------------------------------------------------------- presets


def _jitter(b, c, s, h, p=0.8, **extra) -> Photometric:
    return Photometric(jitter_p=p, brightness=b, contrast=c, saturation=s, hue=h, grayscale_p=0.2, **extra)


_BYOL_VIEWS = (  # BYOL-style asymmetry: view 1 always blurred, view 2 rarely blurred and sometimes solarized
    _jitter(0.4, 0.4, 0.2, 0.1, blur_p=1.0),
    _jitter(0.4, 0.4, 0.2, 0.1, blur_p=0.1, solarize_p=0.2),
)
_MOCO_V2_VIEW = _jitter(0.4, 0.4, 0.4, 0.1, blur_p=0.5)


def _two_views(scale, photometric, interpolation) -> tuple[ViewGroup, ...]:
    return (ViewGroup(2, 224, scale, tuple(photometric), interpolation=interpolation),)


PRESETS: dict[str, Recipe] = {
    "swav": Recipe(
        "swav",
        (
            ViewGroup(2, 224, (0.14, 1.0), (_jitter(0.8, 0.8, 0.8, 0.2, blur_p=0.5),)),
            ViewGroup(6, 96, (0.05, 0.14), (_jitter(0.8, 0.8, 0.8, 0.2, blur_p=0.5),)),
        ),
        std=SWAV_STD,
        global_only_scale=(0.08, 1.0),
        # measured on the demo set (docs/RESULTS.md): 2x32+4x16 at 5 epochs averages 81.15 kNN over
        # seeds 0-4 with (0.3, 1) against 80.01 with (0.14, 1)
        small_global_scale=(0.3, 1.0),
    ),
    "dino": Recipe(
        "dino",
        (
            ViewGroup(2, 224, (0.4, 1.0), _BYOL_VIEWS, interpolation="bicubic"),
            ViewGroup(8, 96, (0.05, 0.4), (_jitter(0.4, 0.4, 0.2, 0.1, blur_p=0.5),), interpolation="bicubic"),
        ),
    ),
    "mocov1": Recipe("mocov1", _two_views((0.2, 1.0), [_jitter(0.4, 0.4, 0.4, 0.4, p=1.0)], "bilinear"),
                     notes="upstream greys before the jitter; here the stack's fixed order (jitter, then grey)"),
    "mocov2": Recipe("mocov2", _two_views((0.2, 1.0), [_MOCO_V2_VIEW], "bilinear")),
    "mocov3": Recipe("mocov3", _two_views((0.2, 1.0), _BYOL_VIEWS, "bilinear"), notes="ViT: scale (0.08, 1)"),
    "simclr": Recipe(
        "simclr",
        _two_views((0.08, 1.0), [_jitter(0.8, 0.8, 0.8, 0.2, blur_p=0.5)], "bicubic"),
        mean=None,
        std=None,
    ),
    "byol": Recipe("byol", _two_views((0.08, 1.0), _BYOL_VIEWS, "bicubic")),
    "simsiam": Recipe("simsiam", _two_views((0.2, 1.0), [_MOCO_V2_VIEW], "bilinear")),
    "barlowtwins": Recipe("barlowtwins", _two_views((0.08, 1.0), _BYOL_VIEWS, "bicubic")),
    "vicreg": Recipe("vicreg", _two_views((0.08, 1.0), _BYOL_VIEWS, "bicubic")),
    "mae": Recipe(
        "mae",
        (ViewGroup(1, 224, (0.2, 1.0), (NO_PHOTOMETRIC,), interpolation="bicubic"),),
        masking=Masking("random", 0.75, patch_size=16),
    ),
    "sim": Recipe(
        "sim",
        _two_views((0.08, 1.0), _BYOL_VIEWS, "bicubic"),
        masking=Masking("block", 118 / 196, patch_size=16),
        notes="flip before crop: boxes are reported in original-image coordinates with the flip flag",
    ),
    # transformation prediction: one crop per image, the pretext inputs made from it (pipelines/pretext.py);
    # a random crop of half the image or more stands in for the papers' resize-then-crop
    "rotnet": Recipe("rotnet", (ViewGroup(1, 224, (0.5, 1.0), (NO_PHOTOMETRIC,)),), pretext=(Rotation(),)),
    "jigsaw": Recipe("jigsaw", (ViewGroup(1, 255, (0.5, 1.0), (Photometric(grayscale_p=0.66),)),),
                     pretext=(Jigsaw(),), notes="grey with p 0.66 against the chromatic-aberration shortcut"),
    "relloc": Recipe("relloc", (ViewGroup(1, 255, (0.5, 1.0), (NO_PHOTOMETRIC,)),), pretext=(RelativeLocation(),)),
    "multitask": Recipe("multitask", (ViewGroup(1, 255, (0.5, 1.0), (NO_PHOTOMETRIC,)),)),
    # NPID (lemniscate): one view per image, (0.2, 1) crops, jitter 0.4 with hue 0.4 always, grey 0.2, flip
    "npid": Recipe("npid", (ViewGroup(1, 224, (0.2, 1.0), (_jitter(0.4, 0.4, 0.4, 0.4, p=1.0),)),),
                   notes="upstream greys before the jitter; here the stack's fixed order (jitter, then grey)"),
    # rotation feature decoupling (FeatureDecoupling): RandomResizedCrop(224) and flip, then the four rotations
    "decoupling": Recipe("decoupling", (ViewGroup(1, 224, (0.08, 1.0), (NO_PHOTOMETRIC,)),), pretext=(Rotation(),)),
    # Zhang et al.: 224-px crops and flips of colour images, no photometric ops; the backbone sees lightness
    "colorization": Recipe("colorization", (ViewGroup(1, 224, (0.5, 1.0), (NO_PHOTOMETRIC,)),), mean=None, std=None,
                           pretext=(Lab(),), lightness_input=True),
    # Pathak et al.: a 128-px square crop (their random 128-px crop of the image resized to 350 px; here a
    # random-resized crop of half the image or more, as the other pretext presets) and a flip, no colour ops
    "inpainting": Recipe("inpainting", (ViewGroup(1, 128, (0.5, 1.0), (NO_PHOTOMETRIC,), ratio=(1.0, 1.0)),),
                         pretext=(Inpainting(),)),
    # IPT (Chen et al.): 48-px patches at the images' own resolution, flipped, every corruption made on the
    # device from them; a square random crop of ~1.5-3 % of a ~400x350 photo (46-65 px) resized to 48 stands
    # in for the native crop. No normalisation: the corruptions work on [0, 1] (0-255 for the noise sigma)
    "ipt": Recipe("ipt", (ViewGroup(1, 48, (0.015, 0.03), (NO_PHOTOMETRIC,), ratio=(1.0, 1.0), interpolation="bicubic"),),
                  mean=None, std=None, pretext=(Restoration(),)),
}


def eval_recipe(recipe: Recipe, size: int | None = None, crop_fraction: float = 0.875) -> Recipe:
    """One un-augmented view per image for feature extraction: the centred square of `crop_fraction`
    of the short side (resize 256 / centre-crop 224 at ImageNet scale), resized to `size` (default:
    the recipe's first crop size), normalised like training."""
    first = recipe.groups[0]
    group = ViewGroup(
        1, size or first.size, (1.0, 1.0), (NO_PHOTOMETRIC,), ratio=(1.0, 1.0),
        interpolation=first.interpolation, flip_p=0.0, center_crop=crop_fraction,
    )
    return dataclasses.replace(recipe, name=f"{recipe.name}-eval", groups=(group,), masking=None, pretext=())


def preset(method: str) -> Recipe:
    try:
        return PRESETS[method]
    except KeyError:
        raise RecipeError(f"no recipe preset for method {method!r}; known: {', '.join(sorted(PRESETS))}") from None
