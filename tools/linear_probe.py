"""Linear probe: a linear classifier on frozen features of a trained backbone.

    python tools/linear_probe.py runs/swav-x                       # demo shards: train 10k, val 2k
    python tools/linear_probe.py runs/swav-x --train shards/fm-train --val shards/fm-test
    python tools/linear_probe.py runs/rotnet-x --layer layer2 layer3 final   # a probe per layer
    python tools/linear_probe.py pixels --size 28                  # the raw-pixel baseline

Protocol: features are extracted once through the input stack's evaluation recipe (as tools/eval_knn.py
does) and cached next to the backbone (`linear_probe_cache/`), then standardised with the train split's
mean and std. A multinomial logistic regression is fitted by full-batch L-BFGS; its L2 penalty is chosen
from `--weight-decays` on a held-out 10% of the train split (stratified by nothing but a seeded shuffle),
refitted on the whole train split, and scored once on the val split (top-1 and top-5). `--layer` probes
each named layer on its own (features as tools/eval_knn.py takes them: one pass per split for all
layers, each layer cached on its own). `pixels` (tools/eval_knn.py) probes the crop's values; they are
extracted on every run, never cached.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.backbones import FINAL_LAYER  # noqa: E402
from models.knn import top_k_accuracies  # noqa: E402
from pipelines.files import atomic_write  # noqa: E402
from pipelines.shards import ShardError, open_shard_set  # noqa: E402
from tools.eval_knn import (EvalError, add_feature_arguments, extract_layers, input_size,  # noqa: E402
                            layer_features, load_backbone)

PROG = "linear_probe"
WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                            weight_decay: float, iterations: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression, mean cross-entropy + weight_decay/2 * ||W||^2, by L-BFGS."""
    torch.manual_seed(0)
    classifier = torch.nn.Linear(features.shape[1], num_classes).to(features.device)
    torch.nn.init.zeros_(classifier.weight)
    torch.nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(classifier.parameters(), lr=1.0, max_iter=iterations,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(features), labels) + weight_decay / 2 * classifier.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return classifier


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def probe(train_x, train_y, val_x, val_y, num_classes: int, weight_decays=WEIGHT_DECAYS,
          held_out: float = 0.1, seed: int = 0) -> dict:
    """Choose the penalty on a held-out part of train, refit on all of train, score val once."""
    order = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(seed))
    cut = int(train_x.shape[0] * held_out)
    fit_index, hold_index = order[cut:], order[:cut]
    sweep = {}
    for weight_decay in weight_decays:
        fit_x, hold_x = standardise(train_x[fit_index], train_x[hold_index])
        classifier = fit_logistic_regression(fit_x, train_y[fit_index], num_classes, weight_decay)
        with torch.no_grad():
            sweep[weight_decay] = top_k_accuracies(classifier(hold_x), train_y[hold_index])[0]
    best = max(sweep, key=lambda wd: (sweep[wd], wd))  # ties: the stronger penalty
    all_x, val_features = standardise(train_x, val_x)
    classifier = fit_logistic_regression(all_x, train_y, num_classes, best)
    with torch.no_grad():
        top1, top5 = top_k_accuracies(classifier(val_features), val_y)
    return {"weight_decay": best, "held_out_top1": sweep, "top1": top1, "top5": top5}


