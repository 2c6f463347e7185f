"""The training loop's rules for several devices and processes, checked in-process on CPU: the step
signals every rank agrees on, SyncBatchNorm where the recipe says so, and the fp16 grad-scaler skip."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import train
from models import training
from models.methods import create_method, method_class
from models.methods.base import Progress


def small(name: str):
    torch.manual_seed(0)
    return create_method(name, backbone="resnet10t", stem="no-maxpool", on_gpu=False,
                         **({"queue_length": 64} if name == "mocov2" else {}))


def progress(step: int = 0) -> Progress:
    return Progress(step=step, epoch=0, total_steps=100, steps_per_epoch=10)


ONE_CPU_PROCESS = SimpleNamespace(device=torch.device("cpu"), num_processes=1)


# ---------------------------------------------------------------------------------------------- step signals


def test_step_signals_are_read_a_step_late_unless_the_loop_waits():
    stop = {"now": False}
    signals = training.StepSignals(ONE_CPU_PROCESS, lambda: stop["now"])
    signals.push(1, torch.tensor(2.5))
    signals.update(wait=False)  # the newest step stays unread
    assert signals.take_losses() == [] and len(signals.pending) == 1
    signals.push(2, torch.tensor(1.5))
    signals.update(wait=False)
    assert signals.take_losses() == [2.5] and signals.last_loss == 2.5
    stop["now"] = True
    signals.push(3, torch.tensor(1.0))
    signals.update(wait=True)
    assert signals.take_losses() == [1.5, 1.0] and signals.last_loss == 1.0
    assert signals.stop and not signals.pending and signals.non_finite is None


def test_step_signals_remember_the_first_non_finite_step_the_first_data_error_and_the_largest_time_share():
    shares = iter([0.2, 0.7, 0.5, 0.6])
    signals = training.StepSignals(ONE_CPU_PROCESS, lambda: False, lambda: next(shares))
    signals.push(1, torch.tensor(1.0))
    signals.push(2, torch.tensor(float("nan")))
    signals.push(3, torch.tensor(float("inf")), data_error=True)
    signals.push(4, torch.tensor(1.0), data_error=True)
    signals.update(wait=True)
    assert signals.time_share == pytest.approx(0.7)
    step, value = signals.non_finite
    assert step == 2 and value != value  # NaN
    assert signals.data_error == 3 and signals.last_loss == 1.0
    assert not signals.stop


def test_step_signals_remember_the_first_step_a_batch_could_not_be_read_for():
    signals = training.StepSignals(ONE_CPU_PROCESS, lambda: False)
    signals.push(1, torch.tensor(1.0))
    signals.push(2, torch.tensor(1.0), data_error=True)
    signals.push(3, torch.tensor(1.0), data_error=True)
    signals.update(wait=False)  # read a step late, as the loop does between log steps
    assert signals.data_error == 2 and signals.take_losses() == [1.0, 1.0]
    assert not signals.stop and signals.non_finite is None


# ---------------------------------------------------------------------------------------------- SyncBN


def sync_norms(model) -> int:
    return sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


@pytest.mark.parametrize("name, sync_bn, device, world, converted", [
    ("swav", None, "cuda", 2, True),
    ("simclr", None, "cuda", 4, True),
    ("mocov2", None, "cuda", 2, False),  # shuffle-BN instead, as upstream
    ("mocov2", True, "cuda", 2, True),  # --sync-bn wins over the recipe
    ("swav", False, "cuda", 2, False),  # --no-sync-bn
    ("swav", None, "cuda", 1, False),  # one GPU: nothing to synchronise
    ("swav", None, "cpu", 2, False),  # gloo processes: SyncBatchNorm runs on CUDA only
])
def test_batch_norms_are_synchronised_where_the_recipe_says_so(name, sync_bn, device, world, converted):
    method = small(name)
    norms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.modules())
    config = training.Config(method=name, sync_bn=sync_bn)
    config, note = train.synchronise_batch_norm(config, method_class(name), method, device, world)
    assert config.sync_bn == (method_class(name).sync_batch_norm if sync_bn is None else sync_bn)
    assert sync_norms(method) == (norms if converted else 0)
    assert ("synchronised across" in note) == converted, note


# ---------------------------------------------------------------------------------------------- scaler skip


def random_batch(batch_size: int = 8) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(0)
    return SimpleNamespace(views=[torch.randn(2 * batch_size, 3, 32, 32, generator=generator)],
                           batch_size=batch_size, counts=[2])


@pytest.mark.parametrize("overflow", [True, False], ids=["skipped", "taken"])
def test_a_step_the_grad_scaler_skips_leaves_teachers_and_queues_as_they_were(overflow):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    # a real grad scaler; an infinite scale overflows the gradients, as an fp16 step can
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=float("inf") if overflow else 1.0)
    method = small("mocov2")
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    method, optimizer = accelerator.prepare(method, optimizer)
    queue, teacher = method.queue.clone(), [p.clone() for p in method.key_backbone.parameters()]
    weights = [p.clone() for p in method.backbone.parameters()]
    # a moved student, so that an EMA update would show in the teacher
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(0.01)
    loss, _ = method(random_batch(), progress())
    assert torch.isfinite(loss)
    training.optimizer_step(accelerator, method, optimizer, loss, progress())
    assert optimizer.step_was_skipped == overflow
    assert torch.equal(method.queue, queue) == overflow
    assert all(torch.equal(a, b) for a, b in zip(method.key_backbone.parameters(), teacher)) == overflow
    assert not any(torch.equal(a, b) for a, b in zip(method.backbone.parameters(), weights))  # the nudge


# ---------------------------------------------------------------------------------------------- learning check


@pytest.mark.parametrize("knn, baseline, warned", [(81.0, 79.0, False), (79.0, 79.0, False), (78.9, 79.0, True),
                                                   (78.0, None, False), (None, 79.0, False)])
def test_a_knn_under_the_random_init_baseline_is_a_warning(knn, baseline, warned):
    warning = train.knn_warning(knn, baseline)
    assert (warning is not None) == warned
    if warned:
        assert warning.startswith("features are below random init") and "\n" not in warning
        assert f"{knn:.2f}%" in warning and f"{baseline:.2f}%" in warning


def test_a_flat_loss_is_a_warning_once_a_quarter_of_the_run_is_done():
    check = train.LearningCheck(fresh=True)
    check.observe([4.16] * 4)
    check.observe([4.15] * 10)  # only the first 10 losses make the start
    assert check.start_losses == [4.16] * 4 + [4.15] * 6
    assert check.warnings({"mean_loss": 4.14}, share_done=0.2) == []  # too early to tell
    assert check.warnings({"mean_loss": 4.11}, share_done=0.25) == []  # 14 losses: not yet twice the start's 10
    check.observe([4.11] * 6)
    (warning,) = check.warnings({"mean_loss": 4.11}, share_done=0.25)  # 1 % in a quarter of the run
    assert "the loss has barely moved after 25% of the run (4.1540 -> 4.1100, under 2%)" in warning
    assert check.warnings({"mean_loss": 4.11}, share_done=0.5) == []  # said once


def test_a_moving_loss_and_a_resumed_run_get_no_loss_warning():
    moving = train.LearningCheck(fresh=True)
    moving.observe([4.16] * 10)
    assert moving.warnings({"mean_loss": 4.0}, share_done=0.3) == []  # 3.8 %
    resumed = train.LearningCheck(fresh=False)
    resumed.observe([4.16] * 10)
    assert resumed.warnings({"mean_loss": 4.16}, share_done=0.9) == []
    both = train.LearningCheck(fresh=True)
    both.observe([4.16] * 20)
    assert len(both.warnings({"mean_loss": 4.16, "knn_top1": 50.0, "knn_random_init": 60.0}, share_done=0.5)) == 2
    # a kNN above random init shows learning: a queue method's loss may stay flat or rise meanwhile
    rising = train.LearningCheck(fresh=True)
    rising.observe([4.75] * 20)
    assert rising.warnings({"mean_loss": 4.81, "knn_top1": 78.7, "knn_random_init": 75.75}, share_done=0.5) == []
    assert len(rising.warnings({"mean_loss": 4.81}, share_done=0.6)) == 1  # checked at the next epoch instead


def test_a_run_shorter_than_twice_the_loss_start_is_not_judged_flat():
    short = train.LearningCheck(fresh=True)
    short.observe([1.4] * 6)  # e.g. --max-steps 6: the epoch's mean is the start itself
    assert short.warnings({"mean_loss": 1.4}, share_done=1.0) == []


# ---------------------------------------------------------------------------------------------- DDP buffers


@pytest.mark.parametrize("name, kept_out", [("mocov2", {"queue", "queue_position"}),
                                            ("swav", {"queue", "queue_filled"}), ("dino", {"center"})])
def test_ddp_does_not_broadcast_queues_and_centres_every_forward(name, kept_out, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        method = small(name)
        ddp = torch.nn.parallel.DistributedDataParallel(method)
        broadcast = set(ddp.named_module_buffers)
        assert not broadcast & kept_out
        assert any(".running_mean" in buffer for buffer in broadcast)  # batch-norm statistics still are
    finally:
        dist.destroy_process_group()


def test_the_profiler_and_training_share_one_autocast_rule():
    from models.runtime import autocast

    a = torch.randn(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "no"):
        assert (a @ a).dtype == torch.float32
