"""NPID and rotation feature decoupling: the memory bank (its update, the negatives it draws, both loss
forms against the published formulas, the same bank on two ranks as in one process), the decoupling losses
and its PU weights, each sample's fixed position from the shard indexes, then `train.py --method npid |
decoupling` on the demo shards with exact resume of the bank and the kNN monitor on the memory bank."""

from __future__ import annotations

import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from models.methods import METHODS, Progress, create_method
from models.methods.decoupling import (
    Decoupling,
    pu_classifier_loss,
    pu_weights,
    rotation_irrelevance_loss,
    weighted_rotation_loss,
)
from models.methods.npid import (
    NPID,
    MemoryBank,
    estimate_z,
    full_softmax_loss,
    momentum_update,
    nce_loss,
    sample_negatives,
    softmax_loss,
)
from pipelines.pretext import rotate
from pipelines.shards import DEMO_TRAIN, DEMO_VAL, SamplePositions, open_shard_set, sample_labels
from pipelines.spec import Rotation, preset

DATA = "shards/fashion-mnist-val-2k"


def progress(step: int = 0, epoch: int = 0) -> Progress:
    return Progress(step=step, epoch=epoch, total_steps=100, steps_per_epoch=10)


def unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


class Flatten(nn.Module):
    """A backbone without batch statistics: a sample's embedding does not depend on its batch."""

    num_features = 3 * 8 * 8

    def forward(self, x):
        return x.flatten(1)


def small_npid(num_samples: int = 50, **options) -> NPID:
    torch.manual_seed(0)
    options = {"loss": "nce", **options}  # the paper's loss (the CPU preset's is softmax)
    return NPID(Flatten(), feature_dim=Flatten.num_features, on_gpu=False, num_samples=num_samples, **options)


# ---------------------------------------------------------------------------------------------- the bank


def test_the_bank_update_keeps_m_of_the_old_row_and_normalises():
    old = unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    new = unit([0.0, 0.0, 1.0], [0.0, 1.0, 0.0])
    half = momentum_update(old, new, 0.5)  # the paper's m = 0.5: the normalised mean
    torch.testing.assert_close(half, torch.tensor([[1 / math.sqrt(2), 0, 1 / math.sqrt(2)], [0.0, 1.0, 0.0]]))
    # m weights the OLD row (lemniscate: memory * m + x * (1 - m)): m = 0.9 stays near the old row
    mostly_old = momentum_update(old, new, 0.9)
    torch.testing.assert_close(mostly_old[0], F.normalize(torch.tensor([0.9, 0.0, 0.1]), dim=0))

    bank = MemoryBank(3, num_negatives=2, seed=1)
    bank.resize(4)
    start = bank.memory.clone()
    torch.testing.assert_close(start.norm(dim=1), torch.ones(4))
    bank.loss(new, torch.tensor([2, 0]), step=0)
    assert torch.equal(bank.memory, start)  # the loss only remembers; the update comes after the step
    bank.update_()
    expected = start.clone()
    expected[2] = F.normalize(0.5 * start[2] + 0.5 * new[0], dim=0)
    expected[0] = F.normalize(0.5 * start[0] + 0.5 * new[1], dim=0)
    torch.testing.assert_close(bank.memory, expected)
    bank.update_()  # nothing pending: unchanged
    torch.testing.assert_close(bank.memory, expected)


def test_the_bank_starts_as_seeded_random_unit_vectors():
    a, b, c = MemoryBank(128, seed=3), MemoryBank(128, seed=3), MemoryBank(128, seed=4)
    for bank in (a, b, c):
        bank.resize(500)
    assert torch.equal(a.memory, b.memory) and not torch.equal(a.memory, c.memory)
    torch.testing.assert_close(a.memory.norm(dim=1), torch.ones(500))
    assert a.memory.mean(dim=0).abs().max() < 0.2  # no preferred direction
    torch.manual_seed(7)
    assert MemoryBank(8).seed == 7  # seed None: torch's initial seed (train.py's --seed)


