"""train.py end to end: real DALI, real Accelerate (also a real two-process launch), no mocks.

Most runs call `train.main(argv)` in this process (`train`): its exit code, and what it printed to
stdout and stderr, with the process-wide state a run sets put back afterwards (`own_process_state`).
What depends on the process itself runs as a subprocess (`python train.py ...` from the repository
root, `train_process`): signals, `accelerate launch` with two ranks, a time limit counted from process
start, a full disk, and the exit status and stderr a user sees. Runs are tiny: the 2k validation
shards as the data, resnet10t with the standard stem, 2x32+2x16 crops, batch 16, a few steps, one
torch thread and one DALI thread per process (two OpenMP threads on a 2-core machine that is also
busy are ~10x slower).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import re
import tarfile
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = "shards/fashion-mnist-val-2k"  # 2,000 labeled images: quick epochs and a quick kNN
BACKBONE = "resnet10t"
ERROR_PREFIX = "train.py: error:"
TINY = ["--data", DATA, "--val-data", "", "--backbone", BACKBONE, "--stem", "standard",
        "--multicrop", "2x32+2x16", "--batch-size", "16", "--log-every", "1", "--data-threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def own_process_state():
    """Inside: what a subprocess would start from. Accelerate's shared states empty (each run makes its
    own Accelerator), one torch thread (OMP_NUM_THREADS=1), the repository root as the working directory.
    After: Accelerate's states as they were (an Accelerator made earlier in this process keeps working),
    the SIGTERM/SIGINT handlers `train.main` installs replaced by the previous ones, the thread count and
    the RNGs `set_seed` seeds restored."""
    import numpy as np
    from accelerate.state import AcceleratorState, GradientState, PartialState

    shared = [cls._shared_state for cls in (PartialState, AcceleratorState, GradientState)]
    saved = [dict(state) for state in shared]
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    rngs = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    for state in shared:
        state.clear()  # in place: every instance shares the dict (accelerate's "Borg" pattern)
    torch.set_num_threads(1)
    try:
        with contextlib.chdir(ROOT):
            yield
    finally:
        for state, values in zip(shared, saved):
            state.clear()
            state.update(values)
        for number, handler in handlers.items():
            signal.signal(number, handler)
        torch.set_num_threads(threads)
        random.setstate(rngs[0])
        np.random.set_state(rngs[1])
        torch.random.set_rng_state(rngs[2])


def run_main(argv: list) -> subprocess.CompletedProcess:
    """`train.main(argv)` in this process: its exit code (argparse's SystemExit included) and what it
    printed to sys.stdout and sys.stderr. An exception escapes: a traceback fails the calling test."""
    from train import main

    stdout, stderr = io.StringIO(), io.StringIO()
    argv = [str(a) for a in argv]
    with own_process_state(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    return subprocess.CompletedProcess(["train.py", *argv], code, stdout.getvalue(), stderr.getvalue())


def train(*args) -> subprocess.CompletedProcess:
    """`train.py TINY... args...` in this process (`run_main`); the options given last win."""
    return run_main([*TINY, *args])


def train_process(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python train.py TINY... args...` in the repository root, a process of its own."""
    command = [sys.executable, "train.py", *TINY, *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A free TCP port: another run may be using accelerate's default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
LAUNCH_OPTIONS = ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]


def two_process_command(*args, script: str = "train.py") -> list[str]:
    """A real 2-process CPU run (gloo). `--cpu --num_processes 2` would silently start one process."""
    return [ACCELERATE, "launch", *LAUNCH_OPTIONS, "--num_machines", "1", "--main_process_port", str(free_port()),
            script, *TINY, *map(str, args)]


def launch_two_processes(*args, timeout: float = 240, script: str = "train.py") -> subprocess.CompletedProcess:
    return subprocess.run(two_process_command(*args, script=script), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def launch_two_machines(*args, logs: Path, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Two `accelerate launch`es on this host as machines 0 and 1 of two, one process each (2 ranks, gloo),
    as on a cluster: `--num_machines 2 --machine_rank R --main_process_ip IP --main_process_port P`. Their
    output goes to files in `logs` (a launcher blocked on a full pipe would stall the other's collectives)."""
    port, launchers, files = str(free_port()), [], []
    try:
        for machine in (0, 1):
            files.append([(logs / f"machine{machine}.{kind}").open("w+") for kind in ("out", "err")])
            command = [ACCELERATE, "launch", *LAUNCH_OPTIONS, "--num_machines", "2", "--machine_rank", str(machine),
                       "--main_process_ip", "127.0.0.1", "--main_process_port", port, "train.py", *TINY,
                       *map(str, args)]
            launchers.append(subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=files[-1][0], stderr=files[-1][1],
                                              text=True))
        deadline = time.monotonic() + timeout
        for launcher in launchers:
            launcher.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    results = []
    for launcher, (out, err) in zip(launchers, files):
        out.seek(0), err.seek(0)
        results.append(subprocess.CompletedProcess(launcher.args, launcher.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{tail(result.stderr)}"


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, alone: bool = True) -> str:
    """Non-zero exit, no traceback, one `train.py: error:` line holding every fragment; returns it.

    `alone`: stderr holds nothing else (errors before training); otherwise the error is its last line
    (a failure during training comes after the progress bar).
    """
    assert result.returncode != 0, f"expected a failure\n{tail(result.stdout)}"
    assert "Traceback" not in result.stderr, tail(result.stderr, 60)
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, tail(result.stderr)
    assert lines[-1] == errors[0], tail(result.stderr)
    if alone:
        assert lines == errors, tail(result.stderr)
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in metrics(run) if "loss" in record}


def checkpoints(run: Path) -> list[str]:
    return sorted(path.name for path in (run / "checkpoints").iterdir())


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def copy_run(run: Path, output_dir: Path, name: str = "run") -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(run, output_dir / name))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_four_steps_resume_exactly_from_step_two(args, run: Path, tmp_path: Path) -> None:
    """`train(*args)` wrote 4 steps with checkpoints at 2 and 4 into `run`: a copy cut back to step 2 and
    resumed (`--resume auto`) logs the same losses and ends with bit-identical model tensors."""
    from safetensors.torch import load_file

    resumed = tmp_path / "resumed" / run.name
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    (resumed / "backbone.safetensors").unlink()
    assert_ok(train(*args, "--output-dir", resumed.parent, "--name", run.name, "--resume", "auto"))
    assert losses(resumed) == losses(run)
    final = "checkpoints/step-00000004/model.safetensors"
    assert_same_tensors(load_file(resumed / final), load_file(run / final))


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory) -> Path:
    """A 6-step run with checkpoints at steps 3 and 6 (the reference for resume tests; copy before use)."""
    output = tmp_path_factory.mktemp("six-steps")
    assert_ok(train("--max-steps", 6, "--checkpoint-every", 3, "--output-dir", output, "--name", "run"))
    return output / "run"


# ---------------------------------------------------------------------------------------------- 1. a run


def test_a_short_run_writes_config_metrics_tensorboard_checkpoint_and_a_timm_loadable_backbone(tmp_path):
    import timm
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train("--val-data", DATA, "--max-steps", 3, "--checkpoint-every", 3,
                   "--output-dir", tmp_path, "--name", "run")
    assert_ok(result)
    run = tmp_path / "run"
    if (os.cpu_count() or 1) > 1:  # one torch thread, as accelerate launch sets by default
        assert f"pass accelerate launch --num_cpu_threads_per_process {os.cpu_count()}" in result.stdout

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["config"]["backbone"] == BACKBONE and saved["config"]["batch_size"] == 16
    assert saved["config"]["max_steps"] == 3 and saved["config"]["val_data"] == DATA
    # resolved defaults: the method's CPU choices are written, not None
    assert saved["config"]["optimizer"] == "lars" and saved["config"]["lr"] == pytest.approx(4.8)
    assert [(g["count"], g["size"]) for g in saved["recipe"]["groups"]] == [(2, 32), (2, 16)]
    assert "2x32" in saved["recipe_text"]
    assert saved["versions"]["torch"] == torch.__version__.split("+")[0]
    assert saved["versions"]["timm"] == timm.__version__
    assert saved["config"]["mixed_precision"] == "no" and saved["config"]["sync_bn"] is True  # swav's recipe
    assert saved["runtime"]["device"] == "cpu" and saved["runtime"]["processes"] == 1
    assert saved["runtime"]["mixed_precision"] == "no" and not saved["runtime"]["tf32"]
    assert "one process" in saved["runtime"]["batch_norm"]

    records = metrics(run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        assert {"step", "epoch", "loss", "lr", "images_per_second", "data_wait"} <= record.keys()
        assert record["loss"] > 0 and record["lr"] > 0 and record["images_per_second"] > 0
        assert 0 <= record["data_wait"] <= 1
    (knn,) = [r for r in records if "knn_top1" in r]
    assert knn["step"] == 3 and 10 < knn["knn_top1"] <= 100  # 10 classes: chance is 10 %
    assert f"kNN top-1 {knn['knn_top1']:.2f}%" in result.stdout

    (events,) = (run / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("loss")] == [1, 2, 3]
    assert [event.step for event in accumulator.Scalars("knn_top1")] == [3]

    assert checkpoints(run) == ["step-00000003"]
    checkpoint = run / "checkpoints" / "step-00000003"
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["step"] == 3 and meta["num_processes"] == 1 and meta["config"] == saved["config"]
    stack_state = torch.load(checkpoint / "input_stack_rank0.pt", weights_only=True)
    assert stack_state["step_in_epoch"] == 3 and stack_state["epoch"] == 0 and stack_state["dali"]
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.bin").is_file()

    exported = run / "backbone.safetensors"
    weights = load_file(exported)
    model = timm.create_model(BACKBONE, pretrained=True, pretrained_cfg_overlay=dict(file=str(exported)),
                              num_classes=0)
    assert_same_tensors(weights, model.state_dict())
    assert not torch.equal(weights["conv1.0.weight"], timm.create_model(BACKBONE).state_dict()["conv1.0.weight"])
    info = json.loads((run / "backbone.json").read_text())
    assert (info["timm_name"], info["stem"]) == (BACKBONE, "standard")


# ---------------------------------------------------------------------------------------------- 2. resume


def test_resume_auto_from_a_mid_run_checkpoint_repeats_the_uninterrupted_run_exactly(six_steps, tmp_path):
    from safetensors.torch import load_file

    # the run as if it had died after its step-3 checkpoint: later checkpoint gone, metrics up to step 6
    run = copy_run(six_steps, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    (run / "backbone.safetensors").unlink()

    result = train("--max-steps", 6, "--checkpoint-every", 3, "--output-dir", tmp_path, "--name", "run",
                   "--resume", "auto")
    assert_ok(result)
    assert f"resumed from {run / 'checkpoints' / 'step-00000003'} at step 3" in result.stdout
    assert list(losses(run)) == [1, 2, 3, 4, 5, 6]  # records after the checkpoint were replaced, not doubled
    assert losses(run) == losses(six_steps)  # bit for bit
    assert_same_tensors(load_file(run / "backbone.safetensors"), load_file(six_steps / "backbone.safetensors"))
    assert checkpoints(run) == ["step-00000003", "step-00000006"]


def test_resume_from_a_checkpoint_directory_needs_neither_name_nor_output_dir(six_steps, tmp_path):
    run = copy_run(six_steps, tmp_path, name="moved")
    result = train("--max-steps", 6, "--resume", run / "checkpoints" / "step-00000003")
    assert_ok(result)
    assert "at step 3" in result.stdout
    assert losses(run) == losses(six_steps)


# ---------------------------------------------------------------------------------------------- 3. options


def test_help_lists_every_config_option_with_its_default(monkeypatch):
    from models.training import Config

    # argparse wraps help at the terminal width and breaks on hyphens, which would split a long default
    # path ("fashion-mnist-" / "train-10k"); a wide COLUMNS keeps every entry on one line.
    monkeypatch.setenv("COLUMNS", "10000")
    result = run_main(["--help"])
    assert_ok(result)
    text = " ".join(result.stdout.split())
    for option in dataclasses.fields(Config):
        flag = "--" + option.name.replace("_", "-")
        assert flag in text, flag
        entry = re.search(rf"\s{flag}[ ,].*?\(default: (.*?)\)", text[text.index("options:"):])
        assert entry and entry.group(1) == str(option.default), (flag, entry and entry.group(0))


def test_small_crops_get_a_resnet_stem_that_keeps_resolution():
    from models.backbones import default_stem

    assert default_stem("resnet10t", 32, on_gpu=False) == "no-maxpool"
    assert default_stem("resnet50", 32, on_gpu=True) == "cifar"
    assert default_stem("resnet50", 224, on_gpu=True) == default_stem("resnet10t", 96, on_gpu=False) == "standard"
    assert default_stem("vit_tiny_patch16_224", 32, on_gpu=False) == "standard"  # not a ResNet


def test_a_config_file_sets_options_and_command_line_flags_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"batch_size": 8, "seed": 7, "lr": 0.1, "max_steps": 1,
                                      "name": "from-yaml", "output_dir": str(tmp_path)}))
    assert_ok(train("--config", config, "--batch-size", 12))
    saved = yaml.safe_load((tmp_path / "from-yaml" / "config.yaml").read_text())["config"]
    assert (saved["seed"], saved["lr"], saved["max_steps"]) == (7, 0.1, 1)
    assert saved["batch_size"] == 12  # the flag, not the file's 8
    assert saved["config"] == str(config)


