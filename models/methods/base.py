"""The contract between the training loop and a method (a backbone plus a head and a loss).

The loop, per iteration:

    loss, metrics = method(batch, progress)      # forward == training_step, under autocast
    backward(loss)
    method.before_optimizer_step(progress)       # gradients exist: drop or edit some (frozen parts)
    [grad clipping] optimizer.step(); optimizer.zero_grad()
    method.after_step(progress)                  # weights updated: EMA teachers, centres, queues...

`batch` is duck-typed: `.views` (one tensor per crop-size group, (count * B, 3, S, S), view-major:
view v of sample i is row v * B + i), `.batch_size` (B, per process) and `.counts`; a method with
`needs_sample_indices` also reads `.indices` (each sample's fixed position in the training set, int64).

Set-up, once, before the method is wrapped for several processes and before a checkpoint is restored:

    recipe = method.adapt_recipe(recipe)          # the recipe it trains on
    method.adapt_to_data(num_samples)             # the training set's size: per-sample state (memory banks)
Methods never import the input stack: a method names its recipe preset (`recipe_preset`) and the
caller looks it up (`default_recipe(pipelines.spec.preset)`).
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from models.backbones import create_backbone, default_backbone, is_vit, running_stats_frozen
from models.ema import cosine_momentum, ema_update_, frozen_copy
from models.optim import param_groups
from models.vit import check_masked_vit, patch_size, use_fixed_positions, visible_index


@dataclass(frozen=True)
class Progress:
    step: int  # optimizer steps done before this one (0-based)
    epoch: int
    total_steps: int
    steps_per_epoch: int

    @property
    def fraction(self) -> float:
        return self.step / max(self.total_steps, 1)


class Method(nn.Module, metaclass=abc.ABCMeta):
    name: ClassVar[str]
    recipe_preset: ClassVar[str]

    # Training defaults: `paper` is upstream's recipe (GPU runs; keys missing there come from this one),
    # `cpu_overrides` replaces some for CPU runs and `vit_overrides` for ViT backbones. lr is the base
    # LR at global batch 256 (see lr_scaling).
    paper: ClassVar[dict[str, Any]] = dict(optimizer="sgd", lr=0.05, weight_decay=1e-4, warmup_epochs=0.0,
                                           epochs=100, batch_size=64, multicrop="2x224", grad_clip=None)
    final_lr_fraction: ClassVar[float] = 0.0  # the cosine schedule ends at lr * this
    warmup_start_fraction: ClassVar[float] = 0.0  # the warmup starts at lr * this
    cpu_overrides: ClassVar[dict[str, Any]] = {}
    vit_overrides: ClassVar[dict[str, Any]] = {}
    # Head widths: "paper" on a GPU, "small" on CPU; explicit keyword arguments override (`head_sizes`)
    HEAD_PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "small": {}}
    # Two-view methods take exactly one view group of 2 crops; multi-crop methods override check_recipe
    accepts_local_crops: ClassVar[bool] = False
    needs_labels: bool = False  # trains on the shards' class labels too (they must have them)
    # reads Batch.indices: the caller builds the input stack with sample_indices=True
    needs_sample_indices: ClassVar[bool] = False
    adamw_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    # several GPUs: batch norms synchronised across them (SyncBatchNorm), as the method's recipe does
    sync_batch_norm: ClassVar[bool] = True
    # Buffers DDP must not broadcast from rank 0 on every forward. PER_RANK: each rank keeps its own (a queue
    # of its own embeddings), so checkpoints save and restore them per rank. REPLICATED: every rank computes
    # the same value itself (from gathered or all-reduced data), so rank 0's copy in the checkpoint serves all.
    PER_RANK_BUFFERS: ClassVar[tuple[str, ...]] = ()
    REPLICATED_BUFFERS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True, stem: str = "standard",
                 feature_dim: int | None = None, backbone_kwargs: dict | None = None):
        """`backbone` is a timm name or a module returning pooled features (then give `feature_dim`);
        None: the device's default (`default_backbone`)."""
        super().__init__()
        if backbone is None:
            backbone, default_kwargs = self.default_backbone(on_gpu)
            backbone_kwargs = {**default_kwargs, **(backbone_kwargs or {})}
        if isinstance(backbone, str):
            backbone, feature_dim = create_backbone(backbone, stem=stem,
                                                    **(backbone_kwargs or {}))
        elif feature_dim is None:
            feature_dim = backbone.num_features
        self.backbone = backbone
        self.feature_dim = feature_dim
        self._ddp_params_and_buffers_to_ignore = [*self.PER_RANK_BUFFERS, *self.REPLICATED_BUFFERS]

    @classmethod
    def default_backbone(cls, on_gpu: bool) -> tuple[str, dict[str, Any]]:
        """(timm name, keyword arguments) of the backbone used when none is given."""
        return default_backbone("cuda" if on_gpu else "cpu"), {}

    @classmethod
    def chosen_backbone(cls, backbone: str | None, options: dict, on_gpu: bool) -> tuple[str, dict[str, Any]]:
        """(timm name, keyword arguments) a run trains: `backbone` with `options`, or (no name given) the
        method's `default_backbone` with its keyword arguments, `options` on top."""
        if backbone:
            return backbone, dict(options)
        default, default_options = cls.default_backbone(on_gpu)
        return default, {**default_options, **options}

    def adapt_recipe(self, recipe):
        """The recipe this model trains on (masked methods match the mask grid to their patches)."""
        return recipe

    def adapt_to_data(self, num_samples: int) -> None:
        """Sizes per-sample state for a training set of `num_samples` samples (a memory bank's rows, indexed
        by `Batch.indices`). The caller (train.py, the tools) calls it once, before the method is wrapped for
        several processes or restored from a checkpoint (whose state must fit); the default keeps none."""

    def memory_bank(self) -> tuple[torch.Tensor, nn.Module] | None:
        """(bank, encoder) for the kNN monitor's `--knn-bank memory`: one L2-normalised row per training
        sample in `Batch.indices` order, and the module mapping images to L2-normalised vectors of the bank's
        space; None for a method without a memory bank."""
        return None

    @classmethod
    def defaults(cls, on_gpu: bool, backbone: str | None = None) -> dict[str, Any]:
        values = {**Method.paper, **cls.paper}
        if backbone is not None and cls.vit_overrides and is_vit(backbone):
            values.update(cls.vit_overrides)
        if not on_gpu:
            values.update(cls.cpu_overrides)
        return values

    @classmethod
    def default_recipe(cls, presets: Callable[[str], Any]) -> Any:
        return presets(cls.recipe_preset)

    @classmethod
    def check_recipe(cls, recipe, batch_size: int) -> None:
        """Raise ValueError (one line) if the method cannot train on this recipe and per-process batch."""
        if not cls.accepts_local_crops and (len(recipe.groups) != 1 or recipe.groups[0].count != 2):
            raise ValueError(f"{cls.name} trains on two views of one size; --multicrop '{recipe.multicrop}' "
                             f"is not that: use e.g. 2x224 (2x32 on CPU)")

    def head_sizes(self, head_preset: str | None, on_gpu: bool, **given) -> dict[str, Any]:
        """The preset's head widths ("paper" on a GPU, "small" on CPU by default), with `given` values
        that are not None on top."""
        head_preset = head_preset or ("paper" if on_gpu else "small")
        if head_preset not in self.HEAD_PRESETS:
            raise ValueError(f"unknown {self.name} head_preset {head_preset!r}; known: {', '.join(self.HEAD_PRESETS)}")
        sizes = dict(self.HEAD_PRESETS[head_preset])
        sizes.update({key: value for key, value in given.items() if value is not None})
        return sizes

    # the attribute holding the backbone that the kNN monitor evaluates and the export writes
    EVAL_BACKBONE: ClassVar[str] = "backbone"
    # the run's periodic evaluation: "knn" (the kNN monitor on `eval_backbone`'s features) or "restoration"
    # (PSNR and SSIM per task of the method's `restore(inputs, task)` on corrupted --val-data, train.py)
    evaluation: ClassVar[str] = "knn"

    def export_model(self, folder, input_size: int, **extra):
        """What a finished run exports into `folder` when it is not a backbone (IPT: the whole restoration
        model); returns the weights' path, or None: the loop exports `eval_backbone` for timm."""
        return None

    @property
    def eval_backbone(self) -> nn.Module:
        return getattr(self, self.EVAL_BACKBONE)

    @staticmethod
    def two_views(batch, *modules: nn.Module) -> tuple[torch.Tensor, ...]:
        """Both views through `modules` in turn (one forward over both), split per view."""
        x = batch.views[0]
        for module in modules:
            x = module(x)
        return x.split(batch.batch_size)

    def final_lr(self, peak_lr: float) -> float:
        """Where the cosine schedule ends."""
        return peak_lr * self.final_lr_fraction

    def forward(self, batch, progress: Progress):
        return self.training_step(batch, progress)

    @abc.abstractmethod
    def training_step(self, batch, progress: Progress) -> tuple[torch.Tensor, dict]:
        """(loss, metrics): metrics map names to floats or 0-d tensors (the loop converts when it logs)."""

    def forward_groups(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Backbone features per crop-size group: one forward per group, never one per crop.

        Only the first (global) group updates the batch norms' running statistics: those are what
        evaluation and the exported backbone use on whole images, and small local crops have other
        statistics (training itself normalises with batch statistics and is unaffected)."""
        features = [self.backbone(views[0])]
        with running_stats_frozen(self.backbone):
            features += [self.backbone(group) for group in views[1:]]
        return features

    def backbones(self) -> list[nn.Module]:
        """The backbone and its EMA teachers (`EMA_PAIRS` entries whose student is the backbone)."""
        teachers = [getattr(self, teacher) for teacher, student in self.EMA_PAIRS if student == "backbone"]
        return [self.backbone, *teachers]

    def compile_backbone(self, **options) -> None:
        """`torch.compile` (with `options`) in place what the training step runs through the backbone and its
        EMA teachers: their forward. In place: parameter names stay timm's, so checkpoints and the export
        don't depend on it."""
        for backbone in self.backbones():
            backbone.compile(**options)

    def per_rank_state(self) -> dict[str, torch.Tensor]:
        """This rank's own buffers (`PER_RANK_BUFFERS`), for its checkpoint file."""
        return {name: buffer.detach().cpu().clone() for name, buffer in self.named_buffers()
                if name in self.PER_RANK_BUFFERS}

    def load_per_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.PER_RANK_BUFFERS) - set(state)
        if missing:
            raise KeyError(f"per-rank state lacks {', '.join(sorted(missing))}")
        self.load_state_dict(state, strict=False)  # through the modules' load hooks (shapes, host mirrors)

    def checkpoint_state(self) -> dict:
        """State outside the module's parameters and buffers that an exact resume needs and that is the same
        on every rank: the optimizers a method owns besides the loop's (a discriminator's Adam). Checkpoints
        save it from the main process (`method_state.pt`) and every rank restores it on resume
        (`load_checkpoint_state`); tensors, numbers, strings and containers of them only (weights_only=True)."""
        return {}

    def load_checkpoint_state(self, state: dict) -> None:
        pass

    def before_optimizer_step(self, progress: Progress) -> None:
        pass

    def after_step(self, progress: Progress) -> None:
        """Moves every EMA teacher towards its student (`ema_pairs`, `momentum`). State that follows the
        weights (teachers, queues, centres) changes here, never in `training_step`, so a step the fp16
        grad scaler skips (the loop then skips this too) leaves all of it as it was."""
        pairs = self.ema_pairs()
        if pairs:
            momentum = self.momentum(progress)
            for teacher, student in pairs:
                ema_update_(teacher, student, momentum)

    # EMA teachers (momentum encoders), declared as (teacher attribute, student attribute) pairs:
    # `add_teachers` creates them as frozen copies, `after_step` moves them with `momentum`
    EMA_PAIRS: ClassVar[tuple[tuple[str, str], ...]] = ()
    ema_base_momentum: float = 0.996
    ema_cosine: bool = True  # momentum base -> 1 along a half cosine per iteration; False: constant

    def add_teachers(self, base_momentum: float) -> None:
        for teacher, student in self.EMA_PAIRS:
            setattr(self, teacher, frozen_copy(getattr(self, student)))
        self.ema_base_momentum = base_momentum

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(getattr(self, teacher), getattr(self, student)) for teacher, student in self.EMA_PAIRS]

    def momentum(self, progress: Progress) -> float:
        """The EMA momentum after optimizer step `progress.step` (0-based)."""
        if not self.ema_cosine:
            return self.ema_base_momentum
        return cosine_momentum(self.ema_base_momentum, progress.step, progress.total_steps)

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self, weight_decay)

    def lr_scaling(self, global_batch: int) -> float:
        return global_batch / 256

    def weight_decay_schedule(self, weight_decay: float, total_steps: int) -> np.ndarray | None:
        """Per-iteration weight decay, or None for a constant one."""
        return None

    # Statistics of the training data a method needs before its first step (colorization's colour prior): a
    # fresh run reads `data_statistics_batches` batches of a separate pass over the training shards, sums
    # `data_statistics(batch)` over them and over ranks, and hands the sum to `fit_data_statistics`, which
    # keeps what it needs in buffers (checkpointed: a resumed run restores them, nothing is re-estimated)
    # and returns a line for the start-up print. 0: the method needs none.
    data_statistics_batches: int = 0

    def data_statistics(self, batch) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} reads no statistics of the training data")

    def fit_data_statistics(self, total: torch.Tensor) -> str:
        raise NotImplementedError(f"{self.name} reads no statistics of the training data")

    def run_files(self) -> dict[str, str]:
        """Files (name: text) a run writes into its directory at start-up, from the method's state."""
        return {}


