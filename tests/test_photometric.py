"""The photometric stage against torchvision/PIL semantics, and its per-sample statistics."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps

from pipelines.photometric import (
    MaybeCompiled,
    PhotometricStage,
    blur_kernel_size,
    compile_failures,
    gaussian_kernels,
)
from pipelines.spec import Photometric, Recipe, ViewGroup, preset

SIZE = 24


def _recipe(*views: Photometric, mean=None, std=None, size=SIZE) -> Recipe:
    return Recipe("test", (ViewGroup(len(views), size, (0.5, 1.0), tuple(views)),), mean=mean, std=std)


def _run(recipe, images, seed=0, record=None):
    stage = PhotometricStage(recipe, "cpu", torch.Generator().manual_seed(seed))
    return stage(images, 0, record)


def _images(n, size=SIZE, seed=0):
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_color_jitter_matches_torchvision_with_the_drawn_factors_and_per_image_order():
    view = Photometric(jitter_p=1.0, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
    images = _images(64)
    record = {}
    out = _run(_recipe(view), images, record=record)
    orders = {tuple(row) for row in record["jitter_order"].tolist()}
    assert len(orders) > 12, "the op order must be drawn per image, not per batch"
    functions = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    names = ["brightness", "contrast", "saturation", "hue"]
    for i in range(len(images)):
        expected = images[i].permute(2, 0, 1).float() / 255
        for op in record["jitter_order"][i].tolist():
            expected = functions[op](expected, record[f"jitter_{names[op]}"][i].item())
        # Kornia's and torchvision's RGB<->HSV differ by < 0.1 of a grey level
        torch.testing.assert_close(out[i], expected, atol=3e-4, rtol=0)


def test_jitter_factor_ranges_follow_torchvision():
    view = Photometric(jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    record = {}
    _run(_recipe(view), _images(4000, size=4), record=record)
    for name, low, high in [("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2),
                            ("hue", -0.1, 0.1)]:
        factors = record[f"jitter_{name}"]
        assert factors.min() >= low and factors.max() <= high
        assert abs(factors.mean().item() - (low + high) / 2) < 0.01 * (high - low) + 0.005
        assert factors.std().item() == pytest.approx((high - low) / 12**0.5, rel=0.05)


def test_grayscale_is_bt601_like_torchvision():
    images = _images(16)
    out = _run(_recipe(Photometric(grayscale_p=1.0)), images)
    expected = TF.rgb_to_grayscale(images.permute(0, 3, 1, 2).float() / 255, num_output_channels=3)
    # torchvision weighs red 0.2989, Kornia 0.299: at most 1e-4 apart
    torch.testing.assert_close(out, expected, atol=2e-4, rtol=0)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_solarize_inverts_at_128_like_pil():
    values = torch.arange(256, dtype=torch.uint8)
    images = values.view(1, 16, 16, 1).expand(2, 16, 16, 3).contiguous()
    out = _run(_recipe(Photometric(solarize_p=1.0), size=16), images)
    pil = np.array(ImageOps.solarize(Image.fromarray(images[0].numpy()), threshold=128))
    expected = torch.from_numpy(pil).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)
    assert out[0, 0].flatten()[127] == pytest.approx(127 / 255) and out[0, 0].flatten()[128] == pytest.approx(127 / 255)


def test_normalisation_is_last_and_uses_the_recipe_mean_and_std():
    images = torch.full((3, SIZE, SIZE, 3), 128, dtype=torch.uint8)
    recipe = _recipe(Photometric(solarize_p=1.0), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    out = _run(recipe, images)
    solarized = 1 - 128 / 255
    for channel, (mean, std) in enumerate(zip((0.5, 0.4, 0.3), (0.2, 0.25, 0.5))):
        assert out[:, channel].mean().item() == pytest.approx((solarized - mean) / std, abs=1e-5)


def test_blur_sigma_is_uniform_per_sample_and_the_kernel_fits_the_crop():
    record = {}
    _run(_recipe(Photometric(blur_p=1.0, blur_sigma=(0.1, 2.0)), size=8), _images(5000, size=8), record=record)
    sigma = record["blur_sigma"]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    assert sigma.mean().item() == pytest.approx(1.05, abs=0.02)
    assert blur_kernel_size(2.0, 224) == 13 and blur_kernel_size(2.0, 8) == 7 and blur_kernel_size(0.5, 96) == 5


def test_blur_kernels_have_no_subnormal_weights_and_match_the_gaussian():
    sigma = torch.linspace(0.1, 2.0, 2000, dtype=torch.float64)
    kernels = gaussian_kernels(13, sigma)
    tiny = torch.finfo(torch.float32).tiny  # smallest normal float32
    assert not ((kernels > 0) & (kernels < tiny)).any()
    taps = torch.arange(13, dtype=torch.float64) - 6
    exact = torch.exp(-(taps ** 2) / (2 * sigma.view(-1, 1) ** 2))
    exact = exact / exact.sum(1, keepdim=True)
    assert torch.allclose(kernels.double(), exact, rtol=1e-4, atol=1e-19)
    assert torch.allclose(kernels.sum(1), torch.ones(2000), atol=1e-6)


def test_blur_matches_torchvision_gaussian_for_a_given_sigma():
    images = _images(6, size=32)
    record = {}
    out = _run(_recipe(Photometric(blur_p=1.0), size=32), images, record=record)
    for i in range(len(images)):
        sigma = record["blur_sigma"][i].item()
        expected = TF.gaussian_blur(images[i].permute(2, 0, 1).float() / 255, [13, 13], [sigma, sigma])
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["byol", "dino", "swav"])
def test_per_view_probabilities_hold_statistically(method):
    recipe = preset(method).with_multicrop("2x8+2x4" if method != "byol" else "2x8")
    per_view = 3000
    for group_index, group in enumerate(recipe.groups):
        record = {}
        stage = PhotometricStage(recipe, "cpu", torch.Generator().manual_seed(1))
        stage(_images(group.count * per_view, size=group.size), group_index, record)
        for view in range(group.count):
            expected = group.view_photometric(view)
            rows = slice(view * per_view, (view + 1) * per_view)
            for name in ("jitter", "grayscale", "blur", "solarize"):
                p = getattr(expected, f"{name}_p")
                decided = record.get(name)
                rate = 0.0 if decided is None else decided[rows].float().mean().item()
                tolerance = 4 * (p * (1 - p) / per_view) ** 0.5 + 1e-9
                assert abs(rate - p) <= tolerance, f"{method} group {group_index} view {view} {name}: {rate} vs {p}"


def test_same_seed_same_output_and_different_seed_differs():
    recipe = preset("byol").with_multicrop("2x16")
    images = _images(20, size=16)
    a, b = _run(recipe, images, seed=3), _run(recipe, images, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, _run(recipe, images, seed=4))


def test_identity_recipe_only_scales_and_rejects_float_input():
    images = _images(4)
    out = _run(_recipe(Photometric()), images)
    torch.testing.assert_close(out, images.permute(0, 3, 1, 2).float() / 255)
    with pytest.raises(TypeError, match="uint8"):
        _run(_recipe(Photometric()), images.float())


def test_channels_first_input_is_accepted():
    images = _images(4)
    recipe = _recipe(dataclasses.replace(Photometric(), grayscale_p=1.0))
    assert torch.equal(_run(recipe, images), _run(recipe, images.permute(0, 3, 1, 2)))


# ---------------------------------------------------------------------------------------------- the fused form


def _stage(recipe, seed=0, **options):
    return PhotometricStage(recipe, "cpu", torch.Generator().manual_seed(seed), **options)


def _strong_recipes():
    strong = Photometric(jitter_p=0.8, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.4, grayscale_p=0.2,
                         blur_p=0.5, solarize_p=0.3)
    half = dataclasses.replace(strong, brightness=0.0, hue=0.0, blur_p=1.0)  # per-view zero strengths
    return [_recipe(strong, half, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
            preset("dino").with_multicrop("2x24+2x12"), preset("swav").with_multicrop("2x20+2x12")]


@pytest.mark.parametrize("recipe_index", [0, 1, 2])
def test_fused_form_equals_the_kornia_op_chain(recipe_index):
    recipe = _strong_recipes()[recipe_index]
    for group_index, group in enumerate(recipe.groups):
        images = _images(group.count * 40, size=group.size, seed=group_index)
        fused_record, reference_record = {}, {}
        fused = _stage(recipe, compile=False)(images, group_index, fused_record)
        reference = _stage(recipe, implementation="reference")(images, group_index, reference_record)
        assert fused_record.keys() == reference_record.keys()
        for key in fused_record:
            assert torch.equal(fused_record[key], reference_record[key]), key
        torch.testing.assert_close(fused, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["swav", "byol"])
def test_branch_free_form_equals_the_indexed_form(method):
    """Blur and solarize on every sample with a per-sample select (the CUDA form) give the images of
    blurring and solarizing the selected samples only (the CPU form), from the same draws."""
    recipe = preset(method).with_multicrop("2x24+2x12" if method == "swav" else "2x24")
    assert not _stage(recipe).branch_free  # CPU default
    for group_index, group in enumerate(recipe.groups):
        images = _images(group.count * 40, size=group.size, seed=group_index)
        indexed_record, free_record = {}, {}
        indexed = _stage(recipe, compile=False, branch_free=False)(images, group_index, indexed_record)
        free = _stage(recipe, compile=False, branch_free=True)(images, group_index, free_record)
        for key in indexed_record:
            assert torch.equal(free_record[key], indexed_record[key]), key
        for name in ("blur", "solarize") if method == "byol" else ("blur",):
            assert 0 < int(indexed_record[name].sum()) < len(images), name  # some samples, not all
        torch.testing.assert_close(free, indexed, atol=1e-6, rtol=0)


def test_fused_form_does_not_depend_on_the_chunking():
    recipe = _strong_recipes()[0]
    images = _images(30)
    whole = _stage(recipe, compile=False, chunk_pixels=10**9)(images, 0)
    for chunk_pixels in (1, 3 * SIZE * SIZE):
        torch.testing.assert_close(_stage(recipe, compile=False, chunk_pixels=chunk_pixels)(images, 0), whole,
                                   atol=1e-6, rtol=0)


def test_compiled_fused_form_equals_the_kornia_op_chain():
    recipe = _strong_recipes()[0]
    images = _images(24, size=16)
    reference = _stage(recipe, implementation="reference")(images, 0)
    compiled = _stage(recipe, compile=True)
    assert compiled.compiled == [True]
    torch.testing.assert_close(compiled(images, 0), reference, atol=1e-5, rtol=0)
    fewer = _images(10, size=16, seed=1)  # another batch size and content: the same compiled graph
    torch.testing.assert_close(_stage(recipe, compile=True)(fewer, 0),
                               _stage(recipe, implementation="reference")(fewer, 0), atol=1e-5, rtol=0)


def _brighten(images: torch.Tensor) -> torch.Tensor:
    return (images * 1.5 + 0.1).clamp(0, 1)


def test_a_function_compile_cannot_build_runs_eagerly_after_one_warning_with_the_same_result():
    kernel = MaybeCompiled(_brighten)
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    # as on a machine without a C++ compiler (no cached kernel may stand in for the compile)
    no_compiler = {"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}
    try:
        with torch._inductor.config.patch(no_compiler), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = kernel(True, images), kernel(True, images)
    finally:
        torch._dynamo.reset()
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "_brighten" in message and "InvalidCxxCompiler" in message and "running eagerly" in message
    assert kernel.failed
    torch.testing.assert_close(first, _brighten(images), rtol=0, atol=0)
    torch.testing.assert_close(second, _brighten(images), rtol=0, atol=0)


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b


def test_an_error_of_the_function_itself_propagates_and_it_stays_compiled():
    kernel = MaybeCompiled(_product)
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(RuntimeError) as raised:
                kernel(True, torch.ones(2, 3), torch.ones(2, 3))  # shapes that cannot be multiplied
            assert not isinstance(raised.value, compile_failures())
            assert not kernel.failed and kernel.compiled is not None
            a, b = torch.rand(2, 3), torch.rand(3, 4)
            torch.testing.assert_close(kernel(True, a, b), a @ b)
    finally:
        torch._dynamo.reset()
    assert not kernel.failed
    assert not [w for w in caught if "running eagerly" in str(w.message)]


def test_compile_setting_comes_from_the_flag_then_the_environment(monkeypatch):
    recipe = preset("dino").with_multicrop("2x224+2x32")
    monkeypatch.delenv("FASTSSL_COMPILE", raising=False)
    assert _stage(recipe).compiled == [True, False]  # auto: large crops only
    assert _stage(recipe, compile=False).compiled == [False, False]
    monkeypatch.setenv("FASTSSL_COMPILE", "0")
    assert _stage(recipe).compiled == [False, False]
    assert _stage(recipe, compile=True).compiled == [True, True]
    monkeypatch.setenv("FASTSSL_COMPILE", "1")
    assert _stage(recipe).compiled == [True, True]
    monkeypatch.setenv("FASTSSL_COMPILE", "yes")
    with pytest.raises(ValueError, match="FASTSSL_COMPILE"):
        _stage(recipe)


def _hue_turns(rgb: torch.Tensor) -> torch.Tensor:
    """HSV hue in turns of (n, 3) colours with a single maximum."""
    r, g, b = rgb.unbind(1)
    maxc, minc = rgb.max(1).values, rgb.min(1).values
    chroma = maxc - minc
    hue = torch.where(maxc == r, (g - b) / chroma, torch.where(maxc == g, (b - r) / chroma + 2, (r - g) / chroma + 4))
    return torch.remainder(hue / 6, 1)


@pytest.mark.parametrize("op,strength", [("brightness", 0.4), ("contrast", 0.8), ("saturation", 0.5), ("hue", 0.1)])
def test_fused_jitter_rates_and_factors_read_from_the_pixels(op, strength):
    """One op at p = 0.8 on flat-colour images: the factor each output implies, recovered from its pixels
    alone, is applied at the rate p and is uniform over torchvision's range."""
    n = 4000
    colour = torch.tensor([102, 77, 51], dtype=torch.uint8)  # (0.4, 0.3, 0.2): no clamping for these ranges
    images = colour.view(1, 1, 1, 3).expand(n, 4, 4, 3).contiguous()
    out = _stage(_recipe(Photometric(jitter_p=0.8, **{op: strength}), size=4), seed=5, compile=False)(images, 0)
    pixel, source = out[:, :, 0, 0].double(), colour.double() / 255
    grey = (torch.tensor(_GREY_WEIGHTS, dtype=torch.float64) * source).sum()
    if op == "brightness":
        factor = pixel[:, 0] / source[0]
    elif op in ("contrast", "saturation"):  # on a flat image the grey mean and the grey image agree
        factor = (pixel[:, 0] - grey) / (source[0] - grey)
    else:
        factor = torch.remainder(_hue_turns(pixel) - _hue_turns(source.view(1, 3)) + 0.5, 1) - 0.5
    neutral = 0.0 if op == "hue" else 1.0
    changed = (factor - neutral).abs() > 1e-4
    rate = changed.double().mean().item()
    assert abs(rate - 0.8) < 4 * (0.8 * 0.2 / n) ** 0.5
    low, high = (-strength, strength) if op == "hue" else (1 - strength, 1 + strength)
    drawn = factor[changed]
    assert drawn.min() >= low - 1e-4 and drawn.max() <= high + 1e-4
    assert drawn.mean().item() == pytest.approx((low + high) / 2, abs=0.02 * (high - low))
    assert drawn.std().item() == pytest.approx((high - low) / 12**0.5, rel=0.05)
    assert (factor[~changed] - neutral).abs().max() < 1e-4


