"""Self-supervised pretraining: config -> Accelerator -> InputStack -> Method -> loop.

    accelerate launch train.py --method swav --multicrop 2x224+6x96 --data shards/my-set
    python train.py --method swav            # CPU: a small backbone on small crops of the demo shards

Every option lives in `Config`; the command line is generated from it (`--help` lists each with its
default) and `--config run.yaml` loads a file (command-line flags win). The loop reads top to bottom:
per-iteration LR (and weight-decay) schedules are explicit arrays, the method does the maths.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import yaml

from models.backbones import default_stem, options_for_crops
from models.checkpointing import CheckpointError, RunCheckpoints
from models.knn import bank_dtype, knn_predict
from models.methods import create_method, method_class
from models.methods.base import Progress
from models.optim import build_optimizer, cosine_schedule
from models.options import ConfigError, format_options, parse_options
from models.runtime import MIXED_PRECISION, default_mixed_precision, use_fast_cuda_kernels
from pipelines.features import evaluation_stack, extract_features, gather_features
from pipelines.shards import DEMO_TRAIN, DEMO_VAL, ShardError, open_shard_set
from pipelines.spec import RecipeError, preset
from pipelines.stack import InputStack

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
                             "compile", "log_keys", "tf32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS
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


def parse_config(argv=None) -> Config:
    given = vars(build_parser().parse_args(argv))
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


def main(argv=None) -> int:
    """Set up (config, Accelerator, method, input stack, schedules, run directory), train, finish."""
    try:
        config = parse_config(argv)
        training = set_up(config)
    except (ConfigError, RecipeError, ShardError, CheckpointError, ValueError) as error:
        return fail(str(error))
    return train(training)


@dataclass
class Training:
    """Everything the loop needs, made by `set_up`."""

    config: Config
    recipe: object
    accelerator: object
    method: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped with several processes)
    model: torch.nn.Module  # the unwrapped method
    optimizer: torch.optim.Optimizer
    train_stack: InputStack
    monitor: KnnMonitor | None
    run: RunCheckpoints
    logger: object
    lr: float  # the peak LR after the method's batch scaling
    lr_schedule: object  # per-iteration arrays
    wd_schedule: object
    total_steps: int
    start_step: int

    @property
    def steps_per_epoch(self) -> int:
        return self.train_stack.steps_per_epoch

    def schedule_index(self, step: int, time_share: float) -> int:
        """The index into the schedule arrays: the step, or (--schedule-by-time) the share of the time
        limit used."""
        if self.config.schedule_by_time:
            return min(self.total_steps - 1, int(time_share * self.total_steps))
        return step

    def apply_schedules(self, at: int) -> None:
        # Python floats: a numpy scalar in the optimizer state breaks the weights_only=True load on resume
        for group in self.optimizer.param_groups:
            scheduled = self.lr if group.get("fixed_lr") else self.lr_schedule[at]
            group["lr"] = float(scheduled) * group.get("lr_multiplier", 1.0)
            if self.wd_schedule is not None and group.get("weight_decay", 0) > 0:
                group["weight_decay"] = float(self.wd_schedule[at])


def set_up(config: Config) -> Training:
    """Raises ConfigError, RecipeError, ShardError, CheckpointError or ValueError with a one-line message."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # Without CUDA, say so: Accelerate 1.15 picks MULTI_CPU (gloo) only when cpu=True; otherwise
    # `accelerate launch --multi_gpu` (or torchrun) starts N independent single-process runs in one run dir
    config = dataclasses.replace(config, mixed_precision=config.mixed_precision or default_mixed_precision())
    try:
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
    except ValueError as error:  # e.g. fp16 without a GPU
        raise ConfigError(f"--mixed-precision {config.mixed_precision}: {error}") from None
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.device.type == "cuda":
        use_fast_cuda_kernels(config.tf32)
    try:
        config, recipe, cls = resolve(config, accelerator.device, world)
        set_seed(config.seed)
        method = create_method(config.method, backbone=config.backbone, stem=config.stem,
                               on_gpu=accelerator.device.type == "cuda",
                               backbone_kwargs=parse_options(config.backbone_options, "--backbone-options"),
                               **parse_options(config.method_options, "--method-options"))
    except TypeError as error:  # an option the method or the timm model does not take
        raise ConfigError(f"--method-options {config.method_options} / --backbone-options "
                          f"{config.backbone_options}: {error}") from None
    recipe = method.adapt_recipe(recipe)
    train_stack = InputStack(recipe, config.data, config.batch_size, rank=rank, world_size=world,
                             seed=config.seed, device=accelerator.device, num_threads=config.data_threads)
    val_shards = knn_monitor_data(config, accelerator)
    monitor = KnnMonitor(config, recipe, accelerator, val_shards) if val_shards else None

    steps_per_epoch = train_stack.steps_per_epoch
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    lr = config.lr * method.lr_scaling(config.batch_size * world)
    lr_schedule = cosine_schedule(lr, method.final_lr(lr), total_steps,
                                  warmup_steps=min(round(config.warmup_epochs * steps_per_epoch), total_steps),
                                  warmup_start=lr * method.warmup_start_fraction)
    wd_schedule = method.weight_decay_schedule(config.weight_decay, total_steps)
    if config.channels_last:
        method = method.to(memory_format=torch.channels_last)
    config, batch_norm_note = synchronise_batch_norm(config, cls, method, accelerator.device.type, world)
    optimizer = build_optimizer(config.optimizer, method.param_groups(config.weight_decay), lr=lr,
                                betas=method.adamw_betas)
    method, optimizer = accelerator.prepare(method, optimizer)
    model = accelerator.unwrap_model(method)
    if config.compile:
        model.compile_backbone()  # what the method's step runs through: the backbone's forward or a ViT's blocks

    run = RunCheckpoints.for_run(config, accelerator)
    start_step = run.resume(config.resume, config, accelerator, train_stack, model) if config.resume else 0
    if accelerator.is_main_process:
        run.write_config(config, recipe, runtime=runtime_settings(config, accelerator, batch_norm_note))
        accelerator.print(recipe.describe())
        accelerator.print(f"{config.method} | {config.backbone} | {world} process(es) x batch {config.batch_size} "
                          f"| {steps_per_epoch} steps/epoch | {total_steps} steps | lr {lr:.4g} | run {run.root}")
        accelerator.print(f"{accelerator.device.type} | mixed precision {config.mixed_precision} | {batch_norm_note}")
        cores = cores_per_process(world)
        if accelerator.device.type == "cpu" and torch.get_num_threads() < cores:
            # accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise: 1.7x slower on 2 cores
            accelerator.print(f"note: {torch.get_num_threads()} CPU thread(s) per process of {cores} available; "
                              f"pass accelerate launch --num_cpu_threads_per_process {cores} (or set OMP_NUM_THREADS)")
    logger = run.logger(accelerator)
    if monitor:
        monitor.random_init_baseline(model.eval_backbone, start_step, logger)
    return Training(config=config, recipe=recipe, accelerator=accelerator, method=method, model=model,
                    optimizer=optimizer, train_stack=train_stack, monitor=monitor, run=run, logger=logger, lr=lr,
                    lr_schedule=lr_schedule, wd_schedule=wd_schedule, total_steps=total_steps,
                    start_step=start_step)


