"""Transformation prediction: the pretext inputs the input stack makes (rotations, jigsaw tiles, context
pairs and their anti-shortcut options), the permutation set, Sinkhorn, the recipe's pretext part, the
methods' heads in process, then `train.py --method rotnet|jigsaw|relloc|multitask` on the demo shards.

The geometry tests read positions back from pixel values: image `s` of a batch holds
s * S * S + y * S + x at (y, x), in every channel, so a tile's top-left value says which image and pixel
it was cut from.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models.methods import METHODS, Progress, create_method
from models.methods.pretext import PretextMethod
from models.methods.rotnet import RotationHead
from models.pretext_losses import classification_loss, log_sinkhorn, permutation_loss
from pipelines.pretext import (
    CENTRE,
    NEIGHBOURS,
    PretextStage,
    blur_chroma,
    drop_colours,
    grid_patches,
    jigsaw,
    minimum_hamming,
    permutation_set,
    project_out_green_magenta,
    random_aperture,
    relative_location,
    rotate,
)
from pipelines.spec import GridPatches, Jigsaw, RecipeError, RelativeLocation, Rotation, eval_recipe, preset

DATA = "shards/fashion-mnist-val-2k"
LABELED_TRAIN = "shards/fashion-mnist-train-10k"  # the demo train shards carry labels (manifest "labeled")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def positions(batch: int, size: int, channels: int = 3) -> torch.Tensor:
    """(batch, channels, size, size): image s holds s * size² + y * size + x at (y, x) in every channel."""
    values = torch.arange(batch * size * size, dtype=torch.float32).view(batch, 1, size, size)
    return values.expand(batch, channels, size, size).contiguous()


def decode(value: float, size: int) -> tuple[int, int, int]:
    """(image, y, x) of a pixel value of `positions`."""
    value = int(value)
    return value // (size * size), (value % (size * size)) // size, value % size


def assert_is_region(tile: torch.Tensor, size: int) -> tuple[int, int, int]:
    """`tile` (C, p, p) is a contiguous p x p region of one `positions` image, the same in every channel:
    returns the (image, y, x) of its top-left pixel."""
    patch = tile.shape[-1]
    image, y, x = decode(tile[0, 0, 0], size)
    span = torch.arange(patch, dtype=torch.float32)
    expected = tile[0, 0, 0] + span.view(-1, 1) * size + span.view(1, -1)
    for channel in tile:
        assert torch.equal(channel, expected)
    return image, y, x


# ------------------------------------------------------------------------------------------------ rotation


def test_all_four_rotations_are_counter_clockwise_quarter_turns_rotation_major():
    first = torch.tensor([[0.0, 1, 2], [3, 4, 5], [6, 7, 8]])
    images = torch.stack([first, first + 10]).unsqueeze(1)  # (2, 1, 3, 3)
    made = rotate(images, Rotation(), generator())
    turned = [  # first rotated by 0, 90, 180 and 270 degrees counter-clockwise, written out
        [[0, 1, 2], [3, 4, 5], [6, 7, 8]],
        [[2, 5, 8], [1, 4, 7], [0, 3, 6]],
        [[8, 7, 6], [5, 4, 3], [2, 1, 0]],
        [[6, 3, 0], [7, 4, 1], [8, 5, 2]],
    ]
    assert made.images.shape == (8, 1, 3, 3) and made.order is None
    for k, expected in enumerate(turned):
        expected = torch.tensor(expected, dtype=torch.float32)
        assert torch.equal(made.images[2 * k, 0], expected)  # rotation k of sample i is row k * B + i
        assert torch.equal(made.images[2 * k + 1, 0], expected + 10)
    assert made.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_one_random_rotation_shows_each_image_turned_by_its_label():
    images = torch.randn(64, 3, 5, 5, generator=generator(1))
    made = rotate(images, Rotation(all_four=False), generator(2))
    assert made.images.shape == images.shape and made.labels.shape == (64,)
    assert set(made.labels.tolist()) == {0, 1, 2, 3}
    for image, label, original in zip(made.images, made.labels.tolist(), images):
        assert torch.equal(image, torch.rot90(original, label, dims=(1, 2)))
    again = rotate(images, Rotation(all_four=False), generator(2))
    assert torch.equal(again.labels, made.labels)  # the labels come from the generator


# ------------------------------------------------------------------------------------------- grid patches


def test_grid_patches_are_cut_at_their_cell_plus_offset_on_the_centred_grid():
    # an 8-px image, a 2x2 grid of 3-px cells (6 px, centred: it starts at (1, 1)), 2-px patches
    image = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    offsets = torch.tensor([[[0, 1], [1, 0], [1, 1], [0, 0]]])  # (y, x) inside cells 0-3
    patches = grid_patches(image, GridPatches(grid=2, cell=3, patch=2), offsets)
    assert patches.shape == (1, 4, 1, 2, 2)
    expected = [  # cell (r, c) starts at (1 + 3r, 1 + 3c), plus the offset
        [[10, 11], [18, 19]],  # (1, 1) + (0, 1)
        [[20, 21], [28, 29]],  # (1, 4) + (1, 0)
        [[42, 43], [50, 51]],  # (4, 1) + (1, 1)
        [[36, 37], [44, 45]],  # (4, 4) + (0, 0)
    ]
    assert patches[0, :, 0].tolist() == expected


# a hand-made set of four orders of the 9 tiles: position j of a puzzle shows tile PERMUTATIONS[label][j]
PERMUTATIONS = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1, 0],
                             [1, 2, 0, 4, 5, 3, 7, 8, 6], [4, 0, 8, 2, 6, 1, 3, 7, 5]])


def test_jigsaw_position_j_shows_the_tile_of_cell_order_j_cut_inside_that_cell():
    size, batch = 50, 6
    spec = Jigsaw(permutations=4, normalise_tiles=False).for_crop(size)
    assert (spec.cell, spec.patch) == (16, 12)  # 50 // 3 and round(16 * 64 / 85); the grid starts at (1, 1)
    made = jigsaw(positions(batch, size), spec, PERMUTATIONS, generator(3))
    assert made.images.shape == (batch * 9, 3, 12, 12) and made.labels.shape == (batch,)
    assert len(set(made.labels.tolist())) > 1
    assert torch.equal(made.order, PERMUTATIONS[made.labels])
    offsets = set()
    for i in range(batch):
        for j in range(9):
            image, y, x = assert_is_region(made.images[i * 9 + j], size)  # sample-major
            row, column = divmod(int(made.order[i, j]), 3)
            offset = (y - 1 - 16 * row, x - 1 - 16 * column)
            assert image == i and 0 <= min(offset) and max(offset) <= 16 - 12, (i, j, image, offset)
            offsets.update(offset)
    assert offsets == {0, 1, 2, 3, 4}  # the jitter covers [0, cell - patch]


def test_jigsaw_without_a_set_shuffles_uniformly_with_label_minus_one_and_standardises_tiles():
    size = 48
    spec = Jigsaw(permutations=0, normalise_tiles=False).for_crop(size)
    made = jigsaw(positions(4, size), spec, None, generator(4))
    assert made.labels.tolist() == [-1] * 4
    for i, order in enumerate(made.order):
        assert sorted(order.tolist()) == list(range(9))
        for j in range(9):
            image, y, x = assert_is_region(made.images[i * 9 + j], size)
            assert image == i and (y // 16, x // 16) == divmod(int(order[j]), 3)  # the grid fills the crop
    assert len({tuple(order.tolist()) for order in made.order}) == 4

    standardised = jigsaw(positions(4, size), Jigsaw(permutations=0).for_crop(size), None, generator(4))
    assert torch.equal(standardised.order, made.order)  # same draws
    tiles = standardised.images
    assert tiles.mean(dim=(-2, -1)).abs().max() < 1e-4
    # a tile's variance is ~3e4 here, so the 1e-2 added to it moves the std by well under 1e-5
    torch.testing.assert_close(tiles.std(dim=(-2, -1), unbiased=False), torch.ones(36, 3), atol=1e-5, rtol=0)


def test_relative_location_pairs_each_centre_patch_with_the_neighbour_its_label_names():
    size, batch = 50, 16
    spec = RelativeLocation().for_crop(size)
    assert NEIGHBOURS == (0, 1, 2, 3, 5, 6, 7, 8) and CENTRE == 4
    made = relative_location(positions(batch, size), spec, generator(5))
    assert made.images.shape == (2 * batch, 3, 12, 12) and made.labels.shape == (batch,)
    assert len(set(made.labels.tolist())) > 3
    for i, label in enumerate(made.labels.tolist()):
        for row, cell in ((i, CENTRE), (batch + i, NEIGHBOURS[label])):  # centres first, then neighbours
            image, y, x = assert_is_region(made.images[row], size)
            assert image == i and ((y - 1) // 16, (x - 1) // 16) == divmod(cell, 3)
            assert (y - 1) % 16 <= 4 and (x - 1) % 16 <= 4


def test_relative_location_all_pairs_gives_eight_per_image_in_order_around_one_centre_patch():
    size = 50
    made = relative_location(positions(2, size), RelativeLocation(all_pairs=True).for_crop(size), generator(6))
    assert made.images.shape == (32, 3, 12, 12)
    assert made.labels.tolist() == list(range(8)) * 2
    for k in range(16):
        image, y, x = assert_is_region(made.images[16 + k], size)
        assert image == k // 8 and ((y - 1) // 16, (x - 1) // 16) == divmod(NEIGHBOURS[k % 8], 3)
        assert torch.equal(made.images[k], made.images[8 * (k // 8)])  # the image's one centre patch
        assert decode(made.images[k, 0, 0, 0], size)[0] == k // 8


def test_yoked_jitter_gives_every_patch_of_an_image_the_same_offset():
    size = 50
    spec = RelativeLocation(all_pairs=True, yoked_jitter=True).for_crop(size)
    made = relative_location(positions(8, size), spec, generator(7))
    offsets = []
    for i in range(8):
        rows = [8 * i, *(64 + 8 * i + k for k in range(8))]  # its centre, then its 8 neighbours (64 pairs)
        found = {((y - 1) % 16, (x - 1) % 16) for _, y, x in (assert_is_region(made.images[r], size) for r in rows)}
        assert len(found) == 1
        offsets.append(found.pop())
    assert len(set(offsets)) > 1  # one offset per image, not one for all


# ------------------------------------------------------------------------------- anti-shortcut options


def test_colour_dropping_keeps_one_channel_per_patch_and_fills_the_others_with_faint_noise():
    scales = torch.tensor([1.0, 5.0, 20.0]).view(1, 3, 1, 1)  # channels of very different spread
    patches = torch.randn(60, 3, 12, 12, generator=generator(8)) * scales + 3.0
    dropped = drop_colours(patches, generator(9))
    kept = []
    for before, after in zip(patches, dropped):
        same = [c for c in range(3) if torch.equal(before[c], after[c])]
        assert len(same) == 1
        keep = same[0]
        kept.append(keep)
        reference = before[keep].std()
        for c in set(range(3)) - {keep}:
            ratio = (after[c].std() / reference).item()
            assert 0.007 < ratio < 0.013, ratio  # 1/100 of the kept channel's std (144 pixels: ~6 % spread)
            assert after[c].mean().abs() < 0.005 * reference  # noise around zero: the colour is gone
    assert set(kept) == {0, 1, 2}


def test_projection_removes_the_green_magenta_component_and_keeps_grey():
    patches = torch.randn(4, 3, 5, 5, generator=generator(10))
    patches[:, :, 0, 0] = torch.tensor([0.7, 0.7, 0.7])  # grey pixels
    projected = project_out_green_magenta(patches)
    axis = torch.tensor([-1.0, 2.0, -1.0]).view(1, 3, 1, 1)
    assert (projected * axis).sum(dim=1).abs().max() < 1e-5
    torch.testing.assert_close(projected[:, :, 0, 0], torch.full((4, 3), 0.7))
    removed = patches - projected  # only along (-1, 2, -1): r and b lose the same, g twice that back
    torch.testing.assert_close(removed[:, 0], removed[:, 2])
    torch.testing.assert_close(removed[:, 1], -2 * removed[:, 0])
    green = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)  # (0, 1, 0) - (2/6) (-1, 2, -1) = grey 1/3
    torch.testing.assert_close(project_out_green_magenta(green).flatten(), torch.full((3,), 1 / 3))


def test_chroma_blur_keeps_each_pixels_grey_level_and_smooths_its_colour():
    patches = torch.rand(4, 3, 12, 12, generator=generator(11))
    blurred = blur_chroma(patches)
    torch.testing.assert_close(blurred.mean(dim=1), patches.mean(dim=1))
    chroma = patches - patches.mean(dim=1, keepdim=True)
    blurred_chroma = blurred - blurred.mean(dim=1, keepdim=True)
    assert blurred_chroma.var() < chroma.var() / 4  # per-pixel noise averaged over 4x4 blocks
    uniform = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(2, 3, 12, 12)
    torch.testing.assert_close(blur_chroma(uniform), uniform)  # one colour everywhere: nothing to blur


def test_random_aperture_shows_each_patch_through_a_square_window_of_half_a_patch_or_more():
    patches = torch.rand(50, 3, 12, 12, generator=generator(12)) + 1.0  # no zero inside the window
    windowed = random_aperture(patches, generator(13))
    heights = set()
    for before, after in zip(patches, windowed):
        inside = after[0] != 0
        rows, columns = inside.any(dim=1).nonzero().flatten(), inside.any(dim=0).nonzero().flatten()
        top, bottom, left, right = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
        assert inside[top:bottom, left:right].all() and inside.sum() == (bottom - top) * (right - left)
        assert bottom - top >= 6 and right - left >= 6
        assert torch.equal(after[:, top:bottom, left:right], before[:, top:bottom, left:right])
        assert (after == 0).sum() == 3 * (144 - inside.sum())
        heights.add(int(bottom - top))
    assert len(heights) > 2


# -------------------------------------------------------------------------------------- permutation set


def greedy_reference(count: int, tiles: int, first: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Noroozi & Favaro's greedy set from `first`, written plainly: each next permutation has the largest
    summed Hamming distance to those chosen, ties to the lexicographically first."""
    candidates = list(itertools.permutations(range(tiles)))
    chosen = [first]
    while len(chosen) < count:
        def total(candidate):
            return sum(sum(a != b for a, b in zip(candidate, other)) for other in chosen)
        remaining = [c for c in candidates if c not in chosen]
        best = max(total(c) for c in remaining)
        chosen.append(next(c for c in remaining if total(c) == best))
    return chosen


