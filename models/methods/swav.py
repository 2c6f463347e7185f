"""SwAV (Caron et al. 2020), as the official code (facebookresearch/swav@06b1b7c) trains it."""

from __future__ import annotations

import torch
from torch import nn

from models.distributed import world_size
from models.heads import SwAVHead, SwAVPrototypes
from models.losses import swapped_prediction_loss, swav_codes
from models.methods.base import Method, Progress
from models.optim import param_groups


class SwAV(Method):
    """Backbone -> SwAVHead (L2-normalised embeddings) -> bias-free prototypes -> swapped prediction.

    Codes come from the first `n_assign` crops (the two largest), by Sinkhorn over all ranks.
    Optional queue of past embeddings of those crops (upstream: 3840 from epoch 15 at B = 256,
    none at B = 4096). Prototype gradients are dropped for the first `freeze_prototypes_steps`
    iterations (default: one epoch).
    """

    name = "swav"
    recipe_preset = "swav"

    # upstream's training recipe (a GPU run); lr: x global batch / 256: 4.8 at the paper's B = 4096 (its B = 256
    # run used 0.6); batch_size: per GPU, as upstream (64 GPUs x 64 = 4096)
    paper = dict(optimizer="lars", lr=0.3, weight_decay=1e-6, warmup_epochs=10.0, epochs=800, batch_size=64,
                 multicrop="2x224+6x96")
    final_lr_fraction = 0.001  # 4.8 -> 0.0048 and 0.6 -> 0.0006 upstream
    warmup_start_fraction = 1 / 16  # 0.3 -> 4.8 upstream
    # CPU: base LR 4.8 and batch 32 (0.6; twice the steps of batch 64 for the same images) scored highest
    # in the short demo runs; kNN rises until about epoch 5 and levels off after (docs/RESULTS.md)
    cpu_overrides = {"multicrop": "2x32+4x16", "epochs": 5, "warmup_epochs": 0.0, "lr": 4.8, "batch_size": 32}
    accepts_local_crops = True
    # each rank queues its own embeddings (as upstream): its queue is its own state
    PER_RANK_BUFFERS = ("queue", "queue_filled")

    HEAD_PRESETS = {
        "paper": dict(hidden_dim=2048, out_dim=128, n_prototypes=3000, epsilon=0.05, freeze_prototypes_steps=None),
        # a few epochs on 10k images (docs/RESULTS.md): sharper codes and a short prototype freeze
        # learn faster; 64 prototypes for batches of 32-64 (the equipartition is soft when B << K)
        "small": dict(hidden_dim=512, out_dim=128, n_prototypes=64, epsilon=0.03, freeze_prototypes_steps=40),
    }

    def __init__(
        self,
        backbone: str | nn.Module | None = None,
        *,
        stem: str = "standard",
        on_gpu: bool = True,
        head_preset: str | None = None,
        hidden_dim: int | None = None,
        out_dim: int | None = None,
        n_prototypes: int | None = None,
        temperature: float = 0.1,
        epsilon: float | None = None,
        sinkhorn_iterations: int = 3,
        n_assign: int = 2,
        queue_length: int = 0,
        queue_start_epoch: int = 15,
        freeze_prototypes_steps: int | None = None,
        feature_dim: int | None = None,
        backbone_kwargs: dict | None = None,
    ):
        """`head_preset` "paper" (2048 / 128 / 3000 prototypes, epsilon 0.05, prototypes frozen for one
        epoch) or "small" (512 / 128 / 64, epsilon 0.03, frozen for 40 steps); None picks "paper" when
        `on_gpu`. Explicit values override the preset."""
        super().__init__(backbone, on_gpu=on_gpu, stem=stem, feature_dim=feature_dim,
                         backbone_kwargs=backbone_kwargs)
        sizes = self.head_sizes(head_preset, on_gpu, hidden_dim=hidden_dim, out_dim=out_dim,
                                n_prototypes=n_prototypes, epsilon=epsilon,
                                freeze_prototypes_steps=freeze_prototypes_steps)
        out_dim = sizes["out_dim"]
        self.head = SwAVHead(self.feature_dim, sizes["hidden_dim"], out_dim)
        self.prototypes = SwAVPrototypes(out_dim, sizes["n_prototypes"])
        self.temperature = temperature
        self.epsilon = sizes["epsilon"]
        self.sinkhorn_iterations = sinkhorn_iterations
        self.n_assign = n_assign
        self.queue_length = queue_length
        self.queue_start_epoch = queue_start_epoch
        self.freeze_prototypes_steps = sizes["freeze_prototypes_steps"]
        # (n_assign, Q / world, D) once the global batch is known; buffers so that they are checkpointed
        self.register_buffer("queue", torch.zeros(n_assign, 0, out_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._filled = 0  # queue_filled on the host: reading the buffer each step would wait for the device
        self._pending: torch.Tensor | None = None  # embeddings to queue once the step is taken

    @classmethod
    def check_recipe(cls, recipe, batch_size: int) -> None:
        first = recipe.groups[0].count
        if first < 2:
            raise ValueError(f"swav computes codes from 2 crops of the first view group; "
                             f"'{recipe.multicrop}' has {first}: use e.g. 2x224+6x96")

    def training_step(self, batch, progress: Progress):
        self.prototypes.normalize_()
        batch_size = batch.batch_size
        if batch.counts[0] < self.n_assign:
            raise ValueError(f"swav needs {self.n_assign} crops in the first view group, "
                             f"got {batch.counts[0]}")
        # the head sees all crops at once (one set of BN statistics, as upstream)
        embeddings = self.head(torch.cat(self.forward_groups(batch.views)))
        scores = self.prototypes(embeddings)
        # crop c is rows c*B..(c+1)*B: groups in order, view-major within a group
        crop_scores = list(scores.split(batch_size))

        queue_scores = self._queue_scores(batch_size, progress)
        codes = swav_codes(crop_scores, self.n_assign, self.epsilon, self.sinkhorn_iterations, queue_scores)
        loss = swapped_prediction_loss(crop_scores, codes, self.temperature)
        self._pending = embeddings[: self.n_assign * batch_size].detach() if self.queue.shape[1] else None
        return loss, self._metrics(loss, codes, queue_scores is not None)

    def after_step(self, progress: Progress) -> None:
        super().after_step(progress)
        if self._pending is not None:
            self._enqueue(self._pending, self._pending.shape[0] // self.n_assign)
            self._pending = None

    def before_optimizer_step(self, progress: Progress) -> None:
        frozen = self.freeze_prototypes_steps
        if progress.step < (progress.steps_per_epoch if frozen is None else frozen):
            # None, not zero (as upstream): the optimiser then skips them, weight decay and momentum too
            for parameter in self.prototypes.parameters():
                parameter.grad = None

    def param_groups(self, weight_decay: float) -> list[dict]:
        # upstream applies LARC and weight decay to every parameter, biases and BN included
        return param_groups(self, weight_decay, exclude_bias_and_norm=False)

    def _queue_scores(self, batch_size: int, progress: Progress) -> list[torch.Tensor] | None:
        """Scores of the queued embeddings under the current prototypes, once the queue is full."""
        if self.queue_length <= 0 or progress.epoch < self.queue_start_epoch:
            return None
        self._allocate_queue(batch_size)
        if self._filled < self.queue.shape[1]:
            return None
        with torch.no_grad():
            return [self.prototypes(self.queue[i]) for i in range(self.n_assign)]

    def _allocate_queue(self, batch_size: int) -> None:
        world = world_size()
        global_batch = batch_size * world
        length = self.queue_length - self.queue_length % global_batch
        if length == 0:
            raise ValueError(f"swav queue_length {self.queue_length} is shorter than the global batch "
                             f"{global_batch}")
        if self.queue.shape[1] != length // world:
            self.queue = self.queue.new_zeros(self.n_assign, length // world, self.queue.shape[2])
            self.queue_filled.zero_()
            self._filled = 0

    @torch.no_grad()
    def _enqueue(self, embeddings: torch.Tensor, batch_size: int) -> None:
        """FIFO: the newest batch goes in front, the oldest falls off the end."""
        capacity = self.queue.shape[1]
        self.queue[:, batch_size:] = self.queue[:, : capacity - batch_size].clone()
        self.queue[:, :batch_size] = embeddings.view(self.n_assign, batch_size, -1)
        self._filled = min(capacity, self._filled + batch_size)
        self.queue_filled.fill_(self._filled)

    @torch.no_grad()
    def _metrics(self, loss: torch.Tensor, codes: list[torch.Tensor], queue_in_use: bool) -> dict:
        q = torch.cat(codes)
        n_prototypes = q.shape[1]
        used = torch.zeros(n_prototypes, dtype=torch.bool, device=q.device)
        used[q.argmax(dim=1)] = True
        return {
            "loss": loss.detach(),
            # collapse shows as loss stuck at ln(K) with uniform codes: entropy -> ln(K), few prototypes used
            "code_entropy": -(q * q.clamp_min(1e-12).log()).sum(dim=1).mean(),
            "prototype_usage": used.float().mean(),
            "queue_in_use": float(queue_in_use),
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the queue's length depends on the global batch, so adopt the checkpoint's shape
        stored = state_dict.get(prefix + "queue")
        if stored is not None and stored.shape != self.queue.shape:
            self.queue = self.queue.new_zeros(stored.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "queue_filled" in state_dict:
            self._filled = int(self.queue_filled)
