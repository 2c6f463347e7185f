"""IPT, the Image Processing Transformer (Chen, Wang, Guo, Xu, Deng, Liu, Ma, Xu, Xu & Gao 2021): one
transformer body pretrained for several restoration tasks at once from clean images alone.

The input stack corrupts each clean crop (`pipelines.corruption`, from the recipe's `restoration` pretext
part: bicubic x2/x3/x4, Gaussian noise sigma 30/50, rain streaks); this file is the model and the loss. Per
task a head (a 3x3 conv and two residual blocks) embeds the corrupted input at its own resolution; the
shared body cuts the feature map into 3x3 patches (tokens of features x 9 values), runs a transformer
encoder and a decoder whose queries carry a learned embedding of the task, and folds the tokens back; per
task a tail (an upsampler for SR, a conv for the others) reconstructs the clean crop. Loss: L1 to the clean
crop + 0.1 x the supervised contrastive term on the decoder's patch features (`models.restoration_losses`).

Samples of a batch are grouped by task (one head, body and tail call per task present): SR inputs are
smaller than the others, so tasks cannot share one tensor. What a run exports is the whole restoration
model (`ipt.safetensors` + `ipt.json`, `export_model` / `load_restoration_model`), not a backbone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.methods.base import Method, Progress
from models.restoration_losses import l1_loss, patch_contrastive_loss
from models.vit import sincos_2d
from pipelines.files import atomic_write, atomic_write_text
from pipelines.spec import RESTORATION_TASKS, Restoration, restoration_task

DIV2K_MEAN = (0.4488, 0.4371, 0.4040)  # IPT's MeanShift: subtracted before the head, added after the tail
MODEL_WEIGHTS, MODEL_INFO = "ipt.safetensors", "ipt.json"


# ------------------------------------------------------------------------------------------------ modules


def conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)


class ResidualBlock(nn.Module):
    """EDSR's residual block, as IPT's heads use it: conv, ReLU, conv, plus the input."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.body = nn.Sequential(conv(channels, channels, kernel), nn.ReLU(inplace=True), conv(channels, channels, kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def upsampler(scale: int, channels: int) -> list[nn.Module]:
    """EDSR's upsampler: for a power of two, log2(scale) stages of a 3x3 conv to 4x the channels and a x2
    pixel shuffle; otherwise one conv to scale² x the channels and a x scale pixel shuffle; nothing at 1."""
    if scale == 1:
        return []
    if scale & (scale - 1) == 0:
        layers: list[nn.Module] = []
        for _ in range(scale.bit_length() - 1):
            layers += [conv(channels, 4 * channels, 3), nn.PixelShuffle(2)]
        return layers
    return [conv(channels, scale * scale * channels, 3), nn.PixelShuffle(scale)]


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class EncoderLayer(nn.Module):
    """IPT's encoder layer: pre-norm self-attention and MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class DecoderLayer(nn.Module):
    """IPT's decoder layer: pre-norm self-attention with the query embedding added to queries and keys,
    attention to the encoder's output (the query embedding added to the queries), an MLP; residuals."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = mlp(dim, hidden)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.self_attention(y + query, y + query, y, need_weights=False)[0]
        y = self.norm2(x)
        x = x + self.cross_attention(y + query, memory, memory, need_weights=False)[0]
        return x + self.mlp(self.norm3(x))