def test_negatives_exclude_the_positive_when_asked_and_cover_every_other_row():
    indices = torch.tensor([0, 3, 5, 5])
    generator = torch.Generator().manual_seed(0)
    drawn = sample_negatives(indices, 6, 3000, generator, exclude_positive=True)
    assert drawn.shape == (4, 3000) and drawn.dtype == torch.int64
    for row, own in zip(drawn, indices.tolist()):
        assert own not in row.tolist()
        assert set(row.tolist()) == set(range(6)) - {own}
        counts = torch.bincount(row, minlength=6).float()
        counts = counts[torch.arange(6) != own]
        assert (counts / 3000 - 1 / 5).abs().max() < 0.03  # uniform over the other five
    kept = sample_negatives(indices, 6, 3000, torch.Generator().manual_seed(0))
    assert all(own in row.tolist() for row, own in zip(kept, indices.tolist()))  # upstream's default may draw it
    again = sample_negatives(indices, 6, 3000, torch.Generator().manual_seed(0), exclude_positive=True)
    assert torch.equal(again, drawn)


def test_the_nce_loss_is_the_published_formula_on_hand_made_similarities():
    positive = torch.tensor([0.5, -0.1])
    negatives = torch.tensor([[0.1, -0.2], [0.3, 0.0]])
    z, n, t = 2.0, 10, 0.5
    k = 2
    expected = 0.0
    for pos, negs in zip(positive.tolist(), negatives.tolist()):
        p = math.exp(pos / t) / z
        expected += math.log(p / (p + k / n + 1e-7))
        for neg in negs:
            q = math.exp(neg / t) / z
            expected += math.log((k / n) / (q + k / n + 1e-7))
    expected = -expected / 2
    assert nce_loss(positive, negatives, z, n, t).item() == pytest.approx(expected, rel=1e-6)
    # Z by Monte Carlo: n times the mean of exp(s / T) over the positive and negative similarities
    values = [0.5, 0.1, -0.2, -0.1, 0.3, 0.0]
    assert estimate_z(positive, negatives, n, t).item() == pytest.approx(
        n * sum(math.exp(v / t) for v in values) / 6, rel=1e-6)