def train(t: Training) -> int:
    """The loop: one step, what every rank agrees on, the log, the end of an epoch, checkpoints; then finish."""
    config, accelerator, total_steps = t.config, t.accelerator, t.total_steps
    by_time = config.schedule_by_time
    keys_log = (t.run.root / f"keys_rank{accelerator.process_index}.txt").open("a", buffering=1) \
        if config.log_keys else None
    progress_bar = make_progress_bar(accelerator, total_steps, t.start_step)
    signals = StepSignals(accelerator, install_stop_handlers(), time_share(config.time_limit))
    learning = LearningCheck(fresh=t.start_step == 0)
    throughput = Throughput(t.train_stack, config.batch_size * accelerator.num_processes)
    step, epoch_losses, timed_out = t.start_step, [], False
    while by_time or step < total_steps:
        epoch = step // t.steps_per_epoch
        at = t.schedule_index(step, signals.time_share)
        progress = Progress(step=at, epoch=at // t.steps_per_epoch, total_steps=total_steps,
                            steps_per_epoch=t.steps_per_epoch)
        t.apply_schedules(at)
        batch = next(t.train_stack)
        if keys_log:
            keys_log.write(f"{step + 1} {' '.join(batch.keys)}\n")
        if config.channels_last:
            batch.views = [v.contiguous(memory_format=torch.channels_last) for v in batch.views]

        # ---- one step
        with accelerator.autocast():
            loss, metrics = t.method(batch, progress)
        signals.push(step + 1, loss)  # step + 1: the numbering of metrics.jsonl and checkpoints
        optimizer_step(accelerator, t.method, t.optimizer, loss, progress, config.grad_clip)
        step += 1
        throughput.step()

        # ---- what every rank agrees on: read a step late, unless this step logs, evaluates or checkpoints
        epoch_done = step % t.steps_per_epoch == 0
        planned_end = step == total_steps and not by_time
        decide_now = (step % config.log_every == 0 or step % config.checkpoint_every == 0 or epoch_done
                      or planned_end)
        signals.update(wait=decide_now)
        if not decide_now and (signals.stop or signals.time_share >= 1):
            signals.update(wait=True)  # this step will checkpoint: its own loss must be known to be finite
        if signals.non_finite is not None:
            progress_bar.close()  # the error goes on its own line, after the bar
            t.logger.close()
            bad_step, value = signals.non_finite
            shown = f"loss is {value}" if not math.isfinite(value) else "loss is not finite on another process"
            return fail_everywhere(accelerator, f"{shown} at step {bad_step} (epoch "
                                   f"{(bad_step - 1) // t.steps_per_epoch}); the last good checkpoint in "
                                   f"{t.run.checkpoint_dir} is kept: lower --lr or check the data")
        epoch_losses += learning.observe(signals.take_losses())
        timed_out = signals.time_share >= 1 and (by_time or step < total_steps)
        finished = planned_end or timed_out

        # ---- the log
        if step % config.log_every == 0 or finished:
            record = {"step": step, "epoch": epoch, "loss": signals.last_loss, "lr": t.lr_schedule[at],
                      **throughput.window()}
            if by_time:
                record["schedule_step"] = at + 1
            record.update({k: float(v) for k, v in metrics.items() if k != "loss"})
            t.logger.log(record)
            progress_bar.update(step, record)

        # ---- the end of an epoch: kNN monitor, summary line, warnings
        if epoch_done or finished:
            summary = {"epoch": epoch, "mean_loss": sum(epoch_losses) / max(len(epoch_losses), 1)}
            epoch_losses = []
            evaluate_now = finished or (config.eval_every and (epoch + 1) % config.eval_every == 0)
            if t.monitor and evaluate_now:
                summary["knn_top1"] = t.monitor.evaluate(t.model.eval_backbone)
                summary["knn_random_init"] = t.monitor.baseline
                t.logger.log({"step": step, "epoch": epoch, "knn_top1": summary["knn_top1"]})
            accelerator.print(format_epoch_summary(summary, math.ceil(total_steps / t.steps_per_epoch)))
            share_done = signals.time_share if by_time else step / total_steps
            for warning in learning.warnings(summary, share_done):
                accelerator.print(f"warning: {warning}")
                t.logger.log({"step": step, "epoch": epoch, "warning": warning})

        # ---- checkpoints, and the ways a run stops early
        if step % config.checkpoint_every == 0 or finished or signals.stop:
            try:
                t.run.save(step, config, accelerator, t.train_stack, t.model)
            except CheckpointError as error:  # e.g. a full disk: one line, the previous checkpoint is kept
                progress_bar.close()
                t.logger.close()
                return fail(str(error))
        if signals.stop and not finished:
            progress_bar.close()
            accelerator.print(f"stop requested: checkpoint written at step {step}" + (
                " (a --schedule-by-time run cannot resume)" if by_time else "; resume with --resume auto"))
            break
        if timed_out:
            progress_bar.close()
            if by_time:
                accelerator.print(f"--time-limit {config.time_limit:g} min reached at step {step} (the schedule "
                                  f"has {total_steps}): the schedule followed the clock to its end")
            else:
                accelerator.print(f"--time-limit {config.time_limit:g} min reached at step {step} of {total_steps}: "
                                  f"checkpoint written; --resume auto continues the schedule")
            break
    progress_bar.close()
    if keys_log:
        keys_log.close()
    return finish(t, completed=(step == total_steps and not by_time) or timed_out)


