"""Zoo losses against lightly 1.6.0 (or the published formula where lightly differs), and over two ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightly.loss import BarlowTwinsLoss, DINOLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss

from models.zoo_losses import (
    barlow_twins_loss,
    dino_center_update,
    dino_loss,
    info_nce_loss,
    mocov3_loss,
    negative_cosine_loss,
    nt_xent_loss,
    vicreg_loss,
)

TIGHT = dict(rtol=1e-10, atol=1e-10)  # float64 parity


def randn(*shape: int, seed: int, dtype=torch.float64, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype) * scale + shift


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Fresh leaf copies that require gradients (one set per implementation under test)."""
    return [t.detach().clone().requires_grad_() for t in tensors]


def assert_same_values_and_gradients(ours_fn, theirs_fn, *inputs: torch.Tensor) -> None:
    ours_inputs, theirs_inputs = leaves(*inputs), leaves(*inputs)
    ours, theirs = ours_fn(*ours_inputs), theirs_fn(*theirs_inputs)
    torch.testing.assert_close(ours, theirs, **TIGHT)
    ours.backward()
    theirs.backward()
    for mine, reference in zip(ours_inputs, theirs_inputs):
        torch.testing.assert_close(mine.grad, reference.grad, **TIGHT)


# --- SimCLR ---------------------------------------------------------------------------------------


def test_nt_xent_matches_lightly_values_and_gradients():
    z1, z2 = randn(16, 32, seed=0), randn(16, 32, seed=1, scale=2.0)
    assert_same_values_and_gradients(lambda a, b: nt_xent_loss(a, b, temperature=0.1), NTXentLoss(temperature=0.1),
                                     z1, z2)


# --- MoCo v2 --------------------------------------------------------------------------------------


def test_info_nce_matches_lightly_memory_bank_over_two_steps():
    n_keys, dim, batch = 64, 16, 8
    oracle = NTXentLoss(temperature=0.2, memory_bank_size=(n_keys, dim))
    # lightly 1.6.0 stores the bank as (K, dim) and hands it out transposed (feature_dim_first=True).
    assert oracle.memory_bank.bank.shape == (n_keys, dim) and oracle.memory_bank.feature_dim_first
    queue = F.normalize(randn(n_keys, dim, seed=2, dtype=torch.float32), dim=1)  # the bank is fp32-only
    with torch.no_grad():
        oracle.memory_bank.bank.copy_(queue)
    for step in range(2):
        q, k = randn(batch, dim, seed=10 + step, dtype=torch.float32), randn(batch, dim, seed=20 + step,
                                                                               dtype=torch.float32)
        (q_ours,), (q_theirs,) = leaves(q), leaves(q)
        ours = info_nce_loss(q_ours, k, queue, temperature=0.2)
        theirs = oracle(q_theirs, k)  # q requires grad, so lightly enqueues l2n(k) after reading the bank
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(q_ours.grad, q_theirs.grad, rtol=1e-6, atol=1e-7)
        queue = queue.clone()
        queue[step * batch:(step + 1) * batch] = F.normalize(k, dim=1)  # FIFO enqueue, as MoCo does
    torch.testing.assert_close(oracle.memory_bank.bank, queue, rtol=0, atol=1e-7)


def test_info_nce_sends_no_gradient_into_the_key():
    q, k = leaves(randn(4, 8, seed=3), randn(4, 8, seed=4))
    info_nce_loss(q, k, F.normalize(randn(12, 8, seed=5), dim=1)).backward()
    assert q.grad is not None and k.grad is None


# --- MoCo v3 --------------------------------------------------------------------------------------


def published_mocov3(q1, q2, k1, k2, temperature):
    """moco-v3 contrastive_loss written out: 2T * mean_i -log softmax(l2n(q_i).l2n(k)^T / T)_i, symmetrised."""

    def ctr(q, k):
        logits = torch.einsum("nc,mc->nm", F.normalize(q, dim=1), F.normalize(k, dim=1)) / temperature
        return 2 * temperature * -(logits.diagonal() - logits.logsumexp(dim=1)).mean()

    return ctr(q1, k2) + ctr(q2, k1)


