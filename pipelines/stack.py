"""`InputStack`: shards in, `Batch`es of ready views on the training device out.

One iterator over as many epochs as the caller wants (an epoch is `steps_per_epoch` whole batches per
rank), with `state_dict()`/`load_state_dict()` for exact mid-epoch resume and a running total of the
time the consumer waited for data.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.dali_stage import DaliConfig, build_iterator
from pipelines.masking import make_masks
from pipelines.photometric import PhotometricStage
from pipelines.pretext import PretextInputs, PretextStage
from pipelines.pretext import lightness_views
from pipelines.shards import SamplePositions, ShardError, ShardSet, first_problem, open_shard_set
from pipelines.spec import Recipe


@dataclass
class Batch:
    """Views grouped by crop size; within a group, view-major: view v of sample i is row v * B + i.

    `boxes` are crop boxes in original-image pixels (y0, x0, h, w) and `flips` whether the view was
    mirrored horizontally after cropping; `image_sizes` holds each original (H, W). `masks` (or None)
    covers the first `recipe.masking.views` views of group 0: (views * B, patches), True = hidden.
    `labels` is -1 for unlabeled samples. `pretext` maps each of the recipe's pretext tasks to its inputs
    (`pipelines.pretext.PretextInputs`), made from group 0's views. `indices` (int64, on the device) is
    each sample's fixed position in the shard set (`pipelines.shards.SamplePositions`: the same on every
    rank and across resume) when the stack was built with `sample_indices=True`, else None.
    """

    views: list[torch.Tensor]
    boxes: list[torch.Tensor]
    flips: list[torch.Tensor]
    image_sizes: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None
    raw_keys: torch.Tensor
    pretext: dict[str, PretextInputs] = field(default_factory=dict)
    indices: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    @property
    def counts(self) -> list[int]:
        return [group.shape[0] // self.batch_size for group in self.views]

    def view(self, group: int, index: int) -> torch.Tensor:
        size = self.batch_size
        return self.views[group][index * size : (index + 1) * size]

    @property
    def keys(self) -> list[str]:
        """Sample keys (tar member names without extension), decoded on demand."""
        keys = []
        for row in self.raw_keys.numpy():
            source = bytes(row).rstrip(b"\0").decode()
            keys.append(source.rsplit(":", 1)[-1].split(".", 1)[0])
        return keys


def dali_reason(error: str) -> str:
    """The line of a DALI pipeline error that says what went wrong (after "encountered:"; DALI's
    assertions without their condition), e.g. "nvImageCodec failure: '#3'"."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
    reason = next((line for line in after if not line.startswith("Current pipeline object")), error.strip())
    return re.sub(r'^Assert on ".*" failed: ', "", reason)


def dali_config(batch_size: int, device: torch.device | str, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                num_threads: int = 2, prefetch: int = 2, hw_decoder_load: float = 0.65,
                training: bool = True) -> DaliConfig:
    """How an input stack on `device` runs DALI: on a CUDA device, mixed decoding (nvJPEG) on that GPU
    (the current one for a bare "cuda"), elsewhere everything on the CPU. `training=False` reads in shard
    order and keeps the last, partial batch."""
    device = torch.device(device)
    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    return DaliConfig(
        batch_size=batch_size,
        shard_id=rank,
        num_shards=world_size,
        seed=seed,
        device_id=device_id,
        num_threads=num_threads,
        prefetch_queue_depth=prefetch,
        hw_decoder_load=hw_decoder_load,
        shuffle=training,
        drop_last=training,
    )


