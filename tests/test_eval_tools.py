"""tools/eval_knn.py on a real short run: export and checkpoint give the same answer; bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.knn import top_k_accuracies
from test_train import DATA, assert_ok, train
from tools.eval_knn import main

ROOT = Path(__file__).resolve().parents[1]


def test_top_k_accuracies_on_known_scores():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    labels = torch.tensor([0, 2, 2])
    top1, top5 = top_k_accuracies(scores, labels)
    assert top1 == pytest.approx(100 / 3) and top5 == pytest.approx(100.0)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("eval")
    assert_ok(train("--max-steps", 2, "--checkpoint-every", 2, "--output-dir", output, "--name", "run"))
    return output / "run"


@pytest.mark.slow
def test_knn_of_the_export_and_of_the_checkpoint_agree(short_run, tmp_path, capsys):
    info = json.loads((short_run / "backbone.json").read_text())
    assert info["input_size"] == 32 and info["model_kwargs"] == {}
    runs = []
    for source in (short_run, short_run / "checkpoints" / "step-00000002"):
        out = tmp_path / f"{len(runs)}.json"
        assert main([str(source), "--train", DATA, "--val", DATA, "--k", "1", "20", "--json", str(out)]) == 0
        runs.append(json.loads(out.read_text()))
    assert runs[0]["k"] == runs[1]["k"]
    # the bank is the query set: with k = 1 every query finds itself (an exact duplicate could differ)
    assert runs[0]["k"]["1"]["top1"] > 99.5 and runs[0]["input_size"] == 32
    assert runs[0]["k"]["20"]["top5"] >= runs[0]["k"]["20"]["top1"] > 10


@pytest.mark.slow
def test_a_backbone_that_does_not_fit_and_unlabeled_shards_are_one_line_errors(short_run, tmp_path, capsys):
    from tools.make_benchmark_set import main as make_benchmark_set

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    info = json.loads((short_run / "backbone.json").read_text())
    (wrong / "backbone.json").write_text(json.dumps({**info, "timm_name": "resnet18",
                                                       "file": str(short_run / info["file"])}))
    unlabeled = tmp_path / "unlabeled"
    assert make_benchmark_set([str(unlabeled), "--count", "2"]) == 0
    capsys.readouterr()
    for args, fragment in (([str(wrong)], "does not fit resnet18"),
                           ([str(short_run), "--val", str(unlabeled)], "unlabeled"),
                           ([str(tmp_path)], "neither a run directory")):
        code = main([*args, "--train", str(ROOT / DATA)])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("eval_knn: error:"), err
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_plot_run_draws_real_runs_side_by_side(short_run, tmp_path):
    from tools.plot_run import main as plot_main

    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text((short_run / "metrics.jsonl").read_text())
    out = tmp_path / "compare.png"
    assert plot_main([str(short_run), str(other), "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size[0] > 500


def test_plot_run_without_metrics_is_a_one_line_error(tmp_path, capsys):
    from tools.plot_run import main as plot_main

    assert plot_main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"plot_run: error: {tmp_path}: no metrics.jsonl (give a run directory written by train.py)"


def test_linear_probe_converges_on_separable_features():
    from tools.linear_probe import probe

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator) * 4
    labels = torch.arange(400) % 4
    features = centres[labels] + torch.randn(400, 16, generator=generator)
    val_labels = torch.arange(100) % 4
    val = centres[val_labels] + torch.randn(100, 16, generator=generator)
    result = probe(features, labels, val, val_labels, num_classes=4, weight_decays=(1e-4, 1e-2))
    assert result["top1"] == 100.0 and result["weight_decay"] in (1e-4, 1e-2)
    # and random labels cannot be learnt: held-out accuracy stays near chance
    shuffled = labels[torch.randperm(400, generator=generator)]
    chance = probe(features, shuffled, val, val_labels[torch.randperm(100, generator=generator)], 4, (1e-2,))
    assert chance["held_out_top1"][1e-2] < 50


@pytest.mark.slow
def test_linear_probe_on_a_run_caches_its_features(short_run, tmp_path):
    from tools.linear_probe import main as probe_main

    out = tmp_path / "probe.json"
    assert probe_main([str(short_run), "--train", DATA, "--val", DATA, "--weight-decays", "1e-3", "--json", str(out)]) == 0
    first = json.loads(out.read_text())
    assert first["top1"] > 30  # fitted on the very images it is scored on
    (cache,) = (short_run / "linear_probe_cache").glob("*.pt")  # train and val are one set here
    # every storage in the file is tagged "cpu" (what a load without map_location would restore it to)
    locations = []
    stored = torch.load(cache, weights_only=True,
                        map_location=lambda storage, where: locations.append(where) or storage)
    assert stored.keys() == {"features", "labels"} and stored["features"].shape[0] == 2000
    assert locations and set(locations) == {"cpu"}

    # the same cache as a GPU machine would have written it (storages tagged cuda:0) loads here too
    # (a tagger registered ahead of torch's own names the location every storage is saved with)
    retag = ("import sys, torch\n"
             "torch.serialization.register_package(0, lambda storage: 'cuda:0', lambda s, where: None)\n"
             "torch.save(torch.load(sys.argv[1], weights_only=True), sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", retag, str(cache)], check=True, timeout=120)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(cache, weights_only=True)
    mtime = cache.stat().st_mtime_ns
    assert probe_main([str(short_run), "--train", DATA, "--val", DATA, "--weight-decays", "1e-3",
                       "--json", str(out)]) == 0
    assert json.loads(out.read_text())["top1"] == first["top1"]
    assert cache.stat().st_mtime_ns == mtime  # read, not extracted and written again


@pytest.mark.slow
def test_export_from_a_checkpoint_round_trips_through_timm(short_run, tmp_path):
    import timm
    from safetensors.torch import load_file

    from tools.export import main as export_main

    out = tmp_path / "exported"
    assert export_main([str(short_run / "checkpoints" / "step-00000002"), "--out", str(out)]) == 0
    info = json.loads((out / "backbone.json").read_text())
    assert (info["timm_name"], info["stem"], info["input_size"]) == ("resnet10t", "standard", 32)
    model = timm.create_model(info["timm_name"], pretrained=True, num_classes=0, **info["model_kwargs"],
                              pretrained_cfg_overlay=dict(file=str(out / "backbone.safetensors")))
    exported = load_file(out / "backbone.safetensors")
    loaded = model.state_dict()
    assert exported.keys() == loaded.keys()
    assert all(torch.equal(exported[name], loaded[name]) for name in exported)
    # the checkpoint's last step is the run's end: the same weights as train.py's own export
    final = load_file(short_run / "backbone.safetensors")
    assert all(torch.equal(exported[name], final[name]) for name in final)


# ------------------------------------------------------------------------------ --layer: intermediate layers


@pytest.fixture(scope="module")
def random_export(tmp_path_factory) -> Path:
    """An untrained resnet10t exported as train.py exports one (32-px crops, SwAV's normalisation)."""
    from models.backbones import create_backbone
    from models.checkpointing import export_backbone

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("layers") / "run"
    export_backbone(folder, create_backbone("resnet10t")[0], timm_name="resnet10t", method="swav", input_size=32)
    return folder


def test_layer_features_pool_each_stage_to_at_most_9216_values():
    from models.backbones import LayerFeatures, create_backbone, layer_names, pooled_grid

    # Goyal et al.'s grids for ResNet-50's stem and stages; at least 1x1; never larger than the map
    assert [pooled_grid(c, 56, 56) for c in (64, 256, 512, 1024, 2048)] == [(12, 12), (6, 6), (4, 4), (3, 3), (2, 2)]
    assert pooled_grid(16384, 7, 7) == (1, 1) and pooled_grid(64, 8, 5) == (8, 5)
    torch.manual_seed(0)
    backbone, _ = create_backbone("resnet10t")
    backbone.eval()
    assert layer_names(backbone) == ["final", "stem", "layer1", "layer2", "layer3", "layer4"]
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        features = LayerFeatures(backbone, layer_names(backbone))(images)
        # channels x grid x grid: stem 64 x 12 x 12 (of 64x64), layer1 64 x 12 x 12, layer2 128 x 8 x 8,
        # layer3 256 x 6 x 6, layer4 512 x 4 x 4 (of 4x4)
        dims = {name: tuple(x.shape) for name, x in features.items()}
        assert dims == {"final": (2, 512), "stem": (2, 9216), "layer1": (2, 9216), "layer2": (2, 8192),
                        "layer3": (2, 9216), "layer4": (2, 8192)}
        assert torch.equal(features["final"], backbone(images))  # the same numbers as the plain forward
        # at 32 px layer1's 8x8 map stays 8x8 and layer4's 1x1 is the final features before pooling
        small = LayerFeatures(backbone, ["layer4", "layer1"])(images[:, :, :32, :32])
        assert list(small) == ["layer4", "layer1"] and small["layer1"].shape == (2, 64 * 8 * 8)
        assert torch.allclose(small["layer4"], backbone(images[:, :, :32, :32]))


def test_vit_block_features_are_the_mean_patch_token_after_the_block():
    from models.backbones import LayerFeatures, create_backbone, layer_names

    torch.manual_seed(0)
    vit, _ = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    vit.eval()
    assert layer_names(vit) == ["final", "block0", "block1", "block2"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = LayerFeatures(vit, ["block1", "final"])(images)
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        tokens = vit.blocks[1](vit.blocks[0](tokens))
        assert torch.allclose(features["block1"], tokens[:, vit.num_prefix_tokens:].mean(dim=1), atol=1e-6)
        assert torch.equal(features["final"], vit(images))


def test_an_unknown_layer_is_a_one_line_error_naming_the_known_ones(random_export, capsys):
    from tools.linear_probe import main as probe_main

    for tool, prog in ((main, "eval_knn"), (probe_main, "linear_probe")):
        code = tool([str(random_export), "--train", str(ROOT / DATA), "--val", str(ROOT / DATA),
                     "--layer", "layer2", "layer9"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"{prog}: error: --layer: unknown layer 'layer9'"), lines[0]
        assert "final, stem, layer1, layer2, layer3, layer4" in lines[0]


def test_knn_scores_each_layer_and_keeps_its_default_output(random_export, tmp_path, capsys):
    data = str(ROOT / DATA)
    default, layered = tmp_path / "default.json", tmp_path / "layers.json"
    assert main([str(random_export), "--train", data, "--val", data, "--k", "20", "--json", str(default)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith("k=  20 T=0.07: top-1 ")
    assert main([str(random_export), "--train", data, "--val", data, "--k", "20", "--layer", "layer3", "final",
                 "--json", str(layered)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[1].startswith("layer3  1024-d  k=  20") and out[2].startswith("final    512-d")
    before, after = json.loads(default.read_text()), json.loads(layered.read_text())
    assert set(before) == {"backbone", "timm_name", "input_size", "train", "val", "temperature", "k"}
    assert list(after["layers"]) == ["layer3", "final"] and "k" not in after
    assert after["layers"]["layer3"]["dim"] == 1024 and after["layers"]["final"]["dim"] == 512
    assert after["layers"]["final"]["k"] == before["k"]  # one pass for both layers: the same final features
    assert 10 < after["layers"]["layer3"]["k"]["20"]["top1"] <= 100


def test_linear_probe_scores_each_layer_with_a_cache_per_layer(random_export, tmp_path, capsys):
    from tools.linear_probe import main as probe_main

    data = str(ROOT / DATA)
    default, layered = tmp_path / "default.json", tmp_path / "layers.json"
    common = [str(random_export), "--train", data, "--val", data, "--weight-decays", "1e-3"]
    assert probe_main([*common, "--layer", "layer3", "final", "--json", str(layered)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[1].startswith("layer3  1024-d: val top-1") and out[2].startswith("final    512-d")
    caches = {torch.load(path, weights_only=True)["features"].shape: path
              for path in (random_export / "linear_probe_cache").glob("*.pt")}
    assert set(caches) == {(2000, 1024), (2000, 512)}  # train and val are one set here
    stamps = {path: path.stat().st_mtime_ns for path in caches.values()}
    assert probe_main([*common, "--json", str(default)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("resnet10t at 32 px, 512-d features: weight decay 0.001")
    assert out[1].startswith("val top-1 ")
    before, after = json.loads(default.read_text()), json.loads(layered.read_text())
    assert set(before) == {"weight_decay", "held_out_top1", "top1", "top5", "backbone", "input_size", "train", "val"}
    assert list(after["layers"]) == ["layer3", "final"] and after["layers"]["layer3"]["dim"] == 1024
    assert after["layers"]["final"]["top1"] == before["top1"]
    # the default read the final features' cache the layered run wrote: no new file, nothing rewritten
    assert {path: path.stat().st_mtime_ns for path in (random_export / "linear_probe_cache").glob("*.pt")} == stamps


# ------------------------------------------------------------------------------ pixels: the raw-pixel baseline


def _decoded_pixels(count: int) -> torch.Tensor:
    """The first `count` images of DATA's first shard decoded by PIL: (count, 3 * H * W) in [0, 1]."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rows = []
    with tarfile.open(sorted((ROOT / DATA).glob("*.tar"))[0]) as archive:
        for member in archive:
            if member.name.endswith(".jpg"):
                image = np.asarray(Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB"))
                rows.append(torch.from_numpy(image.copy()).permute(2, 0, 1).flatten().float() / 255)
                if len(rows) == count:
                    return torch.stack(rows)
    raise AssertionError(f"{DATA} has fewer than {count} images")


def test_pixel_features_are_the_unnormalised_crop_flattened():
    from pipelines.shards import open_shard_set
    from pipelines.spec import preset
    from tools.eval_knn import extract, load_backbone

    pixels, info = load_backbone("pixels")
    shards = open_shard_set(ROOT / DATA, need_labels=True)
    features, labels = extract(pixels, info, shards, 28, 256, "cpu")
    assert features.shape == (2000, 3 * 28 * 28) and labels.shape == (2000,)
    assert 0 <= features.min() and features.max() <= 1 and features.max() > 0.9
    # the JPEGs as PIL decodes them (DALI's decoder may round a value differently)
    decoded = _decoded_pixels(4)
    assert (features[:4] - decoded).abs().max() <= 2 / 255
    # the same stack with a backbone's normalisation: those crops are these values, normalised
    normalised, same_labels = extract(pixels, {"timm_name": "swav-like", "method": "swav"}, shards, 28, 256, "cpu")
    mean = torch.tensor(preset("swav").mean).repeat_interleave(28 * 28)
    std = torch.tensor(preset("swav").std).repeat_interleave(28 * 28)
    assert torch.equal(same_labels, labels)
    assert torch.allclose(normalised[:8], (features[:8] - mean) / std, atol=1e-5)


def test_knn_on_pixels_gives_one_result_per_k(tmp_path, capsys):
    data = str(ROOT / DATA)
    out = tmp_path / "pixels.json"
    assert main(["pixels", "--size", "28", "--train", data, "--val", data, "--k", "1", "20", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("pixels at 28 px:") and len(lines) == 3
    results = json.loads(out.read_text())
    assert results["timm_name"] == "pixels" and results["input_size"] == 28
    assert list(results["k"]) == ["1", "20"]
    # the bank is the query set: with k = 1 every query finds itself (an exact duplicate could differ)
    assert results["k"]["1"]["top1"] > 99.5 and 50 < results["k"]["20"]["top1"] <= results["k"]["20"]["top5"]


def test_pixels_without_size_or_with_a_layer_are_one_line_errors(tmp_path, monkeypatch, capsys):
    from tools.linear_probe import main as probe_main

    monkeypatch.chdir(tmp_path)  # nothing may be written beside "pixels" (no feature cache)
    data = str(ROOT / DATA)
    for tool, prog in ((main, "eval_knn"), (probe_main, "linear_probe")):
        for args, message in (([], "pixels: give --size"),
                              (["--size", "28", "--layer", "final", "layer1"], "--layer: unknown layer 'layer1'")):
            assert tool(["pixels", "--train", data, "--val", data, *args]) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: {message}"), lines
    assert probe_main(["pixels", "--size", "28", "--train", data, "--val", data, "--weight-decays", "1e-2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("pixels at 28 px, 2352-d features:") and out[1].startswith("val top-1 ")
    assert list(tmp_path.iterdir()) == []
