"""Fashion-MNIST quality benchmark: pretrain a method for a fixed budget on the 60,000 training images,
then score frozen features on the official 10,000-image test set next to two references.

    python tools/benchmark_quality.py --method swav --minutes 30
    python tools/benchmark_quality.py --method simclr --epochs 2 --train-options "--batch-size 128"

Needs Debian's `dataset-fashion-mnist` package (`sudo apt-get install dataset-fashion-mnist`; it puts
the IDX files in /usr/share/datasets/fashion-mnist) or `--fashion-mnist DIR` holding the four
`*-idx?-ubyte.gz` files. The shards are written once under `--work-dir` and reused.

Reported, each on the test set with the train set as memory bank / fitting set:
  - the pretrained backbone: weighted kNN (cosine, k = 20 and 200, T = 0.07) and a linear probe
    (tools/linear_probe.py's protocol: standardised features, L-BFGS logistic regression, weight decay
    chosen on 10% of train);
  - the same backbone at its random initialisation (what pretraining adds);
  - raw pixels (784 values in [0, 1]): the same kNN, and the same logistic regression.
A budget in minutes runs train.py with `--time-limit MINUTES --schedule-by-time`: the schedules follow
the share of the budget used, so the run ends annealed at the budget even when the machine's speed
drifts (on this project's VMs it moves 20-40 % within one run). A short timing run of the same command
(its images/s) sets the schedule's resolution, `--max-steps`; the report gives the steps done and
planned. JSON and a markdown table row go to
`--work-dir/<run name>/quality.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from models.knn import knn_accuracies, l2_normalize_  # noqa: E402
from tools import make_shards  # noqa: E402
from tools.eval_knn import extract, load_backbone  # noqa: E402
from tools.linear_probe import probe  # noqa: E402

PROG = "benchmark_quality"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
KS = (20, 200)


class BenchmarkError(Exception):
    pass


def find_fashion_mnist(folder: Path) -> Path:
    missing = [name for pair in FILES.values() for name in pair if not (folder / name).is_file()]
    if missing:
        raise BenchmarkError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}): install Debian's package "
            f"(sudo apt-get install dataset-fashion-mnist) or pass --fashion-mnist DIR with the four IDX files")
    return folder


def pixels(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images as (N, 784) floats in [0, 1], labels) straight from the IDX files."""
    images, labels = (folder / name for name in FILES[split])
    try:
        x, y = make_shards.load_idx(images, "images"), make_shards.load_idx(labels, "labels")
    except make_shards.CliError as error:
        raise BenchmarkError(str(error)) from None
    x = x.reshape(x.shape[0], -1).astype(np.float32) / 255.0
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def build_shards(folder: Path, work_dir: Path) -> dict[str, Path]:
    """The train and test shard sets (written once; an existing complete set is reused)."""
    from pipelines.shards import ShardError, open_shard_set

    shards = {}
    for split, (images, _) in FILES.items():
        out = work_dir / "shards" / f"fashion-mnist-{split}"
        try:
            open_shard_set(out, need_labels=True)
        except ShardError:
            print(f"writing {split} shards to {out}", flush=True)
            code = make_shards.main([str(folder / images), str(out), "--force"])
            if code != 0:
                raise BenchmarkError(f"make_shards failed on {folder / images} (exit {code})") from None
        shards[split] = out
    return shards


def evaluate_features(train_x, train_y, test_x, test_y) -> dict:
    """kNN (on a normalised copy of the train features as the bank) and the linear probe (on the features
    as they are)."""
    bank = l2_normalize_(train_x.clone())
    return {"knn": knn_accuracies(bank, train_y, test_x, test_y, 10, KS, temperature=0.07),
            "linear": probe(train_x, train_y, test_x, test_y, 10)}


def evaluate_backbone(backbone, info, shards: dict[str, Path], device) -> dict:
    from pipelines.shards import open_shard_set

    size = info.get("input_size") or 32
    backbone = backbone.to(device).eval()
    features = {split: extract(backbone, info, open_shard_set(path, need_labels=True), size, 256, device)
                for split, path in shards.items()}
    return evaluate_features(*features["train"], *features["test"])


def train_command(args, shards: dict[str, Path], run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--method", args.method, "--data", str(shards["train"]),
            "--val-data", "", "--output-dir", str(run_dir.parent), "--name", run_dir.name,
            "--checkpoint-every", "1000000", *shlex.split(args.train_options or ""), *extra]


def run_training(command: list[str], threads: int) -> None:
    """`command` in this process's working directory, where the relative paths given to this tool lead."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print("$ " + " ".join(shlex.quote(part) for part in command), flush=True)
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise BenchmarkError(f"train.py exited with {result.returncode} (its error is above)")


def measured_images_per_second(run_dir: Path) -> float:
    """The median images/s of a timing run's log windows, the first (start-up) window left out."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_second"] for r in records if "images_per_second" in r][1:]
    if not rates:
        raise BenchmarkError(f"{run_dir}/metrics.jsonl has no throughput to plan the budget with")
    return float(np.median(rates))


