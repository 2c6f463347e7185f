"""tools/gpu_check.py on a machine without a GPU: its arguments, the pure parts that judge and report a GPU
run (loss comparison, sync counting, the report and its table), the CPU half of the loss comparison on
real batches, and the one-line exit when there is no GPU."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from models.methods import METHODS
from pipelines.stack import Batch
from tools import gpu_check
from tools.gpu_check import (ABS_TOLERANCE, REL_TOLERANCE, batch_to, compare_losses, count_sync_warnings,
                             exact_float32, failures, first_step_loss, first_step_losses, format_table,
                             jsonable, last_error_line, main, parse_args, per_step_summary, read_losses,
                             run_command, summarise_profile, write_report)
from tools.profile_throughput import STAGES

ROOT = Path(__file__).resolve().parents[1]
KNOWN = ", ".join(sorted(METHODS))


# ------------------------------------------------------------------------------------ arguments


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", captured.err
    assert lines[0].startswith("gpu_check: error: ")
    return lines[0]


def test_an_unknown_method_is_a_one_line_error_naming_it_and_the_known_methods(capsys):
    line = one_line_error(capsys, ["--methods", "swav,nope"])
    assert line == f"gpu_check: error: --methods: unknown method 'nope'; known: {KNOWN}"


@pytest.mark.parametrize("argv, fragment", [
    (["--steps", "0"], "--steps 0: give a positive number of steps"),
    (["--steps", "-3"], "--steps -3"),
    (["--steps", "many"], "invalid int value: 'many'"),
    (["--methods", " , "], "name at least one method"),
    (["--batch-size", "1"], "--batch-size 1"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, fragment):
    assert fragment in one_line_error(capsys, argv)


def test_methods_default_to_every_registered_one_and_a_list_keeps_its_order_without_repeats():
    assert parse_args([]).methods == list(METHODS)
    args = parse_args(["--methods", "dino, swav,dino", "--steps", "3", "--skip-profile", "--skip-multi-gpu"])
    assert args.methods == ["dino", "swav"]
    assert (args.steps, args.skip_profile, args.skip_multi_gpu, args.output) == (3, True, True, "gpu-check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the tool would run its checks")
def test_without_a_gpu_the_tool_says_so_in_one_line_and_exits_zero(tmp_path):
    command = [sys.executable, "tools/gpu_check.py", "--output", str(tmp_path / "report")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [gpu_check.NO_GPU]
    assert "CUDA" in gpu_check.NO_GPU and not (tmp_path / "report").exists()


# ------------------------------------------------------------------------------------ loss comparison


def test_losses_within_the_tolerance_pass_with_their_relative_difference():
    result = compare_losses(8.0, 8.0 + 8e-5)
    assert result["ok"] and result["problem"] is None
    assert result["rel_diff"] == pytest.approx(1e-5) and result["abs_diff"] == pytest.approx(8e-5)
    assert compare_losses(-0.5, -0.5001)["ok"]  # negative losses (SimSiam) by their magnitude
    assert compare_losses(2.0, 2.0)["rel_diff"] == 0.0


def test_losses_outside_the_tolerance_fail_and_say_by_how_much():
    result = compare_losses(8.0, 8.0 * (1 + 3 * REL_TOLERANCE))
    assert not result["ok"]
    assert result["rel_diff"] == pytest.approx(3 * REL_TOLERANCE)
    assert result["problem"] == f"rel. diff 3.00e-03 > {REL_TOLERANCE:.0e}"
    assert not compare_losses(1.0, -1.0)["ok"]


def test_a_zero_cpu_loss_is_judged_on_the_absolute_difference():
    same = compare_losses(0.0, 0.0)
    assert same["ok"] and same["rel_diff"] is None and same["abs_diff"] == 0.0
    assert compare_losses(0.0, ABS_TOLERANCE / 2)["ok"]
    off = compare_losses(0.0, 1e-3)
    assert not off["ok"] and off["rel_diff"] is None and "the CPU loss is 0" in off["problem"]


@pytest.mark.parametrize("cpu, gpu, problem", [
    (2.0, math.nan, "the GPU loss is nan"),
    (math.nan, 2.0, "the CPU loss is nan"),
    (math.inf, math.nan, "the CPU loss is inf and the GPU loss is nan"),
])
def test_a_non_finite_loss_fails_and_names_the_device(cpu, gpu, problem):
    result = compare_losses(cpu, gpu)
    assert not result["ok"] and result["problem"] == problem and result["rel_diff"] is None


# ------------------------------------------------------------------------------------ sync counting


def test_only_torchs_sync_warnings_are_counted():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # the same warning from the same line: every occurrence counts
            warnings.warn("called a synchronizing CUDA operation (Triggered internally at Functions.cpp:1)")
        warnings.warn("some other warning")
        warnings.warn("called a synchronizing CUDA operation", DeprecationWarning)
    assert len(caught) == 5
    assert count_sync_warnings(caught) == 4
    assert count_sync_warnings([]) == 0
    assert count_sync_warnings(["called a synchronizing CUDA operation", UserWarning("other")]) == 1


def test_the_first_step_is_left_out_of_the_sync_summary():
    summary = per_step_summary([40, 2, 0, 1])
    assert summary == {"per_step": [40, 2, 0, 1], "counted_steps": 3, "mean": 1.0, "max": 2}
    assert per_step_summary([7]) == {"per_step": [7], "counted_steps": 0, "mean": None, "max": None}


# ------------------------------------------------------------------------------------ report


def a_report() -> dict:
    """A finished run on 4 GPUs: swav passes everything, dino fails on 4 GPUs and in the loss comparison,
    mae's sync count raised, one profile failed."""
    def run(processes, exit_code=0, steps_logged=4, loss=8.0):
        return {"processes": processes, "exit_code": exit_code, "steps": 4, "steps_logged": steps_logged,
                "final_loss": loss, "seconds": 41.6, "error": None if exit_code == 0 else
                "train.py: error: mocov2 queue_length 65536 is not a multiple of the global batch 96"}

    syncs = {"stack": per_step_summary([30, 17, 17, 17]), "step": per_step_summary([9, 0, 1, 0]),
             "final_loss": 7.9}
    return {
        "settings": {"methods": ["swav", "dino", "mae"], "steps": 4, "batch_size": 32, "seed": 0,
                     "compare_batch_size": 8, "rel_tolerance": REL_TOLERANCE, "abs_tolerance": ABS_TOLERANCE,
                     "multi_gpu_processes": 4, "profile_data": "gpu-check/bench-512"},
        "methods": {
            "swav": {"training": {"single_gpu": run(1), "multi_gpu": run(4)},
                     "first_step_loss": compare_losses(8.006413, 8.006420), "syncs": syncs},
            "dino": {"training": {"single_gpu": run(1, loss=11.09),
                                  "multi_gpu": run(4, exit_code=2, steps_logged=0, loss=None)},
                     "first_step_loss": compare_losses(11.09, 11.5), "syncs": syncs},
            "mae": {"training": {"single_gpu": run(1, steps_logged=3, loss=math.nan)},
                    "first_step_loss": compare_losses(1.8, 1.8),
                    "syncs": {"error": "RuntimeError: CUDA out of memory"}},
        },
        "profiles": [
            {"method": "swav", "multicrop": "2x224+6x96", "ok": True, **summarise_profile(
                {"stages": {STAGES[1]: {"images_per_second": 4000.0},
                            STAGES[3]: {"images_per_second": 1500.0},
                            STAGES[4]: {"images_per_second": 900.0},
                            STAGES[5]: {"images_per_second": 850.0}}},
                6 * 2**30)},
            {"method": "dino", "multicrop": "2x224+8x96", "ok": False, "error": "exit 1: RuntimeError: boom"},
        ],
    }


