import pytest

from pipelines.spec import PRESETS, Masking, RecipeError, format_multicrop, parse_multicrop, preset



@pytest.mark.parametrize(
    "spec, expected",
    [
        ("2x224+6x96", [(2, 224, None), (6, 96, None)]),
        ("2x224@0.14-1+6x96@0.05-0.14", [(2, 224, (0.14, 1.0)), (6, 96, (0.05, 0.14))]),
        ("1x32", [(1, 32, None)]),
        ("2x32@.2-1", [(2, 32, (0.2, 1.0))]),
    ],
)
def test_parse_multicrop_good(spec, expected):
    assert parse_multicrop(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["", "2x", "x224", "2*224", "2x224+", "0x224", "2x0", "2x224@1-0.5", "2x224@0-1", "2x224@0.2-1.5",
     "2x224+4x224", "2x224;6x96", "abc", "2x224@0.2"],
)
def test_parse_multicrop_rejects_bad_specs_with_a_one_line_message(spec):
    with pytest.raises(RecipeError) as error:
        parse_multicrop(spec)
    message = str(error.value)
    assert "--multicrop" in message and "\n" not in message


@pytest.mark.parametrize("spec", ["2x224@0.14-1+6x96@0.05-0.14", "2x32@0.2-1+4x16@0.05-0.2", "1x64@0.5-0.5"])
def test_multicrop_round_trips(spec):
    recipe = preset("swav").with_multicrop(spec)
    assert recipe.multicrop == spec
    assert parse_multicrop(format_multicrop(recipe.groups)) == parse_multicrop(spec)


def test_every_method_has_a_preset():
    from models.methods import METHODS

    assert sorted(PRESETS) == sorted(METHODS)


def test_swav_preset_follows_the_paper():
    swav = preset("swav")
    assert swav.multicrop == "2x224@0.14-1+6x96@0.05-0.14"
    assert swav.std == (0.228, 0.224, 0.225)
    view = swav.groups[0].view_photometric(0)
    assert (view.brightness, view.contrast, view.saturation, view.hue, view.jitter_p) == (0.8, 0.8, 0.8, 0.2, 0.8)
    assert all(group.view_photometric(0).blur_p == 0.5 for group in swav.groups)
    # 2x224 alone uses the (0.08, 1) scale of the paper's no-multi-crop run
    assert swav.with_multicrop("2x224").groups[0].scale == (0.08, 1.0)
    assert swav.with_multicrop("2x224+6x96").groups[1].scale == (0.05, 0.14)


def test_small_global_crops_take_the_small_image_scale_unless_the_spec_gives_one():
    swav = preset("swav")
    small = swav.with_multicrop("2x32+4x16")
    assert [group.scale for group in small.groups] == [(0.3, 1.0), (0.05, 0.14)]
    assert swav.with_multicrop("2x64+4x32").groups[0].scale == (0.3, 1.0)
    assert swav.with_multicrop("2x96+4x48").groups[0].scale == (0.14, 1.0)  # above SMALL_GLOBAL_CROP
    assert swav.with_multicrop("2x32@0.14-1+4x16").groups[0].scale == (0.14, 1.0)  # given in the spec
    assert swav.with_multicrop("2x32").groups[0].scale == (0.08, 1.0)  # no local crops: global_only_scale
    assert "2x32 scale=(0.3, 1.0)" in small.describe()  # printed at start-up
    assert preset("dino").with_multicrop("2x32+4x16").groups[0].scale == (0.4, 1.0)  # only SwAV sets one


def test_blur_sigma_scales_with_each_groups_crop_size():
    swav = preset("swav")
    assert swav.with_multicrop("2x224+6x96") == swav  # the paper's recipe is untouched
    small = swav.with_multicrop("2x32+4x16")
    low, high = small.groups[0].view_photometric(0).blur_sigma
    assert low == pytest.approx(0.1 * 32 / 224) and high == pytest.approx(2.0 * 32 / 224)
    low, high = small.groups[1].view_photometric(0).blur_sigma
    assert low == pytest.approx(0.1 * 16 / 96) and high == pytest.approx(2.0 * 16 / 96)
    assert "blur(0.0143, 0.286)@0.5" in small.describe()
    # relative to the recipe it starts from, so resizing again composes
    assert small.with_multicrop("2x64+4x32").groups[0].view_photometric(0).blur_sigma == pytest.approx(
        swav.with_multicrop("2x64+4x32").groups[0].view_photometric(0).blur_sigma)


@pytest.mark.parametrize("method", ["dino", "byol", "mocov3", "barlowtwins", "vicreg", "sim"])
def test_asymmetric_presets_blur_and_solarize_per_view(method):
    first, second = (preset(method).groups[0].view_photometric(i) for i in range(2))
    assert (first.blur_p, second.blur_p) == (1.0, 0.1)
    assert (first.solarize_p, second.solarize_p) == (0.0, 0.2)


def test_dino_locals_and_interpolation():
    dino = preset("dino")
    assert dino.multicrop == "2x224@0.4-1+8x96@0.05-0.4"
    assert all(group.interpolation == "bicubic" for group in dino.groups)
    assert dino.groups[1].view_photometric(5).blur_p == 0.5


def test_with_multicrop_cycles_per_view_photometric():
    dino = preset("dino").with_multicrop("4x32+2x16")
    views = [dino.groups[0].view_photometric(i) for i in range(4)]
    assert [v.blur_p for v in views] == [1.0, 0.1, 1.0, 0.1]


def test_simclr_has_no_normalisation_and_mae_no_photometric():
    assert preset("simclr").mean is None and preset("simclr").std is None
    mae = preset("mae")
    assert mae.groups[0].view_photometric(0).is_identity
    assert mae.masking == Masking("random", 0.75, patch_size=16)
    assert preset("sim").masking.num_masked(224) == 118


def test_masking_needs_divisible_crop_size():
    with pytest.raises(RecipeError, match="patch size"):
        preset("mae").with_multicrop("1x40")


def test_unknown_method():
    with pytest.raises(RecipeError, match="no recipe preset"):
        preset("nope")


def test_recipe_description_and_dict():
    text = preset("byol").describe()
    assert "view 2" in text and "solarize@0.2" in text
    assert preset("byol").to_dict()["groups"][0]["count"] == 2