_GREY_WEIGHTS = (0.299, 0.587, 0.114)


def test_fused_jitter_order_is_uniform_per_image_and_followed():
    """All 24 orders at a uniform rate, and each image follows its own: strong factors clamp, so the
    orders give different images, and every output is the chain in its recorded order, not reversed."""
    view = Photometric(jitter_p=1.0, brightness=0.9, contrast=0.9, saturation=0.9, hue=0.3)
    n = 2400
    record = {}
    images = _images(n, size=6, seed=3)
    out = _stage(_recipe(view, size=6), compile=False)(images, 0, record)
    orders, counts = torch.unique(record["jitter_order"], dim=0, return_counts=True)
    assert len(orders) == 24
    assert (counts - n / 24).abs().max() < 5 * (n / 24) ** 0.5
    functions = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    names = ["brightness", "contrast", "saturation", "hue"]
    told_apart = 0
    for i in range(0, n, 12):
        chains = []
        for order in (record["jitter_order"][i].tolist(), record["jitter_order"][i].tolist()[::-1]):
            expected = images[i].permute(2, 0, 1).float() / 255
            for op in order:
                expected = functions[op](expected, record[f"jitter_{names[op]}"][i].item())
            chains.append(expected)
        # torchvision's and Kornia's HSV round trips differ by < 1e-3 at these strengths
        torch.testing.assert_close(out[i], chains[0], atol=1e-3, rtol=0)
        told_apart += bool((chains[0] - chains[1]).abs().max() > 1e-2)
    assert told_apart > n // 12 // 2


