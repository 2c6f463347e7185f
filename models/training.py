"""A training run's settings and the loop pieces that `train.py` and the tools share: `Config` (every
option of a run, the command line generated from it), `resolve` (the device- and method-dependent
defaults), `optimizer_step` and `StepSignals` (what every rank agrees on after a step)."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import yaml

from models.backbones import default_stem, options_for_crops
from models.methods import method_class
from models.methods.base import Progress
from models.options import ConfigError, format_options, parse_options
from models.runtime import MIXED_PRECISION
from pipelines.shards import DEMO_TRAIN, DEMO_VAL
from pipelines.spec import preset


KNN_BANKS = ("features", "memory")


@dataclass
class Config:
    method: str = "swav"
    multicrop: str | None = None  # None: the method's recipe (paper crops on a GPU, small crops on CPU)
    data: str = str(DEMO_TRAIN)
    val_data: str | None = str(DEMO_VAL)  # labeled shards for the kNN monitor; "" disables it
    backbone: str | None = None  # any timm name; None: resnet50 on a GPU, resnet10t on CPU (MAE/SIM: ViT-B/16, ViT-Ti/4)
    stem: str | None = None  # ResNets: standard | no-maxpool | cifar; None: crops <= 64 px get cifar on a GPU, no-maxpool on CPU
    method_options: str | None = None  # method keyword arguments, e.g. "queue_length=3840,queue_start_epoch=15"
    backbone_options: str | None = None  # timm.create_model keyword arguments, e.g. "img_size=32,patch_size=4"
    batch_size: int | None = None  # per process; None: the method's default for the device
    epochs: int | None = None
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    time_limit: float | None = None  # minutes of wall time from process start; then checkpoint, export, stop
    # with --time-limit: LR, weight decay and the method's schedules follow the share of the limit used,
    # so the run ends annealed at the limit however fast the machine runs; --max-steps / --epochs set
    # the schedules' resolution
    schedule_by_time: bool = False
    lr: float | None = None  # base LR, scaled by the method's rule (e.g. x global batch / 256)
    optimizer: str | None = None  # lars | sgd | adamw
    warmup_epochs: float | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    seed: int = 0
    output_dir: str = "runs"
    name: str | None = None  # run directory name; None: <method>-<timestamp>
    resume: str | None = None  # a checkpoint directory, a run directory, or "auto" (latest of --name)
    compile: bool = False
    channels_last: bool = False
    # no | bf16 | fp16; None: the launcher's choice if it made one (accelerate launch --mixed_precision), else
    # bf16 on a CUDA GPU that supports it and no (float32) elsewhere
    mixed_precision: str | None = None
    tf32: bool = True  # CUDA: TF32 matmuls and convolutions, cuDNN autotuning (float32 runs and autocast)
    sync_bn: bool | None = None  # several GPUs: SyncBatchNorm; None: as the method's recipe says
    eval_every: int = 1  # epochs between kNN evaluations (and always at the end); 0: only at the end
    # the kNN monitor's bank: features (the backbone's features of --data, k=20) or memory (the method's memory
    # bank, NPID's protocol: k=200 on the bank vectors; npid, decoupling)
    knn_bank: str = "features"
    checkpoint_every: int = 500  # optimizer steps between checkpoints (and always at the end)
    keep_checkpoints: int = 3
    log_every: int = 10
    data_threads: int | None = None  # DALI CPU threads; None: the cores available per process
    log_keys: bool = False  # debug: each rank appends "<step> <sample keys>" lines to <run>/keys_rank<r>.txt
    config: str | None = None  # a YAML file of these options

    # options that may differ on resume without changing the run (name and output_dir only locate it:
    # `--resume runs/x` needs neither, and a moved or copied run directory resumes)
    RESUMABLE_DIFFERENCES = ("resume", "config", "name", "output_dir", "max_steps", "time_limit", "epochs",
                             "eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "data_threads",
                             "compile", "log_keys", "tf32", "knn_bank")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS
    )
    for option in fields(Config):
        flag = "--" + option.name.replace("_", "-")
        default = option.default
        kind = {"int": int, "float": float, "bool": bool}.get(str(option.type).split(" | ")[0], str)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"(default: {default})")
        else:
            parser.add_argument(flag, type=kind, help=f"(default: {default})")
    return parser


def parse_config(argv=None, description: str | None = None) -> Config:
    """The run's `Config` from the command line (`description` heads `--help`) and any `--config` file."""
    given = vars(build_parser(description).parse_args(argv))
    values = {}
    if given.get("config"):
        path = Path(given["config"])
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in fields(Config)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
        values.update(loaded)
    values.update(given)
    precision = values.get("mixed_precision")
    if precision is not None and precision not in MIXED_PRECISION:
        raise ConfigError(f"--mixed-precision {precision}: use one of {', '.join(MIXED_PRECISION)}")
    if values.get("knn_bank", Config.knn_bank) not in KNN_BANKS:
        raise ConfigError(f"--knn-bank {values['knn_bank']}: use one of {', '.join(KNN_BANKS)}")
    limit = values.get("time_limit")
    if limit is not None and not (isinstance(limit, (int, float)) and limit > 0):
        raise ConfigError(f"--time-limit {limit}: give a positive number of minutes")
    if values.get("schedule_by_time") and limit is None:
        raise ConfigError("--schedule-by-time needs --time-limit MINUTES: the schedule follows the share of it used")
    if values.get("schedule_by_time") and values.get("resume"):
        raise ConfigError("--schedule-by-time with --resume: a schedule driven by one process's clock cannot "
                          "continue in another; start a new run")
    return Config(**values)


