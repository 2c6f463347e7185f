"""The input stack end to end on the committed demo shards: real DALI pipelines, real Kornia ops."""

import dataclasses
import io
import tarfile

import numpy as np
import pytest
import torch
from nvidia.dali import Pipeline
from PIL import Image

from pipelines.dali_stage import DaliConfig, build_pipeline, define_graph, output_names
from pipelines.shards import DEMO_TRAIN, ShardError, open_shard_set
from pipelines.spec import NO_PHOTOMETRIC, Recipe, ViewGroup, preset
from pipelines.stack import InputStack


@pytest.fixture(scope="module")
def demo():
    return open_shard_set(DEMO_TRAIN)


def _geometry_recipe(scale=(0.2, 1.0), size=24, count=2, mean=None, std=None, interpolation="bilinear"):
    group = ViewGroup(count, size, scale, (NO_PHOTOMETRIC,), interpolation=interpolation)
    return Recipe("geometry", (group,), mean=mean, std=std)


def _collect(stack, steps):
    return [next(stack) for _ in range(steps)]


def test_crop_area_and_aspect_stay_in_the_recipe_ranges_and_flips_are_fair(demo):
    low, high = 0.2, 0.6
    stack = InputStack(_geometry_recipe(scale=(low, high)), demo, batch_size=256, seed=3)
    batches = _collect(stack, 4)
    boxes = torch.cat([b.boxes[0] for b in batches])
    sizes = torch.cat([b.image_sizes.repeat(2, 1) for b in batches]).float()
    area = boxes[:, 2] * boxes[:, 3] / (sizes[:, 0] * sizes[:, 1])
    # integer box sides on 28x28 images move the area by up to about one row or column
    slack = 2 / 28
    assert ((area >= low - slack) & (area <= high + slack)).float().mean() > 0.99
    assert area.mean().item() == pytest.approx((low + high) / 2, abs=0.05)
    aspect = boxes[:, 3] / boxes[:, 2]
    assert ((aspect >= 0.75 * 0.8) & (aspect <= 4 / 3 * 1.25)).float().mean() > 0.99
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= sizes[:, 0]).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= sizes[:, 1]).all()
    flips = torch.cat([b.flips[0] for b in batches]).float()
    assert abs(flips.mean().item() - 0.5) < 4 * (0.25 / len(flips)) ** 0.5


def _originals(shards, keys):
    wanted = {f"{key}.jpg" for key in keys}
    found = {}
    for tar in shards.tars:
        with tarfile.open(tar) as archive:
            for member in archive:
                if member.name in wanted:
                    found[member.name[:-4]] = Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB")
    return [found[key] for key in keys]


def test_crop_boxes_and_flips_match_the_pixels(demo):
    size = 28
    stack = InputStack(_geometry_recipe(size=size, count=1), demo, batch_size=32, seed=5)
    batch = next(stack)
    views = (batch.views[0] * 255).permute(0, 2, 3, 1).numpy()
    own, other = [], []
    for i, image in enumerate(_originals(stack.shards, batch.keys)):
        def crop(box, flip):
            y0, x0, h, w = box.tolist()
            patch = image.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
            return np.asarray(patch.transpose(Image.FLIP_LEFT_RIGHT) if flip else patch, dtype=np.float32)

        own.append(np.abs(crop(batch.boxes[0][i], batch.flips[0][i]) - views[i]).mean())
        j = (i + 1) % batch.batch_size
        other.append(np.abs(crop(batch.boxes[0][j], not batch.flips[0][i]) - views[i]).mean())
    assert np.median(own) < 6.0, "a view must be its reported box of its own image (decoder noise only)"
    assert np.median(other) > 3 * np.median(own)


def test_normalisation_uses_the_recipe_mean_and_std(demo):
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    raw = next(InputStack(_geometry_recipe(), demo, batch_size=16, seed=9))
    normalised = next(InputStack(_geometry_recipe(mean=mean, std=std), demo, batch_size=16, seed=9))
    expected = (raw.views[0] - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalised.views[0], expected, atol=1e-5, rtol=0)
    assert raw.views[0].min() >= 0 and raw.views[0].max() <= 1


def test_multicrop_batch_layout_labels_and_keys(demo):
    recipe = preset("swav").with_multicrop("2x32+4x16")
    batch = next(InputStack(recipe, demo, batch_size=8, seed=0))
    assert [tuple(v.shape) for v in batch.views] == [(16, 3, 32, 32), (32, 3, 16, 16)]
    assert batch.counts == [2, 4] and batch.view(1, 3).shape == (8, 3, 16, 16)
    assert batch.labels.dtype == torch.int64 and ((batch.labels >= 0) & (batch.labels < 10)).all()
    assert len(set(batch.keys)) == 8 and all(key.isdigit() for key in batch.keys)
    assert batch.masks is None and torch.isfinite(batch.views[1]).all()


