"""The DALI stage: read shards, decode once, then one random-resized crop + flip per view.

Geometry only; photometric work happens later on the training device (pipelines/photometric.py).
Per view the pipeline also outputs the crop box in original-image pixels (y0, x0, h, w) and the flip
flag, so masked and dense methods can relate views to each other. The flip is folded into the
resize by swapping the ROI's x ends (DALI flips a ROI whose start exceeds its end), so it costs nothing.

With a GPU (`DaliConfig.device_id` set) decoding is mixed and every output but the keys leaves DALI on
the GPU: the crops because everything after the decoder runs there, the labels, image sizes, boxes and
flips (computed on the CPU from the encoded bytes) because DALI copies them over in its own prefetching.
The keys stay on the CPU, where they are decoded to strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dali_math
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipelines.shards import ShardSet
from pipelines.spec import Recipe

READER_NAME = "reader"
_INTERPOLATION = {
    "nearest": types.INTERP_NN,
    "bilinear": types.INTERP_LINEAR,
    "bicubic": types.INTERP_CUBIC,
    "lanczos": types.INTERP_LANCZOS3,
}


@dataclass(frozen=True)
class DaliConfig:
    """How the DALI stage runs. `device_id=None` means CPU-only (decode on the CPU)."""

    batch_size: int
    shard_id: int = 0
    num_shards: int = 1
    seed: int = 0
    device_id: int | None = None
    num_threads: int = 2
    prefetch_queue_depth: int = 2
    shuffle_buffer: int = 4096
    hw_decoder_load: float = 0.65
    shuffle: bool = True
    drop_last: bool = True  # False (evaluation): the last, partial batch of an epoch is kept

    @property
    def decoder_device(self) -> str:
        return "cpu" if self.device_id is None else "mixed"

    @property
    def reader_seed(self) -> int:
        # Per-rank stream for the shuffle buffer and crops; the shard-order shuffle uses the run seed.
        return (self.seed * 1_000_003 + self.shard_id * 7919 + 17) % (2**31)


def output_names(recipe: Recipe) -> list[str]:
    names = ["label", "key", "image_size"]
    for group_index, group in enumerate(recipe.groups):
        for view in range(group.count):
            names += [f"view_{group_index}_{view}", f"box_{group_index}_{view}", f"flip_{group_index}_{view}"]
    return names


def _key_length(shards: ShardSet) -> int:
    """An upper bound on the `source_info` string ("tar:offset:member") so keys pad to a dense batch.

    Tar member names are at most 255 bytes (USTAR prefix + name) and offsets at most 20 digits.
    """
    return max(len(str(path)) for path in shards.tars) + 1 + 20 + 1 + 256


def _crop_box(shape_hw, group):
    """(y0, x0, h, w) as float DALI nodes: random-resized, or the centred square for evaluation."""
    if group.center_crop is not None:
        shape = fn.cast(shape_hw, dtype=types.FLOAT)
        side = dali_math.min(shape[0], shape[1]) * group.center_crop
        return (shape[0] - side) * 0.5, (shape[1] - side) * 0.5, side, side
    anchor, size = fn.random_crop_generator(
        shape_hw, random_area=list(group.scale), random_aspect_ratio=list(group.ratio)
    )
    anchor = fn.cast(anchor, dtype=types.FLOAT)
    size = fn.cast(size, dtype=types.FLOAT)
    return anchor[0], anchor[1], size[0], size[1]


def _random_view(image, shape_hw, group):
    """One random-resized crop + flip of `image`; returns (crop as uint8 CHW, box, flip)."""
    y0, x0, h, w = _crop_box(shape_hw, group)
    flip = fn.random.coin_flip(probability=group.flip_p, dtype=types.UINT8)
    flip_f = fn.cast(flip, dtype=types.FLOAT)
    start = fn.stack(y0, x0 + flip_f * w)
    end = fn.stack(y0 + h, x0 + w - flip_f * w)
    crop = fn.resize(
        image,
        roi_start=start,
        roi_end=end,
        roi_relative=False,
        size=[group.size, group.size],
        interp_type=_INTERPOLATION[group.interpolation],
        antialias=True,
    )
    # planar (CHW) for the photometric stage: DALI's transpose, in its prefetching threads, cost less
    # than a torch permute of the batch in the consumer (docs/PERFORMANCE.md)
    crop = fn.transpose(crop, perm=[2, 0, 1])
    box = fn.stack(y0, x0, h, w)
    return crop, box, flip


STAGES = ("read", "decode", "crop")


def define_graph(recipe: Recipe, shards: ShardSet, config: DaliConfig, upto: str = "crop") -> tuple:
    """The pipeline's output DataNodes (see `build_pipeline`); call it inside a DALI pipeline's scope."""
    jpegs, labels = fn.readers.webdataset(
        paths=[str(path) for path in shards.tars],
        index_paths=[str(path) for path in shards.indexes],
        ext=["jpg", "lab.i32"],
        dtypes=[types.UINT8, types.INT32],
        missing_component_behavior="error",
        shard_id=config.shard_id,
        num_shards=config.num_shards,
        random_shuffle=config.shuffle,
        initial_fill=max(1, min(config.shuffle_buffer, shards.num_samples // config.num_shards)),
        shuffle_after_epoch=config.shuffle,
        **({"shuffle_after_epoch_seed": config.seed} if config.shuffle else {}),
        pad_last_batch=True,
        dont_use_mmap=True,
        name=READER_NAME,
    )
    if upto == "read":
        return jpegs, labels
    decode_args = {"hw_decoder_load": config.hw_decoder_load} if config.decoder_device == "mixed" else {}
    images = fn.decoders.image(jpegs, device=config.decoder_device, output_type=types.RGB, **decode_args)
    if upto == "decode":
        return images, labels

    # The small CPU-computed outputs go to the GPU inside DALI, whose prefetching copies them ahead of
    # time: a copy from pageable memory in the consumer (`.to(device)`) would block the host on the GPU.
    def on_device(node):
        return node if config.device_id is None else node.gpu()

    keys = fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0, shape=[_key_length(shards)])
    shape_hw = fn.peek_image_shape(jpegs)[0:2]
    outputs = [on_device(labels), keys, on_device(fn.cast(shape_hw, dtype=types.INT32))]
    for group in recipe.groups:
        for _ in range(group.count):
            crop, box, flip = _random_view(images, shape_hw, group)
            outputs += [crop, on_device(box), on_device(flip)]
    return tuple(outputs)


def build_pipeline(
    recipe: Recipe, shards: ShardSet, config: DaliConfig, checkpoint: str | None = None, upto: str = "crop"
):
    """A DALI pipeline whose outputs follow `output_names(recipe)`.

    `upto` stops the graph early ("read": encoded bytes, "decode": full images) so the profiler can
    time each stage on the same shards; training always uses the full "crop" graph.
    """
    if upto not in STAGES:
        raise ValueError(f"upto={upto!r} is not one of {STAGES}")

    @pipeline_def(enable_checkpointing=True)
    def views_pipeline():
        return define_graph(recipe, shards, config, upto)

    pipe = views_pipeline(
        batch_size=config.batch_size,
        num_threads=config.num_threads,
        device_id=config.device_id,
        seed=config.reader_seed,
        prefetch_queue_depth=config.prefetch_queue_depth,
        checkpoint=checkpoint,
    )
    pipe.build()
    return pipe


def build_iterator(recipe: Recipe, shards: ShardSet, config: DaliConfig, checkpoint: str | None = None):
    """A DALIGenericIterator; for training only whole batches (the partial last one is dropped)."""
    pipe = build_pipeline(recipe, shards, config, checkpoint)
    return DALIGenericIterator(
        [pipe],
        output_map=output_names(recipe),
        reader_name=READER_NAME,
        last_batch_policy=LastBatchPolicy.DROP if config.drop_last else LastBatchPolicy.PARTIAL,
        auto_reset=True,
    )
