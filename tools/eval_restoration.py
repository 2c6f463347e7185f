"""PSNR and SSIM per task of a restoration model (an `ipt` run) on held-out shards, against the trivial
baselines (bicubic upscaling for super-resolution, the noisy or rainy input itself), and a picture.

    python tools/eval_restoration.py runs/ipt-x                       # the demo validation split
    python tools/eval_restoration.py runs/ipt-x --val shards/my-val --json scores.json --picture restored.png

RUN is a folder holding `ipt.json` (a finished run, or an export) or a run / checkpoint directory (its
latest checkpoint, the model rebuilt from its saved options). Every image of `--val` (the whole image
resized to the size the model trained at) is corrupted by every task of the model with seeded draws
(`--seed`: the same corruptions each time, as train.py's periodic evaluation, which uses seed 0) and
scored: PSNR (dB, peak 1) and SSIM (11-px Gaussian window) on RGB in [0, 1], the whole image, outputs
clipped to [0, 1] (`pipelines/restoration.py`). `--picture` draws, for the first `--samples` images and
each task, the corrupted input, the model's output and the clean image.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipelines.shards import DEMO_VAL, ShardError  # noqa: E402
from pipelines.spec import RecipeError, Restoration, preset  # noqa: E402

PROG = "eval_restoration"


class EvalError(ValueError):
    """A run or option this tool cannot use; the message is one line naming it and the fix."""


def load_model(source: str | Path):
    """(the restoration network in eval mode on the CPU, the clean crop size it trained at, a label)."""
    from models.methods.ipt import MODEL_INFO, load_restoration_model

    source = Path(source)
    if (source / MODEL_INFO).is_file():
        network, info = load_restoration_model(source)
        return network, info["input_size"], f"{source.name} (exported)"
    from tools.show_views import load_run_method

    try:
        method, recipe, checkpoint = load_run_method(source)
    except (ValueError, OSError, KeyError) as error:
        raise EvalError(f"{source}: no {MODEL_INFO} and no checkpoint to rebuild the model from ({error}): pass a "
                        f"finished ipt run, an export or a checkpoint directory") from None
    if not hasattr(method, "restore"):
        raise EvalError(f"{source}: a {method.name} run restores no images (ipt runs do)")
    return method.backbone.eval(), recipe.groups[0].size, f"{checkpoint.parent.parent.name} {checkpoint.name}"


def evaluate(network, size: int, val: str, batch_size: int = 256, seed: int = 0, samples: int = 0):
    """({task: mean scores}, pictures) of `network` on every image of `val` at `size` px."""
    from pipelines.restoration import mean_scores, restoration_stack, score_restoration

    spec = Restoration(tasks=network.tasks).for_crop(size)
    recipe = preset("ipt").with_multicrop(f"1x{size}").with_pretext([spec])
    stack = restoration_stack(recipe, val, batch_size, num_threads=1)

    def restore(inputs: torch.Tensor, task: str) -> torch.Tensor:
        return network(inputs, task)[0]

    sums, pictures = score_restoration(restore, stack, spec, seed=seed, examples=samples)
    return mean_scores(sums, spec.tasks), pictures


def format_table(scores: dict) -> str:
    from pipelines.restoration import baseline_name

    lines = [f"{'task':<9} {'PSNR':>7} {'SSIM':>7}   {'baseline':<12} {'PSNR':>7} {'SSIM':>7}   {'gain dB':>7}"]
    for task, s in scores.items():
        lines.append(f"{task:<9} {s['psnr']:7.2f} {s['ssim']:7.4f}   {baseline_name(task):<12} {s['baseline_psnr']:7.2f} "
                     f"{s['baseline_ssim']:7.4f}   {s['psnr'] - s['baseline_psnr']:+7.2f}")
    return "\n".join(lines)


def draw(pictures: dict, scores: dict, title: str, out: Path) -> None:
    """One row per task; per image three columns: the corrupted input (an SR input at its own size), the
    output and the clean image, each titled with its PSNR in the first row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(pictures)
    samples = pictures[tasks[0]]["clean"].shape[0]
    figure, axes = plt.subplots(len(tasks), 3 * samples, figsize=(1.15 * 3 * samples, 1.25 * len(tasks)),
                                squeeze=False)
    for row, task in enumerate(tasks):
        for image in range(samples):
            for offset, name in enumerate(("input", "output", "clean")):
                axis = axes[row][3 * image + offset]
                shown = pictures[task][name][image].clamp(0, 1).permute(1, 2, 0).numpy()
                axis.imshow(shown, interpolation="nearest")
                axis.set_xticks([])
                axis.set_yticks([])
                if row == 0:
                    axis.set_title(name, fontsize=7)
            if image == 0:
                axes[row][0].set_ylabel(f"{task}\n{scores[task]['psnr']:.1f} dB", fontsize=7)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=80)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a folder with ipt.json (finished run or export), or a run / checkpoint directory")
    parser.add_argument("--val", default=str(DEMO_VAL), help="held-out shards (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="the corruptions' seed (default: %(default)s, as train.py)")
    parser.add_argument("--json", default=None, help="write the scores here")
    parser.add_argument("--picture", default=None, help="write input / output / clean per task here (PNG)")
    parser.add_argument("--samples", type=int, default=3, help="images per task in the picture (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.samples < 1:
            raise EvalError(f"--samples {args.samples}: give 1 or more")
        network, size, label = load_model(args.run)
        scores, pictures = evaluate(network, size, args.val, args.batch_size, args.seed,
                                    samples=args.samples if args.picture else 0)
    except (EvalError, RecipeError, ShardError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    images = next(iter(scores.values()))["images"]
    print(f"{label} on {args.val}: {images} images at {size} px, seed {args.seed}")
    print(format_table(scores))
    if args.json:
        from pipelines.files import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps({"run": str(args.run), "val": args.val, "size": size,
                                                       "seed": args.seed, "scores": scores}, indent=2))
    if args.picture:
        draw(pictures, scores, f"{label}: input / output / clean (rows: the task's mean PSNR)", Path(args.picture))
        print(f"wrote {args.picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