def test_dali_hands_over_planar_uint8_crops(demo):
    recipe = preset("swav").with_multicrop("2x32+4x16")
    outputs = dict(zip(output_names(recipe), build_pipeline(recipe, demo, DaliConfig(batch_size=4)).run()))
    for name, size in (("view_0_1", 32), ("view_1_3", 16)):
        crops = outputs[name].as_array()
        assert crops.shape == (4, 3, size, size) and crops.dtype == np.uint8


def test_under_mixed_decode_every_output_but_the_keys_leaves_dali_on_the_gpu(demo):
    """Small outputs computed on the CPU are moved by DALI: the consumer never copies from pageable memory."""
    recipe = preset("swav").with_multicrop("2x32+4x16")
    for device_id, expected in ((None, "cpu"), (0, "gpu")):
        config = DaliConfig(batch_size=4, device_id=device_id)
        with Pipeline(batch_size=4, num_threads=1, device_id=device_id):  # the graph only: no GPU needed
            nodes = define_graph(recipe, demo, config)
        devices = dict(zip(output_names(recipe), (node.device for node in nodes)))
        assert len(devices) == len(nodes) and devices.pop("key") == "cpu"
        assert set(devices.values()) == {expected}, (device_id, devices)


def test_masks_come_with_masked_recipes(demo):
    recipe = preset("mae")
    recipe = dataclasses.replace(recipe, masking=dataclasses.replace(recipe.masking, patch_size=4)).with_multicrop("1x32")
    batch = next(InputStack(recipe, demo, batch_size=8, seed=0))
    assert batch.masks.shape == (8, 64) and (batch.masks.sum(1) == 48).all()


def test_two_ranks_read_disjoint_samples_that_cover_the_epoch(demo):
    keys = []
    for rank in range(2):
        stack = InputStack(_geometry_recipe(size=8, count=1), demo, batch_size=500, rank=rank, world_size=2, seed=1)
        assert stack.steps_per_epoch == demo.num_samples // 2 // 500
        keys.append([k for b in _collect(stack, stack.steps_per_epoch) for k in b.keys])
    assert not set(keys[0]) & set(keys[1])
    assert len(set(keys[0]) | set(keys[1])) == demo.num_samples


def test_epochs_are_reshuffled_and_counted(demo):
    stack = InputStack(_geometry_recipe(size=8, count=1), demo, batch_size=2500, seed=2)
    first = [k for b in _collect(stack, 4) for k in b.keys]
    assert stack.epoch == 0 and stack.step_in_epoch == 4
    second = [k for b in _collect(stack, 4) for k in b.keys]
    assert stack.epoch == 1
    assert sorted(first) == sorted(second) and first != second


def test_state_dict_restores_the_identical_next_batch(demo):
    recipe = preset("dino").with_multicrop("2x24+2x12")
    stack = InputStack(recipe, demo, batch_size=16, seed=7)
    _collect(stack, 3)
    state = stack.state_dict()
    expected = next(stack)
    resumed = InputStack(recipe, demo, batch_size=16, seed=7)
    resumed.load_state_dict(state)
    got = next(resumed)
    assert got.keys == expected.keys
    for a, b in zip(got.views + got.boxes, expected.views + expected.boxes):
        assert torch.equal(a, b)
    assert resumed.step_in_epoch == stack.step_in_epoch


def test_state_of_another_configuration_is_refused(demo):
    stack = InputStack(_geometry_recipe(), demo, batch_size=16)
    state = stack.state_dict()
    other = InputStack(_geometry_recipe(), demo, batch_size=8)
    with pytest.raises(ShardError, match="resume with the same settings"):
        other.load_state_dict(state)


def test_same_seed_same_stream_different_seed_differs(demo):
    recipe = preset("byol").with_multicrop("2x16")
    a = next(InputStack(recipe, demo, batch_size=8, seed=11))
    b = next(InputStack(recipe, demo, batch_size=8, seed=11))
    c = next(InputStack(recipe, demo, batch_size=8, seed=12))
    assert torch.equal(a.views[0], b.views[0]) and a.keys == b.keys
    assert not torch.equal(a.views[0], c.views[0])


def test_bad_input_gives_one_line_errors(demo, tmp_path):
    with pytest.raises(ShardError) as error:
        InputStack(_geometry_recipe(), tmp_path, batch_size=4)
    assert "\n" not in str(error.value)
    with pytest.raises(ShardError, match="--batch-size"):
        InputStack(_geometry_recipe(), demo, batch_size=demo.num_samples + 1)