def test_permutation_set_of_four_tiles_is_the_greedy_maximal_hamming_set():
    everything = permutation_set(24, 4)
    assert everything.dtype == torch.int64 and everything.shape == (24, 4)
    assert {tuple(p) for p in everything.tolist()} == set(itertools.permutations(range(4)))

    for seed in (0, 1):
        chosen = permutation_set(10, 4, seed)
        rows = [tuple(p) for p in chosen.tolist()]
        assert len(set(rows)) == 10 and all(sorted(p) == [0, 1, 2, 3] for p in rows)
        assert rows == greedy_reference(10, 4, rows[0])
        # the first 4 differ at every position (a 4x4 Latin rectangle can always be completed)
        assert minimum_hamming(chosen[:4]) == 4
    assert torch.equal(permutation_set.__wrapped__(10, 4, 0), permutation_set.__wrapped__(10, 4, 0))
    assert not torch.equal(permutation_set.__wrapped__(10, 4, 0), permutation_set.__wrapped__(10, 4, 1))
    with pytest.raises(ValueError, match="25 permutations asked, 24 candidates"):
        permutation_set.__wrapped__(25, 4, 0)


def test_permutation_set_of_nine_tiles_starts_with_nine_mutually_disagreeing_orders():
    chosen = permutation_set(20, 9)
    assert chosen.shape == (20, 9) and len({tuple(p) for p in chosen.tolist()}) == 20
    assert all(sorted(p) == list(range(9)) for p in chosen.tolist())
    assert minimum_hamming(chosen[:9]) == 9
    assert torch.equal(permutation_set.__wrapped__(20, 9, 0), chosen)