def steps_for_minutes(args, shards, work_dir: Path, threads: int) -> tuple[int, float]:
    """Optimizer steps that fit in `args.minutes` of training, from a 30-step timing run."""
    import shutil

    timing_dir = work_dir / "timing"
    shutil.rmtree(timing_dir, ignore_errors=True)
    run_training(train_command(args, shards, timing_dir, ["--max-steps", "30", "--log-every", "5"]), threads)
    rate = measured_images_per_second(timing_dir)
    steps = max(1, int(args.minutes * 60 * rate / run_config(timing_dir)["batch_size"]))
    shutil.rmtree(timing_dir, ignore_errors=True)
    return steps, rate


def run_config(run_dir: Path) -> dict:
    """The resolved train.py options of a run (its config.yaml)."""
    return yaml.safe_load((run_dir / "config.yaml").read_text())["config"]


def markdown_row(report: dict) -> str:
    def pct(value):
        return f"{value:.1f}"

    trained, random_init, raw = report["pretrained"], report["random_init"], report["pixels"]
    budget = report["budget"]
    return (f"| {report['method']} | {report['backbone']} | {budget['steps']} steps ({budget['epochs']:.2f} ep, "
            f"{budget['train_minutes']:.1f} min) | **{pct(trained['knn']['20']['top1'])}** / "
            f"{pct(trained['knn']['200']['top1'])} | **{pct(trained['linear']['top1'])}** | "
            f"{pct(random_init['knn']['20']['top1'])} / {pct(random_init['linear']['top1'])} | "
            f"{pct(raw['knn']['20']['top1'])} / {pct(raw['linear']['top1'])} | {report['machine']} |")


MARKDOWN_HEADER = ("| method | backbone | budget | kNN top-1 k=20 / 200 | linear top-1 | random init kNN / linear "
                   "| pixels kNN / logistic | machine |\n|---|---|---|---|---|---|---|---|")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="swav")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, help="training time budget (default: 30)")
    budget.add_argument("--epochs", type=int, default=None, help="budget in epochs of the 60k images instead")
    parser.add_argument("--train-options", default="", help='more train.py flags, e.g. "--batch-size 128 --lr 2"')
    parser.add_argument("--fashion-mnist", default=str(DEBIAN_DIR), help="folder of the IDX files (default: %(default)s)")
    parser.add_argument("--work-dir", default="runs/fashion-mnist", help="shards and runs (default: %(default)s)")
    parser.add_argument("--name", default=None, help="run name (default: <method>-<budget>)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for training")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.minutes is None and args.epochs is None:
        args.minutes = 30.0
    if (args.minutes is not None and args.minutes <= 0) or (args.epochs is not None and args.epochs <= 0):
        parser.error("--minutes / --epochs must be positive")
    work_dir = Path(args.work_dir)
    name = args.name or f"{args.method}-" + (f"{args.minutes:g}min" if args.minutes else f"{args.epochs:g}ep")
    run_dir = work_dir / name
    try:
        folder = find_fashion_mnist(Path(args.fashion_mnist))
        shards = build_shards(folder, work_dir)
        train_x, train_y = pixels(folder, "train")
        images = train_x.shape[0]
        if args.minutes:
            steps, rate = steps_for_minutes(args, shards, work_dir, args.threads)
            print(f"timing run: {rate:.1f} images/s -> {steps} steps for {args.minutes:g} min", flush=True)
            # the schedule follows the clock: a machine that slows down or speeds up after the timing run
            # still ends the run annealed at the budget
            extra = ["--max-steps", str(steps), "--time-limit", f"{args.minutes:g}", "--schedule-by-time"]
        else:
            extra = ["--epochs", str(args.epochs)]
        started = time.perf_counter()
        run_training(train_command(args, shards, run_dir, extra), args.threads)
        train_minutes = (time.perf_counter() - started) / 60
        backbone, info = load_backbone(run_dir)
        device = torch.device(args.device)
        print("evaluating the pretrained backbone", flush=True)
        pretrained = evaluate_backbone(backbone, info, shards, device)
        print("evaluating the same backbone at its random initialisation", flush=True)
        from models.backbones import create_backbone

        torch.manual_seed(0)
        random_backbone, _ = create_backbone(info["timm_name"], stem=info.get("stem", "standard"),
                                             **(info.get("model_kwargs") or {}))
        random_init = evaluate_backbone(random_backbone, info, shards, device)
        print("evaluating raw pixels", flush=True)
        test_x, test_y = pixels(folder, "test")
        raw = evaluate_features(train_x, train_y, test_x, test_y)
    except BenchmarkError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    config = run_config(run_dir)
    batch = config["batch_size"]
    steps = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1]).get("step")
    report = {"method": args.method, "backbone": info["timm_name"], "machine": machine(),
              "budget": {"steps": steps, "planned_steps": config["max_steps"], "epochs": steps * batch / images,
                         "train_minutes": train_minutes,
                         "requested_minutes": args.minutes, "requested_epochs": args.epochs},
              "pretrained": pretrained, "random_init": random_init, "pixels": raw, "run": str(run_dir),
              "config": config}
    (run_dir / "quality.json").write_text(json.dumps(report, indent=2, default=str))
    row = markdown_row(report)
    (run_dir / "quality.md").write_text(MARKDOWN_HEADER + "\n" + row + "\n")
    print(MARKDOWN_HEADER + "\n" + row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