class InputStack:
    """Reads `data` with DALI (rank `rank` of `world_size`) and applies `recipe` on `device`.

    `training=False` (feature extraction) reads in shard order without shuffling and keeps the last,
    partial batch, so one epoch visits every sample exactly once. `sample_indices=True` gives every batch
    its samples' positions in the shard set (`Batch.indices`), from a table built once from the index files.
    """

    def __init__(
        self,
        recipe: Recipe,
        data: str | Path | ShardSet,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
        num_threads: int = 2,
        prefetch: int = 2,
        hw_decoder_load: float = 0.65,
        need_labels: bool = False,
        training: bool = True,
        sample_indices: bool = False,
    ):
        self.recipe = recipe
        self.shards = data if isinstance(data, ShardSet) else open_shard_set(data, need_labels=need_labels)
        self.device = torch.device(device)
        if batch_size < 1:
            raise ShardError(f"--batch-size {batch_size} must be positive")
        per_rank = self.shards.num_samples // world_size
        if training and batch_size > per_rank:
            raise ShardError(
                f"--batch-size {batch_size} is larger than the {per_rank} samples each of {world_size} "
                f"process(es) reads from {self.shards.root}: lower --batch-size or use more data"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.dali = dali_config(batch_size, self.device, rank=rank, world_size=world_size, seed=seed,
                                num_threads=num_threads, prefetch=prefetch, hw_decoder_load=hw_decoder_load,
                                training=training)
        # training drops the partial last batch; evaluation keeps it (and reads every sample once)
        if training:
            self.steps_per_epoch = per_rank // batch_size
        else:
            self.steps_per_epoch = math.ceil(math.ceil(self.shards.num_samples / world_size) / batch_size)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed((seed * 1_000_003 + rank * 104_729 + 99_991) % (2**63))
        self.photometric = PhotometricStage(recipe, self.device, self.generator)
        self.pretext = PretextStage(recipe.pretext, self.device, batch_size if training else None)
        self.positions = SamplePositions(self.shards) if sample_indices else None
        self.epoch = 0
        self.step_in_epoch = 0
        self.wait_seconds = 0.0
        self._failure: str | None = None  # a failed read: every later `next` raises it again
        self._start()

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        started = time.perf_counter()
        if self._failure is None:
            try:
                try:
                    outputs = next(self._iterator)[0]
                except StopIteration:  # end of an epoch; the iterator has reset itself
                    self.epoch += 1
                    self.step_in_epoch = 0
                    outputs = next(self._iterator)[0]
            except RuntimeError as error:  # DALI's: a sample that does not decode, a tar cut short or gone
                self._failure = self._read_failure(str(error))
        if self._failure is not None:
            raise ShardError(self._failure)
        batch = self._assemble(outputs)
        self.step_in_epoch += 1
        self.wait_seconds += time.perf_counter() - started
        return batch

    def _start(self, checkpoint: str | None = None) -> None:
        """A new DALI iterator (at `checkpoint`). It reads its first batch as it is built: a failed read is
        raised by the next `next`, so every rank of a run meets its data errors in the training loop."""
        self._failure = None
        try:
            self._iterator = build_iterator(self.recipe, self.shards, self.dali, checkpoint=checkpoint)
        except RuntimeError as error:
            self._iterator, self._failure = None, self._read_failure(str(error))

    def _read_failure(self, dali_error: str) -> str:
        """One line for a failed read: DALI's reason and the first bad sample or shard `make_shards.py --verify`
        finds (DALI names neither the shard nor the sample of an image that does not decode; which samples a
        rank reads in an epoch is DALI's shuffle, so the set is read in order, up to the first bad tar)."""
        if self.shards.remote:  # --verify reads local sets: ask the store what changed instead
            from pipelines.s3 import read_failure

            return str(read_failure(self.shards, dali_error))
        where = f" on rank {self.rank}" if self.dali.num_shards > 1 else ""
        verify = f"tools/make_shards.py --verify {self.shards.root}"
        try:
            problem = first_problem(self.shards.root)
        except OSError:  # a tar gone between the checks' steps, a set not on a local file system
            problem = None
        if problem is None:
            return (f"cannot read {self.shards.root}{where} ({dali_reason(dali_error)}) and {verify} finds no "
                    f"bad sample now: check the storage the shards are on and run again")
        return (f"cannot read {self.shards.root}{where} ({dali_reason(dali_error)}): {problem}; rebuild or re-copy "
                f"that shard and check the set with {verify}")

    def _assemble(self, outputs: dict[str, torch.Tensor]) -> Batch:
        # DALI hands every output but the keys over on `device` already (pipelines/dali_stage.py), as
        # zero-copy views of its buffers; each is copied out here (cat, clone, a dtype change)
        device = self.device
        views, boxes, flips = [], [], []
        for group_index, group in enumerate(self.recipe.groups):
            names = [f"{group_index}_{view}" for view in range(group.count)]
            crops = torch.cat([outputs[f"view_{name}"] for name in names]).to(device, non_blocking=True)
            views.append(self.photometric(crops, group_index))
            boxes.append(torch.cat([outputs[f"box_{name}"] for name in names]))
            flips.append(torch.cat([outputs[f"flip_{name}"] for name in names]).bool())
        masks = None
        if self.recipe.masking is not None:
            size = self.recipe.groups[0].size
            masks = make_masks(self.recipe.masking, self.batch_size, size, self.generator, device)
        pretext = self.pretext(views[0], self.generator) if self.recipe.pretext else {}
        if self.recipe.lightness_input:  # a colorization backbone sees lightness, in training and evaluation
            views = lightness_views(views, pretext)
        raw_keys = outputs["key"].cpu().clone()
        indices = None
        if self.positions is not None:
            indices = torch.from_numpy(self.positions(raw_keys.numpy())).to(device, non_blocking=True)
        return Batch(
            views=views,
            boxes=boxes,
            flips=flips,
            image_sizes=outputs["image_size"].clone(),
            labels=outputs["label"].view(-1).long(),
            masks=masks,
            raw_keys=raw_keys,
            pretext=pretext,
            indices=indices,
        )

    def state_dict(self) -> dict:
        """Everything needed to continue with the identical next batch."""
        return {
            "dali": list(self._iterator.checkpoints()),
            "generator": self.generator.get_state().cpu(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "multicrop": self.recipe.multicrop,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "num_shards": self.dali.num_shards,
        }

    def load_state_dict(self, state: dict) -> None:
        expected = (self.recipe.multicrop, self.batch_size, self.rank, self.dali.num_shards)
        found = (state["multicrop"], state["batch_size"], state["rank"], state["num_shards"])
        if expected != found:
            raise ShardError(
                f"input-stack state was saved for (multicrop, batch size, rank, ranks) = {found}, "
                f"this run has {expected}: resume with the same settings"
            )
        self._start(checkpoint=state["dali"][0])
        self.generator.set_state(state["generator"].to(self.generator.get_state().device))
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