def test_the_softmax_losses_are_cross_entropy_of_the_positive_among_the_negatives():
    positive = torch.tensor([0.5, -0.1])
    negatives = torch.tensor([[0.1, -0.2], [0.3, 0.0]])
    t = 0.5
    expected = 0.0
    for pos, negs in zip(positive.tolist(), negatives.tolist()):
        expected -= pos / t - math.log(math.exp(pos / t) + sum(math.exp(neg / t) for neg in negs))
    assert softmax_loss(positive, negatives, t).item() == pytest.approx(expected / 2, rel=1e-6)

    bank = unit([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    f = unit([1.0, 0.2])
    logits = (f @ bank.t())[0] / t
    expected = -(logits[2] - torch.logsumexp(logits, dim=0)).item()
    assert full_softmax_loss(f, bank, torch.tensor([2]), t).item() == pytest.approx(expected, rel=1e-6)


def test_the_bank_scores_the_own_row_and_the_drawn_rows_either_way_it_computes_them():
    bank = MemoryBank(16, num_negatives=5, seed=2)
    bank.resize(40)
    f = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    indices = torch.tensor([4, 0, 39])
    positive, negatives = bank.similarities(f, indices, step=7)  # 40 rows < 15 drawn ones: one product
    drawn = sample_negatives(indices, 40, 5, bank.step_generator(7))
    torch.testing.assert_close(positive, (f * bank.memory[indices]).sum(dim=1))
    torch.testing.assert_close(negatives, torch.einsum("bd,bkd->bk", f, bank.memory[drawn]))
    bank.num_negatives = 20  # 60 drawn rows > 40: gathered rows
    positive, negatives = bank.similarities(f, indices, step=7)
    drawn = sample_negatives(indices, 40, 20, bank.step_generator(7))
    torch.testing.assert_close(negatives, torch.einsum("bd,bkd->bk", f, bank.memory[drawn]))
    assert not torch.equal(sample_negatives(indices, 40, 20, bank.step_generator(8)), drawn)  # a draw per step


def test_nce_z_is_estimated_from_the_first_batch_and_kept():
    method = small_npid()
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    batch = SimpleNamespace(views=[images], batch_size=6, counts=[1], indices=torch.arange(6))
    assert method.bank.nce_z.item() == -1
    with torch.no_grad():
        embeddings = method.embedding(images.flatten(1))
        positive, negatives = method.bank.similarities(embeddings, batch.indices, step=0)
    loss, _ = method(batch, progress(0))
    z = estimate_z(positive, negatives, 50, 0.07)
    assert loss.item() == pytest.approx(nce_loss(positive, negatives, z, 50).item(), rel=1e-5)
    assert method.bank.nce_z.item() == -1  # set after the optimizer step, with the bank
    method.after_step(progress(0))
    assert method.bank.nce_z.item() == pytest.approx(z.item(), rel=1e-6)
    method(SimpleNamespace(views=[images * 2], batch_size=6, counts=[1], indices=torch.arange(6) + 6), progress(1))
    method.after_step(progress(1))
    assert method.bank.nce_z.item() == pytest.approx(z.item(), rel=1e-6)  # kept


@pytest.mark.parametrize("options, message", [
    ({"loss": "hinge"}, "npid loss='hinge': use one of nce, softmax"),
    ({"num_negatives": -1}, "npid num_negatives=-1"),
    ({"num_negatives": 0, "loss": "nce"}, "npid num_negatives=0 (the whole bank) needs loss=softmax"),
    ({"bank_momentum": 1.0}, "npid bank_momentum=1.0"),
    ({"temperature": 0}, "npid temperature=0"),
])
def test_bad_npid_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError) as raised:
        create_method("npid", backbone="resnet10t", on_gpu=False, **options)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_npid_needs_one_view_and_the_batch_indices():
    with pytest.raises(ValueError, match="npid trains on one view per image"):
        METHODS["npid"].check_recipe(preset("npid").with_multicrop("2x32"), 8)
    METHODS["npid"].check_recipe(preset("npid").with_multicrop("1x32"), 8)
    method = small_npid()
    with pytest.raises(ValueError, match="sample_indices=True"):
        method(SimpleNamespace(views=[torch.randn(2, 3, 8, 8)], batch_size=2, counts=[1], indices=None), progress())
    unsized = NPID(Flatten(), feature_dim=Flatten.num_features, on_gpu=False)
    with pytest.raises(ValueError, match="adapt_to_data"):
        unsized(SimpleNamespace(views=[torch.randn(2, 3, 8, 8)], batch_size=2, counts=[1],
                                indices=torch.arange(2)), progress())


def test_a_bank_loads_into_a_method_not_yet_sized():
    trained = small_npid(num_samples=30)
    trained.bank.nce_z.fill_(123.0)
    fresh = NPID(Flatten(), feature_dim=Flatten.num_features, on_gpu=False)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.bank.memory, trained.bank.memory) and fresh.bank._z_known


def test_the_softmax_over_the_whole_bank_trains_and_updates_it():
    method = small_npid(loss="softmax", num_negatives=0)
    images = torch.randn(4, 3, 8, 8)
    batch = SimpleNamespace(views=[images], batch_size=4, counts=[1], indices=torch.tensor([1, 5, 9, 13]))
    loss, metrics = method(batch, progress())
    with torch.no_grad():
        expected = full_softmax_loss(method.embedding(images.flatten(1)), method.bank.memory, batch.indices)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    before = method.bank.memory.clone()
    method.after_step(progress())
    changed = (method.bank.memory != before).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [1, 5, 9, 13]


# ---------------------------------------------------------------------------------------------- two ranks


