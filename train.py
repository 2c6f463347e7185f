"""Self-supervised pretraining: config -> Accelerator -> InputStack -> Method -> loop.

    accelerate launch train.py --method swav --multicrop 2x224+6x96 --data shards/my-set
    python train.py --method swav            # CPU: a small backbone on small crops of the demo shards

Every option lives in `Config`; the command line is generated from it (`--help` lists each with its
default) and `--config run.yaml` loads a file (command-line flags win). The loop reads top to bottom:
per-iteration LR (and weight-decay) schedules are explicit arrays, the method does the maths.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass

import torch

from models.checkpointing import CheckpointError, RunCheckpoints
from models.knn import bank_dtype, knn_predict
from models.methods import create_method
from models.methods.base import Progress
from models.optim import build_optimizer, cosine_schedule
from models.options import ConfigError, parse_options
from models.runtime import default_mixed_precision, use_fast_cuda_kernels
from models.training import (Config, StepSignals, cores_per_process, optimizer_step, parse_config, resolve,
                             time_share)
from pipelines.features import evaluation_stack, extract_features, gather_features
from pipelines.files import atomic_write_text
from pipelines.shards import ShardError, open_shard_set, sample_labels
from pipelines.restoration import EVALUATION_SEED, baseline_name, mean_scores, restoration_stack, score_restoration
from pipelines.spec import RecipeError, Restoration
from pipelines.stack import InputStack


def main(argv=None) -> int:
    """Set up (config, Accelerator, method, input stack, schedules, run directory), train, finish."""
    try:
        config = parse_config(argv, __doc__)
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
    psnr_monitor: RestorationMonitor | None = None

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
    if config.knn_bank == "memory" and method.memory_bank() is None:
        raise ConfigError(f"--knn-bank memory: {config.method} keeps no memory bank (methods that do: "
                          f"{', '.join(memory_bank_methods())}); use --knn-bank features")
    recipe = method.adapt_recipe(recipe)
    train_stack = InputStack(recipe, config.data, config.batch_size, rank=rank, world_size=world,
                             seed=config.seed, device=accelerator.device, num_threads=config.data_threads,
                             need_labels=method.needs_labels, sample_indices=method.needs_sample_indices)
    method.adapt_to_data(train_stack.shards.num_samples)  # per-sample state (a memory bank), before DDP and resume
    # a restoration method (IPT) is scored by PSNR per task on --val-data (any shards, labels or not), not by kNN
    restoration = cls.evaluation == "restoration"
    psnr_monitor = RestorationMonitor(config, recipe, accelerator) if restoration and config.val_data else None
    val_shards = None if restoration else knn_monitor_data(config, accelerator)
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
    # e.g. colorization's colour prior: estimated by a fresh run, restored from the checkpoint on resume
    statistics = (fit_data_statistics(model, recipe, config, accelerator)
                  if start_step == 0 and model.data_statistics_batches else None)
    if accelerator.is_main_process:
        run.write_config(config, recipe, runtime=runtime_settings(config, accelerator, batch_norm_note))
        for task, permutations in train_stack.pretext.permutations.items():  # the set a jigsaw run drew from
            atomic_write_text(run.root / f"{task}_permutations.json", json.dumps(permutations.tolist()))
        for file_name, text in model.run_files().items():  # e.g. colorization's colour prior
            atomic_write_text(run.root / file_name, text)
        accelerator.print(recipe.describe())
        accelerator.print(f"{config.method} | {config.backbone} | {world} process(es) x batch {config.batch_size} "
                          f"| {steps_per_epoch} steps/epoch | {total_steps} steps | lr {lr:.4g} | run {run.root}")
        accelerator.print(f"{accelerator.device.type} | mixed precision {config.mixed_precision} | {batch_norm_note}")
        if statistics:
            accelerator.print(statistics)
        cores = cores_per_process(world)
        if accelerator.device.type == "cpu" and torch.get_num_threads() < cores:
            # accelerate launch sets OMP_NUM_THREADS=1 unless told otherwise: 1.7x slower on 2 cores
            accelerator.print(f"note: {torch.get_num_threads()} CPU thread(s) per process of {cores} available; "
                              f"pass accelerate launch --num_cpu_threads_per_process {cores} (or set OMP_NUM_THREADS)")
    logger = run.logger(accelerator)
    if monitor:
        monitor.random_init_baseline(model, start_step, logger)
    if psnr_monitor:
        psnr_monitor.baselines(start_step, logger)
    return Training(config=config, recipe=recipe, accelerator=accelerator, method=method, model=model,
                    optimizer=optimizer, train_stack=train_stack, monitor=monitor, run=run, logger=logger, lr=lr,
                    lr_schedule=lr_schedule, wd_schedule=wd_schedule, total_steps=total_steps,
                    start_step=start_step, psnr_monitor=psnr_monitor)


def fit_data_statistics(model, recipe, config: Config, accelerator) -> str:
    """A fresh run's statistics of its training data (`Method.data_statistics`): the method's first
    `data_statistics_batches` batches of a pass of their own (the run's recipe and seed; the training
    stack is not touched) over this rank's share of --data, summed over the batches and the ranks."""
    stack = InputStack(recipe, config.data, config.batch_size, rank=accelerator.process_index,
                       world_size=accelerator.num_processes, seed=config.seed, device=accelerator.device,
                       num_threads=config.data_threads)
    total = sum(model.data_statistics(next(stack)) for _ in range(model.data_statistics_batches))
    return model.fit_data_statistics(accelerator.reduce(total, reduction="sum"))


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
    batch, data_error = None, None

    def end_with_error(message: str, every_rank: bool = True) -> int:
        progress_bar.close()  # the error goes on its own line, after the bar
        t.logger.close()
        return fail_everywhere(accelerator, message) if every_rank else fail(message)

    while by_time or step < total_steps:
        epoch = step // t.steps_per_epoch
        at = t.schedule_index(step, signals.time_share)
        progress = Progress(step=at, epoch=at // t.steps_per_epoch, total_steps=total_steps,
                            steps_per_epoch=t.steps_per_epoch)
        t.apply_schedules(at)
        if data_error is None:
            try:
                batch = next(t.train_stack)
            except ShardError as error:  # this rank steps on its previous batch until every rank knows
                data_error = str(error)
            if step == t.start_step:  # no previous batch to step on: every rank decides now (one gather)
                message = first_data_error(accelerator, data_error)
                if message:
                    return end_with_error(f"at step {step + 1}: {message}")
        if keys_log and data_error is None:
            keys_log.write(f"{step + 1} {' '.join(batch.keys)}\n")
        if config.channels_last:
            batch.views = [v.contiguous(memory_format=torch.channels_last) for v in batch.views]

        # ---- one step
        with accelerator.autocast():
            loss, metrics = t.method(batch, progress)
        signals.push(step + 1, loss, data_error is not None)  # step + 1: the numbering of metrics.jsonl, checkpoints
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
        if signals.data_error is not None:  # read by every rank at the same step: each gathers the message
            return end_with_error(f"at step {signals.data_error}: {first_data_error(accelerator, data_error)}; "
                                  f"the last checkpoint in {t.run.checkpoint_dir} is kept: --resume auto "
                                  "continues from it")
        if signals.non_finite is not None:
            bad_step, value = signals.non_finite
            shown = f"loss is {value}" if not math.isfinite(value) else "loss is not finite on another process"
            return end_with_error(f"{shown} at step {bad_step} (epoch {(bad_step - 1) // t.steps_per_epoch}); "
                                  f"the last good checkpoint in {t.run.checkpoint_dir} is kept: lower --lr or "
                                  "check the data")
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
            if t.psnr_monitor and evaluate_now:
                summary["restoration"] = t.psnr_monitor.evaluate_and_log(t.model, step, epoch, t.logger)
            if t.monitor and evaluate_now:
                try:
                    summary["knn_top1"] = t.monitor.evaluate_method(t.model)
                except ShardError as error:  # raised on every rank alike (`KnnMonitor.features`)
                    return end_with_error(f"kNN monitor at step {step}: {error}")
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
                return end_with_error(str(error), every_rank=False)
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
    """A completed run (its planned steps done, or its time limit reached) exports its backbone (or the model
    the method exports instead: `Method.export_model`)."""
    if completed and t.accelerator.is_main_process:
        size = t.recipe.groups[0].size
        path = t.model.export_model(t.run.root, input_size=size, method_options=t.config.method_options)
        if path is not None:
            t.accelerator.print(f"model written to {path}")
        else:
            path = t.run.export_backbone(t.model.eval_backbone, t.config,
                                         parse_options(t.config.backbone_options, "--backbone-options"),
                                         input_size=size, **({"input": "lightness"} if t.recipe.lightness_input else {}))
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

    `--knn-bank memory`: the method's own memory bank (`Method.memory_bank`: NPID, decoupling) is the bank,
    with the labels of --data read from its shards, and the queries are embedded by the method's bank
    encoder: NPID's protocol, k=200, T=0.07 on the bank vectors, no pass over --data. At random init the
    bank is random vectors, so the baseline is chance.
    """

    K, TEMPERATURE = 20, 0.07
    MEMORY_BANK_K = 200  # Wu et al.'s kNN on the memory bank
    # the baseline's metrics.jsonl record: {"step": 0, "epoch": 0, "knn_top1_random_init": x}
    BASELINE_KEY = "knn_top1_random_init"

    def __init__(self, config: Config, recipe, accelerator, val_shards):
        self.accelerator = accelerator
        self.num_classes = len(val_shards.classes)
        self.baseline: float | None = None
        batch_size = max(config.batch_size, 256)
        where = dict(rank=accelerator.process_index, world_size=accelerator.num_processes,
                     device=accelerator.device, num_threads=config.data_threads)
        self.memory_bank = config.knn_bank == "memory"
        if self.memory_bank:  # the labels of --data in Batch.indices order; no pass over --data
            labels = sample_labels(open_shard_set(config.data))
            self.bank_labels = torch.from_numpy(labels).to(accelerator.device)
        else:
            self.bank_stack = evaluation_stack(recipe, config.data, batch_size, **where)
        self.query_stack = evaluation_stack(recipe, val_shards, batch_size, **where)

    def evaluate_method(self, model) -> float:
        """Top-1 in percent of `model` (the unwrapped method): its `eval_backbone`'s features, or with
        `--knn-bank memory` its memory bank. Every rank must call it."""
        if self.memory_bank:
            return self.evaluate_memory_bank(*model.memory_bank())
        return self.evaluate(model.eval_backbone)

    def evaluate_memory_bank(self, bank: torch.Tensor, encoder) -> float:
        """Top-1 in percent of the k=200 weighted kNN of the query embeddings against `bank` (replicated: every
        rank holds it), the same on every rank."""
        (queries,) = self.features(encoder, [self.query_stack], torch.float32)
        scores = knn_predict(bank.detach().float(), self.bank_labels, queries.features, self.num_classes,
                             self.MEMORY_BANK_K, self.TEMPERATURE)
        counts = torch.tensor([(scores.argmax(1) == queries.labels).sum().item(), queries.labels.shape[0]],
                              device=self.accelerator.device)
        counts = self.accelerator.reduce(counts, reduction="sum")
        return counts[0].item() / counts[1].item() * 100

    def evaluate(self, backbone) -> float:
        """Top-1 in percent, the same on every rank (each rank must call it)."""
        bank, queries = self.features(backbone, [self.bank_stack, self.query_stack], bank_dtype(self.accelerator.device))
        bank = gather_features(bank)
        scores = knn_predict(bank.features, bank.labels, queries.features, self.num_classes, self.K,
                             self.TEMPERATURE)
        del bank
        counts = torch.tensor([(scores.argmax(1) == queries.labels).sum().item(), queries.labels.shape[0]],
                              device=self.accelerator.device)
        counts = self.accelerator.reduce(counts, reduction="sum")
        return counts[0].item() / counts[1].item() * 100

    def features(self, backbone, stacks: list[InputStack], dtype: torch.dtype) -> list:
        """This rank's L2-normalised features of one epoch of each stack, under the run's --mixed-precision.
        A failed read on any rank raises the same ShardError on every rank, before any waits in a gather."""
        try:
            with self.accelerator.autocast():
                found, error = [extract_features(backbone, stack, dtype=dtype, normalize=True) for stack in stacks], None
        except ShardError as failure:
            found, error = None, str(failure)
        message = first_data_error(self.accelerator, error)
        if message:
            raise ShardError(message)
        return found

    def random_init_baseline(self, model, start_step: int, logger) -> None:
        """A fresh run (`start_step` 0) evaluates the method before its first step (`evaluate_method`) and logs
        it at step 0; a resumed run reads that record back from its metrics.jsonl (every rank gets rank 0's)."""
        if start_step == 0:
            self.baseline = self.evaluate_method(model)
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


class RestorationMonitor:
    """A restoration method's periodic evaluation (IPT; `Method.evaluation == "restoration"`): PSNR and SSIM
    per task of `model.restore` on --val-data (labels not needed), every image corrupted by every task with
    the same seeded draws each time, against the trivial baselines (bicubic, the noisy or rainy input);
    `pipelines.restoration`. Each rank scores its share, the sums are reduced, every rank gets the same."""

    def __init__(self, config: Config, recipe, accelerator):
        self.accelerator = accelerator
        self.spec = next(task for task in recipe.pretext if isinstance(task, Restoration))
        self.stack = restoration_stack(recipe, config.val_data, max(config.batch_size, 256),
                                       rank=accelerator.process_index, world_size=accelerator.num_processes,
                                       device=accelerator.device, num_threads=config.data_threads)
        self.baseline: dict | None = None

    def scores(self, restore) -> dict[str, dict[str, float]]:
        with self.accelerator.autocast():
            sums, _ = score_restoration(restore, self.stack, self.spec,
                                        seed=EVALUATION_SEED + self.accelerator.process_index)
        return mean_scores(self.accelerator.reduce(sums, reduction="sum"), self.spec.tasks)

    def baselines(self, start_step: int, logger) -> None:
        """The trivial baselines' PSNR per task (they do not depend on the model: computed by every run, fresh
        or resumed), printed and logged at step 0 by a fresh run."""
        self.baseline = self.scores(None)
        if start_step == 0:
            logger.log({"step": 0, "epoch": 0, **{f"baseline_psnr_{task}": round(values["baseline_psnr"], 4)
                                                  for task, values in self.baseline.items()}})
        self.accelerator.print("restoration baselines on --val-data (PSNR dB / SSIM): " + ", ".join(
            f"{task} {baseline_name(task)} {values['baseline_psnr']:.2f} / {values['baseline_ssim']:.4f}"
            for task, values in self.baseline.items()))

    def evaluate_and_log(self, model, step: int, epoch: int, logger) -> dict[str, dict[str, float]]:
        """The scores after an epoch ({task: means}), logged as psnr_<task> and ssim_<task>."""
        model.eval()
        try:
            scores = self.scores(model.restore)
        finally:
            model.train()
        record = {"step": step, "epoch": epoch}
        for task, values in scores.items():
            record.update({f"psnr_{task}": round(values["psnr"], 4), f"ssim_{task}": round(values["ssim"], 4)})
        logger.log(record)
        return scores


class LearningCheck:
    """One-line warnings when a run does not seem to learn (README, "When a run does not learn"): a kNN
    evaluation under the random-init baseline, and a loss that has moved by less than `MIN_LOSS_CHANGE` of
    its start once `CHECK_SHARE` of the run is done. The start is the mean of the first `START_STEPS`
    losses, and the check waits for twice that many (a run too short for it is not judged); a resumed run skips the loss check (its first losses are not the run's start), and so does an
    epoch whose kNN is above the baseline: the features learn, and a queue method's loss can rise while
    they do (its queue fills with harder negatives)."""

    CHECK_SHARE = 0.25
    MIN_LOSS_CHANGE = 0.02
    START_STEPS = 10

    def __init__(self, fresh: bool):
        self.start_losses: list[float] | None = [] if fresh else None
        self.loss_checked = not fresh
        self.seen = 0

    def observe(self, losses: list[float]) -> list[float]:
        self.seen += len(losses)
        if self.start_losses is not None and len(self.start_losses) < self.START_STEPS:
            self.start_losses += losses[: self.START_STEPS - len(self.start_losses)]
        return losses

    def warnings(self, summary: dict, share_done: float) -> list[str]:
        knn, baseline = summary.get("knn_top1"), summary.get("knn_random_init")
        found = [knn_warning(knn, baseline)]
        learning = knn is not None and baseline is not None and knn > baseline
        long_enough = self.seen >= 2 * self.START_STEPS
        if not self.loss_checked and share_done >= self.CHECK_SHARE and long_enough and not learning:
            self.loss_checked = True
            start = sum(self.start_losses) / len(self.start_losses)
            found.append(flat_loss_warning(start, summary["mean_loss"], share_done, self.MIN_LOSS_CHANGE))
        return [warning for warning in found if warning]


def memory_bank_methods() -> list[str]:
    """The registered methods that keep a memory bank (`Method.memory_bank` overridden)."""
    from models.methods import METHODS
    from models.methods.base import Method

    return sorted(name for name, cls in METHODS.items() if cls.memory_bank is not Method.memory_bank)


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
    for task, values in (summary.get("restoration") or {}).items():
        text += f" | {task} PSNR {values['psnr']:.2f} ({baseline_name(task)} {values['baseline_psnr']:.2f})"
    if summary.get("knn_top1") is not None:
        text += f" | kNN top-1 {summary['knn_top1']:.2f}%"
        if summary.get("knn_random_init") is not None:
            text += f" (random init {summary['knn_random_init']:.2f}%)"
    return text


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


def first_data_error(accelerator, message: str | None) -> str | None:
    """The data error of the first rank that has one (its input stack's one-line message), or None; the
    same on every rank, and every rank must call it (a gather of each rank's message)."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        return next((found for found in gather_object([message]) if found), None)
    return message


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
    settings = {"device": accelerator.device.type, "processes": accelerator.num_processes,
                "mixed_precision": config.mixed_precision, "batch_norm": batch_norm_note,
                "tf32": bool(cuda and torch.backends.cuda.matmul.allow_tf32),
                "cudnn_benchmark": bool(cuda and torch.backends.cudnn.benchmark)}
    if any((location or "").startswith("s3://") for location in (config.data, config.val_data)):
        from pipelines.s3 import endpoint_description

        settings["s3_endpoint"] = endpoint_description()  # where the s3:// URLs were read; no credentials
    return settings


if __name__ == "__main__":
    sys.exit(main())
