"""Weighted kNN on frozen features of a trained backbone (the DINO protocol: cosine, k = 20 and 200, T = 0.07).

    python tools/eval_knn.py runs/swav-x                                  # a run (its backbone.json)
    python tools/eval_knn.py runs/swav-x/checkpoints/step-00000312        # a checkpoint
    python tools/eval_knn.py runs/swav-x --train shards/fm-train --val shards/fm-test --k 20 200
    python tools/eval_knn.py runs/rotnet-x --layer layer2 layer3 final   # intermediate layers too
    python tools/eval_knn.py pixels --size 28                             # the raw-pixel baseline

Features come from the input stack with an evaluation recipe: each image once, un-augmented; crops
of 64 px or less see the whole image, larger ones resize 256 / centre-crop 224 (in proportion), at the
size the backbone was trained at (`--size` overrides), in the input it trained on (a colorization
backbone, "input": "lightness" in backbone.json: (L - 50) / 50 in 3 channels). The train shards are
the memory bank; top-1 and top-5 are reported on the val shards. `--layer` scores features of intermediate layers instead of
(or beside: "final") the pooled output, all from one pass over each split: a ResNet's stem and stages
(`stem layer1 .. layer4`) average-pooled to a grid of at most 9216 values, a ViT's blocks (`block0` ..)
as the mean of their patch tokens (models/backbones.py, `LayerFeatures`). In place of a backbone,
`pixels` takes the evaluation crop's own values as the features: in [0, 1] (no mean/std
normalisation), at `--size` (required), flattened channel-major; its only layer is "final".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from models.knn import knn_accuracies, l2_normalize_  # noqa: E402
from models.options import ConfigError, parse_options  # noqa: E402
from pipelines.features import evaluation_stack, extract_feature_sets, extract_features  # noqa: E402
from pipelines.shards import DEMO_TRAIN, DEMO_VAL, ShardError, open_shard_set  # noqa: E402

PROG = "eval_knn"
PIXELS = "pixels"  # the backbone argument of the raw-pixel baseline


class Pixels(torch.nn.Flatten):
    """The raw-pixel baseline's "backbone": a batch of crops flattened to (batch, C * H * W)."""


class EvalError(Exception):
    pass