def test_minimum_hamming_is_the_closest_pair_of_a_hand_made_set():
    assert minimum_hamming(torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3], [3, 2, 1, 0]])) == 2
    assert minimum_hamming(torch.tensor([[0, 1, 2], [1, 2, 0], [2, 0, 1]])) == 3
    assert minimum_hamming(torch.tensor([[0, 1, 2, 3], [0, 1, 3, 2], [1, 0, 3, 2], [3, 2, 0, 1]])) == 2


# --------------------------------------------------------------------------------------------- losses


def test_log_sinkhorn_makes_doubly_stochastic_matrices_with_its_default_iterations():
    scores = torch.randn(16, 9, 9, generator=generator(14))
    p = log_sinkhorn(scores).exp()
    torch.testing.assert_close(p.sum(dim=-1), torch.ones(16, 9), atol=1e-4, rtol=0)
    torch.testing.assert_close(p.sum(dim=-2), torch.ones(16, 9), atol=1e-4, rtol=0)
    large = log_sinkhorn(1000 * scores).exp()  # in log space: no overflow
    assert torch.isfinite(large).all()
    torch.testing.assert_close(large.sum(dim=-2), torch.ones(16, 9), atol=1e-4, rtol=0)
    torch.testing.assert_close(log_sinkhorn(torch.zeros(1, 3, 3)), torch.full((1, 3, 3), -math.log(3)))


