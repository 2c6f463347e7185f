"""tools/ood_score.py: AUROC on known scores, the in/out split of the samples, a real short supervised
rotnet run scored end to end, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_train import DATA, assert_ok, train
from tools.ood_score import OodError, auroc, chosen, load_method, main, plan

ROOT = Path(__file__).resolve().parents[1]
VAL = str(ROOT / DATA)  # 2,000 labeled images, 200 of each of the 10 classes
SUPERVISED = "num_classes=10,supervised_weight=1,rotation_weight=0.5"


def test_auroc_on_known_scores():
    inside, outside = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.7, 0.9])
    assert auroc(inside, outside) == 1.0
    assert auroc(outside, inside) == 0.0
    assert auroc(torch.full((4,), 0.5), torch.full((3,), 0.5)) == 0.5
    # pairs (out, in) ordered right: 0.8 beats all three, 0.3 beats 0.1 only, 0.35 ties 0.35 (half)
    assert auroc(torch.tensor([0.1, 0.4, 0.35]), torch.tensor([0.8, 0.3, 0.35])) == pytest.approx(5.5 / 9)


def test_the_class_split_of_one_shard_set():
    in_shards, out_shards, classes, out_classes = plan(VAL, None, [0, 1, 2, 3, 4], None)
    assert out_shards is in_shards and classes == [0, 1, 2, 3, 4] and out_classes == [5, 6, 7, 8, 9]
    assert plan(VAL, None, [3], [7, 1])[3] == [7, 1]
    assert plan(VAL, VAL, [0], [9])[2:] == ([0], [9])  # the same set as --out, split by labels
    labels = torch.tensor([0, 5, 3, 9, 5, -1])
    assert chosen(labels, [5, 9]).tolist() == [False, True, False, True, True, False]
    assert chosen(labels, None).all()


@pytest.mark.parametrize("args, fragment", [
    ((None, None, None), "--out or --classes is needed"),
    ((None, [0, 12], None), "--classes 12: --in"),
    ((None, [0, 1], [1, 2]), "--out-classes 1 is also in --classes"),
    ((None, list(range(10)), None), "--classes lists every label"),
    ((VAL, None, None), "is --in"),
    ((VAL, [0], [12]), "--out-classes 12: --out"),
])
def test_bad_splits_name_the_flag(args, fragment):
    out, classes, out_classes = args
    with pytest.raises(OodError, match=fragment):
        plan(VAL, out, classes, out_classes)


@pytest.fixture(scope="module")
def rotnet_run(tmp_path_factory) -> Path:
    """A supervised rotnet run (class head + rotation head) of 3 steps on the 2k demo shards."""
    output = tmp_path_factory.mktemp("ood")
    assert_ok(train("--method", "rotnet", "--multicrop", "1x32", "--method-options", SUPERVISED,
                    "--max-steps", 3, "--output-dir", output, "--name", "rotnet"))
    return output / "rotnet"


@pytest.mark.slow
def test_load_method_has_the_checkpoint_weights_and_both_heads(rotnet_run):
    from safetensors.torch import load_file

    method, config, recipe, checkpoint = load_method(rotnet_run)
    assert checkpoint == rotnet_run / "checkpoints" / "step-00000003" and not method.training
    assert config.method == "rotnet" and recipe.groups[0].size == 32
    head = method.heads["rotation"]
    assert head.classifier.out_features == 10 and head.rotation.out_features == 4
    exported = load_file(str(rotnet_run / "backbone.safetensors"))  # train.py's export at the end
    assert exported.keys() == method.backbone.state_dict().keys()
    assert all(torch.equal(exported[name], value) for name, value in method.backbone.state_dict().items())


@pytest.mark.slow
def test_held_out_classes_end_to_end(rotnet_run, tmp_path, capsys):
    out = tmp_path / "split.json"
    assert main([str(rotnet_run), "--in", VAL, "--classes", "0,1,2,3,4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rotation loss" in printed and "1 - max softmax" in printed
    results = json.loads(out.read_text())
    assert results["in"]["samples"] == results["out"]["samples"] == 1000
    assert results["out"]["classes"] == [5, 6, 7, 8, 9]
    assert results["auroc"].keys() == {"rotation_loss", "max_softmax"}
    assert all(0 <= value <= 1 for value in results["auroc"].values())
    # the same split with in and out swapped, --out naming the same set: each AUROC is 1 - the first
    swapped = tmp_path / "swapped.json"
    assert main([str(rotnet_run / "checkpoints" / "step-00000003"), "--in", VAL, "--out", VAL,
                 "--in-classes", "5,6,7,8,9", "--out-classes", "0,1,2,3,4", "--json", str(swapped)]) == 0
    reversed_auroc = json.loads(swapped.read_text())["auroc"]
    for name, value in results["auroc"].items():
        assert reversed_auroc[name] == pytest.approx(1 - value, abs=1e-6)


@pytest.mark.slow
def test_bad_input_is_one_line_with_exit_code_2(rotnet_run, tmp_path, capsys):
    from tools.make_benchmark_set import main as make_benchmark_set

    unlabeled = tmp_path / "unlabeled"
    assert make_benchmark_set([str(unlabeled), "--count", "2"]) == 0
    output = tmp_path / "runs"
    assert_ok(train("--max-steps", 1, "--output-dir", output, "--name", "swav"))
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    for args, fragment in (([empty, "--in", VAL, "--classes", "0"], f"RUN {empty}: no checkpoint"),
                           ([output / "swav", "--in", VAL, "--classes", "0"], "swav run has no rotation head"),
                           ([rotnet_run, "--in", VAL, "--classes", "0,10"], "--classes 10: --in"),
                           ([rotnet_run, "--in", unlabeled, "--classes", "0"], f"{unlabeled.resolve()} is unlabeled"),
                           ([rotnet_run, "--in", VAL, "--out", unlabeled, "--out-classes", "1"], "--out-classes: --out"),
                           ([rotnet_run, "--in", tmp_path / "missing", "--classes", "0"], "does not exist")):
        code = main([str(arg) for arg in args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("ood_score: error:"), lines
        assert fragment in lines[0], lines[0]
