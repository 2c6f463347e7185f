"""The method zoo: registry, recipes each method accepts, EMA teachers, queues, centres and schedules
(in process, on a small random-init ResNet), then `train.py --method X` end to end on the demo shards."""

from __future__ import annotations

import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from models.ema import cosine_momentum
from models.methods import METHODS, Progress, create_method
from models.methods.base import train_step
from models.methods.dino import teacher_temperature_schedule
from models.methods.mocov2 import MoCoV2
from pipelines.spec import preset

ZOO = ("dino", "mocov1", "mocov2", "mocov3", "simclr", "byol", "simsiam", "barlowtwins", "vicreg")
TEACHERS = ("dino", "mocov1", "mocov2", "mocov3", "byol")  # methods with an EMA teacher (and state to resume)


def batch_of(method_cls, batch_size: int = 8, seed: int = 0) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(seed)
    views, counts = [torch.randn(2 * batch_size, 3, 32, 32, generator=generator)], [2]
    if method_cls.accepts_local_crops:
        views.append(torch.randn(4 * batch_size, 3, 16, 16, generator=generator))
        counts.append(4)
    return SimpleNamespace(views=views, batch_size=batch_size, counts=counts)


def small(name: str, **options):
    torch.manual_seed(0)
    return create_method(name, backbone="resnet10t", stem="no-maxpool", on_gpu=False, **options)


def one_step(method, batch, progress: Progress, lr: float = 0.05) -> torch.Tensor:
    optimizer = torch.optim.SGD([p for group in method.param_groups(0.0) for p in group["params"]], lr=lr)
    return train_step(method, optimizer, batch, progress)


def progress(step: int = 0, epoch: int = 0, total_steps: int = 100, steps_per_epoch: int = 10) -> Progress:
    return Progress(step=step, epoch=epoch, total_steps=total_steps, steps_per_epoch=steps_per_epoch)


# ---------------------------------------------------------------------------------------------- registry


def test_every_zoo_method_is_registered_with_its_recipe_preset():
    for name in ZOO:
        assert name in METHODS
        assert preset(METHODS[name].recipe_preset).name == name


@pytest.mark.parametrize("name", [n for n in ZOO if n != "dino"])
def test_two_view_methods_reject_local_crops_and_a_single_view(name):
    cls = METHODS[name]
    cls.check_recipe(preset(cls.recipe_preset).with_multicrop("2x32"), 16)
    for multicrop in ("2x32+4x16", "1x32", "4x32"):
        with pytest.raises(ValueError, match=f"{name} trains on two views of one size; --multicrop '{multicrop[:4]}"):
            cls.check_recipe(preset(cls.recipe_preset).with_multicrop(multicrop), 16)


def test_dino_takes_local_crops_but_needs_two_globals():
    METHODS["dino"].check_recipe(preset("dino").with_multicrop("2x32+6x16"), 16)
    with pytest.raises(ValueError, match="2 global crops"):
        METHODS["dino"].check_recipe(preset("dino").with_multicrop("3x32+6x16"), 16)


def test_vit_and_resnet_defaults_follow_the_papers():
    assert METHODS["mocov3"].defaults(True, "resnet50")["optimizer"] == "lars"
    vit = METHODS["mocov3"].defaults(True, "vit_base_patch16_224")
    assert (vit["optimizer"], vit["lr"], vit["weight_decay"], vit["warmup_epochs"]) == ("adamw", 1.5e-4, 0.1, 40.0)
    dino_vit, dino_r50 = METHODS["dino"].defaults(True, "vit_small_patch16_224"), METHODS["dino"].defaults(True, "resnet50")
    assert (dino_vit["optimizer"], dino_vit["lr"], dino_vit["grad_clip"]) == ("adamw", 5e-4, 3.0)
    assert (dino_r50["optimizer"], dino_r50["lr"], dino_r50["weight_decay"]) == ("sgd", 0.03, 1e-4)
    assert METHODS["dino"].defaults(True)["multicrop"] == "2x224+8x96"


# ---------------------------------------------------------------------------------------------- schedules


