"""The photometric stage: the recipe's colour ops on the training device, one call per view group.

Input is the uint8 crops of one size group (all its views stacked view-major); output is float,
normalised last. Every random quantity is drawn per sample from one seeded `torch.Generator`, so a
stream is reproducible from the run's seed and step, and per-view parameters (BYOL/DINO asymmetries)
become per-sample tensors. Semantics are torchvision/PIL's: multiplicative brightness, contrast blended
with the grey mean, saturation blended with the grey image, hue shifted in HSV (in turns), each op
clamped to [0, 1], the four jitter ops in an independent random order per image, BT.601 grey, Gaussian
blur with a per-sample sigma, solarize at and above 0.5 (128/255), normalisation last.

Implementation (see docs/PERFORMANCE.md for the measurements behind it). The elementwise part runs as
one fused function, `_front`: uint8 -> float, colour jitter, grayscale and (for samples that are neither
blurred nor solarized) normalisation in one pass over the pixels, on every sample of the group, with the
per-sample decisions as data instead of as Python branches. The per-image random order is exact: a
sample's jitter is written as three "blend" slots before the hue shift and three after it, each slot
being brightness, contrast, saturation or the identity for that sample (`_jitter_slots`); all three
ops are `clamp(f * x + (1 - f) * ref, 0, 1)` with ref = 0, the grey mean or the grey image, and the
identity is f = 1, which leaves a [0, 1] image bit-exact. The hue shift is HSV as one elementwise
expression. Unselected samples pass through exactly (`torch.where`). Blur (a spatial op: two depthwise
convolutions, eager) and solarize then run, followed by the normalisation of the samples they touched
(`_back`). On CPU they run on the samples that drew them only (found by index); on CUDA on every sample
of a group that uses them, with `torch.where` keeping the result per sample, so no step of the stage
waits for the device (no `.any()`, `.nonzero()` or host-to-device copy per call). Both forms give the
same images from the same draws (`branch_free=` in the constructor picks one; the tests compare them).

`_front` and `_back` are compiled with `torch.compile(dynamic=True)` (one compile per process, reused
for every crop size and batch size) when the group's crops are at least `COMPILE_MIN_SIZE` pixels wide
and compilation is allowed: `compile=` in the constructor, else the environment variable
`FASTSSL_COMPILE` = 1 (always), 0 (never) or auto (the default: large crops only, where the one-time
compile of ~15-25 s pays off). If compilation fails (no C++ compiler, no Triton, an unsupported
construct: `compile_failures`) the same functions run eagerly (one warning each), with the same results
up to float rounding; other errors propagate. On CPU the group is processed in chunks of ~4 images of 224 px
so the intermediates stay in cache. `PhotometricStage(..., implementation="reference")` runs the
plain Kornia op chain instead (one Kornia call per op and selected subset); the tests hold the fused
form to it.
"""

from __future__ import annotations

import math
import os
import warnings

import kornia
import torch

from pipelines.spec import Recipe, ViewGroup

_JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
COMPILE_MIN_SIZE = 64
_CPU_CHUNK_PIXELS = 4 * 224 * 224
_GREY = (0.299, 0.587, 0.114)  # Kornia's BT.601 weights


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


# ---------------------------------------------------------------------------------------------- fused form


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b).unsqueeze(1)