@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_mocov3_matches_the_published_formula(temperature):
    q1, q2, k1, k2 = (randn(8, 16, seed=30 + i) for i in range(4))
    a1, a2, ak1, ak2 = leaves(q1, q2, k1, k2)
    b1, b2 = leaves(q1, q2)
    ours = mocov3_loss(a1, a2, ak1, ak2, temperature)
    reference = published_mocov3(b1, b2, k1, k2, temperature)
    torch.testing.assert_close(ours, reference, **TIGHT)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(a1.grad, b1.grad, **TIGHT)
    torch.testing.assert_close(a2.grad, b2.grad, **TIGHT)
    assert ak1.grad is None and ak2.grad is None  # keys come from the momentum encoder: no gradient
    # lightly's NTXent adds intra-view negatives: not MoCo v3 even after putting back the 2T factor.
    ntxent = NTXentLoss(temperature=temperature)
    lightly_value = 2 * temperature * (ntxent(q1, k2) + ntxent(q2, k1))
    assert abs(lightly_value.item() - ours.item()) > 0.05


# --- SimSiam / BYOL -------------------------------------------------------------------------------


def test_negative_cosine_matches_lightly_and_stops_the_gradient_into_z():
    p, z = randn(8, 16, seed=40), randn(8, 16, seed=41, shift=0.5)
    a_p, a_z = leaves(p, z)
    b_p, b_z = leaves(p, z)
    ours = negative_cosine_loss(a_p, a_z)
    theirs = NegativeCosineSimilarity()(b_p, b_z)
    torch.testing.assert_close(ours, theirs, **TIGHT)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a_p.grad, b_p.grad, **TIGHT)
    assert a_z.grad is None
    assert b_z.grad is not None and b_z.grad.abs().sum() > 0  # lightly does not stop the gradient
    byol = (F.normalize(p, dim=1) - F.normalize(z, dim=1)).pow(2).sum(dim=1).mean()
    torch.testing.assert_close(byol, 2 + 2 * negative_cosine_loss(p, z), **TIGHT)


# --- DINO -----------------------------------------------------------------------------------------


def lightly_teacher_temperature(oracle: DINOLoss, epoch: int) -> float:
    """The fp32 value lightly's schedule uses at `epoch` (linspace(0.04, 0.07, 30), then 0.07)."""
    value = float(oracle.teacher_temp_schedule[epoch]) if epoch < 30 else float(torch.tensor(0.07))
    assert abs(value - (0.04 + 0.03 * min(epoch, 29) / 29)) < 1e-8
    return value


def test_dino_matches_lightly_over_three_steps_with_center_updates():
    dim, batch, n_global, n_crops = 64, 4, 2, 6
    oracle = DINOLoss(output_dim=dim, warmup_teacher_temp=0.04, teacher_temp=0.07,
                      warmup_teacher_temp_epochs=30).double()
    assert oracle.center_momentum == 0.9
    center = torch.zeros(1, dim, dtype=torch.float64)
    for step, epoch in enumerate((0, 12, 31)):
        # teacher rows have a large mean: without centring (or with a stale center) the values move
        teacher = randn(n_global * batch, dim, seed=50 + step) + randn(dim, seed=60, scale=3.0)
        student = randn(n_crops * batch, dim, seed=70 + step, scale=2.0)
        temperature = lightly_teacher_temperature(oracle, epoch)
        (s_ours,), (s_theirs,) = leaves(student), leaves(student)
        ours = dino_loss(s_ours, teacher, center, student_temp=0.1, teacher_temp=temperature, n_global=n_global)
        theirs = oracle(list(teacher.chunk(n_global)), list(s_theirs.chunk(n_crops)), epoch=epoch)
        torch.testing.assert_close(ours, theirs, **TIGHT)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(s_ours.grad, s_theirs.grad, **TIGHT)
        center = dino_center_update(center, teacher, momentum=0.9)  # after the loss, as upstream
        torch.testing.assert_close(center, oracle.center.reshape(1, dim), **TIGHT)
    assert center.abs().max() > 0.1


def test_dino_sends_no_gradient_into_the_teacher_and_rejects_a_single_crop():
    student, teacher = leaves(randn(12, 8, seed=80), randn(8, 8, seed=81))
    dino_loss(student, teacher, torch.zeros(1, 8, dtype=torch.float64), 0.1, 0.04, n_global=2).backward()
    assert student.grad is not None and teacher.grad is None
    with pytest.raises(ValueError):
        dino_loss(randn(4, 8, seed=82), randn(4, 8, seed=83), torch.zeros(1, 8), 0.1, 0.04, n_global=1)


# --- Barlow Twins and VICReg ----------------------------------------------------------------------


