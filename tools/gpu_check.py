"""An acceptance check of the GPU path in one command: every method trains, matches the CPU maths,
stays free of needless host-device syncs, and the throughput profiler runs.

    python tools/gpu_check.py --output gpu-check          # or: make gpu-check

On a machine with a CUDA GPU it
  1. trains every registered method for `--steps` steps on the demo shards with `train.py` on one GPU
     (and under `accelerate launch --multi_gpu` on all of them when there are several): exit code,
     steps logged, final loss and seconds per run; a failing method is recorded and the others go on;
  2. computes each method's first-step loss on the same batch on the CPU and on the GPU (same weights,
     float32, TF32 off) and compares them within `REL_TOLERANCE`;
  3. runs a few steps of each method in this process under `torch.cuda.set_sync_debug_mode("warn")` and
     counts the host-device syncs per step (the input stack's batch and the training step apart; the
     first step is left out, it initialises lazily);
  4. runs tools/profile_throughput.py for SwAV 2x224+6x96 and DINO 2x224+8x96 on an ImageNet-like
     benchmark set (written once under the output folder) and reports images/s, the peak GPU memory
     of torch's allocations and the input stack's share of the decode-only ceiling;
  5. writes `<output>/gpu_check.json`, prints a table and exits 0 when every check passed, otherwise 1
     with one line naming what failed. Sync counts are reported, not judged.

Without a CUDA GPU it prints one line saying so and exits 0. The checkpoints and exported weights of
the short training runs are deleted once the report has recorded that they were written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models.methods import METHODS, method_class  # noqa: E402
from pipelines.files import atomic_write_text  # noqa: E402
from pipelines.shards import DEMO_TRAIN, open_shard_set  # noqa: E402

PROG = "gpu_check"
NO_GPU = f"{PROG}: no CUDA GPU on this machine; nothing to check (this tool is for GPU machines)"
REPORT = "gpu_check.json"
# The same maths on the same batch in float32 with TF32 off still differs between devices: cuDNN and
# cuBLAS run other algorithms than the CPU kernels, which sum in other orders, so the losses agree only
# up to rounding accumulated through a deep network; 1e-3 leaves room for that and catches a wrong result.
REL_TOLERANCE = 1e-3
# a loss near zero (e.g. SimSiam's -cos at a lucky initialisation) is judged on its absolute difference
ABS_TOLERANCE = 1e-6
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's text under set_sync_debug_mode("warn")
PROFILES = (("swav", "2x224+6x96"), ("dino", "2x224+8x96"))
BENCHMARK_IMAGES = 512
COMPARE_BATCH = 8  # samples in the CPU / GPU comparison batch
TRAIN_TIMEOUT = 1800  # seconds per train.py run (start-up and torch.compile included)
PROFILE_TIMEOUT = 1800


class UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message)


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="gpu-check", help="report folder (default: %(default)s)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated methods (default: all: {','.join(METHODS)})")
    parser.add_argument("--steps", type=int, default=4, help="training steps per run (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="per-GPU batch of the training runs, sync counts and profiles "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-profile", action="store_true", help="do not run the throughput profiler")
    parser.add_argument("--skip-multi-gpu", action="store_true", help="train on one GPU only")
    parser.add_argument("--profile-data", default=None,
                        help=f"shards for the profiler (default: {BENCHMARK_IMAGES} benchmark images, "
                             f"written once to <output>/bench-{BENCHMARK_IMAGES})")
    args = parser.parse_args(argv)
    args.methods = parse_methods(args.methods)
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: give a positive number of steps")
    if args.batch_size < 2:
        raise UsageError(f"--batch-size {args.batch_size}: give at least 2 (batch norm needs two samples)")
    return args


def parse_methods(text: str | None) -> list[str]:
    """`a,b` -> registered method names in the given order (None: all of them)."""
    if text is None:
        return list(METHODS)
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise UsageError(f"--methods {text!r}: name at least one method; known: {', '.join(sorted(METHODS))}")
    for name in names:
        try:
            method_class(name)
        except ValueError as error:
            raise UsageError(f"--methods: {error}") from None
    return names


# ------------------------------------------------------------------------------------ pure parts


def compare_losses(cpu: float, gpu: float, rel_tolerance: float = REL_TOLERANCE,
                   abs_tolerance: float = ABS_TOLERANCE) -> dict:
    """The first-step losses of one method on both devices, judged.

    `rel_diff` is |gpu - cpu| / |cpu| (None when the CPU loss is 0). The check passes when both losses
    are finite and |gpu - cpu| <= rel_tolerance * |cpu| + abs_tolerance.
    """
    result = {"cpu": cpu, "gpu": gpu, "abs_diff": None, "rel_diff": None, "rel_tolerance": rel_tolerance,
              "abs_tolerance": abs_tolerance, "ok": False, "problem": None}
    not_finite = [device for device, value in (("CPU", cpu), ("GPU", gpu)) if not math.isfinite(value)]
    if not_finite:
        result["problem"] = " and ".join(f"the {device} loss is {value}" for device, value in
                                         (("CPU", cpu), ("GPU", gpu)) if device in not_finite)
        return result
    difference = abs(gpu - cpu)
    result["abs_diff"] = difference
    result["rel_diff"] = difference / abs(cpu) if cpu != 0 else None
    result["ok"] = difference <= rel_tolerance * abs(cpu) + abs_tolerance
    if not result["ok"]:
        result["problem"] = (f"rel. diff {result['rel_diff']:.2e} > {rel_tolerance:.0e}" if cpu != 0 else
                             f"abs. diff {difference:.2e} > {abs_tolerance:.0e} (the CPU loss is 0)")
    return result


def count_sync_warnings(records) -> int:
    """How many of the recorded warnings (`warnings.WarningMessage`s or plain warnings) are torch's
    host-device sync warnings."""
    return sum(SYNC_WARNING in str(getattr(record, "message", record)) for record in records)


def per_step_summary(counts: list[int], skip_first: int = 1) -> dict:
    """Sync counts per step -> the steps counted (the first `skip_first` left out), their mean and max."""
    counted = counts[skip_first:]
    if not counted:
        return {"per_step": counts, "counted_steps": 0, "mean": None, "max": None}
    return {"per_step": counts, "counted_steps": len(counted), "mean": sum(counted) / len(counted),
            "max": max(counted)}


def summarise_profile(results: dict, peak_bytes: int | None) -> dict:
    """The numbers gpu_check reports from a profile_throughput.py --json file."""
    from tools.profile_throughput import STAGES

    rate = {stage: row["images_per_second"] for stage, row in results["stages"].items()}
    decode, stack = rate.get(STAGES[1]), rate.get(STAGES[3])
    return {"input_stack_images_per_second": stack,
            "model_step_images_per_second": rate.get(STAGES[4]),
            "end_to_end_images_per_second": rate.get(STAGES[5]),
            "decode_only_images_per_second": decode,
            "stack_share_of_decode": stack / decode if stack and decode else None,
            "peak_gpu_memory_mib": peak_bytes / 2**20 if peak_bytes is not None else None}


def training_ok(run: dict) -> bool:
    return run.get("exit_code") == 0 and run.get("steps_logged") == run.get("steps") \
        and run.get("final_loss") is not None and math.isfinite(run["final_loss"])


def failures(report: dict) -> list[str]:
    """One short phrase per failed check of a report."""
    found = []
    for name, entry in report["methods"].items():
        for label, run in entry.get("training", {}).items():
            if not training_ok(run):
                why = run.get("error") or (f"exit {run.get('exit_code')}" if run.get("exit_code") else
                                           f"{run.get('steps_logged')}/{run.get('steps')} steps, "
                                           f"final loss {run.get('final_loss')}")
                found.append(f"{name}: training on {_gpus(run['processes'])} ({_clip(why)})")
        comparison = entry.get("first_step_loss")
        if comparison is not None and not comparison.get("ok"):
            why = comparison.get("problem") or "error"
            found.append(f"{name}: first-step loss CPU vs GPU ({_clip(why)})")
        syncs = entry.get("syncs")
        if syncs is not None and syncs.get("error"):
            found.append(f"{name}: sync count ({_clip(syncs['error'])})")
    for profile in report.get("profiles", []):
        if not profile.get("ok"):
            why = profile.get("error") or ""
            found.append(f"profile {profile['method']} {profile['multicrop']} ({_clip(why)})")
    return found


def _gpus(count: int) -> str:
    return f"{count} GPU" + ("s" if count != 1 else "")


def _clip(text: str, width: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)


def format_table(report: dict) -> list[str]:
    """The report as a fixed-width table (one row per method, then one per profile)."""
    multi = report["settings"].get("multi_gpu_processes")
    header = ["method", "1 GPU"] + ([_gpus(multi)] if multi else []) + [
        "loss CPU", "loss GPU", "rel. diff", "syncs/step", "stack syncs/batch"]
    rows = []
    for name, entry in report["methods"].items():
        training = entry.get("training", {})
        cells = [name, _training_cell(training.get("single_gpu"))]
        if multi:
            cells.append(_training_cell(training.get("multi_gpu")))
        comparison = entry.get("first_step_loss")
        if comparison is None:
            cells += ["-", "-", "-"]
        elif comparison.get("error"):
            cells += ["error", "error", "FAIL"]
        else:
            diff = comparison["rel_diff"] if comparison["rel_diff"] is not None else comparison["abs_diff"]
            cells += [_number(comparison["cpu"], ".6g"), _number(comparison["gpu"], ".6g"),
                      ("" if comparison["ok"] else "FAIL ") + _number(diff, ".1e")]
        syncs = entry.get("syncs")
        if syncs is None:
            cells += ["-", "-"]
        elif syncs.get("error"):
            cells += ["error", "error"]
        else:
            cells += [_sync_cell(syncs["step"]), _sync_cell(syncs["stack"])]
        rows.append(cells)
    lines = _columns([header] + rows)
    settings = report["settings"]
    lines.append(f"(training: {settings['steps']} steps at batch {settings['batch_size']} per GPU; loss: one "
                 f"batch of {settings['compare_batch_size']}, float32, TF32 off, pass at |gpu - cpu| <= "
                 f"{settings['rel_tolerance']:g} |cpu| + {settings['abs_tolerance']:g}; syncs: mean over "
                 f"steps 2..{max(settings['steps'], 2)}, max in brackets)")
    profiles = report.get("profiles", [])
    if profiles:
        table = [["profile", "stack img/s", "model step img/s", "end-to-end img/s", "stack / decode",
                  "peak GPU memory"]]
        for profile in profiles:
            label = f"{profile['method']} {profile['multicrop']}"
            if not profile.get("ok"):
                table.append([label, "FAIL", "", "", "", ""])
                continue
            table.append([label, _number(profile["input_stack_images_per_second"], ",.0f"),
                          _number(profile["model_step_images_per_second"], ",.0f"),
                          _number(profile["end_to_end_images_per_second"], ",.0f"),
                          _number(profile["stack_share_of_decode"], ".1%"),
                          _number(profile["peak_gpu_memory_mib"], ",.0f") + " MiB"])
        lines += [""] + _columns(table)
        lines.append(f"(profiles: batch {settings['batch_size']} on {settings.get('profile_data')}; peak GPU "
                     f"memory: torch's allocations in the profiler's process)")
    return lines


def _training_cell(run: dict | None) -> str:
    if run is None:
        return "-"
    steps = f"{run.get('steps_logged')}/{run.get('steps')}"
    if training_ok(run):
        return f"ok {steps} {run['seconds']:.0f}s"
    if run.get("exit_code") is None:
        return "FAIL timeout"
    return f"FAIL exit {run['exit_code']}" if run["exit_code"] else f"FAIL {steps}"


def _sync_cell(summary: dict) -> str:
    if summary["mean"] is None:
        return "-"
    mean = f"{summary['mean']:.0f}" if float(summary["mean"]).is_integer() else f"{summary['mean']:.1f}"
    return f"{mean} ({summary['max']})"


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def jsonable(value):
    """`value` with non-finite floats as strings ("nan", "inf"): strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return value