def cached_features(backbone_path, info, backbone, shards, size, batch_size, device, layers=(FINAL_LAYER,)):
    """({layer: features}, labels) of `shards` at `size` as CPU tensors, cached under the backbone's
    folder, one file per layer keyed by the weights, data, size and layer (the final features' key is
    the one they always had); the layers not cached yet are extracted together, in one pass over
    `shards`. The cache loads onto the CPU, so one written on a GPU machine reads anywhere. A backbone
    whose info has "cache": False (the pixels) is extracted every time and nothing is written."""
    if not info.get("cache", True):
        extracted, labels = extract_layers(backbone, info, shards, size, batch_size, device, list(layers))
        return {layer: extracted[layer].cpu() for layer in layers}, labels.cpu()
    weights = Path(backbone_path) / (info.get("file") or "model.safetensors")
    # a set in S3 is known by its URL and manifest version; a local one by its (resolved) directory
    data = f"{shards.root}@{shards.etags['manifest.json']}" if shards.remote else shards.root
    source = f"{weights.resolve()}:{weights.stat().st_mtime_ns}:{data}:{size}"
    caches = {}
    for layer in layers:
        text = source if layer == FINAL_LAYER else f"{source}:layer={layer}"
        key = hashlib.sha1(text.encode()).hexdigest()[:16]
        caches[layer] = Path(backbone_path) / "linear_probe_cache" / f"{key}.pt"
    features, labels = {}, None
    for layer, cache in caches.items():
        if cache.is_file():
            stored = torch.load(cache, map_location="cpu", weights_only=True)
            features[layer], labels = stored["features"], stored["labels"]
    missing = [layer for layer in caches if layer not in features]
    if missing:
        extracted, labels = extract_layers(backbone, info, shards, size, batch_size, device, missing)
        labels = labels.cpu()
        for layer in missing:
            features[layer] = extracted[layer].cpu()
            stored = {"features": features[layer], "labels": labels}
            caches[layer].parent.mkdir(exist_ok=True)
            atomic_write(caches[layer], lambda temporary, stored=stored: torch.save(stored, temporary))
    return {layer: features[layer] for layer in caches}, labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_feature_arguments(parser, train_help="labeled shards to fit on", val_help="labeled shards to score")
    parser.add_argument("--weight-decays", type=float, nargs="+", default=list(WEIGHT_DECAYS))
    args = parser.parse_args(argv)
    try:
        backbone, info = load_backbone(args.backbone)
        train_shards = open_shard_set(args.train, need_labels=True)
        val_shards = open_shard_set(args.val, need_labels=True)
        if train_shards.classes != val_shards.classes:
            raise EvalError(f"--train {args.train} and --val {args.val} have different classes")
        layers = list(layer_features(backbone, args.layer or [FINAL_LAYER]).names)
        size = input_size(info, args.size)
    except (EvalError, ShardError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    folder = Path(args.backbone).parent if Path(args.backbone).suffix == ".json" else Path(args.backbone)
    device = torch.device(args.device)
    backbone = backbone.to(device)
    train_x, train_y = cached_features(folder, info, backbone, train_shards, size, args.batch_size, device, layers)
    val_x, val_y = cached_features(folder, info, backbone, val_shards, size, args.batch_size, device, layers)
    probes = {}
    for layer in layers:
        classes = len(train_shards.classes)
        results = probe(train_x[layer], train_y, val_x[layer], val_y, classes, args.weight_decays)
        sweep = ", ".join(f"{wd:g}: {acc:.1f}" for wd, acc in results["held_out_top1"].items())
        if args.layer is None:  # the output the probe has always had
            print(f"{info['timm_name']} at {size} px, {train_x[layer].shape[1]}-d features: weight decay "
                  f"{results['weight_decay']:g} (held-out top-1 by weight decay: {sweep})")
            print(f"val top-1 {results['top1']:.2f}%  top-5 {results['top5']:.2f}%  ({val_shards.root})")
        else:
            if not probes:
                print(f"{info['timm_name']} at {size} px, val {val_shards.root}")
            print(f"{layer:<{max(map(len, layers))}} {train_x[layer].shape[1]:>5}-d: val top-1 "
                  f"{results['top1']:.2f}%  top-5 {results['top5']:.2f}%  weight decay "
                  f"{results['weight_decay']:g} (held-out top-1: {sweep})")
        probes[layer] = results
    if args.json:
        summary = probes[FINAL_LAYER] if args.layer is None else {
            "layers": {layer: {"dim": train_x[layer].shape[1], **results} for layer, results in probes.items()}}
        Path(args.json).write_text(json.dumps({**summary, "backbone": str(args.backbone), "input_size": size,
                                               "train": str(train_shards.root), "val": str(val_shards.root)},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