def test_barlow_twins_matches_lightly_with_the_paper_lambda():
    z1, z2 = randn(32, 16, seed=90, scale=3.0, shift=1.0), randn(32, 16, seed=91, scale=0.5, shift=-2.0)
    z2 = z2 + 0.5 * z1  # some correlation, so that the diagonal term is not trivial
    assert_same_values_and_gradients(barlow_twins_loss, BarlowTwinsLoss(lambda_param=0.0051), z1, z2)


def test_vicreg_matches_lightly():
    # std 0.5 < 1 keeps the variance hinge active; the shared component gives covariance to penalise
    shared = randn(32, 1, seed=100)
    x = randn(32, 16, seed=101, scale=0.5) + shared
    y = randn(32, 16, seed=102, scale=0.5) + shared
    assert_same_values_and_gradients(vicreg_loss, VICRegLoss(), x, y)


# --- precision ------------------------------------------------------------------------------------


def all_losses(t: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    a, b, c, d = t
    return {
        "nt_xent": nt_xent_loss(a, b),
        "info_nce": info_nce_loss(a, b, F.normalize(c.float(), dim=1)),
        "mocov3": mocov3_loss(a, b, c, d, 0.2),
        "negative_cosine": negative_cosine_loss(a, b),
        "dino": dino_loss(torch.cat([a, b]), a, torch.zeros(1, a.shape[1]), 0.1, 0.04, n_global=1),
        "barlow_twins": barlow_twins_loss(a, b),
        "vicreg": vicreg_loss(a, b),
    }


def test_losses_compute_in_fp32_under_bf16_autocast():
    inputs = [randn(16, 32, seed=110 + i, dtype=torch.float32).bfloat16() for i in range(4)]
    reference = all_losses([t.float() for t in inputs])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = all_losses(inputs)
    for name, value in low.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-5, msg=name)


# --- two ranks ------------------------------------------------------------------------------------


def _global_losses(z: list[torch.Tensor], teacher: torch.Tensor, world: int) -> dict[str, torch.Tensor]:
    """Losses whose maths is global, and the grad of the inputs (z are leaves)."""
    a, b, c, d = z
    out = {
        "nt_xent": nt_xent_loss(a, b),
        "mocov3": mocov3_loss(a, b, c, d, 0.2),
        "barlow_twins": barlow_twins_loss(a, b),
        "vicreg": vicreg_loss(a, b),
    }
    grads = {}
    for name, value in out.items():
        for t in z:
            t.grad = None
        value.backward()
        grads.update({f"{name}.grad{i}": t.grad.clone() for i, t in enumerate(z[:2])})
    out = {name: value.detach() for name, value in out.items()}
    out["dino_center"] = dino_center_update(torch.zeros(1, teacher.shape[1], dtype=teacher.dtype), teacher)
    return out | grads


def _rank(rank: int, world: int, port: int, z: list[torch.Tensor], teacher: torch.Tensor, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        local = leaves(*(t.chunk(world)[rank] for t in z))
        results = _global_losses(local, teacher.chunk(world)[rank], world)
        # numpy pickles by value: torch tensors travel as shared-memory handles that die with this process
        queue.put((rank, {name: value.numpy() for name, value in results.items()}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_global_batch():
    """Rank losses average to the global loss (Barlow: every rank has it); a rank's input gradient is
    world x the global gradient of its slice, so DDP's averaging gives the single-process gradient."""
    world, batch = 2, 8
    z = [randn(world * batch, 12, seed=120 + i) + (randn(world * batch, 1, seed=130) if i < 2 else 0)
         for i in range(4)]
    teacher = randn(world * batch, 12, seed=140, shift=1.0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank, args=(rank, world, port, z, teacher, results))
                 for rank in range(world)]
    for process in processes:
        process.start()
    parts = {}
    for _ in processes:
        rank, values = results.get(timeout=60)
        parts[rank] = {name: torch.from_numpy(value) for name, value in values.items()}
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    single = _global_losses(leaves(*z), teacher, 1)
    for name in ("nt_xent", "mocov3", "vicreg"):
        torch.testing.assert_close((parts[0][name] + parts[1][name]) / 2, single[name], **TIGHT, msg=name)
    for name in ("barlow_twins", "dino_center"):
        for r in range(world):
            torch.testing.assert_close(parts[r][name], single[name], **TIGHT, msg=name)
    for name in ("nt_xent", "mocov3", "barlow_twins", "vicreg"):
        for i in range(2):
            key = f"{name}.grad{i}"
            distributed = torch.cat([parts[r][key] for r in range(world)])
            torch.testing.assert_close(distributed, world * single[key], **TIGHT, msg=key)