def test_momentum_schedules_at_start_middle_and_end():
    for name, base in (("byol", 0.99), ("mocov3", 0.99), ("dino", 0.996)):
        method = small(name)
        values = [method.momentum(progress(step, total_steps=1000)) for step in (0, 500, 1000)]
        assert values == pytest.approx([base, (1 + base) / 2, 1.0]), name
        assert values == pytest.approx([cosine_momentum(base, s, 1000) for s in (0, 500, 1000)])
    mocov2 = small("mocov2", momentum=0.999)
    assert {mocov2.momentum(progress(step, total_steps=1000)) for step in (0, 500, 999)} == {0.999}


def test_teacher_temperature_warms_up_linearly_then_stays():
    schedule = teacher_temperature_schedule(0.04, 0.07, 30, 100)
    assert len(schedule) == 100
    assert schedule[0] == pytest.approx(0.04)
    assert schedule[15] == pytest.approx(0.04 + 0.03 * 15 / 29)  # np.linspace over 30 values
    assert schedule[29] == schedule[99] == pytest.approx(0.07)
    dino = small("dino")
    assert dino.teacher_temperature(progress(0, epoch=0, total_steps=1000, steps_per_epoch=10)) == pytest.approx(0.04)
    assert dino.teacher_temperature(progress(995, epoch=99, total_steps=1000, steps_per_epoch=10)) == pytest.approx(0.07)


def test_dino_weight_decay_rises_along_a_cosine_for_a_vit_and_stays_for_a_resnet():
    vit = create_method("dino", backbone="vit_tiny_patch16_224", on_gpu=False,
                        backbone_kwargs=dict(img_size=32, patch_size=8, dynamic_img_size=True))
    schedule = vit.weight_decay_schedule(0.04, 100)  # upstream's cosine_scheduler: step t of T at pi * t / T
    assert (schedule[0], schedule[50], schedule[-1]) == pytest.approx(
        (0.04, 0.22, 0.4 - 0.18 * (1 + math.cos(math.pi * 99 / 100))))
    assert small("dino").weight_decay_schedule(1e-4, 100) is None


# ---------------------------------------------------------------------------------------------- steps


@pytest.mark.parametrize("name", ZOO)
def test_one_step_gives_a_finite_loss_and_trains_the_backbone(name):
    method = small(name, **({"queue_length": 64} if name.startswith("mocov") and name != "mocov3" else {}))
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    loss = one_step(method, batch_of(type(method)), progress())
    assert torch.isfinite(loss)
    after = method.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())


@pytest.mark.parametrize("name", TEACHERS)
def test_teachers_follow_the_ema_of_their_students_and_take_no_gradient(name):
    method = small(name, **({"queue_length": 64} if name.startswith("mocov") and name != "mocov3" else {}))
    pairs = method.ema_pairs()
    assert pairs and all(not p.requires_grad for teacher, _ in pairs for p in teacher.parameters())
    teachers_before = [[p.clone() for p in teacher.parameters()] for teacher, _ in pairs]
    step = progress(step=3, total_steps=10)
    one_step(method, batch_of(type(method)), step)
    momentum = method.momentum(step)
    for (teacher, student), before in zip(pairs, teachers_before):
        for old, new, online in zip(before, teacher.parameters(), student.parameters()):
            torch.testing.assert_close(new, momentum * old + (1 - momentum) * online)


def test_dino_drops_last_layer_gradients_in_the_first_epoch_and_centres_the_teacher():
    dino = small("dino")
    last = [p.clone() for p in dino.head.last_layer_parameters()]
    one_step(dino, batch_of(type(dino)), progress(step=0, epoch=0))
    assert all(torch.equal(a, b) for a, b in zip(last, dino.head.last_layer_parameters()))
    assert dino.center.abs().sum() > 0  # 0.1 x the teacher's batch mean
    weight_before = dino.head.last_weight.clone()
    one_step(dino, batch_of(type(dino)), progress(step=10, epoch=1))
    assert not torch.equal(weight_before, dino.head.last_weight)
    assert not dino.head.last_scale.requires_grad  # norm_last_layer: weight_g stays 1
    assert dino.eval_backbone is dino.teacher_backbone