class MaskedImageMethod(Method):
    """A ViT trained on patch masks the input stack draws (MAE, SIM): positions are fixed 2-D sin-cos
    and the recipe's mask grid follows the ViT's patch size."""

    views: ClassVar[int] = 1  # views of the one crop group: 1 for MAE, 2 for SIM (only the first masked)
    num_masked: int | None = None  # patches each mask hides, from the recipe (`adapt_recipe`)

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True, **backbone_options):
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        check_masked_vit(self.backbone, self.name)
        use_fixed_positions(self.backbone)

    @property
    def patch_size(self) -> int:
        return patch_size(self.backbone)

    @classmethod
    def default_backbone(cls, on_gpu: bool) -> tuple[str, dict[str, Any]]:
        # CPU: ViT-Ti with 6 of its 12 blocks on 4-px patches: 8x8 patches on a 32-px crop (img_size follows
        # the crop in train.py)
        return ("vit_base_patch16_224", {}) if on_gpu else ("vit_tiny_patch16_224", {"patch_size": 4, "depth": 6})

    @classmethod
    def check_recipe(cls, recipe, batch_size: int) -> None:
        if len(recipe.groups) != 1 or recipe.groups[0].count != cls.views or recipe.masking is None:
            raise ValueError(f"{cls.name} trains on {cls.views} masked view(s) of one size; --multicrop "
                             f"'{recipe.multicrop}' is not that: use {cls.views}x224 "
                             f"({cls.views}x32 on CPU)")

    def adapt_recipe(self, recipe):
        masking = dataclasses.replace(recipe.masking, patch_size=self.patch_size)
        size = recipe.groups[0].size
        if self.backbone.patch_embed.img_size[0] != size:
            raise ValueError(f"--backbone-options img_size={self.backbone.patch_embed.img_size[0]} differs from "
                             f"the {size}-px crops of --multicrop '{recipe.multicrop}': make them equal")
        self.num_masked = masking.num_masked(size)
        return dataclasses.replace(recipe, masking=masking)

    def visible_index(self, mask: torch.Tensor) -> torch.Tensor:
        """Each row's visible patch positions (B, visible), in order (`models.vit.visible_index`). The count
        comes from the recipe once `adapt_recipe` has seen it, without a host sync; masks from elsewhere
        (tests, tools) have it read from their first row."""
        hidden = self.num_masked if self.num_masked is not None else int(mask[0].sum())
        return visible_index(mask, mask.shape[1] - hidden)

    def compile_backbone(self, **options) -> None:
        """Masked methods never call the ViT's forward: `models.vit.encode` runs its blocks on the visible
        tokens, so the blocks are what gets compiled (in place), in the backbone and its EMA teachers."""
        for backbone in self.backbones():
            backbone.blocks.compile(**options)


def train_step(method: Method, optimizer: torch.optim.Optimizer, batch, progress: Progress) -> torch.Tensor:
    """One step in the loop's order (see the module docstring), without Accelerate: for tools and tests."""
    loss, _ = method(batch, progress)
    loss.backward()
    method.before_optimizer_step(progress)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.after_step(progress)
    return loss.detach()