def finish(t: Training, completed: bool) -> int:
    """A completed run (its planned steps done, or its time limit reached) exports its backbone."""
    if completed and t.accelerator.is_main_process:
        path = t.run.export_backbone(t.model.eval_backbone, t.config,
                                     parse_options(t.config.backbone_options, "--backbone-options"),
                                     input_size=t.recipe.groups[0].size)
        t.accelerator.print(f"backbone written to {path}")
    t.logger.close()
    t.accelerator.wait_for_everyone()
    t.accelerator.end_training()
    return 0


class Throughput:
    """Images per second and the share of the time spent waiting for data, per log window."""

    def __init__(self, stack: InputStack, images_per_step: int):
        self.stack, self.images_per_step = stack, images_per_step
        self._restart()

    def _restart(self) -> None:
        self.started, self.images, self.waited = time.perf_counter(), 0, self.stack.wait_seconds

    def step(self) -> None:
        self.images += self.images_per_step

    def window(self) -> dict:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        record = {"images_per_second": self.images / elapsed,
                  "data_wait": (self.stack.wait_seconds - self.waited) / elapsed}
        self._restart()
        return record


def knn_monitor_data(config: Config, accelerator):
    """The labeled validation shards for the kNN monitor, or None when it cannot run."""
    if not config.val_data:
        return None
    train_shards = open_shard_set(config.data)
    if not train_shards.labeled:
        accelerator.print(f"kNN monitor off: --data {config.data} has no labels (it is the memory bank)")
        return None
    if config.val_data == Config.val_data and config.data != Config.data:
        accelerator.print("kNN monitor off: pass --val-data with labeled shards of the same classes as --data")
        return None
    val_shards = open_shard_set(config.val_data, need_labels=True)
    if train_shards.classes != val_shards.classes:
        raise ShardError(f"--val-data {config.val_data} has other classes than --data {config.data}: "
                         f"give validation shards of the same classes, or --val-data ''")
    return val_shards


