"""The fault suite: what a run on a preemptible cluster meets, tried for real, each with a timeout.

Processes killed with SIGKILL (during a step, during a checkpoint write), SIGINT to a process, SIGTERM to
one rank of two, a non-finite loss on one rank, a full disk at checkpoint time, and damaged shards: a corrupt
JPEG (bytes overwritten, size and index unchanged), a stale index, a tar truncated or deleted while it is
read. What must hold: `--resume auto` continues from the last complete checkpoint to the weights of an
uninterrupted run; a fault is a one-line error naming the file (the shard and the sample where it can be
known) and the fix, never a hang or a traceback; every rank of a run reaches the same decision at the
same step. docs/RELIABILITY.md lists each fault and the test that tries it.

Processes are started only where the process is the point (kills, signals, two ranks, a full disk),
each with a timeout; the damaged shards are read in this process by an `InputStack` (in a thread with a
deadline: a hang fails the test) over a corrupted copy of a 128-sample set. Runs are test_train.py's
tiny ones: a few steps, batch 16, one thread per process; those in this process (the reference, the
resumes) have no deadline of their own, as train.py's signal handlers need the main thread.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipelines.shards import ShardError, read_index
from pipelines.spec import NO_PHOTOMETRIC, Recipe, ViewGroup
from pipelines.stack import InputStack
from test_train import (DATA, ENV, ERROR_PREFIX, ROOT, TINY, assert_ok, assert_one_line_error, assert_same_tensors,
                        checkpoints, file_bytes, launch_two_processes, losses, metrics, tail, train, train_process,
                        two_process_command)

pytestmark = pytest.mark.slow

VERIFY = "tools/make_shards.py --verify"


# ---------------------------------------------------------------------------------------------- helpers


def within(seconds: float, function, *args, **kwargs):
    """`function(*args, **kwargs)`'s result (or its exception) from a daemon thread; the test fails if it takes longer
    than `seconds`, instead of hanging (a blocked DALI call cannot be interrupted in this thread)."""
    outcome = {}

    def run():
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(function, '__name__', function)} did not return within {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def start_train_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *TINY, *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(process: subprocess.Popen, ready, timeout: float = 180, poll: float = 0.001) -> None:
    """SIGKILL `process` at a moment `ready()` is true (polled every `poll` s); fails if it ends first.
    The process is stopped (SIGSTOP) before the kill and `ready()` asked again: a moment that passed
    between the poll and the signal is waited for anew, not taken for the one wanted."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert process.poll() is None, f"the run ended before the kill\n{tail(process.communicate()[1])}"
            assert time.monotonic() < deadline, "the moment to kill never came"
            if ready():
                process.send_signal(signal.SIGSTOP)
                if ready():
                    break
                process.send_signal(signal.SIGCONT)
            time.sleep(poll)
        process.kill()
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL


def complete_checkpoints(run: Path) -> list[int]:
    return [int(name.removeprefix("step-")) for name in checkpoints(run) if name.startswith("step-")]


def last_logged_step(run: Path) -> int:
    records = metrics(run) if (run / "metrics.jsonl").is_file() else []
    return max((record["step"] for record in records if "loss" in record), default=0)


# ---------------------------------------------------------------------------------------------- 1. SIGKILL


