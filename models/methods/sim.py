"""SIM, Siamese Image Modeling (Tao et al. 2023), as OpenGVLab/Siamese-Image-Modeling pretrains it,
plus the project's global UniGrad term (loss = alpha_global * global + alpha_dense * dense)."""

from __future__ import annotations

import torch
from torch import nn

from models.methods.base import MaskedImageMethod, Progress
from models.mim_losses import unigrad_dense_loss, unigrad_global_loss
from models.vit import TokenBatchNorm, encode, grid_sincos, init_like_mae, sincos_2d, take, transformer


def relative_patch_positions(box1: torch.Tensor, flip1: torch.Tensor, box2: torch.Tensor, flip2: torch.Tensor,
                             grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where view 2's patch centres fall on view 1's patch grid.

    Boxes are (y0, x0, h, w) crops of the original image, `flip` a horizontal mirror after the crop.
    Returns (rows, cols) of shape (B, grid * grid), row-major over view 2's patches, in view-1 patch
    units (patch k of view 1 is centred at k), and the scales h2 / h1, w2 / w1 of shape (B,).
    """
    box1, box2 = box1.double(), box2.double()
    centres = (torch.arange(grid, dtype=torch.float64, device=box1.device) + 0.5) / grid  # in [0, 1]

    def along(axis: int, mirrored1, mirrored2) -> torch.Tensor:
        start1, length1 = box1[:, axis : axis + 1], box1[:, axis + 2 : axis + 3]
        start2, length2 = box2[:, axis : axis + 1], box2[:, axis + 2 : axis + 3]
        fraction2 = torch.where(mirrored2.view(-1, 1), 1 - centres, centres)
        fraction1 = (start2 + fraction2 * length2 - start1) / length1  # original pixels -> view 1 [0, 1]
        fraction1 = torch.where(mirrored1.view(-1, 1), 1 - fraction1, fraction1)
        return fraction1 * grid - 0.5

    no_flip = torch.zeros_like(flip1, dtype=torch.bool)
    rows = along(0, no_flip, no_flip)  # (B, grid): row of each view-2 patch row
    cols = along(1, flip1.bool(), flip2.bool())
    rows = rows.unsqueeze(2).expand(-1, grid, grid).reshape(len(box1), -1)
    cols = cols.unsqueeze(1).expand(-1, grid, grid).reshape(len(box1), -1)
    return rows.float(), cols.float(), (box2[:, 2] / box1[:, 2]).float(), (box2[:, 3] / box1[:, 3]).float()


def relative_position_encoding(box1, flip1, box2, flip2, grid: int, dim: int) -> torch.Tensor:
    """SIM's query positions (B, grid * grid, 2 * dim): sin-cos of view 2's patch centres on view 1's
    grid, then sin-cos of (10 log(h2 / h1), 10 log(w2 / w1))."""
    rows, cols, scale_h, scale_w = relative_patch_positions(box1, flip1, box2, flip2, grid)
    scales = sincos_2d(10 * scale_h.log(), 10 * scale_w.log(), dim).unsqueeze(1).expand(-1, rows.shape[1], -1)
    return torch.cat([sincos_2d(rows, cols, dim), scales], dim=-1)


class SIM(MaskedImageMethod):
    """The online ViT encodes the visible ~40% of view 1 (block masks); decoder_embed -> projector
    (transformer blocks with BN over tokens) -> a predictor that also gets one mask token per view-2
    patch at its position relative to view 1 predicts the EMA target's LayerNorm-ed tokens of the whole
    view 2. Patch embedding frozen at its random init (upstream's default)."""

    name = "sim"
    recipe_preset = "sim"
    views = 2
    EMA_PAIRS = (("target_backbone", "backbone"), ("target_decoder_embed", "decoder_embed"),
                 ("target_projector", "projector"))
    # upstream's recipe: lr x global batch / 256 (6.25e-5 -> 1e-3 at 4096), 1600 epochs, grad clip 1.0
    paper = dict(optimizer="adamw", lr=6.25e-5, weight_decay=0.05, warmup_epochs=40.0, epochs=1600, batch_size=64,
                 multicrop="2x224", grad_clip=1.0)
    adamw_betas = (0.9, 0.95)
    cpu_overrides = {"multicrop": "2x32", "epochs": 2, "warmup_epochs": 0.2, "batch_size": 64, "lr": 5e-4}

    HEAD_PRESETS = {"paper": dict(decoder_dim=768, projector_depth=2, predictor_depth=4, decoder_heads=16),
                    "small": dict(decoder_dim=192, projector_depth=1, predictor_depth=2, decoder_heads=4)}

    @classmethod
    def default_backbone(cls, on_gpu: bool) -> tuple[str, dict]:
        # features for kNN, linear probe and export: average-pooled patch tokens (SIM's linear protocol)
        name, options = super().default_backbone(on_gpu)
        return name, {**options, "global_pool": "avg"}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True,
                 head_preset: str | None = None, decoder_dim: int | None = None, projector_depth: int | None = None,
                 predictor_depth: int | None = None, decoder_heads: int | None = None, alpha_global: float = 1.0,
                 alpha_dense: float = 4.0, negative_weight: float = 0.02, global_lambda: float = 100.0,
                 global_rho: float = 0.99, momentum: float = 0.995, train_patch_embed: bool = False,
                 **backbone_options):
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        sizes = self.head_sizes(head_preset, on_gpu, decoder_dim=decoder_dim, projector_depth=projector_depth,
                                predictor_depth=predictor_depth, decoder_heads=decoder_heads)
        dim, heads = sizes["decoder_dim"], sizes["decoder_heads"]
        self.grid = self.backbone.patch_embed.grid_size[0]
        self.alpha_global, self.alpha_dense = alpha_global, alpha_dense
        self.negative_weight, self.global_lambda, self.global_rho = negative_weight, global_lambda, global_rho
        self.decoder_embed = nn.Linear(self.feature_dim, dim)
        self.projector = transformer(dim, sizes["projector_depth"], heads, norm_layer=TokenBatchNorm)
        self.predictor = transformer(dim, sizes["predictor_depth"], heads, norm_layer=TokenBatchNorm)
        self.predictor_out = nn.Linear(dim, dim)
        self.query_position = nn.Linear(2 * dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.target_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.register_buffer("decoder_pos_embed", grid_sincos(self.grid, dim), persistent=False)
        self.register_buffer("global_correlation", torch.zeros(dim, dim))
        for module in (self.decoder_embed, self.projector, self.predictor, self.predictor_out, self.query_position):
            init_like_mae(module)
        nn.init.normal_(self.mask_token, std=0.02)
        if not train_patch_embed:
            self.backbone.patch_embed.requires_grad_(False)
        # upstream's encoder has no final norm; timm's (an identity at init; after pooling with
        # global_pool="avg") stays for evaluation, untrained
        self.backbone.norm.requires_grad_(False)
        self.backbone.fc_norm.requires_grad_(False)
        self.add_teachers(momentum)

    def predict(self, view1: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Predicted target tokens (B, grid * grid, dim) at the `queries` positions (B, grid * grid, 2 dim)."""
        index = self.visible_index(mask)
        tokens = self.projector(self.decoder_embed(encode(self.backbone, view1, index, final_norm=False)))
        b = tokens.shape[0]
        positions = self.decoder_pos_embed
        visible_positions = take(positions[:, 1:].expand(b, -1, -1), index)
        queries = self.mask_token + self.query_position(queries.to(tokens.dtype))
        sequence = torch.cat([tokens[:, :1] + positions[:, :1], tokens[:, 1:] + visible_positions, queries], 1)
        return self.predictor_out(self.predictor(sequence)[:, -queries.shape[1]:])

    @torch.no_grad()
    def target(self, view2: torch.Tensor) -> torch.Tensor:
        tokens = encode(self.target_backbone, view2, final_norm=False)
        tokens = self.target_projector(self.target_decoder_embed(tokens))[:, 1:]
        return self.target_norm(tokens)

    def training_step(self, batch, progress: Progress):
        view1, view2 = batch.views[0].split(batch.batch_size)
        box1, box2 = batch.boxes[0].split(batch.batch_size)
        flip1, flip2 = batch.flips[0].split(batch.batch_size)
        mask = batch.masks[: batch.batch_size]
        queries = relative_position_encoding(box1, flip1, box2, flip2, self.grid, self.decoder_embed.out_features)
        prediction = self.predict(view1, mask, queries)
        target = self.target(view2)
        dense = unigrad_dense_loss(prediction, target, self.negative_weight)
        metrics = {"dense_loss": dense.detach()}
        loss = self.alpha_dense * dense
        if self.alpha_global:
            pooled = unigrad_global_loss(prediction.mean(1), target.mean(1), self.global_correlation,
                                         self.global_lambda, self.global_rho)
            loss = loss + self.alpha_global * pooled
            metrics["global_loss"] = pooled.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics
