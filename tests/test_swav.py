"""SwAV: Sinkhorn and the swapped-prediction loss against lightly 1.6.0, and the method's training step."""

from __future__ import annotations

import copy
import os
import socket
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightly.loss import SwaVLoss
from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn
from torch import nn

from models.losses import sinkhorn, swav_loss
from models.methods import create_method
from models.methods.base import Progress
from models.methods.swav import SwAV


@dataclass
class Views:
    """What the input stack yields, as far as a method reads it."""

    views: list[torch.Tensor]
    batch_size: int

    @property
    def counts(self) -> list[int]:
        return [group.shape[0] // self.batch_size for group in self.views]


def random_views(batch_size: int, groups: list[tuple[int, int]], seed: int = 0) -> Views:
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(count * batch_size, 3, size, size, generator=generator) for count, size in groups]
    return Views(views, batch_size)


def prototype_scores(n_crops: int, batch_size: int, n_prototypes: int = 100, dim: int = 32, seed: int = 0,
                     dtype=torch.float64) -> list[torch.Tensor]:
    """Scores of L2-normalised projections against L2-normalised prototypes, one (B, K) per crop."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(n_prototypes, dim, generator=generator, dtype=dtype), dim=1)
    projections = [torch.randn(batch_size, dim, generator=generator, dtype=dtype) for _ in range(n_crops)]
    return [F.normalize(p, dim=1) @ prototypes.t() for p in projections]


def progress(step: int = 0, epoch: int = 0, steps_per_epoch: int = 10) -> Progress:
    return Progress(step=step, epoch=epoch, total_steps=100 * steps_per_epoch,
                    steps_per_epoch=steps_per_epoch)


def tiny_swav(**kwargs) -> SwAV:
    """A small real network: conv + pooling backbone and a small head, for the fast method tests."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    options = dict(feature_dim=16, hidden_dim=32, out_dim=8, n_prototypes=20)
    options.update(kwargs)
    return SwAV(backbone, **options)


ORACLE = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)


# --- Sinkhorn -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_matches_lightly(dtype):
    scores = prototype_scores(1, 64, dtype=dtype)[0]
    expected = lightly_sinkhorn(scores, iterations=3, epsilon=0.05)
    torch.testing.assert_close(sinkhorn(scores, epsilon=0.05, iterations=3), expected, rtol=1e-5, atol=1e-7)


def test_sinkhorn_rows_are_assignments_and_columns_approach_equipartition():
    batch, prototypes = 64, 100
    scores = prototype_scores(1, batch, prototypes)[0]

    def column_error(codes):
        return ((codes.sum(dim=0) - batch / prototypes).abs().max() / (batch / prototypes)).item()

    # the last step normalises each sample's row: every sample's code sums to exactly 1
    codes = sinkhorn(scores)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(batch, dtype=codes.dtype), rtol=0, atol=1e-12)
    assert (codes >= 0).all()
    # prototype marginals are only pushed towards B/K; they reach it as the iterations grow
    softmax_error = column_error(F.softmax(scores / 0.05, dim=1))
    errors = [column_error(sinkhorn(scores, iterations=n)) for n in (1, 3, 10, 100)]
    assert softmax_error > errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[1] > 0.01  # 3 iterations are far from balanced at this B/K: don't assert equipartition
    assert errors[3] < 1e-9


def test_sinkhorn_is_fp32_under_low_precision_autocast():
    scores = prototype_scores(1, 32, dtype=torch.float32)[0]
    reference = sinkhorn(scores)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = sinkhorn(scores.bfloat16())
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes, sinkhorn(scores.bfloat16().float()))
    assert (codes - reference).abs().max() < 0.1  # only the bf16 rounding of the scores differs
    # exp(1 / 0.05) = 4.9e8 is inf in fp16: the computation must not stay in the input's dtype
    assert torch.isinf(torch.exp(scores.half() / 0.05)).any()
    assert torch.isfinite(sinkhorn(scores.half())).all()


