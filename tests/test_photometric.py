"""The photometric stage against torchvision/PIL semantics, and its per-sample statistics."""

import dataclasses

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps

from pipelines.photometric import PhotometricStage, blur_kernel_size
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