def test_permutation_loss_is_zero_for_the_true_permutation_and_large_for_a_wrong_one():
    order = torch.tensor([[2, 0, 1, 3]])
    favoured = 20 * nn.functional.one_hot(order, 4).float()  # score 20 at (j, order[j]), 0 elsewhere
    loss, accuracy = permutation_loss(log_sinkhorn(favoured), order)
    assert loss.item() < 1e-3 and accuracy.item() == 1.0
    wrong = torch.tensor([[0, 1, 3, 2]])  # differs from `order` at every position
    loss, accuracy = permutation_loss(log_sinkhorn(20 * nn.functional.one_hot(wrong, 4).float()), order)
    assert loss.item() > 10 and accuracy.item() == 0.0
    uniform = torch.full((1, 4, 4), -math.log(4))
    assert permutation_loss(uniform, order)[0].item() == pytest.approx(math.log(4))


def test_classification_loss_is_cross_entropy_and_top1_accuracy():
    logits = torch.zeros(4, 4)
    logits[1, 3] = 5.0
    loss, accuracy = classification_loss(logits, torch.tensor([0, 3, 2, 1]))
    ce_second = math.log(3 + math.exp(5)) - 5
    assert loss.item() == pytest.approx((3 * math.log(4) + ce_second) / 4, rel=1e-6)
    assert accuracy.item() == 0.5  # argmax: 0 for the flat rows (right for the first), 3 for the second