def test_an_unknown_key_in_the_config_file_is_a_one_line_error(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("batch_size: 8\nlearning_rate: 0.1\n")
    assert_one_line_error(train("--config", config, "--output-dir", tmp_path), "learning_rate")
    assert not (tmp_path / "swav").exists() and list(tmp_path.iterdir()) == [config]


# ---------------------------------------------------------------------------------------------- 4. bad input


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--method", "nosuchmethod"], ["unknown method 'nosuchmethod'", "swav"]),
        (["--backbone", "nosuchnet"], ["unknown backbone 'nosuchnet'"]),
        (["--stem", "tiny"], ["unknown stem 'tiny'", "no-maxpool"]),
        (["--multicrop", "2x32+x16"], ["--multicrop", "2x32+x16"]),
        (["--data", "{empty}"], ["no shards in", "{empty}"]),
        (["--batch-size", 5000], ["--batch-size 5000", "2000 samples"]),
        (["--method", "simclr"], ["simclr trains on two views of one size", "2x32@0.08-1+2x16@0.08-1"]),
        (["--backbone-options", "no_such_option=3"], ["--backbone-options no_such_option=3", "no_such_option"]),
        (["--time-limit", 0], ["--time-limit 0", "positive number of minutes"]),
        (["--schedule-by-time"], ["--schedule-by-time needs --time-limit"]),
        (["--schedule-by-time", "--time-limit", 1, "--resume", "auto"], ["--schedule-by-time with --resume"]),
        (["--mixed-precision", "fp8"], ["--mixed-precision fp8", "no, bf16, fp16"]),
    ],
    ids=["method", "backbone", "stem", "multicrop", "empty-data", "batch-larger-than-data",
         "multicrop-the-method-cannot-use", "backbone-option-timm-rejects", "time-limit-not-positive",
         "schedule-by-time-without-a-limit", "schedule-by-time-resumed", "mixed-precision"],
)
def test_bad_input_is_a_one_line_error(tmp_path, args, fragments):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(a).format(empty=empty) for a in args]
    result = train("--max-steps", 1, "--output-dir", tmp_path / "runs", "--name", "bad", *args)
    assert result.returncode == 2
    assert_one_line_error(result, *[f.format(empty=empty) for f in fragments])
    assert not list((tmp_path / "runs" / "bad" / "checkpoints").glob("*"))