def test_failures_name_each_failed_check():
    assert failures(a_report()) == [
        "dino: training on 4 GPUs (train.py: error: mocov2 queue_length 65536 is not a multiple of the "
        "global batch 96)",
        f"dino: first-step loss CPU vs GPU (rel. diff 3.70e-02 > {REL_TOLERANCE:.0e})",
        "mae: training on 1 GPU (3/4 steps, final loss nan)",
        "mae: sync count (RuntimeError: CUDA out of memory)",
        "profile dino 2x224+8x96 (exit 1: RuntimeError: boom)",
    ]
    passing = a_report()
    passing["methods"] = {"swav": passing["methods"]["swav"]}
    passing["profiles"] = passing["profiles"][:1]
    assert failures(passing) == []


def test_the_table_has_a_row_per_method_and_per_profile():
    lines = format_table(a_report())
    header = lines[0].split("  ")
    assert [cell.strip() for cell in header if cell.strip()] == [
        "method", "1 GPU", "4 GPUs", "loss CPU", "loss GPU", "rel. diff", "syncs/step", "stack syncs/batch"]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert rows["swav"].split() == ["swav", "ok", "4/4", "42s", "ok", "4/4", "42s", "8.00641", "8.00642",
                                    "8.7e-07", "0.3", "(1)", "17", "(17)"]
    assert "FAIL exit 2" in rows["dino"] and "FAIL 3.7e-02" in rows["dino"]
    assert rows["mae"].split()[1:5] == ["FAIL", "3/4", "-", "1.8"]
    assert rows["mae"].split()[-2:] == ["error", "error"]
    assert "steps 2..4" in lines[4]
    profiles = lines[lines.index("") + 1:]
    assert profiles[0].split()[:2] == ["profile", "stack"]
    assert profiles[1].split() == ["swav", "2x224+6x96", "1,500", "900", "850", "37.5%", "6,144", "MiB"]
    assert profiles[2].split() == ["dino", "2x224+8x96", "FAIL"]


