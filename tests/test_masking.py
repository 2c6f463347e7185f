import pytest
import torch

from pipelines.masking import block_masks, make_masks, random_masks
from pipelines.spec import Masking


def test_random_masks_have_the_exact_ratio_and_are_uniform_over_patches():
    masks = random_masks(4000, 14, 147, torch.Generator().manual_seed(0), "cpu")
    assert masks.shape == (4000, 196)
    assert (masks.sum(1) == 147).all()
    frequency = masks.float().mean(0)
    assert (frequency - 0.75).abs().max() < 0.04


def test_block_masks_are_exact_and_blocky():
    generator = torch.Generator().manual_seed(0)
    masks = block_masks(500, 14, 118, generator, "cpu")
    assert (masks.sum(1) == 118).all()
    grid = masks.view(-1, 14, 14).float()
    # neighbours of a masked patch are far more often masked than under a random mask of equal ratio
    same_right = (grid[:, :, 1:] == grid[:, :, :-1]).float().mean().item()
    random_grid = random_masks(500, 14, 118, generator, "cpu").view(-1, 14, 14).float()
    random_same_right = (random_grid[:, :, 1:] == random_grid[:, :, :-1]).float().mean().item()
    assert same_right > random_same_right + 0.2


def test_make_masks_covers_the_masked_views_view_major():
    masking = Masking("random", 0.75, patch_size=4, views=2)
    masks = make_masks(masking, 3, 16, torch.Generator().manual_seed(0), "cpu")
    assert masks.shape == (6, 16) and (masks.sum(1) == 12).all()


@pytest.mark.parametrize("kind", ["random", "block"])
def test_masks_are_seeded(kind):
    masking = Masking(kind, 0.6, patch_size=2)
    a = make_masks(masking, 8, 16, torch.Generator().manual_seed(5), "cpu")
    b = make_masks(masking, 8, 16, torch.Generator().manual_seed(5), "cpu")
    assert torch.equal(a, b)
