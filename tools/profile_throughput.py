"""Measure the input stack stage by stage, on the same shards and cores, in one run.

    python tools/profile_throughput.py --method swav --multicrop 2x224+6x96 --data shards/fashion-mnist-train-10k

Stages: (1) read only, (2) read + decode, (3) + geometric crops (DALI), (4) + the photometric recipe on
the training device (the full input stack, as train.py sees it). Warm-up batches are excluded; each
stage is timed over several repetitions and the median is reported, with each stage's throughput as
a fraction of the decode-only ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipelines.dali_stage import DaliConfig, build_pipeline  # noqa: E402
from pipelines.shards import DEMO_TRAIN, ShardError, open_shard_set  # noqa: E402
from pipelines.spec import RecipeError, preset  # noqa: E402
from pipelines.stack import InputStack  # noqa: E402


def _time_batches(next_batch, warmup: int, batches: int, repeats: int) -> list[float]:
    """Seconds per batch, one median-able value per repetition."""
    for _ in range(warmup):
        next_batch()
    per_repeat = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(batches):
            next_batch()
        per_repeat.append((time.perf_counter() - started) / batches)
    return per_repeat


def profile(recipe, shards, batch_size: int, threads: int, warmup: int, batches: int, repeats: int, device) -> dict:
    config = DaliConfig(batch_size=batch_size, num_threads=threads, seed=0)
    results = {}
    for stage, label in (("read", "1 read"), ("decode", "2 read+decode"), ("crop", "3 + crops (DALI)")):
        pipe = build_pipeline(recipe, shards, config, upto=stage)
        results[label] = _time_batches(pipe.run, warmup, batches, repeats)
        del pipe
    stack = InputStack(recipe, shards, batch_size, seed=0, device=device, num_threads=threads)
    results["4 + photometric (input stack)"] = _time_batches(lambda: next(stack), warmup, batches, repeats)
    return {
        stage: {"seconds_per_batch": statistics.median(values), "images_per_second": batch_size / statistics.median(values)}
        for stage, values in results.items()
    }


def print_table(results: dict, batch_size: int) -> None:
    ceiling = results["2 read+decode"]["images_per_second"]
    print(f"{'stage':34s} {'images/s':>10s} {'ms/batch':>10s} {'of decode':>10s}")
    for stage, row in results.items():
        share = row["images_per_second"] / ceiling
        print(f"{stage:34s} {row['images_per_second']:10.1f} {1000 * row['seconds_per_batch']:10.1f} {share:10.1%}")
    print(f"(batch {batch_size}; images/s counts source images, each yielding every view of the recipe)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="swav")
    parser.add_argument("--multicrop", default=None, help="override the crops, e.g. 2x224+6x96")
    parser.add_argument("--data", default=str(DEMO_TRAIN))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="DALI CPU threads (default: all cores)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        recipe = preset(args.method)
        if args.multicrop:
            recipe = recipe.with_multicrop(args.multicrop)
        shards = open_shard_set(args.data)
    except (RecipeError, ShardError) as error:
        print(f"profile_throughput: error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    results = profile(recipe, shards, args.batch_size, args.threads, args.warmup, args.batches, args.repeats, args.device)
    print(f"{recipe.name} {recipe.multicrop} on {shards.root} ({args.threads} threads, {args.device})")
    print_table(results, args.batch_size)
    if args.json:
        report = {"method": recipe.name, "multicrop": recipe.multicrop, "data": str(shards.root),
                  "batch_size": args.batch_size, "threads": args.threads, "device": args.device, "stages": results}
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