# ----------------------------------------------------------------------------------------------- recipe


@pytest.mark.parametrize("task, fragments", [
    (Jigsaw(cell=20), ["jigsaw grid 3 x 20-px cells is 60 px", "48-px crop"]),
    (Jigsaw(patch=20), ["jigsaw patch=20 px", "16-px cell"]),
    (Jigsaw(cell=10, patch=11), ["jigsaw patch=11 px", "10-px cell"]),
    (Jigsaw(grid=2, permutations=25), ["jigsaw permutations=25", "24 orders"]),
    (Jigsaw(grid=1), ["jigsaw grid=1"]),
    (RelativeLocation(grid=2), ["relloc grid=2", "3x3 grid"]),
    (RelativeLocation(cell=17), ["relloc grid 3 x 17-px cells is 51 px", "48-px crop"]),
])
def test_a_geometry_that_does_not_fit_the_crop_is_a_one_line_recipe_error(task, fragments):
    for make in (lambda: task.for_crop(48), lambda: preset("jigsaw").with_multicrop("1x48").with_pretext([task])):
        with pytest.raises(RecipeError) as raised:
            make()
        message = str(raised.value)
        assert "\n" not in message and all(fragment in message for fragment in fragments), message


def test_for_crop_fills_cell_and_patch_from_the_crop_size():
    for kind in (Jigsaw, RelativeLocation):
        for size, cell, patch in ((255, 85, 64), (48, 16, 12), (32, 10, 8), (50, 16, 12)):
            resolved = kind().for_crop(size)
            assert (resolved.cell, resolved.patch) == (cell, patch), (kind, size)
        assert kind(cell=15).for_crop(48).patch == 11  # round(15 * 64 / 85) = round(11.29)
        assert (kind(cell=15, patch=9).for_crop(48).cell, kind(cell=15, patch=9).for_crop(48).patch) == (15, 9)
    assert Jigsaw(grid=2, permutations=24).for_crop(48).cell == 24
    assert Rotation().for_crop(17) == Rotation()