def resolve(config: Config, device: torch.device, world_size: int) -> tuple[Config, object, type]:
    """Fill the device- and method-dependent defaults; returns (config, recipe, method class)."""
    cls = method_class(config.method)
    on_gpu = device.type == "cuda"
    backbone, backbone_options = cls.chosen_backbone(
        config.backbone, parse_options(config.backbone_options, "--backbone-options"), on_gpu)
    defaults = cls.defaults(on_gpu, backbone)
    resolved = dataclasses.replace(
        config,
        multicrop=config.multicrop or defaults["multicrop"],
        backbone=backbone,
        batch_size=config.batch_size or defaults["batch_size"],
        epochs=config.epochs or defaults["epochs"],
        lr=config.lr if config.lr is not None else defaults["lr"],
        optimizer=config.optimizer or defaults["optimizer"],
        warmup_epochs=config.warmup_epochs if config.warmup_epochs is not None else defaults["warmup_epochs"],
        weight_decay=config.weight_decay if config.weight_decay is not None else defaults["weight_decay"],
        grad_clip=config.grad_clip if config.grad_clip is not None else defaults.get("grad_clip"),
        data_threads=config.data_threads or cores_per_process(world_size),
    )
    recipe = preset(cls.recipe_preset).with_multicrop(resolved.multicrop)
    backbone_options = options_for_crops(backbone, backbone_options, [group.size for group in recipe.groups])
    resolved = dataclasses.replace(resolved, backbone_options=format_options(backbone_options) or None)
    if resolved.stem is None:
        resolved = dataclasses.replace(resolved, stem=default_stem(resolved.backbone, recipe.groups[0].size, on_gpu))
    cls.check_recipe(recipe, resolved.batch_size)
    return resolved, recipe, cls


def cores_per_process(world_size: int) -> int:
    return max(1, (os.cpu_count() or 2) // world_size)


def optimizer_step(accelerator, method, optimizer, loss: torch.Tensor, progress: Progress,
                   grad_clip: float | None = None) -> None:
    """Backward and the optimizer step in the order `Method` documents. The method's after-step state
    (EMA teachers, queues, centres) moves only when the optimizer really stepped: the fp16 grad scaler
    skips steps whose gradients overflowed."""
    model = accelerator.unwrap_model(method)
    accelerator.backward(loss)
    model.before_optimizer_step(progress)
    if grad_clip:
        accelerator.clip_grad_norm_(method.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not optimizer.step_was_skipped:
        model.after_step(progress)


def time_share(minutes: float | None):
    """None without a time limit. Otherwise a function: the share of the time left at its creation that
    has passed since, and 1 once `minutes` of wall time have passed since this process started (imports
    and set-up included). Each rank measures its own; `StepSignals` makes every rank use the largest."""
    if minutes is None:
        return None
    import psutil

    deadline = psutil.Process().create_time() + minutes * 60
    started = time.time()

    def share_used() -> float:
        now = time.time()
        return 1.0 if now >= deadline else (now - started) / (deadline - started)

    return share_used


class StepSignals:
    """What every rank must agree on after a step, as one small tensor all-reduced (max) across ranks:
    a stop request (SIGTERM/SIGINT on any rank), a non-finite loss (on any rank), the share of
    --time-limit used (the largest) and a rank that could not read its batch (e.g. a shard gone from
    S3; that rank stepped on its previous batch to keep the collectives in step). This rank's loss rides
    along (not reduced) for the log.

    Reading the values waits for the device, so the loop reads them one step late (`update(wait=False)`:
    every step but the newest; the host keeps queuing work for the GPU) and at once only where a decision
    cannot wait (`wait=True`: log, checkpoint, evaluation and end steps). Every rank reads the same steps,
    so every rank sees the same values at the same step.
    """

    def __init__(self, accelerator, stop_requested, time_share_used=None):
        self.device = accelerator.device
        self.distributed = accelerator.num_processes > 1
        self.stop_requested = stop_requested
        self.time_share_used = time_share_used
        self.pending = collections.deque()  # (step, values on the host or on their way there, CUDA event)
        self.stop = False
        self.time_share = 0.0
        self.non_finite: tuple[int, float] | None = None  # (first bad step, this rank's loss there)
        self.read_failure: int | None = None  # the first step some rank could not read its batch for
        self.last_loss = float("nan")
        self._losses: list[float] = []

    def push(self, step: int, loss: torch.Tensor, read_failed: bool = False) -> None:
        values = torch.zeros(5, device=self.device)  # stop, non-finite, time share, read failed, loss: no host copy
        values[0] = float(self.stop_requested())
        values[1] = ~torch.isfinite(loss.detach()).all()
        values[2] = self.time_share_used() if self.time_share_used else 0.0
        values[3] = float(read_failed)
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(values[:4], op=dist.ReduceOp.MAX)
        values[4] = loss.detach().float()
        event = None
        if self.device.type == "cuda":
            host = torch.empty(5, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        self.pending.append((step, values, event))

    def update(self, wait: bool) -> None:
        """Take in the values of every pushed step (`wait`), or of every step but the newest."""
        while len(self.pending) > (0 if wait else 1):
            step, values, event = self.pending.popleft()
            if event is not None:
                event.synchronize()
            stop, non_finite, share, read_failed, loss = values.tolist()
            self.stop = self.stop or stop > 0
            self.time_share = max(self.time_share, share)
            if non_finite > 0 and self.non_finite is None:
                self.non_finite = (step, loss)
            if read_failed > 0 and self.read_failure is None:
                self.read_failure = step
            self.last_loss = loss
            self._losses.append(loss)

    def take_losses(self) -> list[float]:
        """This rank's losses read since the last call."""
        taken, self._losses = self._losses, []
        return taken