def test_a_single_gpu_report_without_profiles_has_no_multi_gpu_column_and_no_profile_table():
    report = a_report()
    report["settings"]["multi_gpu_processes"] = None
    report["profiles"] = []
    for entry in report["methods"].values():
        entry["training"].pop("multi_gpu", None)
    lines = format_table(report)
    assert "GPUs" not in lines[0] and "" not in lines
    assert len(lines) == 1 + 3 + 1


def test_the_report_is_strict_json_with_non_finite_numbers_as_text(tmp_path):
    report = a_report()
    path = write_report(report, tmp_path / "out")
    assert path == tmp_path / "out" / "gpu_check.json"
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded["methods"]["mae"]["training"]["single_gpu"]["final_loss"] == "nan"
    assert loaded["methods"]["swav"] == jsonable(report["methods"]["swav"])
    assert loaded["profiles"][0]["peak_gpu_memory_mib"] == 6144
    assert jsonable({"a": [math.inf, -math.inf, 1.5]}) == {"a": ["inf", "-inf", 1.5]}
    assert not list(tmp_path.glob("out/*.tmp"))


def test_the_profile_summary_reads_the_profilers_stages():
    stages = {STAGES[1]: {"images_per_second": 2000.0}, STAGES[3]: {"images_per_second": 500.0}}
    summary = summarise_profile({"stages": stages}, None)
    assert summary["stack_share_of_decode"] == 0.25 and summary["input_stack_images_per_second"] == 500.0
    assert summary["end_to_end_images_per_second"] is None and summary["peak_gpu_memory_mib"] is None