class KnnMonitor:
    """Weighted kNN (k=20, T=0.07) top-1 on --val-data with --data as the memory bank, on every rank.

    Its two evaluation input stacks are built once; each evaluation reads one epoch of both, every rank
    its own share. The bank's shares are gathered so each rank holds the whole bank (rows L2-normalised,
    `bank_dtype`: float16 on CUDA) and classifies its share of the queries; the correct counts are
    summed across ranks, so every rank returns the same accuracy. `baseline` is the accuracy of the
    randomly initialised backbone (None until `random_init_baseline`, or for a resumed run without it).
    """

    K, TEMPERATURE = 20, 0.07
    # the baseline's metrics.jsonl record: {"step": 0, "epoch": 0, "knn_top1_random_init": x}
    BASELINE_KEY = "knn_top1_random_init"

    def __init__(self, config: Config, recipe, accelerator, val_shards):
        self.accelerator = accelerator
        self.num_classes = len(val_shards.classes)
        self.baseline: float | None = None
        batch_size = max(config.batch_size, 256)
        where = dict(rank=accelerator.process_index, world_size=accelerator.num_processes,
                     device=accelerator.device, num_threads=config.data_threads)
        self.bank_stack = evaluation_stack(recipe, config.data, batch_size, **where)
        self.query_stack = evaluation_stack(recipe, val_shards, batch_size, **where)

    def evaluate(self, backbone) -> float:
        """Top-1 in percent, the same on every rank (each rank must call it)."""
        dtype = bank_dtype(self.accelerator.device)
        with self.accelerator.autocast():  # the run's --mixed-precision
            bank = extract_features(backbone, self.bank_stack, dtype=dtype, normalize=True)
            queries = extract_features(backbone, self.query_stack, dtype=dtype, normalize=True)
        bank = gather_features(bank)
        scores = knn_predict(bank.features, bank.labels, queries.features, self.num_classes, self.K,
                             self.TEMPERATURE)
        del bank
        counts = torch.tensor([(scores.argmax(1) == queries.labels).sum().item(), queries.labels.shape[0]],
                              device=self.accelerator.device)
        counts = self.accelerator.reduce(counts, reduction="sum")
        return counts[0].item() / counts[1].item() * 100

    def random_init_baseline(self, backbone, start_step: int, logger) -> None:
        """A fresh run (`start_step` 0) evaluates the backbone before its first step and logs it at step
        0; a resumed run reads that record back from its metrics.jsonl (every rank gets rank 0's)."""
        if start_step == 0:
            self.baseline = self.evaluate(backbone)
            logger.log({"step": 0, "epoch": 0, self.BASELINE_KEY: self.baseline})
            self.accelerator.print(f"kNN top-1 at random init: {self.baseline:.2f}%")
            return
        from accelerate.utils import broadcast_object_list

        found = [None]
        if self.accelerator.is_main_process and logger.path.is_file():
            for line in logger.path.read_text().splitlines():
                if self.BASELINE_KEY in line:
                    found[0] = json.loads(line).get(self.BASELINE_KEY, found[0])
        if self.accelerator.num_processes > 1:
            broadcast_object_list(found)
        self.baseline = found[0]