class TransformerBody(nn.Module):
    """The shared body: a feature map (n, C, h, w) -> patch x patch tokens of C·patch² values (the map
    padded by replication to a multiple of the patch, cropped back after), a linear encoding with a
    residual, 2-D sin-cos positions, `depth` encoder layers, `depth` decoder layers whose query embedding is
    the task's learned vector plus the positions, an MLP head with a residual, folded back to (n, C, h, w).
    IPT learns a query per task and token and positions for its one 48-px input; here inputs of each task
    have their own token grid (SR inputs are smaller), so the task query is one vector and the positions
    are fixed sin-cos for any grid."""

    def __init__(self, channels: int, patch: int, depth: int, heads: int, mlp_ratio: float, tasks: int):
        super().__init__()
        self.patch = patch
        dim = channels * patch * patch
        hidden = int(dim * mlp_ratio)
        self.dim = dim
        self.encoding = nn.Linear(dim, dim)
        self.encoder = nn.ModuleList(EncoderLayer(dim, heads, hidden) for _ in range(depth))
        self.decoder = nn.ModuleList(DecoderLayer(dim, heads, hidden) for _ in range(depth))
        self.queries = nn.Parameter(torch.zeros(tasks, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.head = mlp(dim, hidden)

    def positions(self, rows: int, cols: int, device) -> torch.Tensor:
        r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
        return sincos_2d(r.flatten(), c.flatten(), self.dim)

    def forward(self, x: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the body's output map (n, C, h, w), the decoder's tokens (n, tokens, dim))."""
        height, width = x.shape[-2:]
        p = self.patch
        padded = F.pad(x, [0, -width % p, 0, -height % p], mode="replicate")
        grid = (padded.shape[-2] // p, padded.shape[-1] // p)
        tokens = F.unfold(padded, p, stride=p).transpose(1, 2)  # (n, tokens, C·p²)
        tokens = self.encoding(tokens) + tokens
        position = self.positions(*grid, x.device).to(tokens.dtype)
        memory = tokens + position
        for layer in self.encoder:
            memory = layer(memory)
        query = self.queries[task].to(tokens.dtype) + position
        decoded = memory
        for layer in self.decoder:
            decoded = layer(decoded, memory, query)
        out = self.head(decoded) + decoded
        folded = F.fold(out.transpose(1, 2), padded.shape[-2:], p, stride=p)
        return folded[..., :height, :width], decoded


class ImageProcessingTransformer(nn.Module):
    """Heads, the shared body and tails, one head and tail per task: `forward(images, task)` maps a
    corrupted batch of one task (RGB in [0, 1]; SR inputs 1/scale of the clean size) to (the restored
    images, the decoder's patch features)."""

    def __init__(self, tasks=RESTORATION_TASKS, features: int = 64, depth: int = 12, heads: int = 12,
                 patch: int = 3, block_kernel: int = 5, mlp_ratio: float = 4.0):
        super().__init__()
        self.tasks = tuple(tasks)
        self.config = dict(tasks=list(self.tasks), features=features, depth=depth, heads=heads, patch=patch,
                           block_kernel=block_kernel, mlp_ratio=mlp_ratio)
        dim = features * patch * patch
        if dim % heads or dim % 4:
            raise ValueError(f"ipt: the token width features x patch² = {dim} must be divisible by heads={heads} and "
                             f"by 4 (sin-cos positions): change features, patch or heads")
        self.register_buffer("mean", torch.tensor(DIV2K_MEAN).view(1, 3, 1, 1), persistent=False)
        self.heads = nn.ModuleDict({
            task: nn.Sequential(conv(3, features, 3), ResidualBlock(features, block_kernel),
                                ResidualBlock(features, block_kernel)) for task in self.tasks})
        self.body = TransformerBody(features, patch, depth, heads, mlp_ratio, len(self.tasks))
        self.tails = nn.ModuleDict({
            task: nn.Sequential(*upsampler(self.scale(task), features), conv(features, 3, 3)) for task in self.tasks})

    @property
    def num_features(self) -> int:
        return self.body.dim

    @staticmethod
    def scale(task: str) -> int:
        kind, amount = restoration_task(task)
        return amount if kind == "sr" else 1

    def forward(self, images: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        if task not in self.heads:
            raise ValueError(f"ipt: this model has no {task!r} head; its tasks: {'+'.join(self.tasks)}")
        x = self.heads[task](images - self.mean.to(images.dtype))
        body, decoded = self.body(x, self.tasks.index(task))
        return self.tails[task](body + x) + self.mean.to(images.dtype), decoded


# ------------------------------------------------------------------------------------------------ method


class IPT(Method):
    """The restoration model as the method's `backbone` (what the loop compiles and checkpoints), trained on
    L1 + contrastive_weight x `patch_contrastive_loss` (temperature T) of each task group's decoder features,
    averaged over the groups. No kNN monitor: its periodic evaluation is PSNR per task (`evaluation`)."""

    name = "ipt"
    recipe_preset = "ipt"
    evaluation = "restoration"
    # the paper: Adam at 5e-5 decayed to 2e-5 over 300 epochs of ImageNet, batch 256 (8 per GPU on 32 GPUs),
    # 48-px patches
    paper = dict(optimizer="adamw", lr=5e-5, weight_decay=0.0, warmup_epochs=0.0, epochs=300, batch_size=8,
                 multicrop="1x48", grad_clip=None)
    final_lr_fraction = 0.4
    # the demo: 24-28 px squares of the 28-px images resized to 24 (never upscaled; 24 is divisible by 2, 3, 4)
    cpu_overrides = dict(multicrop="1x24@0.73-1", epochs=5, batch_size=32, lr=1e-3, warmup_epochs=0.2)
    # sizes and the contrastive term's form: on CPU the paper's form (the positive left out of the denominator)
    # falls below zero within 250 steps and x2, x3, x4 and sigma 30 score under their trivial baselines; the
    # SupCon form, the positive in the denominator, does not (docs/RESULTS.md)
    HEAD_PRESETS = {"paper": dict(features=64, depth=12, heads=12, patch=3, block_kernel=5, mlp_ratio=4.0,
                                  contrastive_form="paper"),
                    "small": dict(features=16, depth=2, heads=4, patch=3, block_kernel=3, mlp_ratio=2.0,
                                  contrastive_form="supcon")}

    def __init__(self, backbone: str | None = None, *, on_gpu: bool = True, stem: str = "standard",
                 backbone_kwargs: dict | None = None, head_preset: str | None = None, features: int | None = None,
                 depth: int | None = None, heads: int | None = None, patch: int | None = None,
                 block_kernel: int | None = None, mlp_ratio: float | None = None, tasks: str | list = RESTORATION_TASKS,
                 assign: str = "sample", contrastive_weight: float = 0.1, temperature: float = 0.07,
                 contrastive_form: str | None = None):
        """`tasks`: `sr2+noise30+...` (`pipelines.spec.restoration_task`); `assign`: sample | all (the
        recipe's `Restoration`); sizes: `features` (channels of heads and tails), `depth` (encoder and decoder
        layers each), `heads`, `patch` (token patch side), `block_kernel`, `mlp_ratio`; the loss:
        `contrastive_weight`, `temperature`, `contrastive_form` (paper | supcon, `models.restoration_losses`)."""
        if backbone not in (None, "ipt") or backbone_kwargs:
            raise ValueError("ipt builds its own restoration transformer: leave --backbone and --backbone-options "
                             "unset (its sizes are --method-options features=,depth=,heads=,patch=)")
        self.spec = Restoration(tasks=tuple(tasks.split("+")) if isinstance(tasks, str) else tuple(tasks),
                                assign=assign)
        self.spec.for_crop(0)  # the task names and the assignment, checked before anything is built
        sizes = self.head_sizes(head_preset, on_gpu, features=features, depth=depth, heads=heads, patch=patch,
                                block_kernel=block_kernel, mlp_ratio=mlp_ratio, contrastive_form=contrastive_form)
        contrastive_form = sizes.pop("contrastive_form")
        network = ImageProcessingTransformer(self.spec.tasks, **sizes)
        super().__init__(network, on_gpu=on_gpu, feature_dim=network.num_features)
        self.contrastive_weight = float(contrastive_weight)
        self.temperature = float(temperature)
        self.contrastive_form = contrastive_form
        patch_contrastive_loss(torch.zeros(1, 1, 1), form=contrastive_form)  # a bad form: one line, now

    @classmethod
    def default_backbone(cls, on_gpu: bool) -> tuple[str, dict[str, Any]]:
        return "ipt", {}

    @classmethod
    def check_recipe(cls, recipe, batch_size: int) -> None:
        if len(recipe.groups) != 1 or recipe.groups[0].count != 1:
            raise ValueError(f"ipt corrupts one clean crop per image; --multicrop '{recipe.multicrop}' is not that: "
                             f"use e.g. 1x48 (1x24 on CPU)")

    def adapt_recipe(self, recipe):
        """The recipe with this model's tasks as its `restoration` pretext part."""
        return recipe.with_pretext([self.spec])

    def lr_scaling(self, global_batch: int) -> float:
        """Adam at the paper's LR whatever the batch: `--lr` is used as given."""
        return 1.0

    def training_step(self, batch, progress: Progress):
        made = batch.pretext.get("restoration") if getattr(batch, "pretext", None) else None
        if made is None:
            raise ValueError("ipt: the batch has no restoration inputs; train on a recipe whose pretext part makes "
                             "them (adapt_recipe)")
        outputs, targets, contrastive = [], [], []
        for task, inputs in made.inputs.items():
            restored, decoded = self.backbone(inputs, task)
            outputs.append(restored)
            targets.append(made.targets[task])
            contrastive.append(patch_contrastive_loss(decoded, self.temperature, self.contrastive_form))
        l1 = l1_loss(outputs, targets)
        contrast = torch.stack(contrastive).mean()
        loss = l1 + self.contrastive_weight * contrast
        return loss, {"loss": loss.detach(), "l1_loss": l1.detach(), "contrastive_loss": contrast.detach()}

    @torch.no_grad()
    def restore(self, inputs: torch.Tensor, task: str) -> torch.Tensor:
        """The restored images of one task's corrupted `inputs`, clipped to [0, 1]."""
        return self.backbone(inputs, task)[0].clamp(0.0, 1.0)

    def export_model(self, folder: Path, input_size: int, **extra) -> Path:
        """`export_restoration_model` of this run's network."""
        return export_restoration_model(Path(folder), self.backbone, input_size=input_size, **extra)


def export_restoration_model(folder: Path, network: ImageProcessingTransformer, input_size: int | None = None,
                             **extra) -> Path:
    """Writes `folder`/ipt.safetensors (the network's weights) and then ipt.json (what builds it:
    `architecture`, the keyword arguments of `ImageProcessingTransformer`; the clean crop size it trained at;
    the value range; `extra`), each atomically; returns the weights' path. `load_restoration_model` reads them."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_WEIGHTS
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
    atomic_write(path, lambda temporary: save_file(state, str(temporary)))
    info = {"method": "ipt", "file": path.name, "architecture": network.config, "input_size": input_size,
            "value_range": [0.0, 1.0], **extra}
    atomic_write_text(folder / MODEL_INFO, json.dumps(info, indent=2))
    return path


def load_restoration_model(folder: str | Path) -> tuple[ImageProcessingTransformer, dict]:
    """(the exported network in eval mode on the CPU, its ipt.json) from a folder `export_restoration_model`
    wrote (a run directory after training)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = json.loads((folder / MODEL_INFO).read_text())
    network = ImageProcessingTransformer(**info["architecture"])
    network.load_state_dict(load_file(str(folder / info["file"])))
    return network.eval(), info