def test_a_runs_losses_and_its_error_line_are_read_from_its_files(tmp_path):
    records = [{"step": 1, "loss": 8.1}, {"step": 2, "loss": 7.9}, {"step": 2, "epoch": 0, "knn_top1": 50.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_losses(tmp_path) == {1: 8.1, 2: 7.9}
    assert read_losses(tmp_path / "missing") == {}
    log = "step 1\r step 2\ntrain.py: error: loss is nan at step 3\nmore text\n"
    assert last_error_line(log) == "train.py: error: loss is nan at step 3"
    assert last_error_line("Traceback\n  File x\nRuntimeError: CUDA error\n\n") == "RuntimeError: CUDA error"
    assert last_error_line("") is None


def test_a_command_gives_its_exit_code_and_both_output_streams():
    command = [sys.executable, "-c", "import sys; print('out'); sys.exit('err')"]
    code, output = run_command(command, timeout=120)
    assert code == 1 and output.split() == ["out", "err"]


def test_a_command_out_of_time_is_killed_with_the_processes_it_started_in_sessions_of_their_own():
    """As accelerate launch starts its ranks: a timed-out launcher must not leave them holding GPUs."""
    import psutil

    grandchild = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
                  "'import time; time.sleep(600)'], start_new_session=True); print(p.pid, flush=True); "
                  "time.sleep(600)")
    code, output = run_command([sys.executable, "-c", grandchild], timeout=5)
    assert code is None
    pid = int(output.split()[0])
    try:
        psutil.Process(pid).wait(timeout=30)  # gone (reaped by init once killed)
    except psutil.NoSuchProcess:
        pass
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# ------------------------------------------------------------------------------------ the CPU half


def test_a_batch_moves_every_tensor_and_keeps_its_keys_on_the_host():
    batch = Batch(views=[torch.zeros(4, 3, 8, 8), torch.zeros(8, 3, 4, 4)], boxes=[torch.zeros(4, 4)] * 2,
                  flips=[torch.zeros(4, dtype=torch.bool)] * 2, image_sizes=torch.zeros(2, 2),
                  labels=torch.zeros(2),
                  masks=torch.zeros(2, 4, dtype=torch.bool), raw_keys=torch.zeros(2, 8, dtype=torch.uint8))
    moved = batch_to(batch, "meta")
    tensors = [*moved.views, *moved.boxes, *moved.flips, moved.image_sizes, moved.labels, moved.masks]
    assert all(tensor.device.type == "meta" for tensor in tensors)
    assert moved.raw_keys.device.type == "cpu" and batch.views[0].device.type == "cpu"
    assert batch_to(dataclasses.replace(batch, masks=None), "meta").masks is None


def test_exact_float32_turns_tf32_off_inside_and_restores_the_settings():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    torch.backends.cudnn.allow_tf32 = True
    try:
        with exact_float32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_the_first_step_loss_on_the_cpu_is_the_same_on_every_call(method):
    """The CPU side of the comparison with each method's small CPU configuration: a real input-stack batch,
    two methods built from one seed with one state dict, identical losses."""
    compile_setting = os.environ.get("FASTSSL_COMPILE")
    first = first_step_loss(method, "cpu", gpu_config=False)
    again = first_step_losses(method, ["cpu", "cpu"], gpu_config=False)
    assert math.isfinite(first) and first > 0
    assert again == [first, first]
    assert os.environ.get("FASTSSL_COMPILE") == compile_setting  # the eager batch leaves it as it was
    assert first_step_loss(method, "cpu", gpu_config=False, seed=1) != first  # the seed makes them equal


def test_the_gpu_configuration_builds_and_computes_its_first_loss_on_the_cpu():
    """What a GPU user's comparison runs (resnet50, the paper's heads, 224-px crops), on two samples."""
    method, recipe, config = gpu_check.build_method("simclr", gpu_config=True, seed=0, batch_size=2)
    assert (config.backbone, recipe.groups[0].size) == ("resnet50", 224)
    losses = first_step_losses("simclr", ["cpu", "cpu"], gpu_config=True, batch_size=2)
    assert math.isfinite(losses[0]) and losses[0] == losses[1]


def test_the_sync_count_runs_train_py_steps_in_process():
    """The GPU's sync count drives the training loop's own pieces (its Accelerator, `optimizer_step`, the
    step signals) on the input stack's batches; here on the CPU, where the sync debug mode does not exist
    and nothing is counted, with SimCLR's CPU configuration."""
    syncs = gpu_check.count_syncs("simclr", 1, 16, 0, gpu_config=False)  # at least 2 steps
    assert syncs["step"]["per_step"] == syncs["stack"]["per_step"] == [0, 0]
    assert syncs["step"]["counted_steps"] == 1
    assert math.isfinite(syncs["final_loss"]) and syncs["mixed_precision"] == "no"
