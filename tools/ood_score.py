"""Out-of-distribution detection with a run's rotation head (Hendrycks, Mazeika, Kadavath & Song 2019).

    python tools/ood_score.py runs/rotnet-x --in shards/fashion-mnist-val-2k --classes 0,1,2,3,4
    python tools/ood_score.py runs/rotnet-x --in shards/cifar10-test --out shards/svhn-test --json ood.json
    python tools/ood_score.py runs/rotnet-x --in shards/a --classes 0,1 --out shards/b --out-classes 7,8

The run's method is rebuilt from its latest checkpoint (or the checkpoint directory given), heads
included. Every image is read once through the evaluation recipe (un-augmented, at the crop size the
run trained at), shown to the backbone in all four rotations, and scored: `rotation_loss`, the sum over
the four rotations of the cross-entropy of the rotation head's prediction (high: unusual), and, when
the run has a class head (rotnet num_classes=N), `max_softmax` scored as 1 - the largest class
probability of the upright image. For each score: the AUROC of telling out-of-distribution samples
(the positives) from in-distribution ones; 0.5 is chance.

In-distribution: the samples of --in, or only its labels --classes. Out-of-distribution: the samples of
--out (or only its labels --out-classes); without --out, the labels of --in that --classes leaves out
(or --out-classes of them): the held-out-classes setting, e.g. a run trained on classes 0-4 only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models.options import ConfigError  # noqa: E402
from pipelines.shards import ShardError, ShardSet, open_shard_set  # noqa: E402

PROG = "ood_score"
SCORES = {"rotation_loss": "rotation loss", "max_softmax": "1 - max softmax"}


class OodError(Exception):
    """Bad input: the message is one line naming the flag or file."""


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """The area under the ROC curve of telling `out_scores` (positives) from `in_scores` by a threshold
    on the score (higher: more likely out): 1 when every out score is above every in score, 0.5 for
    ties or chance."""
    from sklearn.metrics import roc_auc_score

    scores = torch.cat([in_scores, out_scores]).double().cpu().numpy()
    truth = [0] * len(in_scores) + [1] * len(out_scores)
    return float(roc_auc_score(truth, scores))


def label_list(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts) or len(set(map(int, parts))) != len(parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of distinct labels such as 0,1,2")
    return [int(part) for part in parts]


# ------------------------------------------------------------------------------------------------ the run


def latest_checkpoint(path: Path) -> Path:
    """`path` itself when it is a checkpoint directory, else the run directory's latest checkpoint."""
    from models.checkpointing import list_checkpoints

    if (path / "meta.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise OodError(f"RUN {path}: no checkpoint (neither a run directory with checkpoints/step-* nor a "
                       f"checkpoint directory with meta.json; train.py writes them)")
    return found[-1]


def load_method(path: str | Path) -> tuple[nn.Module, object, object, Path]:
    """(method in eval mode, heads included, its resolved `Config`, the recipe, the checkpoint) of a run
    directory's latest checkpoint or of a checkpoint directory, built as train.py built it from the
    saved options, with the checkpoint's weights (safetensors: no code runs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from models.methods import create_method
    from models.options import parse_options
    from models.training import Config, resolve

    checkpoint = latest_checkpoint(Path(path))
    try:
        meta = json.loads((checkpoint / "meta.json").read_text())
        known = {field.name for field in dataclasses.fields(Config)}
        saved = Config(**{key: value for key, value in meta["config"].items() if key in known})
        device = torch.device(meta.get("device", "cpu"))  # the defaults of the device it trained on
        config, recipe, _ = resolve(saved, device, world_size=1)
        method = create_method(config.method, backbone=config.backbone, stem=config.stem,
                               on_gpu=device.type == "cuda",
                               backbone_kwargs=parse_options(config.backbone_options, "--backbone-options"),
                               **parse_options(config.method_options, "--method-options"))
    except (OSError, KeyError, TypeError, ValueError) as error:  # ConfigError and JSON errors are ValueErrors
        first = (str(error).strip().splitlines() or [repr(error)])[0]
        raise OodError(f"RUN {checkpoint}: cannot rebuild the method from meta.json ({first})") from None
    weights = checkpoint / "model.safetensors"
    try:
        method.load_state_dict(load_file(str(weights)))
    except (OSError, SafetensorError, RuntimeError) as error:
        first = (str(error).strip().splitlines() or [repr(error)])[0]
        raise OodError(f"RUN {weights}: cannot load the method's weights ({first})") from None
    return method.eval(), config, recipe, checkpoint


def rotation_head(method: nn.Module, config) -> nn.Module:
    heads = getattr(method, "heads", None)
    head = heads["rotation"] if heads is not None and "rotation" in heads else None
    if head is None or not hasattr(head, "scores"):
        raise OodError(f"RUN: the {config.method} run has no rotation head: score a run of --method rotnet "
                       f"(or multitask with rotation)")
    return head


class RotationScores(nn.Module):
    """Images (B, C, S, S) -> {score: (B, 1)}: the backbone on the four rotations of the batch, one
    forward, and the head's per-image scores, `max_softmax` turned into 1 - max softmax."""

    def __init__(self, method: nn.Module, head: nn.Module):
        super().__init__()
        self.method, self.head = method, head
        self.spec = dataclasses.replace(head.spec, all_four=True)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        from pipelines.pretext import rotate

        rotated = rotate(images, self.spec, generator=None).images  # all four: nothing random drawn
        scores = self.head.scores(self.method.backbone(rotated), images.shape[0])
        if "max_softmax" in scores:
            scores["max_softmax"] = 1 - scores["max_softmax"]
        return {name: value.unsqueeze(1) for name, value in scores.items()}


@torch.no_grad()
def score_shards(scorer: RotationScores, recipe, shards: ShardSet, batch_size: int,
                 device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({score: (n,)}, labels (n,), -1 when unlabeled) of every sample of `shards`, on the CPU."""
    from pipelines.features import evaluation_stack, extract_feature_sets

    stack = evaluation_stack(recipe, shards, batch_size, device=device)
    extracted = extract_feature_sets(scorer, stack)
    labels = next(iter(extracted.values())).labels.cpu()
    return {name: features.features[:, 0].cpu() for name, features in extracted.items()}, labels


# ---------------------------------------------------------------------------------------------- samples


def check_labels(shards: ShardSet, labels: list[int] | None, flag: str, data_flag: str) -> None:
    if labels is None:
        return
    if not shards.labeled:
        raise OodError(f"{flag}: {data_flag} {shards.root} is unlabeled; drop {flag} or give labeled shards")
    unknown = [label for label in labels if label >= len(shards.classes)]
    if unknown:
        raise OodError(f"{flag} {unknown[0]}: {data_flag} {shards.root} has labels 0..{len(shards.classes) - 1}")


def chosen(labels: torch.Tensor, wanted: list[int] | None) -> torch.Tensor:
    """A mask of the samples whose label is in `wanted` (all of them when None)."""
    if wanted is None:
        return torch.ones_like(labels, dtype=torch.bool)
    return torch.isin(labels, torch.tensor(wanted, dtype=labels.dtype))


def plan(in_data, out_data, classes, out_classes) -> tuple[ShardSet, ShardSet, list[int] | None, list[int] | None]:
    """The in and out shard sets and the labels each contributes (None: all samples), checked."""
    in_shards = open_shard_set(in_data)
    check_labels(in_shards, classes, "--classes", "--in")
    if out_data is None:
        if classes is None:
            raise OodError("--out or --classes is needed: name the out-of-distribution shards, or the "
                           "in-distribution labels of --in (the others are out)")
        out_shards = in_shards
        check_labels(out_shards, out_classes, "--out-classes", "--in")
        if out_classes is None:
            out_classes = [label for label in range(len(in_shards.classes)) if label not in classes]
            if not out_classes:
                raise OodError(f"--classes lists every label of --in {in_shards.root}: leave some out or give --out")
        both = sorted(set(classes) & set(out_classes))
        if both:
            raise OodError(f"--out-classes {both[0]} is also in --classes: a sample cannot be both in and out")
    else:
        out_shards = open_shard_set(out_data)
        check_labels(out_shards, out_classes, "--out-classes", "--out")
        if str(out_shards.root) == str(in_shards.root):  # local roots are resolved: the same set
            if classes is None or out_classes is None or set(classes) & set(out_classes):
                raise OodError(f"--out {out_data} is --in: with one shard set, split it with --classes and "
                               f"--out-classes that do not overlap")
    return in_shards, out_shards, classes, out_classes


def evaluate(run, in_data, out_data=None, classes=None, out_classes=None, batch_size: int = 256,
             device: str = "cpu") -> dict:
    """AUROC of each score of the run's rotation head at telling the out samples from the in samples."""
    in_shards, out_shards, classes, out_classes = plan(in_data, out_data, classes, out_classes)
    method, config, recipe, checkpoint = load_method(run)
    scorer = RotationScores(method, rotation_head(method, config)).to(device)
    device = torch.device(device)
    scored = {in_shards.root: score_shards(scorer, recipe, in_shards, batch_size, device)}
    if out_shards.root not in scored:
        scored[out_shards.root] = score_shards(scorer, recipe, out_shards, batch_size, device)
    sides = {}
    for side, shards, wanted, flag in (("in", in_shards, classes, "--classes"),
                                       ("out", out_shards, out_classes, "--out-classes")):
        scores, labels = scored[shards.root]
        mask = chosen(labels, wanted)
        if not mask.any():
            where = "--in" if shards is in_shards else "--out"
            raise OodError(f"{flag} {','.join(map(str, wanted))}: {where} {shards.root} has no sample of these labels")
        sides[side] = {"data": str(shards.root), "classes": wanted, "samples": int(mask.sum()),
                       "scores": {name: values[mask] for name, values in scores.items()}}
    results = {"run": str(run), "checkpoint": str(checkpoint), "method": config.method, "backbone": config.backbone,
               "input_size": recipe.groups[0].size, "auroc": {}, "mean_score": {}}
    for name in sides["in"]["scores"]:
        inside, outside = sides["in"]["scores"][name], sides["out"]["scores"][name]
        results["auroc"][name] = auroc(inside, outside)
        results["mean_score"][name] = {"in": float(inside.mean()), "out": float(outside.mean())}
    for side in ("in", "out"):
        results[side] = {key: value for key, value in sides[side].items() if key != "scores"}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", metavar="RUN", help="a run directory (its latest checkpoint) or a checkpoint directory")
    parser.add_argument("--in", dest="in_data", required=True, metavar="SHARDS", help="in-distribution shards")
    parser.add_argument("--out", dest="out_data", default=None, metavar="SHARDS",
                        help="out-of-distribution shards (default: the labels of --in that --classes leaves out)")
    parser.add_argument("--classes", "--in-classes", dest="classes", type=label_list, default=None, metavar="L,L",
                        help="the labels of --in that are in-distribution (default: all)")
    parser.add_argument("--out-classes", type=label_list, default=None, metavar="L,L",
                        help="the labels of --out (or of --in without --out) that are out-of-distribution")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        results = evaluate(args.run, args.in_data, args.out_data, args.classes, args.out_classes,
                           args.batch_size, args.device)
    except (OodError, ShardError, ConfigError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(f"{results['method']} | {results['backbone']} at {results['input_size']} px | {results['checkpoint']}")
    for side in ("in", "out"):
        part = results[side]
        labels = "all labels" if part["classes"] is None else "labels " + ",".join(map(str, part["classes"]))
        print(f"{side:<3}: {part['samples']} samples of {part['data']} ({labels})")
    for name, value in results["auroc"].items():
        mean = results["mean_score"][name]
        print(f"{SCORES[name]:<16} AUROC {value:.4f}  (mean score in {mean['in']:.4f}, out {mean['out']:.4f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