def test_bad_input_is_one_line_on_the_stderr_of_the_process_and_its_exit_status_is_2(tmp_path):
    # the cases above run in this process; here what a user's shell sees, past the shards and DALI's
    # pipeline (C++ code that could print to the process's stderr itself)
    result = train_process("--batch-size", 5000, "--max-steps", 1, "--output-dir", tmp_path, "--name", "bad")
    assert result.returncode == 2
    assert_one_line_error(result, "--batch-size 5000", "2000 samples")
    assert result.stdout == ""


def test_resuming_with_other_options_lists_the_differences(six_steps, tmp_path):
    run = copy_run(six_steps, tmp_path)
    before = file_bytes(run / "checkpoints")
    result = train("--max-steps", 9, "--output-dir", tmp_path, "--name", "run", "--resume", "auto",
                   "--seed", 1, "--batch-size", 8)
    error = assert_one_line_error(result, "step-00000006", "seed: 0 -> 1", "batch_size: 16 -> 8")
    assert "max_steps" not in error  # a resumable difference
    assert file_bytes(run / "checkpoints") == before


def test_a_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # LR 1e30: the first step's loss is finite (it is computed before any update), its update is not
    assert_ok(train("--lr", 1e30, "--max-steps", 1, "--checkpoint-every", 1, "--output-dir", tmp_path,
                    "--name", "run"))
    run = tmp_path / "run"
    assert list(losses(run)) == [1]
    before = file_bytes(run / "checkpoints")
    assert list(before) and all(name.startswith("step-00000001/") for name in before)

    result = train("--lr", 1e30, "--max-steps", 10, "--checkpoint-every", 1, "--output-dir", tmp_path,
                   "--name", "run", "--resume", "auto")
    assert_one_line_error(result, "loss is nan at step 2", str(run / "checkpoints"), alone=False)
    assert file_bytes(run / "checkpoints") == before  # untouched, and nothing half-written beside it
    assert list(losses(run)) == [1]