def test_dino_center_is_the_momentum_average_of_teacher_outputs():
    dino = small("dino")
    batch = batch_of(type(dino))
    with torch.no_grad():
        teacher_out = dino.teacher_head(dino.teacher_backbone(batch.views[0]))
    dino(batch, progress())
    assert not dino.center.any()  # the centre moves with the step, not with the forward
    dino.after_step(progress())
    torch.testing.assert_close(dino.center, 0.1 * teacher_out.mean(dim=0, keepdim=True))


def test_mocov2_enqueues_normalised_keys_with_the_step_and_wraps():
    moco = small("mocov2", queue_length=24)
    batch = batch_of(MoCoV2)  # B = 8
    initial = moco.queue.clone()
    moco(batch, progress())
    assert torch.equal(moco.queue, initial)  # the queue moves with the step, not with the forward
    moco.after_step(progress())
    with torch.no_grad():
        keys = moco.key_projector(moco.key_backbone(batch.views[0][8:]))
    torch.testing.assert_close(moco.queue[:8], torch.nn.functional.normalize(keys, dim=1))
    assert torch.equal(moco.queue[8:], initial[8:]) and int(moco.queue_position) == 8
    for step in (1, 2):
        moco(batch, progress(step))
        moco.after_step(progress(step))
    assert int(moco.queue_position) == 0  # 3 x 8 = 24: back to the front
    with pytest.raises(ValueError, match="queue_length 20 is not a multiple of the global batch 8"):
        small("mocov2", queue_length=20)(batch, progress())


def test_simsiam_predictor_keeps_its_lr_and_the_last_projector_bias_is_frozen():
    simsiam = small("simsiam")
    groups = simsiam.param_groups(1e-4)
    predictor = {id(p) for p in simsiam.predictor.parameters()}
    for group in groups:
        assert group["fixed_lr"] == all(id(p) in predictor for p in group["params"])
        assert group["weight_decay"] == 1e-4  # upstream decays everything
    assert not simsiam.projector[-2].bias.requires_grad


def test_barlow_twins_biases_and_norms_get_the_bias_lr():
    barlow = small("barlowtwins")
    for group in barlow.param_groups(1e-6):
        one_dimensional = all(p.ndim == 1 for p in group["params"])
        assert group["lr_multiplier"] == pytest.approx(0.0048 / 0.2 if one_dimensional else 1.0)
        assert group["weight_decay"] == (0.0 if one_dimensional else 1e-6)


def test_mocov3_vit_freezes_its_patch_embedding_and_uses_t_0_2():
    moco = create_method("mocov3", backbone="vit_tiny_patch16_224", on_gpu=False,
                         backbone_kwargs=dict(img_size=32, patch_size=8))
    assert moco.temperature == 0.2 and small("mocov3").temperature == 1.0
    assert not any(p.requires_grad for p in moco.backbone.patch_embed.parameters())
    assert isinstance(moco.predictor[-1], nn.BatchNorm1d)  # ViT predictor ends in BN, the ResNet one does not
    assert not isinstance(small("mocov3").predictor[-1], nn.BatchNorm1d)
    assert torch.isfinite(one_step(moco, batch_of(type(moco)), progress()))


def test_dino_trains_a_vit_on_global_and_local_crops():
    dino = create_method("dino", backbone="vit_tiny_patch16_224", on_gpu=False,
                         backbone_kwargs=dict(img_size=32, patch_size=8, dynamic_img_size=True))
    assert torch.isfinite(one_step(dino, batch_of(type(dino)), progress(step=10, epoch=1)))


# ---------------------------------------------------------------------------------------------- two ranks


class Flatten(nn.Module):
    """A BN-free key encoder: keys then do not depend on which rank computed them."""

    num_features = 3 * 32 * 32

    def forward(self, x):
        return x.flatten(1)