KILL_RUN = ["--max-steps", 6, "--checkpoint-every", 2]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: the 6-step run (`KILL_RUN`) without a fault, checkpoints at 2, 4 and 6."""
    output = tmp_path_factory.mktemp("uninterrupted")
    assert_ok(train(*KILL_RUN, "--output-dir", output, "--name", "run"))
    return output / "run"


def resume_to_the_end_and_compare(run: Path, uninterrupted: Path, expected_start: int) -> None:
    from safetensors.torch import load_file

    result = train(*KILL_RUN, "--output-dir", run.parent, "--name", run.name, "--resume", "auto")
    assert_ok(result)
    assert f"at step {expected_start}" in result.stdout
    assert losses(run) == losses(uninterrupted)  # steps 1-6, each once, bit for bit
    assert checkpoints(run) == ["step-00000002", "step-00000004", "step-00000006"]  # no .tmp- left
    assert_same_tensors(load_file(run / "backbone.safetensors"), load_file(uninterrupted / "backbone.safetensors"))
    final = "checkpoints/step-00000006/model.safetensors"
    assert_same_tensors(load_file(run / final), load_file(uninterrupted / final))


def test_sigkill_during_a_step_resumes_from_the_last_checkpoint_to_the_uninterrupted_weights(uninterrupted, tmp_path):
    run = tmp_path / "run"
    process = start_train_process(*KILL_RUN, "--output-dir", tmp_path, "--name", "run")
    # the last logged step 3 or 5: in the next step's forward or backward, no checkpoint being written
    kill_when(process, lambda: last_logged_step(run) in (3, 5), poll=0.01)
    logged = last_logged_step(run)
    assert complete_checkpoints(run) == list(range(2, logged, 2)) and not (run / "backbone.safetensors").exists()
    resume_to_the_end_and_compare(run, uninterrupted, expected_start=logged - 1)


def test_sigkill_while_a_checkpoint_is_written_keeps_the_previous_one_and_resume_reaches_the_same_weights(
        uninterrupted, tmp_path):
    run = tmp_path / "run"
    writing = [run / "checkpoints" / f".tmp-step-{step:08d}" for step in (4, 6)]  # each with one before it
    process = start_train_process(*KILL_RUN, "--output-dir", tmp_path, "--name", "run")
    kill_when(process, lambda: any(path.exists() for path in writing))
    (temporary,) = [path for path in writing if path.is_dir()]  # killed mid-write
    step = int(temporary.name.removeprefix(".tmp-step-"))
    assert complete_checkpoints(run) == list(range(2, step, 2))  # the half-written one is not among them
    resume_to_the_end_and_compare(run, uninterrupted, expected_start=step - 2)


# ---------------------------------------------------------------------------------------------- 2. signals, a NaN


def test_sigint_writes_a_checkpoint_exits_zero_and_resume_auto_continues(tmp_path):
    # SIGINT (Ctrl-C) here, SIGTERM (a preemption notice) to one rank of two below: one handler takes both
    run = tmp_path / "run"
    process = start_train_process("--max-steps", 400, "--checkpoint-every", 1000, "--output-dir", tmp_path,
                                  "--name", "run")
    try:
        deadline = time.monotonic() + 180
        while not ((run / "metrics.jsonl").is_file() and metrics(run)):
            assert process.poll() is None and time.monotonic() < deadline, "no metrics record"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, tail(stderr)
    assert "Traceback" not in stderr
    stopped_at = max(losses(run))
    assert 1 <= stopped_at < 400
    assert f"stop requested: checkpoint written at step {stopped_at}" in stdout
    assert checkpoints(run) == [f"step-{stopped_at:08d}"]
    assert not (run / "backbone.safetensors").exists()  # only a finished run exports

    result = train("--max-steps", stopped_at + 2, "--checkpoint-every", 1000, "--output-dir", tmp_path,
                   "--name", "run", "--resume", "auto")
    assert_ok(result)
    assert f"at step {stopped_at}" in result.stdout
    assert list(losses(run)) == list(range(1, stopped_at + 3))
    assert checkpoints(run) == [f"step-{stopped_at:08d}", f"step-{stopped_at + 2:08d}"]


def worker(launcher: subprocess.Popen, rank: int, deadline: float):
    """The `train.py` process of `rank` under an `accelerate launch` (found by its RANK variable)."""
    import psutil

    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if "train.py" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                    return child
            except psutil.Error:  # gone, or not readable yet
                continue
        time.sleep(0.2)
    raise AssertionError(f"no rank-{rank} process under the launcher")


def test_sigterm_to_one_rank_stops_both_at_the_same_step_with_one_checkpoint(tmp_path):
    run = tmp_path / "run"
    # log every 5 steps: between log steps the ranks read their stop flags a step late, and still agree
    args = ["--max-steps", 400, "--checkpoint-every", 1000, "--log-every", 5, "--output-dir", tmp_path, "--name", "run"]
    launcher = subprocess.Popen(two_process_command(*args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        rank_one = worker(launcher, 1, deadline)
        while not ((run / "metrics.jsonl").is_file() and metrics(run)):
            assert launcher.poll() is None and time.monotonic() < deadline, "no metrics record"
            time.sleep(0.2)
        rank_one.send_signal(signal.SIGTERM)  # rank 1 only, as a preemption notice may reach it first
        stdout, stderr = launcher.communicate(timeout=120)  # a rank left in a collective would hang here
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, tail(stderr)
    assert "Traceback" not in stderr
    (stopped,) = checkpoints(run)
    step = int(stopped.removeprefix("step-"))
    assert 5 <= step < 400
    assert f"stop requested: checkpoint written at step {step}" in stdout
    checkpoint = run / "checkpoints" / stopped
    for rank in (0, 1):  # both ranks wrote their part of the same step's checkpoint
        state = torch.load(checkpoint / f"input_stack_rank{rank}.pt", weights_only=True)
        assert state["rank"] == rank and state["step_in_epoch"] == step
    assert not (run / "backbone.safetensors").exists()


def test_a_non_finite_loss_on_one_rank_stops_both_with_one_error(tmp_path):
    # tests/nan_on_one_rank.py: train.py whose loss is NaN on rank 1 from step 3 on; rank 0's stays finite
    args = ["--max-steps", 40, "--checkpoint-every", 2, "--log-every", 5, "--output-dir", tmp_path, "--name", "run"]
    result = launch_two_processes(*args, script="tests/nan_on_one_rank.py", timeout=240)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, tail(result.stderr, 40)
    assert "loss is not finite on another process at step 3" in errors[0], errors[0]
    run = tmp_path / "run"
    assert checkpoints(run) == ["step-00000002"]  # the last good one; nothing written after the bad step


# ---------------------------------------------------------------------------------------------- 3. a full disk


@pytest.fixture
def small_disk(tmp_path):
    """(folder, limit): a real filesystem to fill, a tmpfs (mounting needs root); `limit(run, free)`
    resizes it to leave about `free` bytes.

    Without root, `limit` makes the run's checkpoints directory read-only instead (a PermissionError:
    the same code path). As root chmod does not stop writes, so without tmpfs the test is skipped.
    """
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        yield mount_point, lambda run, free: (run / "checkpoints").chmod(0o555)
        for folder in mount_point.glob("*/checkpoints"):
            folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def limit(run: Path, free: int) -> None:
        size = shutil.disk_usage(mount_point).used + free
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)

    try:
        yield mount_point, limit
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_a_full_disk_while_checkpointing_is_a_one_line_error_and_keeps_the_previous_checkpoint(small_disk):
    disk, limit = small_disk
    args = ["--checkpoint-every", 3, "--output-dir", disk, "--name", "run"]
    assert_ok(train("--max-steps", 3, *args))
    run = disk / "run"
    before = file_bytes(run / "checkpoints")
    model_size = (run / "checkpoints" / "step-00000003" / "model.safetensors").stat().st_size
    # the disk fills in the model's file (safetensors), then in the optimizer's (torch.save): both report it
    # in their own way; ~1 MB more is left for the small files a resumed run writes first
    for free in (model_size // 2, model_size * 3 // 2):
        limit(run, free)
        result = train_process("--max-steps", 6, *args, "--resume", "auto")  # its files close as it exits
        assert_one_line_error(result, "cannot write checkpoint", "step-00000006", "previous checkpoint is kept",
                              alone=False)
        assert checkpoints(run) == ["step-00000003"]  # no half-written step-00000006 or .tmp- directory
        assert file_bytes(run / "checkpoints") == before
        assert list(losses(run)) == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------- 4. damaged shards


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    """128 samples of the demo validation split in 4 tars (38, 38, 38, 14 samples): damage a copy."""
    from tools import make_shards

    out = tmp_path_factory.mktemp("small-set") / "small"
    assert make_shards.main([str(ROOT / DATA), str(out), "--limit", "128", "--shard-size", "200KB",
                             "--workers", "1"]) == 0
    return out


def copy_set(small_set: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(small_set, tmp_path / "damaged"))


def tar_of(root: Path, number: int) -> Path:
    return sorted(root.glob("*.tar"))[number]


def jpeg_of(root: Path, key: str):
    """(tar, the index entry of sample `key`'s JPEG)."""
    for tar in sorted(root.glob("*.tar")):
        for sample in read_index(tar.with_suffix(".idx")):
            if sample[0].name == f"{key}.jpg":
                return tar, sample[0]
    raise AssertionError(f"no sample {key} in {root}")


def corrupt_jpeg(root: Path, key: str) -> Path:
    """Overwrites the middle half of sample `key`'s JPEG with zeros: the tar's size and its index stay."""
    tar, entry = jpeg_of(root, key)
    size = tar.stat().st_size
    with open(tar, "r+b") as handle:
        handle.seek(entry.offset + entry.size // 4)
        handle.write(bytes(entry.size // 2))
    assert tar.stat().st_size == size
    return tar


def first_key(tar: Path) -> str:
    return read_index(tar.with_suffix(".idx"))[0][0].name.split(".")[0]


def stale_index(root: Path) -> Path:
    """The index of tar 2 written for another tar: its first sample's entries point 512 bytes too far."""
    index = tar_of(root, 2).with_suffix(".idx")
    header, first, *rest = index.read_text().splitlines()
    fields = first.split()
    for at in range(1, len(fields), 4):
        fields[at] = str(int(fields[at]) + 512)
    index.write_text("\n".join([header, " ".join(fields), *rest]) + "\n")
    return index


def truncate(tar: Path) -> None:
    os.truncate(tar, tar.stat().st_size // 2)


GEOMETRY = Recipe("geometry", (ViewGroup(1, 16, (0.5, 1.0), (NO_PHOTOMETRIC,)),))


def read_until_the_error(root: Path, damage_while_reading=None, epochs: int = 3, **where) -> tuple[int, str]:
    """An input stack over `root` (batch 16) read for `epochs`, `damage_while_reading()` applied after its
    first batch; returns (the batch number that raised ShardError, its message). The reader holds the whole
    epoch in its shuffle buffer, so damage done while reading shows in the next epoch."""
    stack = InputStack(GEOMETRY, root, 16, num_threads=1, **where)
    for number in range(1, epochs * stack.steps_per_epoch + 1):
        try:
            next(stack)
        except ShardError as error:
            return number, str(error)
        if number == 1 and damage_while_reading:
            damage_while_reading()
    raise AssertionError(f"{epochs} epochs read without an error")


def verify_cli(root: Path, capsys) -> str:
    """`tools/make_shards.py --verify ROOT`'s stderr (it must fail)."""
    from tools import make_shards

    capsys.readouterr()
    assert make_shards.main(["--verify", str(root)]) == 1
    return capsys.readouterr().err


def assert_names_the_fix(message: str, root: Path, *fragments: str) -> None:
    assert "\n" not in message and f"{VERIFY} {root.resolve()}" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_a_corrupt_jpeg_is_one_line_naming_the_shard_and_the_sample_and_verify_reports_it(small_set, tmp_path, capsys):
    root = copy_set(small_set, tmp_path)
    key = first_key(tar_of(root, 1))
    tar = corrupt_jpeg(root, key)
    _, message = within(120, read_until_the_error, root)
    assert_names_the_fix(message, root, "nvImageCodec", f"{tar}: {key}.jpg does not decode")
    assert f"{tar.name}: {key}.jpg does not decode" in verify_cli(root, capsys)


def test_a_stale_index_is_one_line_naming_it_and_verify_reports_it(small_set, tmp_path, capsys):
    root = copy_set(small_set, tmp_path)
    index = stale_index(root)
    _, message = within(120, read_until_the_error, root)
    assert_names_the_fix(message, root, f"{index}: entry for sample 0 does not match the tar members (stale index)")
    assert f"{index.name}: entry for sample 0 does not match the tar members (stale index)" in verify_cli(root, capsys)


@pytest.mark.parametrize("damage, fragment", [(truncate, "is truncated"), (os.unlink, "missing shard")],
                         ids=["truncated", "deleted"])
def test_a_tar_cut_short_or_deleted_while_it_is_read_is_one_line_naming_it(small_set, tmp_path, capsys, damage,
                                                                          fragment):
    root = copy_set(small_set, tmp_path)
    tar = tar_of(root, 1)
    number, message = within(120, read_until_the_error, root, lambda: damage(tar))
    assert number > 1  # read while the stack was running
    assert_names_the_fix(message, root, fragment, str(tar))
    reported = verify_cli(root, capsys)
    assert fragment in reported and tar.name in reported


def batch_keys(root: Path, batches: int, **where) -> list[list[str]]:
    """The sample keys of the first `batches` batches (of 16) of an input stack over `root`, as a run reads
    them: the reader's order depends on the seed, the rank and the batch size, not on the recipe."""
    stack = InputStack(GEOMETRY, root, 16, num_threads=1, **where)
    return [next(stack).keys for _ in range(batches)]


def test_a_corrupt_jpeg_in_the_first_batch_ends_the_run_at_step_1_with_one_line(small_set, tmp_path):
    root = copy_set(small_set, tmp_path)
    (first,) = within(120, batch_keys, root, 1)
    tar = corrupt_jpeg(root, first[0])
    result = train("--data", root, "--max-steps", 4, "--output-dir", tmp_path, "--name", "run")  # in this process
    assert result.returncode == 2
    assert_one_line_error(result, f"at step 1: cannot read {root.resolve()} (nvImageCodec",
                          f"{tar}: {first[0]}.jpg does not decode", f"{VERIFY} {root.resolve()}", alone=False)
    assert checkpoints(tmp_path / "run") == []


def test_a_corrupt_jpeg_on_one_rank_of_two_stops_both_at_the_same_step_with_that_ranks_error(small_set, tmp_path):
    root = copy_set(small_set, tmp_path)
    key = within(120, batch_keys, root, 3, rank=1, world_size=2)[2][0]  # in rank 1's third batch
    tar = corrupt_jpeg(root, key)
    failing, _ = within(120, read_until_the_error, root, None, 1, rank=1, world_size=2)
    assert failing > 1  # rank 1 steps on its previous batch until both ranks have read the flag
    # steps 2 and 4 checkpoint, the others read the step signals a step late (log every 5)
    result = launch_two_processes("--data", root, "--max-steps", 8, "--checkpoint-every", 2, "--log-every", 5,
                                  "--output-dir", tmp_path, "--name", "run", timeout=240)
    assert result.returncode != 0  # a rank left waiting in a collective would hang until the timeout
    errors = [line for line in result.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, tail(result.stderr, 40)
    assert f"at step {failing}: cannot read {root.resolve()} on rank 1 (nvImageCodec" in errors[0], errors[0]
    assert f"{tar}: {key}.jpg does not decode" in errors[0] and f"{VERIFY} {root.resolve()}" in errors[0]
    assert checkpoints(tmp_path / "run") == [f"step-{step:08d}" for step in range(2, failing, 2)]


def test_a_shard_the_knn_monitor_reads_cut_short_during_a_run_is_the_same_one_line_error(small_set, tmp_path):
    import train as train_script
    from accelerate import Accelerator
    from models.training import Config
    from pipelines.shards import open_shard_set
    from test_train import own_process_state

    def pixels(images):
        return images.flatten(1)

    val = copy_set(small_set, tmp_path)
    tar = tar_of(val, 1)
    with own_process_state():  # a real Accelerator in this process; a run's evaluation reads each epoch again
        config = Config(data=str(small_set), val_data=str(val), batch_size=16, data_threads=1)
        monitor = train_script.KnnMonitor(config, GEOMETRY, Accelerator(cpu=True), open_shard_set(val, need_labels=True))
        assert 10 < within(120, monitor.evaluate, pixels) <= 100  # 10 classes
        truncate(tar)
        with pytest.raises(ShardError) as error:  # on every rank alike: `KnnMonitor.features` agrees first
            for _ in range(4):  # an epoch is one batch of 256 here, and DALI reads 2 batches ahead
                within(120, monitor.evaluate, pixels)
    assert_names_the_fix(str(error.value), val, f"{tar} is truncated")