def test_fused_grayscale_and_solarize_rates_read_from_the_pixels():
    recipe = preset("dino").with_multicrop("2x8+2x6")
    recipe = dataclasses.replace(recipe, mean=None, std=None, groups=tuple(
        dataclasses.replace(g, photometric=tuple(dataclasses.replace(p, jitter_p=0.0) for p in g.photometric))
        for g in recipe.groups))
    per_view = 3000
    group = recipe.groups[0]
    bright = torch.tensor([230, 180, 140], dtype=torch.uint8).view(1, 1, 1, 3)  # all >= 128, grey too
    images = bright.expand(group.count * per_view, 8, 8, 3).contiguous()
    out = _stage(recipe, seed=2, compile=False)(images, 0)
    grey = (out[:, 0] == out[:, 1]).all((-2, -1)) & (out[:, 1] == out[:, 2]).all((-2, -1))
    solarized = out.amax((1, 2, 3)) < 0.5
    for view in range(group.count):
        p = group.view_photometric(view)
        rows = slice(view * per_view, (view + 1) * per_view)
        for name, decided, rate in (("grayscale", grey, p.grayscale_p), ("solarize", solarized, p.solarize_p)):
            measured = decided[rows].double().mean().item()
            assert abs(measured - rate) <= 4 * (rate * (1 - rate) / per_view) ** 0.5 + 1e-9, (view, name, measured)
