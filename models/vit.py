"""ViT pieces for masked-image methods (MAE, SIM), on top of timm's VisionTransformer.

The encoder stays a stock timm ViT (so the export loads into `timm.create_model`); these functions run
it on the visible patches only. Positions use fixed 2-D sin-cos embeddings, written into the ViT's own
`pos_embed` (frozen), as MAE and SIM do.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from timm.models.vision_transformer import Block


def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """Sin-cos embedding of (possibly fractional) 2-D positions: (..., dim) = [sin(r w), cos(r w),
    sin(c w), cos(c w)] with w_k = 10000^(-k / (dim / 4)), k < dim / 4 (MAE's layout)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=rows.device) / quarter)
    r = rows.double().unsqueeze(-1) * omega
    c = cols.double().unsqueeze(-1) * omega
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=-1).float()


def grid_sincos(grid: int, dim: int, cls_token: bool = True) -> torch.Tensor:
    """(1 [+ 1], grid * grid, dim): row-major patch positions, a zero row first for the class token."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = sincos_2d(rows.flatten(), cols.flatten(), dim)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table])
    return table.unsqueeze(0)


def check_masked_vit(vit: nn.Module, method: str) -> None:
    """MAE/SIM run timm ViTs with one class token, a position table and a fixed input size."""
    if not hasattr(vit, "patch_embed") or not hasattr(vit, "blocks"):
        raise ValueError(f"{method} needs a ViT backbone (e.g. vit_tiny_patch16_224), got {type(vit).__name__}")
    if vit.cls_token is None or vit.reg_token is not None or vit.no_embed_class or vit.pos_embed is None:
        raise ValueError(f"{method} needs a ViT with one class token and an absolute position table")
    if vit.dynamic_img_size:
        raise ValueError(f"{method} masks a fixed patch grid: drop dynamic_img_size from --backbone-options")


def use_fixed_positions(vit: nn.Module) -> None:
    """Overwrite the ViT's learned position table with frozen 2-D sin-cos values."""
    grid = vit.patch_embed.grid_size[0]
    vit.pos_embed.data.copy_(grid_sincos(grid, vit.pos_embed.shape[-1]))
    vit.pos_embed.requires_grad_(False)


def patch_size(vit: nn.Module) -> int:
    return vit.patch_embed.patch_size[0]


def visible_index(mask: torch.Tensor, num_visible: int) -> torch.Tensor:
    """(B, num_visible): where each row of `mask` (B, N) is False, in increasing order; every row hides
    N - num_visible patches. A stable sort puts them first: unlike boolean indexing, whose output size
    depends on the data, it never waits for the device."""
    return mask.to(torch.uint8).argsort(dim=1, stable=True)[:, :num_visible]


def take(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` (B, K) of each sample's tokens (B, N, D): (B, K, D)."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def encode(vit: nn.Module, images: torch.Tensor, index: torch.Tensor | None = None, final_norm: bool = True
           ) -> torch.Tensor:
    """[cls, patch tokens at `index`] through the ViT's blocks: (B, 1 + K, D). `index` (B, K) holds each
    sample's visible patches (`visible_index`); None: all of them."""
    tokens = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    if index is not None:
        tokens = take(tokens, index)
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
    tokens = vit.norm_pre(torch.cat([cls, tokens], dim=1))
    tokens = vit.blocks(tokens)
    return vit.norm(tokens) if final_norm else tokens


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, patches, patch * patch * C), row-major patches, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class TokenBatchNorm(nn.Module):
    """BatchNorm over tokens (B, N, D) -> statistics per channel over B * N, in float32 (SIM's
    projector and predictor use it instead of LayerNorm). The inner BatchNorm1d converts to SyncBN."""

    def __init__(self, dim: int, **factory):  # factory: device/dtype, as timm passes them
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, **factory)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(tokens.device.type, enabled=False):
            return self.bn(tokens.float().transpose(1, 2)).transpose(1, 2)


def transformer(dim: int, depth: int, heads: int, norm_layer=None) -> nn.Sequential:
    """`depth` timm transformer blocks (MLP ratio 4, qkv bias), LayerNorm eps 1e-6 unless told."""
    norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
    return nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm_layer)
                           for _ in range(depth)])


def init_like_mae(module: nn.Module) -> None:
    """Xavier-uniform Linear weights, zero biases, unit LayerNorms (MAE's decoder initialisation)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.LayerNorm) and layer.elementwise_affine:
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