def load_backbone(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """(backbone in eval mode, info: timm_name, stem, model_kwargs, input_size, method) from a run
    directory or its backbone.json (the export), or from a checkpoint directory (meta.json).
    `path` "pixels": `Pixels`, info {"timm_name": "pixels", "normalise": False (the stack leaves the
    crops in [0, 1]), "cache": False (no weights to key a feature cache by)}; no input size."""
    if str(path) == PIXELS:
        return Pixels().eval(), {"timm_name": PIXELS, "normalise": False, "cache": False}
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from models.backbones import create_backbone
    from models.methods import method_class
    from models.methods.ipt import MODEL_INFO as IPT_INFO

    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        path = path.parent
    restoration = f"restores images and has no backbone to score: use tools/eval_restoration.py {path}"
    if (path / "meta.json").is_file():  # a checkpoint: the method's evaluation backbone out of the model
        config = json.loads((path / "meta.json").read_text())["config"]
        if method_class(config["method"]).evaluation == "restoration":
            raise EvalError(f"{path}: a {config['method']} checkpoint {restoration}")
        info = {"timm_name": config["backbone"], "stem": config["stem"], "method": config["method"],
                "model_kwargs": parse_options(config.get("backbone_options"), "--backbone-options"),
                "input_size": _first_crop_size(config["multicrop"])}
        prefix = method_class(config["method"]).EVAL_BACKBONE + "."
        if lightness_preset(config["method"]):  # what backbone.json records for an exported run
            info["input"] = "lightness"
        weights_file = path / "model.safetensors"
    elif (path / "backbone.json").is_file():
        info = json.loads((path / "backbone.json").read_text())
        prefix, weights_file = "", path / info["file"]
    elif (path / IPT_INFO).is_file():
        raise EvalError(f"{path}: an ipt run {restoration}")
    else:
        raise EvalError(f"{path}: neither a run directory with backbone.json nor a checkpoint directory "
                        f"with meta.json (train.py writes both)")
    try:
        state = load_file(str(weights_file))
    except (OSError, SafetensorError) as error:
        raise EvalError(f"{weights_file}: cannot read the weights ({error})") from None
    if prefix:
        state = {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}
    try:
        backbone, _ = create_backbone(info["timm_name"], stem=info.get("stem", "standard"),
                                      **(info.get("model_kwargs") or {}))
        backbone.load_state_dict(state)
    except (ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0]
        raise EvalError(f"{weights_file}: does not fit {info['timm_name']} ({info.get('stem')} stem): {first}") from None
    return backbone.eval(), info


def lightness_preset(method: str) -> bool:
    """Whether `method`'s recipe feeds the backbone lightness (colorization) rather than RGB."""
    from models.methods import method_class
    from pipelines.spec import preset

    return preset(method_class(method).recipe_preset).lightness_input


def _first_crop_size(multicrop: str) -> int:
    return int(multicrop.split("+")[0].split("@")[0].split("x")[1])


def input_size(info: dict, size: int | None) -> int:
    """`size` (--size), else the size the backbone was trained at, else 224; the pixels need --size."""
    if size:
        return size
    if info["timm_name"] == PIXELS:
        raise EvalError("pixels: give --size, the side of the crop whose values are the features (e.g. 28)")
    return info.get("input_size") or 224


def _stack(info: dict, shards, size: int, batch_size: int, device):
    from models.methods import method_class
    from pipelines.spec import preset

    recipe = preset(method_class(info.get("method", "swav")).recipe_preset).with_multicrop(f"1x{size}")
    if not info.get("normalise", True):
        recipe = dataclasses.replace(recipe, mean=None, std=None)
    if "input" in info:  # backbone.json's record of the input the backbone trained on wins over the preset's
        lightness = info["input"] == "lightness"
        recipe = dataclasses.replace(recipe, lightness_input=lightness,
                                     **({"mean": None, "std": None} if lightness else {}))
    return evaluation_stack(recipe, shards, batch_size, device=torch.device(device))


@torch.no_grad()
def extract(backbone, info: dict, shards, size: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of `shards`, through the evaluation recipe at `size` px with
    the normalisation of the method the backbone was trained with (none for the pixels)."""
    extracted = extract_features(backbone, _stack(info, shards, size, batch_size, device))
    return extracted.features, extracted.labels


@torch.no_grad()
def extract_layers(backbone, info: dict, shards, size: int, batch_size: int, device,
                   layers: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """As `extract`, for each of `layers` (`layer_names`): {layer: features}, labels, from one forward
    per batch."""
    stack = _stack(info, shards, size, batch_size, device)
    extracted = extract_feature_sets(layer_features(backbone, layers), stack)
    return {layer: extracted[layer].features for layer in layers}, extracted[layers[0]].labels


def layer_features(backbone, layers: list[str]):
    """`LayerFeatures` of `backbone`; an unknown layer is an EvalError naming --layer."""
    from models.backbones import LayerFeatures

    try:
        return LayerFeatures(backbone, layers)
    except ValueError as error:
        raise EvalError(f"--layer: {error}") from None


def evaluate(backbone_path, train_data, val_data, ks=(20, 200), temperature=0.07, size=None, batch_size=256,
             device="cpu", layers: list[str] | None = None) -> dict:
    """kNN accuracies: under "k" for the final features, or with `layers`, under "layers": {layer:
    {"dim", "k"}} for each."""
    backbone, info = load_backbone(backbone_path)
    size = input_size(info, size)
    if layers:
        layer_features(backbone, layers)  # unknown names fail before any data is read
    train_shards = open_shard_set(train_data, need_labels=True)
    val_shards = open_shard_set(val_data, need_labels=True)
    if train_shards.classes != val_shards.classes:
        raise EvalError(f"--train {train_data} and --val {val_data} have different classes")
    backbone = backbone.to(device)
    results = {"backbone": str(backbone_path), "timm_name": info["timm_name"], "input_size": size,
               "train": str(train_shards.root), "val": str(val_shards.root), "temperature": temperature}
    classes = len(train_shards.classes)
    if not layers:
        bank, bank_labels = extract(backbone, info, train_shards, size, batch_size, device)
        l2_normalize_(bank)
        queries, query_labels = extract(backbone, info, val_shards, size, batch_size, device)
        results["k"] = knn_accuracies(bank, bank_labels, queries, query_labels, classes, ks, temperature)
        return results
    banks, bank_labels = extract_layers(backbone, info, train_shards, size, batch_size, device, layers)
    queries, query_labels = extract_layers(backbone, info, val_shards, size, batch_size, device, layers)
    results["layers"] = {}
    for layer, bank in banks.items():
        l2_normalize_(bank)
        accuracies = knn_accuracies(bank, bank_labels, queries[layer], query_labels, classes, ks, temperature)
        results["layers"][layer] = {"dim": bank.shape[1], "k": accuracies}
    return results


def add_feature_arguments(parser: argparse.ArgumentParser, train_help: str, val_help: str) -> None:
    """The options every frozen-feature evaluation takes (kNN, linear probe)."""
    parser.add_argument("backbone", help="a run directory, its backbone.json, or a checkpoint directory; "
                                         "or pixels: the crop's values in [0, 1] (needs --size)")
    parser.add_argument("--train", default=str(DEMO_TRAIN), help=train_help)
    parser.add_argument("--val", default=str(DEMO_VAL), help=val_help)
    parser.add_argument("--size", type=int, default=None, help="input size (default: the training crop size)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--layer", nargs="+", default=None, metavar="NAME",
                        help="evaluate these layers, one pass for all: final (the pooled output, the "
                             "default), a ResNet's stem layer1 .. layer4 (average-pooled to at most 9216 "
                             "values), a ViT's block0 .. (mean patch token)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_feature_arguments(parser, train_help="labeled shards: the memory bank", val_help="labeled shards to classify")
    parser.add_argument("--k", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--temperature", type=float, default=0.07)
    args = parser.parse_args(argv)
    try:
        results = evaluate(args.backbone, args.train, args.val, args.k, args.temperature, args.size,
                           args.batch_size, args.device, args.layer)
    except (EvalError, ShardError, ConfigError, yaml.YAMLError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(f"{results['timm_name']} at {results['input_size']} px: bank {results['train']}, queries {results['val']}")
    if "k" in results:
        for k, row in results["k"].items():
            print(f"k={k:>4} T={args.temperature}: top-1 {row['top1']:.2f}%  top-5 {row['top5']:.2f}%")
    else:
        width = max(len(layer) for layer in results["layers"])
        for layer, result in results["layers"].items():
            for k, row in result["k"].items():
                print(f"{layer:<{width}} {result['dim']:>5}-d  k={k:>4} T={args.temperature}: "
                      f"top-1 {row['top1']:.2f}%  top-5 {row['top5']:.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