def test_recipes_carry_the_resolved_pretext_describe_it_and_evaluation_drops_it():
    recipe = preset("jigsaw").with_multicrop("1x48")
    (task,) = recipe.pretext
    assert (task.cell, task.patch, task.permutations) == (16, 12, 1000)
    assert ("  pretext jigsaw: 3x3 cells of 16 px, 12-px patches (jitter 4), 1000 permutations (seed 0), "
            "tiles standardised") in recipe.describe().splitlines()
    assert preset("jigsaw").with_multicrop("1x255").pretext[0].cell == 85

    tasks = [Rotation(all_four=False), Jigsaw(permutations=0, normalise_tiles=False),
             RelativeLocation(all_pairs=True, projection=True)]
    lines = preset("multitask").with_multicrop("1x48").with_pretext(tasks).describe().splitlines()
    assert lines[-3:] == [
        "  pretext rotation: one random of 0/90/180/270 per image",
        "  pretext jigsaw: 3x3 cells of 16 px, 12-px patches (jitter 4), every order",
        "  pretext relloc: 3x3 cells of 16 px, 12-px patches (jitter 4), all_pairs, projection",
    ]
    assert "pretext" not in preset("multitask").describe() and preset("multitask").pretext == ()
    assert preset("rotnet").pretext == (Rotation(),)
    assert eval_recipe(recipe).pretext == () and eval_recipe(preset("rotnet")).pretext == ()
    with pytest.raises(RecipeError, match="each pretext task may appear once"):
        recipe.with_pretext([Jigsaw(), Jigsaw(grid=2, permutations=2)])


# ----------------------------------------------------------------------------------- methods in process


class CountingBackbone(nn.Module):
    """A backbone that records the shape of every batch it is called on."""

    def __init__(self, inner: nn.Module, num_features: int):
        super().__init__()
        self.inner = inner
        self.num_features = num_features
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.inner(x)


def test_features_by_shape_runs_the_backbone_once_per_distinct_shape_and_keeps_the_order():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # no batch statistics
    backbone = CountingBackbone(inner, 5)
    method = PretextMethod(backbone, on_gpu=False)
    a, b, c = torch.randn(4, 3, 8, 8), torch.randn(6, 3, 4, 4), torch.randn(2, 3, 8, 8)
    features = method.features_by_shape([a, b, c])
    assert backbone.calls == [(6, 3, 8, 8), (6, 3, 4, 4)]  # a and c together, b alone
    for got, images in zip(features, (a, b, c)):
        torch.testing.assert_close(got, inner(images))


def multitask_batch(method, batch_size: int = 4, size: int = 48, seed: int = 0):
    recipe = method.adapt_recipe(preset("multitask").with_multicrop(f"1x{size}"))
    images = torch.randn(batch_size, 3, size, size, generator=generator(seed))
    pretext = PretextStage(recipe.pretext, "cpu")(images, generator(seed + 1))
    return SimpleNamespace(views=[images], pretext=pretext, batch_size=batch_size, counts=[1],
                           labels=torch.arange(batch_size) % 10)


def test_multitask_runs_one_forward_per_input_shape_and_sums_the_weighted_task_losses():
    import timm

    torch.manual_seed(0)
    backbone = CountingBackbone(timm.create_model("resnet10t", num_classes=0), 512)
    method = create_method("multitask", backbone=backbone, on_gpu=False, weights="1+0.5+2",
                           jigsaw_permutations=20, relloc_all_pairs=True)
    assert list(method.heads) == ["rotation", "jigsaw", "relloc"]
    assert method.heads["jigsaw"].spec.permutations == 20 and method.heads["relloc"].spec.all_pairs
    assert method.weights == {"rotation": 1.0, "jigsaw": 0.5, "relloc": 2.0} and not method.needs_labels
    batch = multitask_batch(method)
    loss, metrics = method(batch, Progress(step=0, epoch=0, total_steps=10, steps_per_epoch=10))
    # the rotations (4 x 4 crops of 48 px) in one forward, the 9 x 4 jigsaw tiles and 2 x 32 relloc patches
    # (all 12 px) in another
    assert backbone.calls == [(16, 3, 48, 48), (36 + 64, 3, 12, 12)]
    total = metrics["rotation_loss"] + 0.5 * metrics["jigsaw_loss"] + 2 * metrics["relloc_loss"]
    torch.testing.assert_close(loss.detach(), total)
    assert {"rotation_accuracy", "jigsaw_accuracy", "relloc_accuracy"} <= metrics.keys()
    loss.backward()
    assert all(p.grad is not None for p in method.heads.parameters())