def _mocov2_rank(rank: int, world: int, port: int, images: torch.Tensor, results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        moco = MoCoV2(Flatten(), feature_dim=Flatten.num_features, on_gpu=False, queue_length=32)
        local = images.view(2, world, -1, 3, 32, 32)[:, rank].reshape(-1, 3, 32, 32)
        batch = SimpleNamespace(views=[local], batch_size=local.shape[0] // 2, counts=[2])
        loss, _ = moco(batch, progress())
        keys = moco._keys(local[batch.batch_size:])
        results.put((rank, loss.item(), keys.numpy(), moco.queue.numpy()))
    finally:
        dist.destroy_process_group()


def test_mocov2_shuffled_keys_and_the_queue_over_two_ranks_match_one_process():
    images = torch.randn(2 * 8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    single = MoCoV2(Flatten(), feature_dim=Flatten.num_features, on_gpu=False, queue_length=32)
    loss, _ = single(SimpleNamespace(views=[images], batch_size=8, counts=[2]), progress())
    with torch.no_grad():
        keys = single.key_projector(images[8:].flatten(1))

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_mocov2_rank, args=(r, 2, port, images, results)) for r in range(2)]
    for worker in workers:
        worker.start()
    outcomes = sorted(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    # each rank's keys, computed on a shuffled global batch, come back in its own samples' order
    torch.testing.assert_close(torch.cat([torch.from_numpy(o[2]) for o in outcomes]), keys)
    for _, _, _, queue in outcomes:  # every rank enqueued the keys of all ranks, in global order
        torch.testing.assert_close(torch.from_numpy(queue), single.queue)
    assert sum(o[1] for o in outcomes) / 2 == pytest.approx(loss.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- train.py


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_train_py_runs_each_method_and_resumes_its_state_exactly(name, tmp_path):
    from test_train import assert_four_steps_resume_exactly_from_step_two, assert_ok, checkpoints, losses, metrics, train

    multicrop = "2x32+2x16" if METHODS[name].accepts_local_crops else "2x32"
    args = ["--method", name, "--multicrop", multicrop, "--max-steps", 4, "--checkpoint-every", 2,
            *(["--method-options", "queue_length=64"] if name in ("mocov1", "mocov2") else [])]
    assert_ok(train(*args, "--output-dir", tmp_path / "full", "--name", "run"))
    run = tmp_path / "full" / "run"
    full = losses(run)
    assert list(full) == [1, 2, 3, 4] and all(math.isfinite(value) for value in full.values())
    assert checkpoints(run) == ["step-00000002", "step-00000004"]
    assert all(record["images_per_second"] > 0 for record in metrics(run) if "loss" in record)
    assert (run / "backbone.safetensors").is_file()
    if name not in TEACHERS:
        return
    # state beyond the weights (EMA teachers, queue, centre) survives a resume: 2 + 2 steps == 4 steps
    assert_four_steps_resume_exactly_from_step_two(args, run, tmp_path)


def test_mocov1_is_mocov2_with_the_v1_head_temperature_and_views():
    v1, v2 = small("mocov1", queue_length=64), small("mocov2", queue_length=64)
    linear = [layer for layer in v1.projector if isinstance(layer, nn.Linear)]
    assert len(linear) == 1 and (linear[0].in_features, linear[0].out_features) == (v1.feature_dim, 128)
    assert len([layer for layer in v2.projector if isinstance(layer, nn.Linear)]) == 2
    assert (v1.temperature, v2.temperature) == (0.07, 0.2)
    assert METHODS["mocov1"].HEAD_PRESETS["paper"] == dict(hidden_dim=None, out_dim=128, queue_length=65536,
                                                          momentum=0.999)
    assert METHODS["mocov1"].defaults(on_gpu=True) == METHODS["mocov2"].defaults(on_gpu=True)  # SGD 0.03, wd 1e-4
    assert not METHODS["mocov1"].sync_batch_norm  # shuffle-BN, as v2
    (one,), (two,) = preset("mocov1").groups[0].photometric, preset("mocov2").groups[0].photometric
    assert preset("mocov1").groups[0].scale == preset("mocov2").groups[0].scale == (0.2, 1.0)
    assert (one.jitter_p, one.brightness, one.contrast, one.saturation, one.hue) == (1.0, 0.4, 0.4, 0.4, 0.4)
    assert (one.grayscale_p, one.blur_p) == (0.2, 0.0)
    assert (two.jitter_p, two.hue, two.blur_p) == (0.8, 0.1, 0.5)
