"""Batch-norm running statistics frozen for local crops without touching module attributes, and what
`Method.compile_backbone` puts under torch.compile (counted with dynamo's graph counter as the backend)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from models.backbones import running_stats_frozen
from models.methods import Progress, create_method
from models.methods.base import train_step
from pipelines.masking import block_masks, random_masks

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def conv_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def progress(step: int) -> Progress:
    return Progress(step=step, epoch=0, total_steps=100, steps_per_epoch=10)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_local_crops_use_batch_statistics_and_leave_running_ones_as_a_zero_momentum_would():
    model = conv_bn()
    zero_momentum = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    global_crops, local_crops = torch.randn(4, 3, 12, 12, generator=generator), torch.randn(8, 3, 8, 8)
    start = buffers(model)
    global_out = model(global_crops)
    after_global = buffers(model)
    assert all(not torch.equal(after_global[name], start[name]) for name in start)  # means, vars and counts
    with running_stats_frozen(model):
        local_out = model(local_crops)
    assert all(torch.equal(buffer, after_global[name]) for name, buffer in model.named_buffers())

    reference_global = zero_momentum(global_crops)
    for norm in (zero_momentum[1], zero_momentum[4]):
        norm.momentum = 0.0  # running = 1 * running + 0 * batch
    reference_local = zero_momentum(local_crops)
    # backward after the buffers were written back: batch norm kept them for its backward
    (global_out.sum() + local_out.square().sum()).backward()
    (reference_global.sum() + reference_local.square().sum()).backward()
    torch.testing.assert_close(local_out, reference_local, rtol=0, atol=0)
    for (name, parameter), reference in zip(model.named_parameters(), zero_momentum.parameters()):
        torch.testing.assert_close(parameter.grad, reference.grad, msg=name)
    torch.testing.assert_close(model[1].running_var, zero_momentum[1].running_var)


def test_a_compiled_backbone_compiles_two_graphs_for_global_and_local_groups_and_no_more():
    model = conv_bn()
    counter = CompileCounter()
    model.compile(backend=counter)
    graphs = []
    # (global batch, local batch, local size): the later steps change sizes, as a last batch or another recipe
    for global_batch, local_batch, local_size in [(4, 8, 8)] * 3 + [(6, 8, 8), (4, 12, 7), (4, 8, 10)]:
        global_out = model(torch.randn(global_batch, 3, 12, 12))
        with running_stats_frozen(model):
            local_out = model(torch.randn(local_batch, 3, local_size, local_size))
        (global_out.sum() + local_out.sum()).backward()
        graphs.append(counter.frame_count)
    assert graphs == [2] * 6  # one static graph, then one with dynamic sizes that serves both groups


def test_compile_backbone_covers_the_backbone_and_the_teacher_of_a_multi_crop_method():
    torch.manual_seed(0)
    method = create_method("dino", backbone="resnet10t", stem="no-maxpool", on_gpu=False, head_preset="small")
    counter = CompileCounter()
    method.compile_backbone(backend=counter)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01)
    batch = SimpleNamespace(views=[torch.randn(4, 3, 16, 16), torch.randn(8, 3, 8, 8)], batch_size=2, counts=[2, 4])
    graphs = []
    for step in range(3):
        train_step(method, optimizer, batch, progress(step))
        graphs.append(counter.frame_count)
    assert graphs == [3] * 3  # the student's global and local groups, the teacher's globals


@pytest.mark.parametrize("name", ["mae", "sim"])
def test_compile_backbone_covers_the_vit_blocks_masked_methods_run_on_visible_tokens(name):
    torch.manual_seed(0)
    method = create_method(name, backbone="vit_tiny_patch16_224", on_gpu=False, backbone_kwargs=TINY_VIT)
    counter = CompileCounter()
    method.compile_backbone(backend=counter)
    generator = torch.Generator().manual_seed(0)
    views = 2 if name == "sim" else 1
    batch = SimpleNamespace(views=[torch.randn(views * 4, 3, 16, 16, generator=generator)], batch_size=4,
                            counts=[views], boxes=[torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(views * 4, 1)],
                            flips=[torch.zeros(views * 4, dtype=torch.bool)])
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    graphs = []
    for step in range(2):
        batch.masks = (random_masks(4, 4, 12, generator, "cpu") if name == "mae"
                       else block_masks(4, 4, 10, generator, "cpu", min_block=4))
        train_step(method, optimizer, batch, progress(step))
        graphs.append(counter.frame_count)
    # MAE: the encoder's blocks; SIM: those of the online encoder (visible tokens) and of the target
    assert graphs == ([1, 1] if name == "mae" else [2, 2])