def _npid_rank(rank: int, world: int, port: int, images: torch.Tensor, indices: torch.Tensor,
               results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        method = small_npid()
        for step in range(2):  # rank r holds samples r * B .. r * B + B - 1 of each global batch
            local_images = images[step].view(world, -1, 3, 8, 8)[rank]
            local_indices = indices[step].view(world, -1)[rank]
            batch = SimpleNamespace(views=[local_images], batch_size=local_images.shape[0], counts=[1],
                                    indices=local_indices)
            with torch.no_grad():
                method(batch, progress(step))
            method.after_step(progress(step))
        results.put((rank, method.bank.memory.numpy(), method.bank.nce_z.item()))
    finally:
        dist.destroy_process_group()


def test_two_ranks_hold_the_bank_one_process_holds_on_the_same_global_batch():
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(2, 8, 3, 8, 8, generator=generator)  # two global batches of 8
    indices = torch.stack([torch.tensor([3, 17, 8, 40, 22, 5, 31, 0]), torch.tensor([3, 9, 12, 40, 1, 2, 44, 49])])
    single = small_npid()
    for step in range(2):
        with torch.no_grad():
            single(SimpleNamespace(views=[images[step]], batch_size=8, counts=[1], indices=indices[step]),
                   progress(step))
        single.after_step(progress(step))

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_npid_rank, args=(r, 2, port, images, indices, results)) for r in range(2)]
    for worker in workers:
        worker.start()
    outcomes = sorted(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    for _, memory, _ in outcomes:  # every rank wrote every rank's embeddings: rows 3 and 40 twice
        torch.testing.assert_close(torch.from_numpy(memory), single.bank.memory)
    assert not torch.equal(single.bank.memory, small_npid().bank.memory)
    assert outcomes[0][2] == outcomes[1][2] > 0  # one Z, averaged over the ranks' first batches


# ---------------------------------------------------------------------------------------------- decoupling


def test_the_rotation_irrelevance_term_is_zero_when_the_four_copies_agree():
    same = torch.randn(3, 5).repeat(4, 1)  # copy-major: copy r of sample i is row r * 3 + i
    assert rotation_irrelevance_loss(same).item() == 0.0
    parts = torch.randn(12, 5, generator=torch.Generator().manual_seed(4), requires_grad=True)
    loss = rotation_irrelevance_loss(parts)
    copies = parts.detach().view(4, 3, 5)
    assert loss.item() == pytest.approx(((copies - copies.mean(dim=0)) ** 2).mean().item(), rel=1e-6)
    loss.backward()  # the mean is a constant target: d/dx (x - c)^2 / n
    torch.testing.assert_close(parts.grad.view(4, 3, 5), 2 * (copies - copies.mean(dim=0)) / 60)


def test_pu_weights_are_one_for_upright_copies_and_one_minus_p_squared_for_rotated_ones():
    logits = torch.tensor([0.0, 0.0, 2.0, -1.0])
    upright = torch.tensor([True, False, False, False])
    p = torch.sigmoid(logits)
    torch.testing.assert_close(pu_weights(logits, upright), torch.tensor([1.0, *(1 - p[1:] ** 2)]))
    torch.testing.assert_close(pu_weights(logits, upright, gamma=1.0), torch.tensor([1.0, *(1 - p[1:])]))
    expected = F.binary_cross_entropy_with_logits(logits, upright.float())
    assert pu_classifier_loss(logits, upright).item() == pytest.approx(expected.item())
    scores, labels = torch.randn(4, 4), torch.tensor([0, 1, 2, 3])
    weights = torch.tensor([1.0, 0.5, 0.25, 0.0])
    each = F.cross_entropy(scores, labels, reduction="none")
    assert weighted_rotation_loss(scores, labels, weights).item() == pytest.approx((each * weights).mean().item())


def decoupling_batch(batch_size: int = 4, size: int = 8, seed: int = 5):
    images = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return SimpleNamespace(views=[images], batch_size=batch_size, counts=[1], indices=torch.arange(batch_size) * 3,
                           pretext={"rotation": rotate(images, Rotation(), torch.Generator())})


def small_decoupling(**options) -> Decoupling:
    torch.manual_seed(0)
    return Decoupling(Flatten(), feature_dim=Flatten.num_features, on_gpu=False, num_samples=20, part_dim=16,
                      **{"loss": "nce", **options})


def test_pu_weights_switch_on_at_the_set_epoch():
    method = small_decoupling(pu_start_epoch=2)
    batch = decoupling_batch()
    inputs = batch.pretext["rotation"]
    for epoch, on in ((0, False), (1, False), (2, True), (5, True)):
        assert method.pu_active(progress(epoch=epoch)) is on
        with torch.no_grad():
            _, metrics = method(batch, progress(epoch=epoch))
            features = method.backbone(inputs.images)
            related = method.split(features)[:, :16]
            weights = pu_weights(method.upright(features).squeeze(1), inputs.labels == 0) if on else None
            expected = weighted_rotation_loss(method.rotation(related), inputs.labels, weights)
        assert metrics["rotation_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
        assert ("pu_weight" in metrics) is on
        method.bank._pending = None
    assert METHODS["decoupling"].HEAD_PRESETS["paper"]["pu_start_epoch"] == 210  # the released config


def test_decoupling_sums_its_terms_and_feeds_the_copies_mean_to_the_bank():
    method = small_decoupling(mse_weight=2.0, nce_weight=0.5)
    batch = decoupling_batch()
    loss, metrics = method(batch, progress())
    total = metrics["rotation_loss"] + 2 * metrics["mse_loss"] + 0.5 * metrics["nce_loss"] + metrics["pu_loss"]
    assert loss.item() == pytest.approx(total.item(), rel=1e-6)
    loss.backward()
    assert method.upright.weight.grad is not None
    assert all(p.grad is not None for p in (*method.rotation.parameters(), *method.embedding.parameters()))
    with torch.no_grad():  # the bank row of each image: the embedding of its four copies' mean unrelated part
        unrelated = method.split(method.backbone(batch.pretext["rotation"].images))[:, 16:]
        expected = method.embedding(unrelated.view(4, 4, 16).mean(dim=0))
    before = method.bank.memory.clone()
    method.after_step(progress())
    torch.testing.assert_close(method.bank.memory[batch.indices],
                               momentum_update(before[batch.indices], expected, 0.5))
    bank, encoder = method.memory_bank()
    with torch.no_grad():
        torch.testing.assert_close(encoder(batch.views[0]).norm(dim=1), torch.ones(4))


def test_decoupling_options_and_recipe():
    halves = Decoupling(Flatten(), feature_dim=Flatten.num_features, on_gpu=False, part_dim=0)
    assert isinstance(halves.split, nn.Identity) and halves.part_dim == Flatten.num_features // 2
    with pytest.raises(ValueError, match="decoupling part_dim=-1"):
        Decoupling(Flatten(), feature_dim=Flatten.num_features, on_gpu=False, part_dim=-1)
    with pytest.raises(ValueError, match="decoupling loss='x'"):
        Decoupling(Flatten(), feature_dim=Flatten.num_features, on_gpu=False, loss="x")
    recipe = halves.adapt_recipe(preset("decoupling").with_multicrop("1x32"))
    assert recipe.pretext == (Rotation(all_four=True),) and recipe.groups[0].scale == (0.08, 1.0)
    with pytest.raises(ValueError, match="decoupling makes its inputs from one crop per image"):
        METHODS["decoupling"].check_recipe(preset("decoupling").with_multicrop("2x32"), 8)


def test_the_npid_recipe_is_the_papers():
    (group,) = preset("npid").groups
    (view,) = group.photometric
    assert (group.count, group.size, group.scale, group.flip_p) == (1, 224, (0.2, 1.0), 0.5)
    assert (view.jitter_p, view.brightness, view.contrast, view.saturation, view.hue) == (1.0, 0.4, 0.4, 0.4, 0.4)
    assert (view.grayscale_p, view.blur_p) == (0.2, 0.0)
    defaults = METHODS["npid"].defaults(on_gpu=True)
    assert (defaults["lr"], defaults["weight_decay"], defaults["epochs"], defaults["batch_size"]) == (0.03, 5e-4, 200, 256)
    for name in ("npid", "decoupling"):  # the paper's NCE on a GPU, the softmax form on CPU
        presets = METHODS[name].HEAD_PRESETS
        assert (presets["paper"]["loss"], presets["small"]["loss"]) == ("nce", "softmax")
        assert presets["paper"]["num_negatives"] == 4096
    assert create_method("npid", backbone="resnet10t", on_gpu=False).bank.loss_form == "softmax"
    assert create_method("npid", backbone="resnet10t", on_gpu=False, loss="nce").bank.loss_form == "nce"


# ---------------------------------------------------------------------------------------------- positions


def test_batch_indices_are_each_samples_position_in_the_shard_set():
    from pipelines.stack import InputStack

    shards = open_shard_set(DEMO_TRAIN)  # 4 tars; the demo's keys are the sample numbers
    stack = InputStack(preset("npid").with_multicrop("1x32"), shards, 64, num_threads=1, sample_indices=True)
    for _ in range(3):
        batch = next(stack)
        assert batch.indices.dtype == torch.int64
        assert batch.indices.tolist() == [int(key) for key in batch.keys]
    assert len(set(batch.indices.tolist())) == 64
    assert max(batch.indices.tolist()) >= shards.counts[0]  # samples past the first tar too
    assert next(InputStack(preset("npid").with_multicrop("1x32"), shards, 8, num_threads=1)).indices is None
    labels = sample_labels(shards)
    assert labels.shape == (10_000,) and torch.equal(torch.from_numpy(labels)[batch.indices], batch.labels)
    val = open_shard_set(DEMO_VAL)
    positions = SamplePositions(val)
    tar = str(val.tars[0])
    keys = [f"{tar}:512:000000000.jpg", f"{tar}:167936:000000033.jpg"]  # offsets from the index file
    assert positions(encoded(keys)).tolist() == [0, 33]
    for wrong in (f"{tar}:513:000000000.jpg", "/elsewhere.tar:512:000000000.jpg", "garbage"):
        with pytest.raises(ValueError, match="is not in the index files"):
            positions(encoded([wrong]))


def encoded(keys: list[str]):
    """Keys as `Batch.raw_keys` holds them: NUL-padded bytes, one row per key."""
    width = max(len(key) for key in keys) + 4
    return torch.tensor([list(key.encode()) + [0] * (width - len(key)) for key in keys], dtype=torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------- train.py


RUNS = {"npid": ["--method", "npid"], "decoupling": ["--method", "decoupling"],  # CPU presets: the softmax form
        "npid-nce-excluding": ["--method", "npid", "--method-options", "loss=nce,exclude_positive=true"]}


@pytest.mark.slow
@pytest.mark.parametrize("run_id", list(RUNS))
def test_train_py_runs_exports_and_resumes_the_bank_exactly(run_id, tmp_path):
    import timm
    from safetensors.torch import load_file
    from test_train import (
        BACKBONE,
        assert_four_steps_resume_exactly_from_step_two,
        assert_ok,
        checkpoints,
        losses,
        train,
    )

    args = [*RUNS[run_id], "--multicrop", "1x32", "--max-steps", 4, "--checkpoint-every", 2]
    assert_ok(train(*args, "--output-dir", tmp_path / "full", "--name", "run"))
    run = tmp_path / "full" / "run"
    full = losses(run)
    assert list(full) == [1, 2, 3, 4] and all(math.isfinite(value) for value in full.values())
    assert checkpoints(run) == ["step-00000002", "step-00000004"]
    timm.create_model(BACKBONE, num_classes=0).load_state_dict(load_file(run / "backbone.safetensors"))
    saved = [load_file(run / "checkpoints" / step / "model.safetensors") for step in checkpoints(run)]
    for state in saved:  # the bank (one row per sample of the 2,000) and Z are in the checkpoint
        assert state["bank.memory"].shape == (2000, 128)
        torch.testing.assert_close(state["bank.memory"].norm(dim=1), torch.ones(2000))
    assert not torch.equal(saved[0]["bank.memory"], saved[1]["bank.memory"])
    if "nce" in run_id:
        assert saved[0]["bank.nce_z"].item() == saved[1]["bank.nce_z"].item() > 0
    else:
        assert saved[1]["bank.nce_z"].item() == -1  # the softmax form needs no Z
    # identical losses and identical tensors (weights, bank, Z) after a resume from step 2
    assert_four_steps_resume_exactly_from_step_two(args, run, tmp_path)


@pytest.mark.slow
def test_the_knn_monitor_can_score_the_memory_bank(tmp_path):
    from test_train import assert_ok, metrics, train

    result = train("--method", "npid", "--multicrop", "1x32", "--max-steps", 3, "--val-data", DATA,
                   "--knn-bank", "memory", "--output-dir", tmp_path, "--name", "run")
    assert_ok(result)
    records = metrics(tmp_path / "run")
    (baseline,) = [r["knn_top1_random_init"] for r in records if "knn_top1_random_init" in r]
    (knn,) = [r["knn_top1"] for r in records if "knn_top1" in r]
    assert 0 <= baseline <= 100 and 0 <= knn <= 100
    assert f"kNN top-1 {knn:.2f}% (random init {baseline:.2f}%)" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, fragment", [
    (["--method", "swav", "--knn-bank", "memory"], "--knn-bank memory: swav keeps no memory bank (methods that "
                                                   "do: decoupling, npid)"),
    (["--method", "npid", "--knn-bank", "bank"], "--knn-bank bank: use one of features, memory"),
    (["--method", "npid", "--multicrop", "1x32", "--method-options", "loss=hinge"], "npid loss='hinge'"),
    (["--method", "npid", "--multicrop", "2x32"], "npid trains on one view per image"),
])
def test_bad_options_are_one_line_errors(args, fragment):
    from test_train import assert_one_line_error, train

    assert_one_line_error(train(*args), fragment)


def test_ddp_leaves_the_bank_and_z_to_the_method(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for method in (small_npid(), small_decoupling()):
            broadcast = set(torch.nn.parallel.DistributedDataParallel(method).named_module_buffers)
            assert not broadcast & {"bank.memory", "bank.nce_z"}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_train_npid_and_resume_the_replicated_bank_exactly(tmp_path):
    """`accelerate launch` with two CPU processes: every rank updates the bank from both ranks' embeddings,
    rank 0's copy is checkpointed and every rank restores it; 2 + 2 steps equal 4."""
    import shutil

    from safetensors.torch import load_file
    from test_train import assert_ok, launch_two_processes, losses

    args = ["--method", "npid", "--multicrop", "1x32", "--max-steps", 4, "--checkpoint-every", 2]
    assert_ok(launch_two_processes(*args, "--output-dir", tmp_path, "--name", "run"))
    run = tmp_path / "run"
    resumed = tmp_path / "resumed" / "run"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    assert_ok(launch_two_processes(*args, "--output-dir", resumed.parent, "--name", "run", "--resume", "auto"))
    assert losses(resumed) == losses(run) and list(losses(run)) == [1, 2, 3, 4]
    final = "checkpoints/step-00000004/model.safetensors"
    saved, again = load_file(run / final), load_file(resumed / final)
    assert saved.keys() == again.keys() and all(torch.equal(saved[name], again[name]) for name in saved)
    assert not torch.equal(saved["bank.memory"], load_file(run / "checkpoints/step-00000002/model.safetensors")
                           ["bank.memory"])


@pytest.mark.parametrize("name", ["npid", "decoupling"])
def test_the_gpu_check_and_the_profiler_build_size_and_step_the_methods(name):
    from pipelines.shards import DEMO_TRAIN
    from tools.gpu_check import build_method, first_step_losses
    from tools.profile_throughput import Settings, method_and_optimizer, model_stages

    method, _, _ = build_method(name, gpu_config=False, seed=0, batch_size=8)
    assert method.bank.num_samples == 10_000  # sized for the demo training shards, as train.py sizes it
    first, again = first_step_losses(name, ["cpu", "cpu"], gpu_config=False, batch_size=8)
    assert math.isfinite(first) and first == again  # the same negatives: drawn by a seeded CPU generator
    settings = Settings(batch_size=8, threads=1, warmup=1, batches=1, repeats=1, device=torch.device("cpu"))
    model, optimizer, recipe, _ = method_and_optimizer(name, preset(name).with_multicrop("1x32"), settings.device, 8)
    seconds = model_stages(model, optimizer, recipe, open_shard_set(DEMO_TRAIN), settings)
    assert all(value > 0 for value in seconds.values()) and optimizer.state