# ---------------------------------------------------------------------------------------------- 5. time limits


def test_a_time_limit_ends_the_run_with_a_checkpoint_and_the_backbone_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    # 0.001 min (60 ms) from process start has passed before the first step ends: one step, not 400
    result = train("--max-steps", 400, "--time-limit", 0.001, "--checkpoint-every", 1000, "--output-dir", tmp_path,
                   "--name", "run")
    assert_ok(result)
    assert "--time-limit 0.001 min reached at step 1 of 400" in result.stdout
    assert list(losses(run)) == [1]
    assert checkpoints(run) == ["step-00000001"]
    assert (run / "backbone.safetensors").is_file()  # a timed run is a usable result

    result = train("--max-steps", 3, "--checkpoint-every", 1000, "--output-dir", tmp_path, "--name", "run",
                   "--resume", "auto")
    assert_ok(result)
    assert list(losses(run)) == [1, 2, 3]
    assert checkpoints(run) == ["step-00000001", "step-00000003"]


def test_a_schedule_by_time_follows_the_clock_past_the_planned_steps_and_ends_annealed(tmp_path):
    run = tmp_path / "run"
    # a schedule of 5 steps stretched over what is left of 18 s after the set-up: many more steps
    # than 5, the LR falling with the share of the time used and at its final value at the end
    # (a process of its own: the limit counts from the start of the process)
    result = train_process("--max-steps", 5, "--time-limit", 0.3, "--schedule-by-time", "--warmup-epochs", 0,
                           "--batch-size", 8, "--checkpoint-every", 1000, "--output-dir", tmp_path,
                           "--name", "run")
    assert_ok(result)
    records = [r for r in metrics(run) if "loss" in r]
    steps = [r["step"] for r in records]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 10, steps
    assert f"--time-limit 0.3 min reached at step {steps[-1]} (the schedule has 5)" in result.stdout
    positions = [r["schedule_step"] for r in records]
    assert positions == sorted(positions) and positions[0] == 1 and positions[-1] == 5, positions
    lrs = [r["lr"] for r in records]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > 10 * lrs[-1], lrs  # cosine without warm-up
    assert [r["lr"] for r in records if r["schedule_step"] == 5] == [lrs[-1]] * positions.count(5)
    assert checkpoints(run) == [f"step-{steps[-1]:08d}"]
    assert (run / "backbone.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- 6. two processes


def shard_keys(data: str) -> set[str]:
    keys = set()
    for tar in sorted((ROOT / data).glob("*.tar")):
        with tarfile.open(tar) as archive:
            keys.update(name.split(".", 1)[0] for name in archive.getnames())
    return keys


# per-rank SwAV queues of 32 embeddings (2 batches), in use from step 3: rank 0's and rank 1's differ
TWO_PROCESS_ARGS = ["--max-steps", 4, "--checkpoint-every", 2, "--log-keys",
                    "--method-options", "queue_length=64,queue_start_epoch=0"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """A 4-step run of two processes (`TWO_PROCESS_ARGS`), checkpoints at steps 2 and 4 (copy before use)."""
    output = tmp_path_factory.mktemp("two-processes")
    result = launch_two_processes(*TWO_PROCESS_ARGS, "--output-dir", output, "--name", "run")
    assert_ok(result)
    return result, output / "run"


def test_two_processes_train_one_model_on_disjoint_samples(two_process_run):
    result, run = two_process_run
    assert "2 process(es) x batch 16" in result.stdout
    assert list(losses(run)) == [1, 2, 3, 4]  # logged once, by the main process
    checkpoint = run / "checkpoints" / "step-00000004"
    assert json.loads((checkpoint / "meta.json").read_text())["num_processes"] == 2
    for rank in (0, 1):
        state = torch.load(checkpoint / f"input_stack_rank{rank}.pt", weights_only=True)
        assert state["rank"] == rank and state["num_shards"] == 2 and state["step_in_epoch"] == 4
        assert (checkpoint / f"random_states_{rank}.pkl").is_file()

    # the keys each rank really trained on, logged by train.py --log-keys inside the launched run
    keys = {}
    for rank in (0, 1):
        lines = (run / f"keys_rank{rank}.txt").read_text().splitlines()
        assert [int(line.split()[0]) for line in lines] == [1, 2, 3, 4]
        keys[rank] = [key for line in lines for key in line.split()[1:]]
        assert len(keys[rank]) == 4 * 16 and len(set(keys[rank])) == 4 * 16  # no repeats within the epoch
    assert not set(keys[0]) & set(keys[1])
    assert set(keys[0]) | set(keys[1]) <= shard_keys(DATA)


@pytest.mark.parametrize("by_time", [False, True], ids=["steps", "schedule-by-time"])
def test_two_processes_stop_together_at_the_time_limit(tmp_path, by_time):
    result = launch_two_processes("--max-steps", 400, "--time-limit", 0.001, "--checkpoint-every", 1000,
                                  "--output-dir", tmp_path, "--name", "run", *(["--schedule-by-time"] * by_time))
    assert_ok(result)  # a rank that stopped alone would leave the other waiting in a collective until the timeout
    expected = "reached at step 1 (the schedule has 400)" if by_time else "reached at step 1 of 400"
    assert expected in result.stdout
    run = tmp_path / "run"
    assert checkpoints(run) == ["step-00000001"]
    meta = json.loads((run / "checkpoints" / "step-00000001" / "meta.json").read_text())
    assert meta["num_processes"] == 2
    assert (run / "backbone.safetensors").is_file()


def test_two_machines_resume_a_two_process_run_exactly_each_rank_with_its_own_samples_and_swav_queue(
        two_process_run, tmp_path):
    """Multi-node as on a cluster: the run of two processes on one machine, resumed at its step 2 by two
    launchers as two machines of one process each (the same world size), ends as it did: the same losses,
    weights and per-rank SwAV queues, and each rank read the same samples, no sample twice in the epoch."""
    from safetensors.torch import load_file

    _, run = two_process_run
    queues = [torch.load(run / "checkpoints" / "step-00000002" / f"method_rank{rank}.pt", weights_only=True)
              for rank in (0, 1)]
    assert all(int(q["queue_filled"]) == 32 for q in queues)
    assert not torch.equal(queues[0]["queue"], queues[1]["queue"])

    resumed = tmp_path / "resumed" / "run"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    (resumed / "backbone.safetensors").unlink()
    for rank in (0, 1):  # the keys each rank read up to the checkpoint
        log = resumed / f"keys_rank{rank}.txt"
        log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))
    machines = launch_two_machines(*TWO_PROCESS_ARGS, "--output-dir", resumed.parent, "--name", "run",
                                   "--resume", "auto", logs=tmp_path)
    for machine in machines:
        assert_ok(machine)
    assert "resumed from" in machines[0].stdout and "2 process(es) x batch 16" in machines[0].stdout
    assert losses(resumed) == losses(run)  # steps 3-4 use the queues: rank 0's everywhere would change them
    final = "checkpoints/step-00000004"
    assert_same_tensors(load_file(resumed / final / "model.safetensors"), load_file(run / final / "model.safetensors"))
    for rank in (0, 1):
        assert_same_tensors(torch.load(resumed / final / f"method_rank{rank}.pt", weights_only=True),
                            torch.load(run / final / f"method_rank{rank}.pt", weights_only=True))
        assert (resumed / f"keys_rank{rank}.txt").read_text() == (run / f"keys_rank{rank}.txt").read_text()
    keys = [key for rank in (0, 1) for line in (resumed / f"keys_rank{rank}.txt").read_text().splitlines()
            for key in line.split()[1:]]
    assert len(keys) == len(set(keys)) == 2 * 4 * 16  # split across the ranks of both machines, none read twice