def _hue_shift(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Kornia's/torchvision's HSV hue shift by `turns` (per sample), as one elementwise expression."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = torch.where(chroma > 0, hue / 6.0, torch.zeros_like(hue))
    hue = torch.remainder(hue + turns.view(-1, 1, 1), 1.0)
    channels = []
    for offset in (5.0, 3.0, 1.0):  # HSV -> RGB: channel = V - C * clamp(min(k, 4 - k), 0, 1)
        k = torch.remainder(offset + 6.0 * hue, 6.0)
        channels.append(maxc - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, 1)


def _blend(x: torch.Tensor, kind: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """One jitter slot: clamp(f * x + (1 - f) * ref) with ref 0 (brightness, and the identity f = 1),
    the grey mean (kind 1, contrast) or the grey image (kind 2, saturation)."""
    grey = _grey(x)
    kind = kind.view(-1, 1, 1, 1)
    ref = torch.where(kind == 1, grey.mean((-2, -1), keepdim=True), torch.where(kind == 2, grey, 0.0))
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * ref).clamp(0.0, 1.0)


def _front(crops, kinds, factors, turns, hue_on, grey_on, normalise_on, mean, std):
    """uint8 crops -> float: jitter (six blend slots around the hue shift), grayscale, normalisation."""
    x = crops.float() / 255.0
    for slot in range(3):
        x = _blend(x, kinds[:, slot], factors[:, slot])
    x = torch.where(hue_on.view(-1, 1, 1, 1), _hue_shift(x, turns), x)
    for slot in range(3, 6):
        x = _blend(x, kinds[:, slot], factors[:, slot])
    x = torch.where(grey_on.view(-1, 1, 1, 1), _grey(x).expand_as(x), x)
    return torch.where(normalise_on.view(-1, 1, 1, 1), (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), x)


def _back(x, solarize_on, normalise, mean, std):
    """Solarize (selected samples) and normalise the samples that were blurred or solarized."""
    x = torch.where(solarize_on.view(-1, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
    return torch.where(normalise, (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), x)


def gaussian_kernels(size: int, sigma: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, size) normalised 1-D Gaussian windows, one per sigma, with no subnormal weights.

    Tails of a small sigma fall into float32's subnormal range (exp(-87) .. exp(-103)); x86 CPUs
    multiply by those through a slow microcode path (a 96-px blur ran 4x slower). Weights under 1e-20
    of the window's sum are set to zero, which changes no output by more than 1e-19.
    """
    taps = torch.arange(size, dtype=dtype, device=sigma.device) - size // 2
    kernel = torch.exp(-(taps.view(1, -1) ** 2) / (2 * sigma.to(dtype).view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    return torch.where(kernel < 1e-20, 0.0, kernel)


def _gaussian_blur(x: torch.Tensor, size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Kornia's `gaussian_blur2d` (reflect border, a `size` window, per-sample sigma) as two depthwise
    convolutions with the kernels built once per call: the same numbers, less overhead."""
    n, channels, height, width = x.shape
    kernel = gaussian_kernels(size, sigma, x.dtype).repeat_interleave(channels, 0)
    pad = size // 2
    y = torch.nn.functional.pad(x.reshape(1, n * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    y = torch.nn.functional.conv2d(y, kernel.view(n * channels, 1, 1, size), groups=n * channels)
    y = torch.nn.functional.conv2d(y, kernel.view(n * channels, 1, size, 1), groups=n * channels)
    return y.view(n, channels, height, width)


def compile_failures() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot compile a function, as opposed to an error of the function
    itself (which reaches the caller, compiled or not: dynamo re-raises it while tracing as a
    `TorchRuntimeError`, which is left out here): the backend failed (`BackendCompilerFailed`, whose
    `InductorError` wraps e.g. no working C++ compiler, a C++ or Triton compile error, Triton missing),
    dynamo cannot trace the function (`Unsupported`) or fails inside itself (`InternalTorchDynamoError`),
    and the inductor errors that can surface unwrapped."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc

    names = [(dynamo_exc, "BackendCompilerFailed"), (dynamo_exc, "Unsupported"),
             (dynamo_exc, "InternalTorchDynamoError"), (inductor_exc, "InvalidCxxCompiler"),
             (inductor_exc, "CppCompileError"), (inductor_exc, "TritonMissing"),
             (inductor_exc, "GPUTooOldForTriton")]
    return tuple(getattr(module, name) for module, name in names if hasattr(module, name))


def _reason(error: BaseException) -> str:
    """One line: the error's type and first line, or those of the error it wraps (a backend's)."""
    error = getattr(error, "inner_exception", None) or error
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class MaybeCompiled:
    """`fn`, compiled with `torch.compile(dynamic=True)` on its first compiled call. If compiling fails
    (`compile_failures`, or torch.compile is unavailable), `fn` runs eagerly from then on, with one warning
    naming the reason; any other error propagates and the next call runs compiled again."""

    def __init__(self, fn):
        self.fn, self.compiled, self.failed = fn, None, False

    def __call__(self, compiled: bool, *args):
        if compiled and not self.failed:
            try:
                if self.compiled is None:  # raises only where compiling is unavailable (platform, Python)
                    self.compiled = torch.compile(self.fn, dynamic=True)
                return self.compiled(*args)
            except Exception as error:
                if self.compiled is not None and not isinstance(error, compile_failures()):
                    raise
                self.failed = True
                warnings.warn(f"photometric stage: torch.compile failed on {self.fn.__name__} ({_reason(error)}); "
                              f"running eagerly", stacklevel=3)
        return self.fn(*args)


_FRONT = MaybeCompiled(_front)
_BACK = MaybeCompiled(_back)


def _jitter_slots(order: torch.Tensor, factors: torch.Tensor, jitter_on: torch.Tensor, active: torch.Tensor):
    """Per-sample (kind, factor) of the six blend slots: the ops before hue in slots 0-2, after it in 3-5.

    `order` (n, 4): op index per position (0 brightness, 1 contrast, 2 saturation, 3 hue); `factors`
    (n, 4) in the same op order; `active` (n, 4): the op is applied to that sample at all.
    """
    n = order.shape[0]
    hue_position = (order == 3).int().argmax(1, keepdim=True)
    identity = torch.full((n, 3), -1, dtype=order.dtype, device=order.device)
    padded = torch.cat([order, identity], 1)  # (n, 7)
    slot = torch.arange(3, device=order.device).view(1, 3)
    before = torch.where(slot < hue_position, order[:, :3], -1)
    after = torch.gather(padded, 1, hue_position + 1 + slot)
    ops = torch.cat([before, after], 1)  # (n, 6), -1 = identity
    applied = ops >= 0
    safe = ops.clamp(min=0)
    applied &= jitter_on.view(-1, 1) & torch.gather(active, 1, safe)
    factor = torch.where(applied, torch.gather(factors, 1, safe), torch.ones_like(factors[:, :1]))
    kind = torch.where(applied & (safe > 0), safe, 0)  # 0 brightness/identity, 1 contrast, 2 saturation
    return kind, factor


# ---------------------------------------------------------------------------------------------- the stage


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
        active = [op in self.jitter_ops for op in _JITTER_OPS]
        self.jitter_active = torch.tensor(active, device=device).view(1, 4)


def _compile_setting(compile: bool | None) -> str:
    if compile is not None:
        return "1" if compile else "0"
    setting = os.environ.get("FASTSSL_COMPILE", "auto").strip().lower()
    if setting not in ("0", "1", "auto"):
        raise ValueError(f"FASTSSL_COMPILE={setting!r}: use 0, 1 or auto")
    return setting


class PhotometricStage:
    """Applies a recipe's photometric ops and normalisation to one view group at a time.

    `implementation`: "fused" (the default; compiled per `compile`, see the module docstring) or
    "reference" (the Kornia op chain). `chunk_pixels`: how many pixels the fused form processes per call
    (default: ~4 images of 224 px on CPU, the whole group on GPU). `branch_free`: blur and solarize every
    sample of the group and select per sample, instead of indexing the samples that drew them (default:
    on CUDA only).
    """

    def __init__(self, recipe: Recipe, device: torch.device | str, generator: torch.Generator,
                 implementation: str = "fused", compile: bool | None = None, chunk_pixels: int | None = None,
                 branch_free: bool | None = None):
        if implementation not in ("fused", "reference"):
            raise ValueError(f"implementation {implementation!r}: use 'fused' or 'reference'")
        self.recipe = recipe
        self.device = torch.device(device)
        self.generator = generator
        self.implementation = implementation
        self._groups = [_GroupParameters(group, self.device) for group in recipe.groups]
        setting = _compile_setting(compile)
        self.compiled = [setting == "1" or (setting == "auto" and group.size >= COMPILE_MIN_SIZE)
                         for group in recipe.groups]
        if chunk_pixels is None:
            chunk_pixels = _CPU_CHUNK_PIXELS if self.device.type == "cpu" else 2**62
        self.chunk_pixels = chunk_pixels
        # a data-dependent branch or index waits for a GPU, so there compute every sample; a CPU has nothing
        # to wait for, and blurring the samples that did not draw blur would cost real time
        self.branch_free = self.device.type == "cuda" if branch_free is None else branch_free
        self._normalise = recipe.mean is not None
        self._mean = torch.tensor(recipe.mean if self._normalise else (0.0, 0.0, 0.0), device=self.device)
        self._std = torch.tensor(recipe.std if self._normalise else (1.0, 1.0, 1.0), device=self.device)

    def _uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=self.device)

    def _coin(self, probability: torch.Tensor) -> torch.Tensor:
        return self._uniform(probability.numel()) < probability

    def _draw(self, n: int, params: _GroupParameters, per_sample) -> dict:
        """Every random decision and factor of the group, in the generator order of all versions."""
        draws = {}
        if params.uses["jitter"]:
            draws["jitter"] = self._coin(per_sample(params.jitter_p))
            for op in _JITTER_OPS:
                strength = per_sample(params.strength[op])
                if op == "hue":
                    draws[f"jitter_{op}"] = (2 * self._uniform(n) - 1) * strength
                else:
                    low = (1 - strength).clamp(min=0)
                    draws[f"jitter_{op}"] = low + (1 + strength - low) * self._uniform(n)
            draws["jitter_order"] = torch.argsort(self._uniform(n * 4).view(n, 4), dim=1)  # per image
        if params.uses["grayscale"]:
            draws["grayscale"] = self._coin(per_sample(params.grayscale_p))
        if params.uses["blur"]:
            draws["blur"] = self._coin(per_sample(params.blur_p))
            low, high = per_sample(params.sigma_low), per_sample(params.sigma_high)
            draws["blur_sigma"] = low + (high - low) * self._uniform(n)
        if params.uses["solarize"]:
            draws["solarize"] = self._coin(per_sample(params.solarize_p))
        return draws

    def __call__(self, crops: torch.Tensor, group_index: int, record: dict | None = None) -> torch.Tensor:
        """`crops`: uint8 (views * B, H, W, 3) or (views * B, 3, H, W), view-major.

        Returns float (views * B, 3, H, W). When `record` is a dict, the per-sample decisions and
        factors are stored in it (used by the statistical tests and the view inspector).
        """
        if crops.dtype != torch.uint8:
            raise TypeError(f"photometric stage expects uint8 crops, got {crops.dtype}")
        if crops.shape[-1] == 3 and crops.shape[1] != 3:
            crops = crops.permute(0, 3, 1, 2)
        crops = crops.contiguous()  # planar: vectorised loads, and one layout (one compiled graph)
        params = self._groups[group_index]
        count = self.recipe.groups[group_index].count
        n = crops.shape[0]
        per_view = n // count

        def per_sample(values: torch.Tensor) -> torch.Tensor:
            return values.repeat_interleave(per_view, output_size=n)  # a known size: no device sync

        draws = self._draw(n, params, per_sample)
        if record is not None:
            record.update(draws)
        if self.implementation == "reference":
            return self._reference(crops, params, draws)
        return self._fused(crops, params, draws, self.compiled[group_index])

    # ------------------------------------------------------------------------------------------ fused

    def _fused(self, crops: torch.Tensor, params: _GroupParameters, draws: dict, compiled: bool) -> torch.Tensor:
        n, device = crops.shape[0], crops.device
        no = torch.zeros(n, dtype=torch.bool, device=device)
        if "jitter" in draws:
            factors = torch.stack([draws[f"jitter_{op}"] for op in _JITTER_OPS], 1)
            active = params.jitter_active.expand(n, 4)
            kinds, slot_factors = _jitter_slots(draws["jitter_order"], factors, draws["jitter"], active)
            turns = draws["jitter_hue"]
            hue_on = draws["jitter"] & active[:, 3]
        else:
            kinds = torch.zeros(n, 6, dtype=torch.long, device=device)
            slot_factors = torch.ones(n, 6, device=device)
            turns, hue_on = torch.zeros(n, device=device), no
        blur_on = draws.get("blur", no)
        solarize_on = draws.get("solarize", no)
        late = blur_on | solarize_on
        normalise_now, normalise_late = (~late, late) if self._normalise else (no, no)
        args = (kinds, slot_factors, turns, hue_on, draws.get("grayscale", no), normalise_now)
        step = max(1, self.chunk_pixels // (crops.shape[-2] * crops.shape[-1]))
        chunks = max(1, round(n / step))
        bounds = [round(i * n / chunks) for i in range(chunks + 1)]  # even chunks, none of size 1 if n > 1
        parts = [_FRONT(compiled, crops[a:b], *(arg[a:b] for arg in args), self._mean, self._std)
                 for a, b in zip(bounds[:-1], bounds[1:])]
        images = parts[0] if len(parts) == 1 else torch.cat(parts)
        if "blur" not in draws and "solarize" not in draws:
            return images
        if self.branch_free:
            if "blur" in draws:
                blurred = _gaussian_blur(images, params.blur_kernel, draws["blur_sigma"])
                images = torch.where(blur_on.view(-1, 1, 1, 1), blurred, images)
            normalise = normalise_late.view(-1, 1, 1, 1)
            return _BACK(compiled, images, solarize_on, normalise, self._mean, self._std)
        if not bool(late.any()):
            return images
        index = late.nonzero().squeeze(1)
        every = index.numel() == n
        selected = images if every else images[index]
        blurred = blur_on if every else blur_on[index]
        if bool(blurred.any()):
            sigma = draws["blur_sigma"] if every else draws["blur_sigma"][index]
            selected = self._apply(selected, blurred, self._blur_depthwise(params), sigma)
        normalise = normalise_late if every else normalise_late[index]
        selected = _BACK(compiled, selected, solarize_on if every else solarize_on[index],
                         normalise.view(-1, 1, 1, 1), self._mean, self._std)
        if every:
            return selected
        images[index] = selected
        return images

    @staticmethod
    def _blur(params: _GroupParameters):
        size = params.blur_kernel
        return lambda x, s: kornia.filters.gaussian_blur2d(x, (size, size), torch.stack([s, s], dim=1))

    @staticmethod
    def _blur_depthwise(params: _GroupParameters):
        return lambda x, s: _gaussian_blur(x, params.blur_kernel, s)

    # ------------------------------------------------------------------------------------------ reference

    def _reference(self, crops: torch.Tensor, params: _GroupParameters, draws: dict) -> torch.Tensor:
        images = crops.float().div_(255.0)
        if "jitter" in draws:
            chosen, order = draws["jitter"], draws["jitter_order"]
            for position in range(4):
                for op_index, op in enumerate(_JITTER_OPS):
                    if op not in params.jitter_ops:
                        continue
                    selected = chosen & (order[:, position] == op_index)
                    images = self._apply(images, selected, _JITTER_FUNCTIONS[op], draws[f"jitter_{op}"])
        if "grayscale" in draws:
            images = self._apply(images, draws["grayscale"],
                                 lambda x: kornia.color.rgb_to_grayscale(x).expand_as(x))
        if "blur" in draws:
            images = self._apply(images, draws["blur"], self._blur(params), draws["blur_sigma"])
        if "solarize" in draws:
            images = self._apply(images, draws["solarize"], lambda x: kornia.enhance.solarize(x, thresholds=0.5))
        if self._normalise:
            images = kornia.enhance.normalize(images, self._mean, self._std)
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
