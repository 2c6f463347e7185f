"""Where the time of a training step goes: every stage measured in one run, on the same shards and cores.

    python tools/profile_throughput.py --method swav --multicrop 2x224+6x96 --data shards/bench-2k

Stages: (1) read only, (2) read + decode, (3) + geometric crops (DALI), (4) + the photometric recipe on
the training device (the full input stack, as train.py sees it), (5) the model's forward/backward and
optimizer step on synthetic tensors of the recipe's shapes, (6) end-to-end training steps (4 feeding 5),
and (7) the peer baseline: the same recipe through a PyTorch DataLoader with PIL/torchvision transforms
and one worker per core (lightly's SwaVTransform / DINOTransform for those methods when lightly is
installed; for a recipe with pretext tasks, jigsaw / relloc / rotation, their inputs made per image in the
workers as VISSL and mmselfsup make them: tools/pretext_peer.py). Stage (4) is also broken down per
photometric op, plus the pretext tasks' inputs. Warm-up batches are excluded; each stage
is timed over several repetitions and the median is reported. Stages (4) and (7) are timed in
alternating blocks and "stack vs peer" is the median of the per-pair ratios, so a machine whose speed
drifts during the run moves both sides of each ratio. `--json` and `--png` write the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipelines.dali_stage import build_pipeline  # noqa: E402
from pipelines.masking import make_masks  # noqa: E402
from pipelines.photometric import PhotometricStage  # noqa: E402
from pipelines.pretext import PretextStage  # noqa: E402
from pipelines.shards import DEMO_TRAIN, ShardError, open_shard_set  # noqa: E402
from pipelines.spec import Photometric, RecipeError, preset  # noqa: E402
from pipelines.stack import Batch, InputStack, dali_config  # noqa: E402

STAGES = ("1 read", "2 read+decode", "3 + crops (DALI)", "4 + photometric (input stack)", "5 model step",
          "6 end-to-end training", "7 peer baseline (DataLoader + PIL)")


@dataclasses.dataclass
class Settings:
    batch_size: int
    threads: int
    warmup: int
    batches: int
    repeats: int
    device: torch.device


def time_batches(next_batch, settings: Settings) -> float:
    """Median seconds per batch over `repeats` runs of `batches` calls, after `warmup` calls."""
    for _ in range(settings.warmup):
        next_batch()
    per_repeat = []
    for _ in range(settings.repeats):
        if settings.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(settings.batches):
            next_batch()
        if settings.device.type == "cuda":
            torch.cuda.synchronize()
        per_repeat.append((time.perf_counter() - started) / settings.batches)
    return statistics.median(per_repeat)


# ---------------------------------------------------------------------------------------------- stages


def dali_stages(recipe, shards, settings: Settings) -> dict[str, float]:
    """Stages 1-3 with DALI set up as the input stack sets it up on `settings.device` (`dali_config`): on a
    GPU the images are decoded there (mixed decoding, nvJPEG), as in training, so "vs decode" compares
    the stack with the decoder it really uses."""
    config = dali_config(settings.batch_size, settings.device, seed=0, num_threads=settings.threads)
    seconds = {}
    for stage, label in zip(("read", "decode", "crop"), STAGES[:3]):
        pipe = build_pipeline(recipe, shards, config, upto=stage)
        seconds[label] = time_batches(pipe.run, settings)
        del pipe
    return seconds


def _input_stack(recipe, shards, settings: Settings) -> InputStack:
    return InputStack(recipe, shards, settings.batch_size, seed=0, device=settings.device,
                      num_threads=settings.threads)


def stack_and_peer(recipe, shards, settings: Settings) -> tuple[list[float], list[float], str]:
    """Seconds per batch of the input stack (stage 4) and the peer (stage 7), timed in alternating blocks.

    On a shared or virtual machine the speed drifts over minutes, so two stages timed minutes apart
    can differ by 20 % for reasons of their own; alternating blocks give each pair the same conditions.
    Neither loader may work in the other's block: the peer's workers start for each of its blocks and
    are shut down after it (idle workers would refill their prefetch queues on the stack's time), and
    each block's warm-up outlasts the other side's refill (DALI's queue of a few batches) and the
    workers' start, so only steady-state batches are timed.
    """
    stack = _input_stack(recipe, shards, settings)
    name, loader = peer_loader(recipe, shards, settings)
    block = dataclasses.replace(settings, repeats=1)
    stack_block = dataclasses.replace(block, warmup=max(settings.warmup, stack.dali.prefetch_queue_depth + 1))
    peer_block = dataclasses.replace(block, warmup=max(settings.warmup, 2 * settings.threads + 1))
    stack_seconds, peer_seconds = [], []
    for _ in range(settings.repeats):
        stack_seconds.append(time_batches(lambda: next(stack), stack_block))
        batches = iter(loader)
        peer_seconds.append(time_batches(batches.__next__, peer_block))
        del batches  # shuts the workers down
    return stack_seconds, peer_seconds, name


def _only(photometric: Photometric, op: str | None) -> Photometric:
    """`photometric` with every op but `op` switched off (None: all off, normalisation only)."""
    keep = {"jitter": "jitter_p", "grayscale": "grayscale_p", "blur": "blur_p", "solarize": "solarize_p"}
    return dataclasses.replace(photometric, **{field: getattr(photometric, field) if name == op else 0.0
                                               for name, field in keep.items()})


def photometric_breakdown(recipe, settings: Settings) -> dict[str, float]:
    """Seconds per batch of each photometric op alone on the recipe's crop shapes (uint8 -> float and
    normalisation counted once, under "convert + normalise"; each op's row is its cost on top), and of
    making the recipe's pretext inputs from group 0's views ("pretext <tasks>")."""
    generator = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (group.count * settings.batch_size, 3, group.size, group.size),
                           dtype=torch.uint8, generator=generator).to(settings.device) for group in recipe.groups]

    def seconds_with(op: str | None) -> float:
        variant = dataclasses.replace(recipe, groups=tuple(
            dataclasses.replace(g, photometric=tuple(_only(p, op) for p in g.photometric)) for g in recipe.groups))
        stage = PhotometricStage(variant, settings.device, torch.Generator(settings.device).manual_seed(0))
        return time_batches(lambda: [stage(c.clone(), i) for i, c in enumerate(crops)], settings)

    base = seconds_with(None)
    used = {op for g in recipe.groups for p in g.photometric
            for op, on in (("jitter", p.jitter_p), ("grayscale", p.grayscale_p), ("blur", p.blur_p),
                           ("solarize", p.solarize_p)) if on > 0}
    breakdown = {"convert + normalise": base}
    for op in ("jitter", "grayscale", "blur", "solarize"):
        if op in used:
            breakdown[op] = max(seconds_with(op) - base, 0.0)
    if recipe.pretext:
        views = torch.randn(crops[0].shape, generator=generator).to(settings.device)
        pretext = PretextStage(recipe.pretext, settings.device)
        pretext_generator = torch.Generator(settings.device).manual_seed(0)
        breakdown[f"pretext {'+'.join(task.task for task in recipe.pretext)}"] = time_batches(
            lambda: pretext(views, pretext_generator), settings)
    return breakdown


def method_and_optimizer(method_name: str, recipe, device: torch.device, batch_size: int):
    """(method, optimizer, the recipe the method trains on, a description of its backbone) as train.py
    builds them with its defaults for `recipe` on `device`: the method's own default backbone for the
    device (a ViT for MAE and SIM) sized to the crops, the default stem, the method's optimizer, and
    the recipe adapted by the method (a masked method's mask grid follows its patch size). ValueError
    when the method cannot train on `recipe`."""
    from models.backbones import default_stem, options_for_crops
    from models.methods import create_method, method_class
    from models.optim import build_optimizer

    cls = method_class(method_name)
    cls.check_recipe(recipe, batch_size)
    on_gpu = device.type == "cuda"
    backbone, options = cls.chosen_backbone(None, {}, on_gpu)
    options = options_for_crops(backbone, options, [group.size for group in recipe.groups])
    defaults = cls.defaults(on_gpu, backbone)
    stem = default_stem(backbone, recipe.groups[0].size, on_gpu)
    method = create_method(method_name, backbone=backbone, stem=stem, on_gpu=on_gpu, backbone_kwargs=options)
    method = method.to(device)
    optimizer = build_optimizer(defaults["optimizer"], method.param_groups(defaults["weight_decay"]), lr=1e-3,
                                betas=method.adamw_betas)
    described = ", ".join([backbone, *(f"{key}={value}" for key, value in options.items())])
    return method, optimizer, method.adapt_recipe(recipe), f"{described} ({stem} stem)"


def synthetic_batch(recipe, batch_size: int, device: torch.device) -> Batch:
    """A batch of the recipe's shapes with random pixels: every view (whole-image boxes, no flips), for a
    masked recipe masks drawn as the input stack draws them, and the recipe's pretext inputs made from
    group 0's random views by the input stack's own functions (`pipelines.pretext`)."""
    generator = torch.Generator(device).manual_seed(0)
    views, boxes, flips = [], [], []
    for group in recipe.groups:
        rows = group.count * batch_size
        views.append(torch.randn(rows, 3, group.size, group.size, generator=generator, device=device))
        boxes.append(torch.tensor([0.0, 0.0, group.size, group.size], device=device).repeat(rows, 1))
        flips.append(torch.zeros(rows, dtype=torch.bool, device=device))
    size = recipe.groups[0].size
    masks = None
    if recipe.masking is not None:
        masks = make_masks(recipe.masking, batch_size, size, generator, device)
    pretext = PretextStage(recipe.pretext, device)(views[0], generator) if recipe.pretext else {}
    return Batch(views=views, boxes=boxes, flips=flips,
                 image_sizes=torch.tensor([size, size], device=device).repeat(batch_size, 1),
                 labels=torch.full((batch_size,), -1, device=device), masks=masks,
                 raw_keys=torch.zeros(batch_size, 1, dtype=torch.uint8), pretext=pretext,
                 indices=torch.arange(batch_size, device=device))


def _train_step(method, optimizer, batch, step: int, total: int = 1000) -> None:
    from models.methods import Progress
    from models.methods.base import train_step
    from models.runtime import autocast, default_mixed_precision

    progress = Progress(step=step % total, epoch=0, total_steps=total, steps_per_epoch=total)
    # the step as train.py computes it by default: bf16 autocast on a CUDA GPU that has it, else float32
    device = batch.views[0].device
    with autocast(device, default_mixed_precision() if device.type == "cuda" else "no"):
        train_step(method, optimizer, batch, progress)


def model_stages(method, optimizer, recipe, shards, settings: Settings) -> dict[str, float]:
    """Stage 5 (the step on a synthetic batch) and stage 6 (the step on the input stack's batches) of
    `method` (from `method_and_optimizer`, with the recipe it adapted)."""
    if settings.device.type == "cuda":
        from models.runtime import use_fast_cuda_kernels

        use_fast_cuda_kernels()  # TF32 and cuDNN autotuning, as train.py sets them up
    method.adapt_to_data(shards.num_samples)  # per-sample state (a memory bank) for these shards
    synthetic = synthetic_batch(recipe, settings.batch_size, settings.device)
    counter = iter(range(10**9))
    seconds = {STAGES[4]: time_batches(lambda: _train_step(method, optimizer, synthetic, next(counter)), settings)}
    stack = InputStack(recipe, shards, settings.batch_size, seed=0, device=settings.device,
                       num_threads=settings.threads, sample_indices=method.needs_sample_indices)
    seconds[STAGES[5]] = time_batches(lambda: _train_step(method, optimizer, next(stack), next(counter)), settings)
    return seconds


# ---------------------------------------------------------------------------------------------- baseline


def torchvision_views(recipe):
    """The recipe as torchvision transforms on PIL images: one Compose per view."""
    from torchvision import transforms as T

    modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
             "nearest": T.InterpolationMode.NEAREST, "lanczos": T.InterpolationMode.LANCZOS}
    composes = []
    for group in recipe.groups:
        for view in range(group.count):
            p = group.view_photometric(view)
            kernel = 2 * round(group.size * 0.05) + 1  # ~10 % of the crop, as SimCLR/BYOL size it
            steps = [T.RandomResizedCrop(group.size, scale=group.scale, ratio=group.ratio,
                                         interpolation=modes[group.interpolation]),
                     T.RandomHorizontalFlip(group.flip_p),
                     T.RandomApply([T.ColorJitter(p.brightness, p.contrast, p.saturation, p.hue)], p=p.jitter_p),
                     T.RandomGrayscale(p.grayscale_p),
                     T.RandomApply([T.GaussianBlur(kernel, sigma=p.blur_sigma)], p=p.blur_p),
                     T.RandomSolarize(128, p=p.solarize_p),
                     T.ToTensor()]
            if recipe.mean is not None:
                steps.append(T.Normalize(recipe.mean, recipe.std))
            composes.append(T.Compose(steps))
    return composes


def peer_transform(recipe):
    """(name, callable PIL image -> list of view tensors): lightly's transform when it exists for the
    recipe and lightly is installed, else the recipe in torchvision."""
    sizes = [g.size for g in recipe.groups]
    counts = [g.count for g in recipe.groups]
    try:
        if recipe.name == "swav":
            from lightly.transforms import SwaVTransform

            return "lightly SwaVTransform", SwaVTransform(
                crop_sizes=tuple(sizes), crop_counts=tuple(counts),
                crop_min_scales=tuple(g.scale[0] for g in recipe.groups),
                crop_max_scales=tuple(g.scale[1] for g in recipe.groups))
        if recipe.name == "dino" and len(sizes) == 2 and counts[0] == 2:
            from lightly.transforms import DINOTransform

            return "lightly DINOTransform", DINOTransform(
                global_crop_size=sizes[0], global_crop_scale=recipe.groups[0].scale, local_crop_size=sizes[1],
                local_crop_scale=recipe.groups[1].scale, n_local_views=counts[1])
    except ImportError:
        pass
    views = torchvision_views(recipe)
    return "torchvision (the recipe)", lambda image: [view(image) for view in views]


def _first_image(sample: dict):
    for extension in ("jpg", "jpeg", "png", "webp"):
        if extension in sample:
            return sample[extension]
    raise KeyError(f"no image member in sample {sample.get('__key__')}")


def peer_loader(recipe, shards, settings: Settings):
    """(name, DataLoader) of the peer: webdataset + PIL transforms, one worker per thread, two batches
    prefetched per worker; each `iter()` starts its own workers. A recipe with pretext tasks yields their
    inputs only (`tools.pretext_peer`), in the layout of the input stack's `Batch.pretext`."""
    import webdataset as wds

    collate = None
    if recipe.pretext:
        from tools.pretext_peer import PretextPeer, collate_pretext

        tasks = "+".join(task.task for task in recipe.pretext)
        name, transform, collate = (f"{tasks} per image in torchvision (VISSL / mmselfsup style)",
                                    PretextPeer(recipe, torchvision_views(recipe)[0]), collate_pretext)
    else:
        name, transform = peer_transform(recipe)
    urls = [str(path) for path in shards.tars]
    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                              workersplitter=wds.split_by_worker, empty_check=False)
               .repeat().shuffle(1000).decode("pil").map(lambda sample: transform(_first_image(sample))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, num_workers=settings.threads,
                                         prefetch_factor=2 if settings.threads > 0 else None, collate_fn=collate)
    return f"{name}, DataLoader with {settings.threads} workers", loader


# ---------------------------------------------------------------------------------------------- report


def report(results: dict) -> list[str]:
    stages, batch = results["stages"], results["batch_size"]
    ceiling = stages[STAGES[1]]["seconds_per_batch"]
    step = stages.get(STAGES[5], {}).get("seconds_per_batch")
    lines = [f"{'stage':40s} {'images/s':>10s} {'ms/batch':>10s} {'vs decode':>10s} {'of a step':>10s}"]
    for stage, row in stages.items():
        of_step = f"{row['seconds_per_batch'] / step:10.0%}" if step and stage.startswith(("4", "5")) else " " * 10
        lines.append(f"{stage:40s} {row['images_per_second']:10.1f} {1000 * row['seconds_per_batch']:10.1f} "
                     f"{ceiling / row['seconds_per_batch']:10.1%} {of_step}")
    if "photometric_ops" in results:
        lines.append("stage 4 per op (ms/batch):  " + ",  ".join(
            f"{op} {1000 * s:.1f}" for op, s in results["photometric_ops"].items()))
    for line in verdict(results):
        lines.append(line)
    lines.append(f"(batch {batch}; images/s counts source images, each yielding every view of the recipe)")
    return lines


def verdict(results: dict) -> list[str]:
    stages = results["stages"]
    rate = {stage: row["images_per_second"] for stage, row in stages.items()}
    lines = []
    if "stack_vs_peer" in results:
        pairs = results["stack_vs_peer"]
        lines.append(f"input stack vs peer baseline: {pairs['median']:.2f}x (median of {len(pairs['pairs'])} "
                     f"interleaved pairs: {', '.join(f'{r:.2f}' for r in pairs['pairs'])})")
    lines.append(f"input stack vs decode-only ceiling: {rate[STAGES[3]] / rate[STAGES[1]]:.1%}")
    if STAGES[4] in rate and STAGES[5] in rate:
        slower = min(rate[STAGES[3]], rate[STAGES[4]])
        bottleneck = "the input stack" if rate[STAGES[3]] < rate[STAGES[4]] else "the model"
        lines.append(f"bottleneck: {bottleneck}; end-to-end reaches {rate[STAGES[5]] / slower:.0%} of the slower "
                     f"of stages 4 and 5")
    return lines


def write_png(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = results["stages"]
    names, rates = list(stages), [row["images_per_second"] for row in stages.values()]
    figure, axis = plt.subplots(figsize=(9, 0.5 * len(names) + 1.2))
    axis.barh(names[::-1], rates[::-1], color="tab:blue")
    axis.set_xscale("log")
    axis.set_xlabel("images/s (log scale)")
    axis.set_title(f"{results['method']} {results['multicrop']}, batch {results['batch_size']}, "
                   f"{results['threads']} threads, {results['device']}", fontsize=9)
    for y, rate in enumerate(rates[::-1]):
        axis.text(rate, y, f" {rate:,.0f}", va="center", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="swav")
    parser.add_argument("--multicrop", default=None, help="override the crops, e.g. 2x224+6x96")
    parser.add_argument("--data", default=str(DEMO_TRAIN))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="DALI threads, torch threads and baseline workers (default: all cores)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 warm-up, 2 batches, 2 repetitions (a smoke run)")
    parser.add_argument("--skip", default="", help="comma-separated stage numbers to skip, e.g. 5,6")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--png", default=None, help="also draw them here (a bar chart)")
    args = parser.parse_args(argv)
    try:
        recipe = preset(args.method)
        if args.multicrop:
            recipe = recipe.with_multicrop(args.multicrop)
        shards = open_shard_set(args.data)
    except (RecipeError, ShardError) as error:
        print(f"profile_throughput: error: {error}", file=sys.stderr)
        return 2
    try:
        skip = {int(n) for n in args.skip.split(",") if n.strip()}
    except ValueError:
        print(f"profile_throughput: error: --skip {args.skip!r}: give stage numbers such as 5,6", file=sys.stderr)
        return 2
    if args.quick:
        args.warmup, args.batches, args.repeats = 1, 2, 2
    if shards.remote and 7 not in skip:  # webdataset's own reader takes files and URLs it can pipe, not s3://
        print(f"note: stage 7 (the webdataset + PIL peer) is skipped for {shards.root}: profile a local copy to "
              "compare with it")
        skip.add(7)
    torch.set_num_threads(args.threads)
    settings = Settings(args.batch_size, args.threads, args.warmup, args.batches, args.repeats,
                        torch.device(args.device))
    try:  # first: a masked method's recipe draws masks for its ViT's patches in every stage
        method, optimizer, recipe, model = method_and_optimizer(args.method, recipe, settings.device,
                                                                args.batch_size)
    except ValueError as error:
        print(f"profile_throughput: error: {error}", file=sys.stderr)
        return 2
    seconds = dali_stages(recipe, shards, settings)
    results = {"method": recipe.name, "multicrop": recipe.multicrop, "data": str(shards.root),
               "batch_size": args.batch_size, "threads": args.threads, "device": args.device,
               "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))}
    if 7 in skip:
        stack = _input_stack(recipe, shards, settings)
        seconds[STAGES[3]] = time_batches(lambda: next(stack), settings)
        del stack
    else:
        stack_seconds, peer_seconds, results["baseline"] = stack_and_peer(recipe, shards, settings)
        seconds[STAGES[3]] = statistics.median(stack_seconds)
        pairs = [peer / own for own, peer in zip(stack_seconds, peer_seconds)]
        results["stack_vs_peer"] = {"median": statistics.median(pairs), "pairs": pairs}
    results["photometric_ops"] = photometric_breakdown(recipe, settings)
    if not {5, 6} <= skip:
        model_seconds = model_stages(method, optimizer, recipe, shards, settings)
        results["model"] = model
        seconds.update({k: v for k, v in model_seconds.items() if int(k[0]) not in skip})
    if 7 not in skip:
        seconds[STAGES[6]] = statistics.median(peer_seconds)
    results["stages"] = {stage: {"seconds_per_batch": s, "images_per_second": args.batch_size / s}
                         for stage, s in seconds.items()}
    print(f"{recipe.name} {recipe.multicrop} on {shards.root} ({args.threads} threads, {args.device})")
    if "model" in results:
        print(f"model: {results['model']}; baseline: {results.get('baseline', 'skipped')}")
    print("\n".join(report(results)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.png:
        write_png(results, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