def test_resuming_with_another_number_of_processes_is_a_one_line_error(two_process_run, tmp_path):
    _, run = two_process_run  # per-rank input-stack and SwAV-queue state: 2 ranks' checkpoint, 1 process here
    copy = copy_run(run, tmp_path)
    before = file_bytes(copy / "checkpoints")
    result = train(*TWO_PROCESS_ARGS, "--output-dir", tmp_path, "--name", "run", "--resume", "auto")
    error = assert_one_line_error(result, "step-00000004", "processes: 2 -> 1", "start a new run")
    assert error.count("->") == 1  # nothing else differs
    assert file_bytes(copy / "checkpoints") == before


# ---------------------------------------------------------------------------------------------- 7. devices


def test_a_checkpoint_from_another_kind_of_device_is_refused_in_one_line(six_steps, tmp_path):
    run = copy_run(six_steps, tmp_path)
    meta_path = run / "checkpoints" / "step-00000006" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["device"] == "cpu"
    meta_path.write_text(json.dumps({**meta, "device": "cuda"}))
    before = file_bytes(run / "checkpoints")
    result = train("--max-steps", 9, "--output-dir", tmp_path, "--name", "run", "--resume", "auto")
    assert_one_line_error(result, "step-00000006", "written on cuda, this run is on cpu")
    assert file_bytes(run / "checkpoints") == before