@pytest.mark.parametrize("options, message", [
    ({"tasks": "rotnet+mae"}, "multitask tasks='rotnet+mae'"),
    ({"tasks": "jigsaw+jigsaw"}, "at most once"),
    ({"tasks": "rotnet+relloc", "weights": "1+2+3"}, "give one weight per task (2)"),
])
def test_multitask_rejects_unknown_or_repeated_tasks_and_a_wrong_weight_count(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        create_method("multitask", backbone="resnet10t", on_gpu=False, **options)


def test_pretext_heads_reject_options_that_cannot_work():
    with pytest.raises(ValueError, match="supervised_weight needs num_classes"):
        create_method("rotnet", backbone="resnet10t", on_gpu=False, supervised_weight=1.0)
    with pytest.raises(ValueError, match="num_classes needs all_four=true"):
        create_method("rotnet", backbone="resnet10t", on_gpu=False, num_classes=10, all_four=False)
    with pytest.raises(ValueError, match="head=classifier needs a permutation set"):
        create_method("jigsaw", backbone="resnet10t", on_gpu=False, permutations=0)
    with pytest.raises(ValueError, match="jigsaw head='mlp'"):
        create_method("jigsaw", backbone="resnet10t", on_gpu=False, head="mlp")
    sinkhorn = create_method("jigsaw", backbone="resnet10t", on_gpu=False, head="sinkhorn")
    assert sinkhorn.heads["jigsaw"].spec.permutations == 0  # every order of the tiles
    assert create_method("jigsaw", backbone="resnet10t", on_gpu=False, grid=2).heads["jigsaw"].spec.permutations == 24
    for name in ("rotnet", "jigsaw", "relloc", "multitask"):
        with pytest.raises(ValueError, match="one crop per image"):
            METHODS[name].check_recipe(preset(name).with_multicrop("2x32"), 8)


def test_rotation_scores_of_a_zeroed_head_are_four_log_four_and_one_over_the_classes():
    head = RotationHead(6, Rotation(), num_classes=5, supervised_weight=1.0)
    for parameter in head.parameters():
        nn.init.zeros_(parameter)
    scores = head.scores(torch.randn(4 * 3, 6), batch_size=3)  # every logit 0
    torch.testing.assert_close(scores["rotation_loss"], torch.full((3,), 4 * math.log(4)))
    torch.testing.assert_close(scores["max_softmax"], torch.full((3,), 1 / 5))
    assert head.needs_labels and not RotationHead(6, Rotation()).needs_labels


def test_the_input_stack_makes_the_recipes_pretext_inputs_from_the_first_views():
    from pipelines.shards import DEMO_VAL
    from pipelines.stack import InputStack

    task = Jigsaw(grid=2, permutations=24, normalise_tiles=False)
    recipe = preset("jigsaw").with_multicrop("1x48").with_pretext([task, Rotation()])
    stack = InputStack(recipe, DEMO_VAL, 4, num_threads=1, seed=1)
    batch = next(stack)
    view = batch.views[0]
    rotation, puzzle = batch.pretext["rotation"], batch.pretext["jigsaw"]
    assert torch.equal(rotation.images, torch.cat([torch.rot90(view, k, dims=(2, 3)) for k in range(4)]))
    assert puzzle.images.shape == (16, 3, 18, 18)  # 2x2 cells of 24 px, round(24 * 64 / 85) = 18-px tiles
    assert torch.equal(puzzle.order, permutation_set(24, 4)[puzzle.labels])
    for i in range(4):
        for j in range(4):
            row, column = divmod(int(puzzle.order[i, j]), 2)
            tile = puzzle.images[i * 4 + j]
            assert any(torch.equal(tile, view[i, :, 24 * row + dy:24 * row + dy + 18, 24 * column + dx:
                                              24 * column + dx + 18])
                       for dy in range(7) for dx in range(7))
    again = InputStack(recipe, DEMO_VAL, 4, num_threads=1, seed=1)
    assert torch.equal(next(again).pretext["jigsaw"].images, puzzle.images)  # seeded


# ---------------------------------------------------------------------------------------------- train.py


RUNS = {  # id: (method, --multicrop, --method-options)
    "rotnet": ("rotnet", "1x32", ""),
    "jigsaw": ("jigsaw", "1x48", ""),
    "jigsaw-sinkhorn": ("jigsaw", "1x48", "head=sinkhorn"),
    "relloc": ("relloc", "1x48", "all_pairs=true,color_dropping=true,projection=true"),
    "multitask": ("multitask", "1x48", "jigsaw_permutations=100"),
}


@pytest.mark.slow
@pytest.mark.parametrize("run_id", list(RUNS))
def test_train_py_runs_each_pretext_method_exports_and_resumes_exactly(run_id, tmp_path):
    import timm
    import yaml
    from safetensors.torch import load_file
    from test_train import (
        BACKBONE,
        assert_four_steps_resume_exactly_from_step_two,
        assert_ok,
        checkpoints,
        losses,
        train,
    )

    name, multicrop, options = RUNS[run_id]
    args = ["--method", name, "--multicrop", multicrop, "--max-steps", 4, "--checkpoint-every", 2,
            *(["--method-options", options] if options else [])]
    result = train(*args, "--output-dir", tmp_path / "full", "--name", "run")
    assert_ok(result)
    run = tmp_path / "full" / "run"
    full = losses(run)
    assert list(full) == [1, 2, 3, 4] and all(math.isfinite(value) for value in full.values())
    assert checkpoints(run) == ["step-00000002", "step-00000004"]
    model = timm.create_model(BACKBONE, num_classes=0)
    model.load_state_dict(load_file(run / "backbone.safetensors"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    tasks = {task["task"]: task for task in saved["recipe"]["pretext"]}
    expected = {"rotnet": ["rotation"], "jigsaw": ["jigsaw"], "relloc": ["relloc"],
                "multitask": ["rotation", "jigsaw", "relloc"]}[name]
    assert list(tasks) == expected
    if "jigsaw" in tasks:  # the method's options reach the recipe, resolved for the 48-px crop
        assert (tasks["jigsaw"]["cell"], tasks["jigsaw"]["patch"]) == (16, 12)
        permutations = {"jigsaw": 1000, "jigsaw-sinkhorn": 0, "multitask": 100}[run_id]
        assert tasks["jigsaw"]["permutations"] == permutations
        written = run / "jigsaw_permutations.json"  # the set the run drew from; none for every order
        if permutations:
            assert json.loads(written.read_text()) == permutation_set(permutations, 9).tolist()
        else:
            assert not written.exists()
    assert_four_steps_resume_exactly_from_step_two(args, run, tmp_path)


@pytest.mark.slow
def test_train_py_rotnet_with_a_class_head_trains_on_the_labeled_shards(tmp_path):
    from test_train import assert_ok, metrics, train

    result = train("--data", LABELED_TRAIN, "--method", "rotnet", "--multicrop", "1x32", "--max-steps", 2,
                   "--method-options", "num_classes=10,supervised_weight=1,rotation_weight=0.5",
                   "--output-dir", tmp_path, "--name", "run")
    assert_ok(result)
    records = [record for record in metrics(tmp_path / "run") if "loss" in record]
    assert [record["step"] for record in records] == [1, 2]
    for record in records:
        total = 0.5 * record["rotation_rotation_loss"] + record["rotation_class_loss"]
        assert record["loss"] == pytest.approx(total, rel=1e-5)
        assert 0 <= record["rotation_class_accuracy"] <= 1 and math.isfinite(record["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("args, fragments", [
    (["--method", "rotnet", "--multicrop", "1x32", "--method-options", "supervised_weight=1"],
     ["rotnet supervised_weight needs num_classes=N"]),
    (["--method", "jigsaw", "--multicrop", "1x48", "--method-options", "cell=20"],
     ["jigsaw grid 3 x 20-px cells is 60 px", "48-px crop"]),
    (["--method", "jigsaw", "--multicrop", "1x48", "--method-options", "permutations=0"],
     ["jigsaw head=classifier needs a permutation set"]),
    (["--method", "relloc", "--multicrop", "2x48"], ["relloc makes its inputs from one crop per image"]),
])
def test_train_py_rejects_unusable_pretext_options_in_one_line(args, fragments, tmp_path):
    from test_train import assert_one_line_error, train

    assert_one_line_error(train(*args, "--output-dir", tmp_path, "--name", "run"), *fragments)