class LearningCheck:
    """One-line warnings when a run does not seem to learn (README, "When a run does not learn"): a kNN
    evaluation under the random-init baseline, and a loss that has moved by less than `MIN_LOSS_CHANGE` of
    its start once `CHECK_SHARE` of the run is done. The start is the mean of the first `START_STEPS`
    losses; a resumed run skips the loss check (its first losses are not the run's start), and so does an
    epoch whose kNN is above the baseline: the features learn, and a queue method's loss can rise while
    they do (its queue fills with harder negatives)."""

    CHECK_SHARE = 0.25
    MIN_LOSS_CHANGE = 0.02
    START_STEPS = 10

    def __init__(self, fresh: bool):
        self.start_losses: list[float] | None = [] if fresh else None
        self.loss_checked = not fresh

    def observe(self, losses: list[float]) -> list[float]:
        if self.start_losses is not None and len(self.start_losses) < self.START_STEPS:
            self.start_losses += losses[: self.START_STEPS - len(self.start_losses)]
        return losses

    def warnings(self, summary: dict, share_done: float) -> list[str]:
        knn, baseline = summary.get("knn_top1"), summary.get("knn_random_init")
        found = [knn_warning(knn, baseline)]
        learning = knn is not None and baseline is not None and knn > baseline
        if not self.loss_checked and share_done >= self.CHECK_SHARE and self.start_losses and not learning:
            self.loss_checked = True
            start = sum(self.start_losses) / len(self.start_losses)
            found.append(flat_loss_warning(start, summary["mean_loss"], share_done, self.MIN_LOSS_CHANGE))
        return [warning for warning in found if warning]


def knn_warning(knn: float | None, baseline: float | None) -> str | None:
    if knn is None or baseline is None or knn >= baseline:
        return None
    return (f"features are below random init: kNN top-1 {knn:.2f}% < {baseline:.2f}% at random init; "
            f"see README, 'When a run does not learn'")


def flat_loss_warning(start: float, now: float, share_done: float, min_change: float) -> str | None:
    if abs(now - start) >= min_change * abs(start):
        return None
    return (f"the loss has barely moved after {share_done:.0%} of the run ({start:.4f} -> {now:.4f}, under "
            f"{min_change:.0%}): it may not be learning; see README, 'When a run does not learn'")