def write_report(report: dict, output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(output / REPORT, json.dumps(jsonable(report), indent=2, allow_nan=False) + "\n")


# ------------------------------------------------------------------------------------ 1: train.py runs


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from a run's metrics.jsonl (empty when there is none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {record["step"]: record["loss"] for record in records if "loss" in record}


def last_error_line(text: str) -> str | None:
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("train.py: error:")]
    return (errors or lines or [None])[-1]


def free_port() -> int:
    with socket.socket() as probe:  # accelerate's default 29500 may be taken
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_command(command: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit code, stdout and stderr together) of `command` in the repository root; the exit code is None
    when it ran out of `timeout` seconds, and then it and every process it started are killed (accelerate
    launch's ranks run in sessions of their own, so they are found as its descendants)."""
    import psutil

    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        try:
            descendants = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        for doomed in [process, *descendants]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                doomed.kill()
        output, _ = process.communicate()
        return None, output


def run_training(method: str, steps: int, batch_size: int, seed: int, runs: Path, processes: int) -> dict:
    """`train.py` for `steps` steps of `method` on the demo shards; one GPU, or `processes` under
    accelerate launch --multi_gpu. Returns exit code, steps logged, final loss and seconds."""
    run_dir = runs / method
    shutil.rmtree(run_dir, ignore_errors=True)
    runs.mkdir(parents=True, exist_ok=True)
    options = [str(ROOT / "train.py"), "--method", method, "--data", str(DEMO_TRAIN), "--val-data", "",
               "--max-steps", str(steps), "--batch-size", str(batch_size), "--seed", str(seed),
               "--log-every", "1", "--checkpoint-every", "1000000", "--output-dir", str(runs),
               "--name", method]
    if processes == 1:
        command = [sys.executable, *options]
    else:
        script = Path(sys.executable).with_name("accelerate")
        launch = [str(script), "launch"] if script.is_file() else [sys.executable, "-m",
                                                                   "accelerate.commands.launch"]
        command = [*launch, "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), *options]
    log = runs / f"{method}.log"
    started = time.perf_counter()
    exit_code, output = run_command(command, TRAIN_TIMEOUT)
    seconds = time.perf_counter() - started
    log.write_text("$ " + shlex.join(command) + "\n" + output)
    losses = read_losses(run_dir)
    error = None
    if exit_code is None:
        error = f"timed out after {TRAIN_TIMEOUT} s"
    elif exit_code != 0:
        error = last_error_line(output)
    exported = (run_dir / "backbone.safetensors").is_file()
    # kept: config.yaml, metrics.jsonl, TensorBoard events, backbone.json; the weights were only the check's
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / "backbone.safetensors").unlink(missing_ok=True)
    return {"processes": processes, "exit_code": exit_code, "steps": steps, "steps_logged": len(losses),
            "final_loss": losses[max(losses)] if losses else None, "seconds": seconds, "exported": exported,
            "error": error, "log": str(log), "command": shlex.join(command)}


# ------------------------------------------------------------------------------------ 2: CPU vs GPU loss


def build_method(name: str, *, gpu_config: bool, seed: int, batch_size: int):
    """(method on the CPU, its recipe, the resolved train.py Config) as train.py builds them for a run on a
    GPU (`gpu_config`: the paper's backbone, heads and crops) or on the CPU, with torch seeded by `seed`."""
    from models.methods import create_method
    from models.options import parse_options
    from models.training import Config, resolve

    config = Config(method=name, val_data="", batch_size=batch_size, seed=seed)
    config, recipe, _ = resolve(config, torch.device("cuda" if gpu_config else "cpu"), world_size=1)
    torch.manual_seed(seed)
    method = create_method(name, backbone=config.backbone, stem=config.stem, on_gpu=gpu_config,
                           backbone_kwargs=parse_options(config.backbone_options, "--backbone-options"),
                           **parse_options(config.method_options, "--method-options"))
    method.adapt_to_data(open_shard_set(config.data).num_samples)  # per-sample state, as train.py sizes it
    return method, method.adapt_recipe(recipe), config


@contextlib.contextmanager
def _environment(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def first_batch(recipe, batch_size: int, seed: int, data=DEMO_TRAIN):
    """The input stack's first batch of `recipe` on the CPU (the photometric maths runs eagerly: a
    one-off batch does not pay for a compile)."""
    from pipelines.stack import InputStack

    with _environment(FASTSSL_COMPILE="0"):
        stack = InputStack(recipe, data, batch_size, seed=seed, device="cpu",
                           num_threads=max(1, min(4, os.cpu_count() or 1)), sample_indices=True)
    batch = next(stack)
    del stack
    return batch


def batch_to(batch, device):
    """A copy of `batch` with its tensors on `device` (the sample keys stay on the host, where they are
    read)."""
    from pipelines.corruption import RestorationInputs

    device = torch.device(device)
    return dataclasses.replace(
        batch, views=[view.to(device) for view in batch.views], boxes=[box.to(device) for box in batch.boxes],
        flips=[flip.to(device) for flip in batch.flips], image_sizes=batch.image_sizes.to(device),
        labels=batch.labels.to(device), masks=None if batch.masks is None else batch.masks.to(device),
        pretext={task: inputs.to(device) if isinstance(inputs, RestorationInputs) else dataclasses.replace(
            inputs, images=inputs.images.to(device), labels=inputs.labels.to(device),
            order=None if inputs.order is None else inputs.order.to(device)) for task, inputs in batch.pretext.items()},
        indices=None if batch.indices is None else batch.indices.to(device))


@contextlib.contextmanager
def exact_float32():
    """float32 matmuls and convolutions in full precision (no TF32) inside; the settings are restored
    after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def _first_progress():
    from models.methods.base import Progress

    return Progress(step=0, epoch=0, total_steps=1000, steps_per_epoch=100)


def first_step_losses(method_name: str, devices, *, gpu_config: bool = True, batch_size: int = COMPARE_BATCH,
                      seed: int = 0) -> list[float]:
    """The loss of `method(batch, progress)` at step 0 on each of `devices`: one batch from the input
    stack on the CPU, and on every device a method built with the same seed holding the same state dict
    (copied from one reference), in float32 without TF32."""
    reference, recipe, _ = build_method(method_name, gpu_config=gpu_config, seed=seed, batch_size=batch_size)
    state = reference.state_dict()
    batch = first_batch(recipe, batch_size, seed)
    losses = []
    for device in devices:
        method, _, _ = build_method(method_name, gpu_config=gpu_config, seed=seed, batch_size=batch_size)
        method.load_state_dict(state)
        method.to(device).train()
        with exact_float32(), torch.no_grad():
            loss, _ = method(batch_to(batch, device), _first_progress())
        losses.append(float(loss.detach()))
        del method, loss
    return losses


def first_step_loss(method_name: str, device, **options) -> float:
    """`first_step_losses` on one device."""
    return first_step_losses(method_name, [device], **options)[0]


def compare_first_step(method_name: str, seed: int) -> dict:
    try:
        cpu, gpu = first_step_losses(method_name, ["cpu", "cuda"], gpu_config=True, seed=seed)
    except Exception as error:  # recorded; the other methods are still checked
        return {"ok": False, "error": f"{type(error).__name__}: {error}", "problem": type(error).__name__}
    return compare_losses(cpu, gpu)


# ------------------------------------------------------------------------------------ 3: syncs


@functools.lru_cache(maxsize=None)
def _accelerator():
    """One Accelerator per process, made as train.py makes it (its mixed-precision default included)."""
    from accelerate import Accelerator

    from models.runtime import default_mixed_precision

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=default_mixed_precision())


@contextlib.contextmanager
def _cuda_kernel_settings():
    """train.py's CUDA kernel settings (TF32, cuDNN autotuning) inside; the previous ones restored after."""
    from models.runtime import use_fast_cuda_kernels
    from models.training import Config

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    if torch.cuda.is_available():
        use_fast_cuda_kernels(Config.tf32)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
        torch.backends.cudnn.benchmark = saved[3]


@contextlib.contextmanager
def _recorded_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every occurrence, not once per code location
        yield caught


def count_syncs(method_name: str, steps: int, batch_size: int, seed: int, *, gpu_config: bool = True) -> dict:
    """Host-device syncs in `steps` (at least 2) training steps as train.py runs them, in this process: its
    Accelerator (mixed precision as train.py picks it), the method's defaults, the input stack on the device,
    `optimizer_step` and the step signals read a step late, as at a step that does not log. The batch
    (`next(stack)`) and the step (forward to after-step updates) are counted apart, every step; the
    summaries leave out the first (lazy initialisation, compilation). Without CUDA the same steps run on
    the CPU and count nothing (the sync debug mode is CUDA's)."""
    from models.methods.base import Progress
    from models.optim import build_optimizer
    from models.training import StepSignals, optimizer_step
    from pipelines.stack import InputStack

    accelerator = _accelerator()
    cuda = accelerator.device.type == "cuda"
    method, recipe, config = build_method(method_name, gpu_config=gpu_config, seed=seed,
                                          batch_size=batch_size)
    optimizer = build_optimizer(config.optimizer, method.param_groups(config.weight_decay),
                                lr=config.lr * method.lr_scaling(batch_size), betas=method.adamw_betas)
    method, optimizer = accelerator.prepare(method, optimizer)
    stack = InputStack(recipe, config.data, batch_size, seed=seed, device=accelerator.device,
                       num_threads=config.data_threads,
                       sample_indices=accelerator.unwrap_model(method).needs_sample_indices)
    signals = StepSignals(accelerator, lambda: False)
    stack_counts, step_counts = [], []
    try:
        with _cuda_kernel_settings():
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                for step in range(max(steps, 2)):
                    progress = Progress(step=step, epoch=0, total_steps=1000,
                                        steps_per_epoch=stack.steps_per_epoch)
                    with _recorded_warnings() as caught:
                        batch = next(stack)
                    stack_counts.append(count_sync_warnings(caught))
                    with _recorded_warnings() as caught:
                        with accelerator.autocast():
                            loss, _ = method(batch, progress)
                        signals.push(step + 1, loss)
                        optimizer_step(accelerator, method, optimizer, loss, progress, config.grad_clip)
                        signals.update(wait=False)
                    step_counts.append(count_sync_warnings(caught))
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
            signals.update(wait=True)
    finally:
        accelerator.free_memory()
        del method, optimizer, stack
    return {"stack": per_step_summary(stack_counts), "step": per_step_summary(step_counts),
            "final_loss": signals.last_loss, "mixed_precision": accelerator.mixed_precision}


def _free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ 4: profiles

# runs the profiler and reports the peak of torch's GPU allocations in its process (the profiler has no JSON
# field for it)
_PROFILE_CHILD = (
    "import sys, torch\n"
    "from tools import profile_throughput\n"
    "sys.argv[0] = 'tools/profile_throughput.py'  # the command its JSON records\n"
    "code = profile_throughput.main(sys.argv[1:])\n"
    "print('peak_gpu_memory_bytes', torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)\n"
    "sys.exit(code)\n"
)


def benchmark_set(output: Path) -> Path:
    """The profiler's ImageNet-like shards under `output` (written once, reused when complete)."""
    from pipelines.shards import ShardError, open_shard_set

    folder = output / f"bench-{BENCHMARK_IMAGES}"
    try:
        open_shard_set(folder)
        return folder
    except ShardError:
        pass
    command = [sys.executable, str(ROOT / "tools" / "make_benchmark_set.py"), str(folder), "--count",
               str(BENCHMARK_IMAGES), "--force"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"make_benchmark_set.py exited with {result.returncode}: "
                           f"{last_error_line(result.stderr) or ''}")
    return folder


def run_profile(method: str, multicrop: str, data: Path, batch_size: int, output: Path) -> dict:
    folder = output / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / f"{method}.json"
    json_path.unlink(missing_ok=True)
    arguments = ["--method", method, "--multicrop", multicrop, "--data", str(data),
                 "--batch-size", str(batch_size), "--device", "cuda", "--warmup", "2", "--batches", "5",
                 "--repeats", "3", "--skip", "7", "--json", str(json_path)]
    command = [sys.executable, "-c", _PROFILE_CHILD, *arguments]
    entry = {"method": method, "multicrop": multicrop, "batch_size": batch_size, "ok": False, "error": None,
             "json": str(json_path), "log": str(folder / f"{method}.log"),
             "command": "python tools/profile_throughput.py " + shlex.join(arguments)}
    exit_code, output = run_command(command, PROFILE_TIMEOUT)
    Path(entry["log"]).write_text(output)
    entry["exit_code"] = exit_code
    if exit_code is None:
        entry["error"] = f"timed out after {PROFILE_TIMEOUT} s"
        return entry
    if exit_code != 0 or not json_path.is_file():
        entry["error"] = f"exit {exit_code}: {last_error_line(output) or ''}"
        return entry
    peak = [int(line.split()[1]) for line in output.splitlines() if line.startswith("peak_gpu_memory_bytes")]
    entry.update(summarise_profile(json.loads(json_path.read_text()), peak[-1] if peak else None))
    entry["ok"] = True
    return entry


# ------------------------------------------------------------------------------------ main


def machine() -> dict:
    import nvidia.dali

    return {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "dali": nvidia.dali.__version__, "cpu_count": os.cpu_count()}


def run_checks(args) -> int:
    output = Path(args.output)
    gpus = torch.cuda.device_count()
    multi = gpus if gpus > 1 and not args.skip_multi_gpu else None
    report = {"tool": PROG, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
              "settings": {"methods": args.methods, "steps": args.steps, "batch_size": args.batch_size,
                           "seed": args.seed, "compare_batch_size": COMPARE_BATCH,
                           "rel_tolerance": REL_TOLERANCE, "abs_tolerance": ABS_TOLERANCE,
                           "multi_gpu_processes": multi, "profile_data": None},
              "methods": {name: {"training": {}} for name in args.methods}, "profiles": []}
    path = write_report(report, output)
    print(f"{PROG}: {len(args.methods)} method(s) on {_gpus(gpus)} ({', '.join(report['machine']['gpus'])}); "
          f"report: {path}", flush=True)

    for label, processes in (("single_gpu", 1), ("multi_gpu", multi)):
        if not processes:
            continue
        for name in args.methods:
            print(f"{PROG}: train.py {name}, {args.steps} steps on {_gpus(processes)} ...", end=" ",
                  flush=True)
            runs = output / "runs" / f"{processes}gpu"
            run = run_training(name, args.steps, args.batch_size, args.seed, runs, processes)
            report["methods"][name]["training"][label] = run
            print(f"{_training_cell(run)}" + ("" if training_ok(run) else f" ({run['error']})"), flush=True)
            write_report(report, output)

    for name in args.methods:
        print(f"{PROG}: {name}: first-step loss on CPU and GPU ...", end=" ", flush=True)
        comparison = compare_first_step(name, args.seed)
        report["methods"][name]["first_step_loss"] = comparison
        _free_cuda()
        print("ok" if comparison["ok"] else f"FAIL ({comparison.get('error') or comparison['problem']})",
              flush=True)
        print(f"{PROG}: {name}: host-device syncs per step ...", end=" ", flush=True)
        try:
            syncs = count_syncs(name, args.steps, args.batch_size, args.seed)
            print(f"step {_sync_cell(syncs['step'])}, stack {_sync_cell(syncs['stack'])}", flush=True)
        except Exception as error:  # recorded; the other methods are still checked
            syncs = {"error": f"{type(error).__name__}: {error}"}
            print(f"FAIL ({syncs['error']})", flush=True)
        report["methods"][name]["syncs"] = syncs
        _free_cuda()
        write_report(report, output)

    if not args.skip_profile:
        try:
            data = Path(args.profile_data) if args.profile_data else benchmark_set(output)
        except RuntimeError as error:
            report["profiles"] = [{"method": method, "multicrop": multicrop, "ok": False, "error": str(error)}
                                  for method, multicrop in PROFILES]
            data = None
        report["settings"]["profile_data"] = str(data) if data else None
        if data is not None:
            for method, multicrop in PROFILES:
                print(f"{PROG}: profile_throughput.py {method} {multicrop} ...", end=" ", flush=True)
                profile = run_profile(method, multicrop, data, args.batch_size, output)
                report["profiles"].append(profile)
                print("ok" if profile["ok"] else f"FAIL ({profile['error']})", flush=True)
                write_report(report, output)

    failed = failures(report)
    report["failures"], report["ok"] = failed, not failed
    path = write_report(report, output)
    print()
    print("\n".join(format_table(report)))
    if failed:
        print(f"{PROG}: error: {len(failed)} check(s) failed: {'; '.join(failed)} (report: {path})",
              file=sys.stderr)
        return 1
    print(f"{PROG}: every check passed (report: {path})")
    return 0


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    return run_checks(args)


if __name__ == "__main__":
    sys.exit(main())
