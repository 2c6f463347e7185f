"""MoCo v2 (Chen et al. 2020), as facebookresearch/moco trains it."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.distributed import gather_with_grad, rank, world_size
from models.heads import mlp
from models.methods.base import Method, Progress
from models.zoo_losses import info_nce_loss


class MoCoV2(Method):
    """Query encoder (backbone -> MLP without BN) against an EMA key encoder and a queue of past keys.

    One direction per step, as upstream: view 1 is the query, view 2 the key. Under DDP the key
    encoder runs on a batch shuffled across ranks (shuffle-BN): SyncBN needs CUDA, and per-rank BN
    statistics of the key batch would let queries cheat. In one process BN sees the whole batch and
    shuffling changes nothing, so it is skipped.
    """

    name = "mocov2"
    recipe_preset = "mocov2"
    EMA_PAIRS = (("key_backbone", "backbone"), ("key_projector", "projector"))

    # upstream's training recipe (a GPU run); lr: x global batch / 256; batch_size: per GPU: 8 x 32 = 256 upstream
    paper = dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, epochs=200, batch_size=32, multicrop="2x224")
    cpu_overrides = {"multicrop": "2x32", "epochs": 2, "batch_size": 64}
    ema_cosine = False
    sync_batch_norm = False  # shuffle-BN instead: the key encoder's batch is shuffled across ranks
    REPLICATED_BUFFERS = ("queue", "queue_position")  # filled from keys gathered over all ranks
    default_temperature = 0.2

    HEAD_PRESETS = {"paper": dict(hidden_dim=2048, out_dim=128, queue_length=65536, momentum=0.999),
                    # a short run on 10k images: a queue of ~half the set, and a key encoder that moves
                    "small": dict(hidden_dim=512, out_dim=128, queue_length=4096, momentum=0.99)}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True,
                 head_preset: str | None = None, hidden_dim: int | None = None, out_dim: int | None = None,
                 queue_length: int | None = None, momentum: float | None = None,
                 temperature: float | None = None, **backbone_options):
        """`hidden_dim` None in the preset: a linear head (MoCo v1)."""
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        sizes = self.head_sizes(head_preset, on_gpu, hidden_dim=hidden_dim, out_dim=out_dim,
                                queue_length=queue_length, momentum=momentum)
        hidden = [sizes["hidden_dim"]] if sizes["hidden_dim"] else []
        self.projector = mlp([self.feature_dim, *hidden, sizes["out_dim"]], batch_norm=False)
        self.add_teachers(sizes["momentum"])
        self.temperature = self.default_temperature if temperature is None else temperature
        self.register_buffer("queue", F.normalize(torch.randn(sizes["queue_length"], sizes["out_dim"]), dim=1))
        self.register_buffer("queue_position", torch.zeros((), dtype=torch.long))
        self._position = 0  # queue_position on the host: reading the buffer each step would wait for the device
        self._pending_keys: torch.Tensor | None = None

    def training_step(self, batch, progress: Progress):
        global_batch = batch.batch_size * world_size()
        if self.queue.shape[0] % global_batch:
            raise ValueError(f"{self.name} queue_length {self.queue.shape[0]} is not a multiple of the global batch "
                             f"{global_batch}: pick one that is")
        query_view, key_view = batch.views[0].split(batch.batch_size)
        queries = self.projector(self.backbone(query_view))
        with torch.no_grad():
            keys = self._keys(key_view)
        # a copy: the enqueue below edits the queue in place, and backward still needs these keys
        loss = info_nce_loss(queries, keys, self.queue.clone(), self.temperature)
        self._pending_keys = F.normalize(keys.float(), dim=1)
        return loss, {"loss": loss.detach()}

    def after_step(self, progress: Progress) -> None:
        super().after_step(progress)
        if self._pending_keys is not None:
            self._enqueue(self._pending_keys)
            self._pending_keys = None

    @torch.no_grad()
    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        if world_size() == 1:
            return self.key_projector(self.key_backbone(images))
        everyone = gather_with_grad(images)
        order = torch.randperm(everyone.shape[0], device=images.device)
        dist.broadcast(order, src=0)
        mine = order.view(world_size(), -1)[rank()]
        keys = gather_with_grad(self.key_projector(self.key_backbone(everyone[mine])))
        # keys[j] belongs to sample order[j]: put them back in sample order, then take this rank's
        restored = torch.empty_like(keys)
        restored[order] = keys
        return restored.view(world_size(), -1, keys.shape[1])[rank()]

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        everyone = gather_with_grad(keys)
        start = self._position
        self.queue[start : start + everyone.shape[0]] = everyone
        self._position = (start + everyone.shape[0]) % self.queue.shape[0]
        self.queue_position.fill_(self._position)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "queue_position" in state_dict:
            self._position = int(self.queue_position)