def format_epoch_summary(summary: dict, total_epochs: int) -> str:
    text = f"epoch {summary['epoch'] + 1}/{total_epochs}: mean loss {summary['mean_loss']:.4f}"
    if summary.get("knn_top1") is not None:
        text += f" | kNN top-1 {summary['knn_top1']:.2f}%"
        if summary.get("knn_random_init") is not None:
            text += f" (random init {summary['knn_random_init']:.2f}%)"
    return text


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
    a stop request (SIGTERM/SIGINT on any rank), a non-finite loss (on any rank) and the share of
    --time-limit used (the largest). This rank's loss rides along (not reduced) for the log.

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
        self.last_loss = float("nan")
        self._losses: list[float] = []

    def push(self, step: int, loss: torch.Tensor) -> None:
        values = torch.zeros(4, device=self.device)  # stop, non-finite, time share, loss: no host copy
        values[0] = float(self.stop_requested())
        values[1] = ~torch.isfinite(loss.detach()).all()
        values[2] = self.time_share_used() if self.time_share_used else 0.0
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(values[:3], op=dist.ReduceOp.MAX)
        values[3] = loss.detach().float()
        event = None
        if self.device.type == "cuda":
            host = torch.empty(4, pin_memory=True)
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
            stop, non_finite, share, loss = values.tolist()
            self.stop = self.stop or stop > 0
            self.time_share = max(self.time_share, share)
            if non_finite > 0 and self.non_finite is None:
                self.non_finite = (step, loss)
            self.last_loss = loss
            self._losses.append(loss)

    def take_losses(self) -> list[float]:
        """This rank's losses read since the last call."""
        taken, self._losses = self._losses, []
        return taken


def install_stop_handlers():
    """SIGTERM/SIGINT (preemption, Ctrl-C) ask the loop to checkpoint and exit cleanly."""
    requested = {"stop": False}

    def handler(signum, frame):
        requested["stop"] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return lambda: requested["stop"]


class make_progress_bar:
    """A tqdm bar on the main process showing images/s, loss, LR and the data-wait fraction."""

    def __init__(self, accelerator, total: int, start: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, disable=not accelerator.is_main_process, dynamic_ncols=True,
                        unit="step", file=sys.stderr, mininterval=1.0)

    def update(self, step: int, record: dict) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}",
                             img_s=f"{record['images_per_second']:.0f}", wait=f"{record['data_wait']:.0%}")

    def close(self) -> None:
        self.bar.close()


def fail(message: str) -> int:
    print(f"train.py: error: {message}", file=sys.stderr)
    return 2


def fail_everywhere(accelerator, message: str) -> int:
    """An error every rank reached at the same step: the main process prints it, every rank exits 2."""
    if accelerator.is_main_process:
        fail(message)
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 2


def synchronise_batch_norm(config: Config, cls, method, device_type: str, world: int) -> tuple[Config, str]:
    """Converts the method's batch norms to SyncBatchNorm where the recipe says so (--sync-bn overrides)
    and several GPUs train; returns the config with the choice resolved and a line for the start-up print."""
    wanted = cls.sync_batch_norm if config.sync_bn is None else config.sync_bn
    config = dataclasses.replace(config, sync_bn=wanted)
    if world == 1:
        return config, "batch norm over the process's batch (one process)"
    if not wanted:
        why = " (the recipe shuffles batches across processes instead)" if not cls.sync_batch_norm else ""
        return config, f"batch norm per process{why}"
    if device_type != "cuda":
        return config, "batch norm per process (SyncBatchNorm needs CUDA; CPU processes normalise their own batch)"
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)  # in place: the top module is not a batch norm
    return config, f"batch norm synchronised across {world} GPUs (SyncBatchNorm; --no-sync-bn turns it off)"


def runtime_settings(config: Config, accelerator, batch_norm_note: str) -> dict:
    """How the run computes, for config.yaml."""
    cuda = accelerator.device.type == "cuda"
    return {"device": accelerator.device.type, "processes": accelerator.num_processes,
            "mixed_precision": config.mixed_precision, "batch_norm": batch_norm_note,
            "tf32": bool(cuda and torch.backends.cuda.matmul.allow_tf32),
            "cudnn_benchmark": bool(cuda and torch.backends.cudnn.benchmark)}


if __name__ == "__main__":
    sys.exit(main())