def _sinkhorn_rank(rank: int, world: int, port: int, scores: torch.Tensor, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # numpy, pickled by value: a tensor travels as a shared-memory handle that dies with this process
        queue.put((rank, sinkhorn(scores.chunk(world)[rank]).numpy()))
    finally:
        dist.destroy_process_group()


def test_sinkhorn_over_two_ranks_equals_one_process_on_the_global_batch():
    scores = prototype_scores(1, 32)[0]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_sinkhorn_rank, args=(rank, 2, port, scores, results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    parts = {rank: torch.from_numpy(part) for rank, part in (results.get(timeout=60) for _ in processes)}
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    torch.testing.assert_close(torch.cat([parts[0], parts[1]]), sinkhorn(scores), rtol=1e-10, atol=1e-12)


# --- the loss -------------------------------------------------------------------------------------


def test_swav_loss_matches_lightly_with_multicrop():
    scores = prototype_scores(8, 16)  # 2 high-resolution + 6 low-resolution crops
    expected = ORACLE(scores[:2], scores[2:])
    torch.testing.assert_close(swav_loss(scores, n_assign=2), expected.squeeze(), rtol=1e-5, atol=1e-5)


def test_swav_loss_gradients_match_lightly():
    ours = [s.clone().requires_grad_() for s in prototype_scores(8, 16)]
    theirs = [s.detach().clone().requires_grad_() for s in ours]
    swav_loss(ours).backward()
    ORACLE(theirs[:2], theirs[2:]).sum().backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)


def test_swav_loss_matches_lightly_with_a_queue():
    scores = prototype_scores(8, 16, seed=1)
    queue = prototype_scores(2, 48, seed=2)
    expected = ORACLE(scores[:2], scores[2:], queue_outputs=queue)
    got = swav_loss(scores, n_assign=2, queue_scores=queue)
    torch.testing.assert_close(got, expected.squeeze(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, swav_loss(scores, n_assign=2))  # the queue changes the codes


def test_swav_loss_rejects_impossible_crop_counts():
    with pytest.raises(ValueError, match="n_assign"):
        swav_loss(prototype_scores(2, 4), n_assign=3)


# --- the method -----------------------------------------------------------------------------------


def test_training_step_on_a_small_resnet_runs_one_backbone_forward_per_group():
    torch.manual_seed(0)
    method = create_method("swav", backbone="resnet18", stem="cifar", on_gpu=False)
    assert method.prototypes.weight.shape == (64, 128) and method.prototypes.bias is None
    forwards = []
    method.backbone.register_forward_hook(lambda module, inputs, output: forwards.append(inputs[0].shape))
    batch = random_views(4, [(2, 32), (4, 16)])

    loss, metrics = method(batch, progress())
    assert forwards == [(8, 3, 32, 32), (16, 3, 16, 16)]
    assert torch.isfinite(loss) and loss.ndim == 0
    assert 0 < loss.item() < 2 * torch.log(torch.tensor(512.0)).item()
    assert set(metrics) >= {"loss", "code_entropy", "prototype_usage", "queue_in_use"}
    loss.backward()
    assert method.backbone.conv1.weight.grad.abs().sum() > 0
    assert method.head.projection[0].weight.grad.abs().sum() > 0


def test_only_the_global_crops_update_batch_norm_running_statistics():
    torch.manual_seed(0)
    method = create_method("swav", backbone="resnet10t", stem="no-maxpool", on_gpu=False)
    reference = copy.deepcopy(method.backbone)
    batch = random_views(4, [(2, 32), (4, 16)])
    method.train()
    features = method.forward_groups(batch.views)
    with torch.no_grad():
        expected_global = reference.train()(batch.views[0])
    # the local forward normalised with its own batch statistics, exactly as an ordinary forward does
    torch.testing.assert_close(features[0], expected_global)
    torch.testing.assert_close(features[1], copy.deepcopy(reference)(batch.views[1]))
    norms = [(name, m) for name, m in method.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    expected = dict(reference.named_modules())
    assert norms
    for name, norm in norms:
        torch.testing.assert_close(norm.running_mean, expected[name].running_mean)
        torch.testing.assert_close(norm.running_var, expected[name].running_var)
        assert int(norm.num_batches_tracked) == int(expected[name].num_batches_tracked) == 1
        assert norm.momentum == 0.1
    fresh = create_method("swav", backbone="resnet10t", stem="no-maxpool", on_gpu=False)
    assert not torch.equal(norms[0][1].running_var, dict(fresh.backbone.named_modules())[norms[0][0]].running_var)


def test_training_step_loss_equals_swav_loss_of_the_crop_scores():
    method = tiny_swav()
    scores = []
    method.prototypes.register_forward_hook(lambda module, inputs, output: scores.append(output))
    loss, _ = method(random_views(4, [(2, 8), (3, 4)]), progress())
    crops = list(scores[0].split(4))
    assert len(crops) == 5
    torch.testing.assert_close(loss, swav_loss(crops, n_assign=2))


def test_prototypes_are_renormalised_before_every_step():
    method = tiny_swav()
    with torch.no_grad():
        method.prototypes.weight.mul_(torch.linspace(0.5, 3.0, 20)[:, None])
    method(random_views(4, [(2, 8), (2, 4)]), progress())
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(20))


@pytest.mark.parametrize("freeze_steps, frozen_until", [(None, 10), (3, 3)])
def test_prototype_gradients_are_dropped_while_frozen(freeze_steps, frozen_until):
    method = tiny_swav(freeze_prototypes_steps=freeze_steps)
    batch = random_views(4, [(2, 8), (2, 4)])
    for step, frozen in [(0, True), (frozen_until - 1, True), (frozen_until, False)]:
        method.zero_grad(set_to_none=True)
        loss, _ = method(batch, progress(step=step, steps_per_epoch=10))
        loss.backward()
        method.before_optimizer_step(progress(step=step, steps_per_epoch=10))
        grad = method.prototypes.weight.grad
        if frozen:
            assert grad is None
        else:
            assert grad is not None and grad.abs().sum() > 0
        assert method.head.projection[0].weight.grad.abs().sum() > 0


def test_queue_starts_at_its_epoch_fills_fifo_and_is_used_only_when_full():
    batch_size = 4
    method = tiny_swav(queue_length=14, queue_start_epoch=1)  # rounded down to 12 = 3 batches
    embeddings, prototype_calls = [], []
    method.head.register_forward_hook(lambda module, inputs, output: embeddings.append(output.detach()))
    method.prototypes.register_forward_hook(
        lambda module, inputs, output: prototype_calls.append(output.detach()))

    _, metrics = method(random_views(batch_size, [(2, 8), (2, 4)], seed=0), progress(epoch=0))
    method.after_step(progress(epoch=0))
    assert method.queue.shape[1] == 0 and metrics["queue_in_use"] == 0.0

    history = []
    for seed in range(1, 5):
        queue_before = method.queue.clone()
        filled_before = int(method.queue_filled)
        prototype_calls.clear()
        batch = random_views(batch_size, [(2, 8), (2, 4)], seed=seed)
        loss, metrics = method(batch, progress(step=seed, epoch=1))
        assert method.queue.shape == (2, 12, 8)
        # unchanged until the step is taken (the first batch of epoch 1 allocates it)
        assert int(method.queue_filled) == filled_before
        if seed > 1:
            torch.testing.assert_close(method.queue, queue_before)
        method.after_step(progress(step=seed, epoch=1))
        history.append(embeddings[-1][: 2 * batch_size].view(2, batch_size, -1))
        # newest first; older batches shift back, FIFO
        for age, past in enumerate(reversed(history[-3:])):
            torch.testing.assert_close(method.queue[:, age * batch_size:(age + 1) * batch_size], past)
        assert int(method.queue_filled) == min(12, filled_before + batch_size)

        full = filled_before == 12
        assert metrics["queue_in_use"] == float(full)
        assert len(prototype_calls) == (3 if full else 1)  # queue re-scored with the current prototypes
        crops = list(prototype_calls[0].split(batch_size))
        queue_scores = [queue_before[i] @ method.prototypes.weight.t() for i in range(2)] if full else None
        torch.testing.assert_close(loss.detach(), swav_loss(crops, queue_scores=queue_scores))
    assert metrics["queue_in_use"] == 1.0  # the 4th batch found the queue full


def test_queue_lands_in_the_state_dict_and_loads_into_a_fresh_method():
    from safetensors.torch import load_file, save_file

    method = tiny_swav(queue_length=8, queue_start_epoch=0)
    method(random_views(4, [(2, 8), (2, 4)]), progress())
    method.after_step(progress())
    state = method.state_dict()
    assert state["queue"].shape == (2, 8, 8) and int(state["queue_filled"]) == 4

    fresh = tiny_swav(queue_length=8, queue_start_epoch=0)
    assert fresh.queue.shape == (2, 0, 8)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.queue, method.queue)
    assert int(fresh.queue_filled) == 4
    # Accelerate checkpoints are safetensors: the empty queue of a fresh method must round-trip too
    save_file(dict(tiny_swav().state_dict()), "/tmp/swav-empty-queue.safetensors")
    tiny_swav().load_state_dict(load_file("/tmp/swav-empty-queue.safetensors"))
    assert method._ddp_params_and_buffers_to_ignore == ["queue", "queue_filled"]


def test_queue_shorter_than_the_global_batch_is_an_error():
    method = tiny_swav(queue_length=3, queue_start_epoch=0)
    with pytest.raises(ValueError, match="queue_length 3 is shorter than the global batch 4"):
        method(random_views(4, [(2, 8)]), progress())


def test_defaults_follow_the_paper_on_gpu_and_shrink_on_cpu():
    gpu, cpu = SwAV.defaults(on_gpu=True), SwAV.defaults(on_gpu=False)
    assert gpu["optimizer"] == "lars" and gpu["lr"] == 0.3 and gpu["weight_decay"] == 1e-6
    assert gpu["multicrop"] == "2x224+6x96" and cpu["multicrop"] == "2x32+4x16"
    paper = SwAV("resnet18", on_gpu=True)
    assert paper.prototypes.weight.shape == (3000, 128)
    assert paper.head.projection[0].out_features == 2048
    assert paper.temperature == 0.1 and paper.epsilon == 0.05 and paper.sinkhorn_iterations == 3
    assert paper.freeze_prototypes_steps is None  # one epoch, whatever its length
    small = SwAV("resnet18", on_gpu=False)
    assert small.prototypes.weight.shape == (64, 128) and small.epsilon == 0.03
    assert small.freeze_prototypes_steps == 40 and cpu["lr"] == 4.8 and cpu["batch_size"] == 32
    assert SwAV("resnet18", on_gpu=False, epsilon=0.05, n_prototypes=100).epsilon == 0.05
    assert SwAV.recipe_preset == "swav"
    # upstream applies LARC and weight decay to every parameter
    groups = paper.param_groups(1e-6)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-6 and not groups[0]["lars_exclude"]


def test_recipe_check_needs_two_crops_of_the_first_size():
    @dataclass
    class Group:
        count: int

    @dataclass
    class Recipe:
        groups: list
        multicrop: str

    SwAV.check_recipe(Recipe([Group(2), Group(6)], "2x224+6x96"), 64)
    with pytest.raises(ValueError, match="'1x224\\+6x96' has 1"):
        SwAV.check_recipe(Recipe([Group(1), Group(6)], "1x224+6x96"), 64)
