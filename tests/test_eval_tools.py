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
