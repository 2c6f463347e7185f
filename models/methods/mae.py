"""MAE (He et al. 2022), as facebookresearch/mae pretrains it."""

from __future__ import annotations

import torch
from torch import nn

from models.methods.base import MaskedImageMethod, Progress
from models.mim_losses import masked_patch_loss, normalized_pixel_targets
from models.vit import encode, grid_sincos, init_like_mae, patchify, transformer


class MAE(MaskedImageMethod):
    """A ViT encodes the visible 25% of one view's patches; a light decoder sees them plus one shared
    mask token per hidden patch (fixed sin-cos positions) and regresses the hidden patches' pixels,
    normalised per patch (`norm_pix_loss`)."""

    name = "mae"
    recipe_preset = "mae"
    # upstream's pretraining recipe: lr x global batch / 256 (1.5e-4 -> 2.4e-3 at 4096 = 64 x 64 GPUs)
    paper = dict(optimizer="adamw", lr=1.5e-4, weight_decay=0.05, warmup_epochs=40.0, epochs=800, batch_size=64,
                 multicrop="1x224")
    adamw_betas = (0.9, 0.95)
    cpu_overrides = {"multicrop": "1x32", "epochs": 2, "warmup_epochs": 0.2, "batch_size": 64, "lr": 1.5e-3}

    HEAD_PRESETS = {"paper": dict(decoder_dim=512, decoder_depth=8, decoder_heads=16),
                    "small": dict(decoder_dim=128, decoder_depth=2, decoder_heads=4)}

    def __init__(self, backbone: str | nn.Module | None = None, *, on_gpu: bool = True,
                 head_preset: str | None = None, decoder_dim: int | None = None, decoder_depth: int | None = None,
                 decoder_heads: int | None = None, norm_pix_loss: bool = True, **backbone_options):
        super().__init__(backbone, on_gpu=on_gpu, **backbone_options)
        sizes = self.head_sizes(head_preset, on_gpu, decoder_dim=decoder_dim, decoder_depth=decoder_depth,
                                decoder_heads=decoder_heads)
        dim = sizes["decoder_dim"]
        grid = self.backbone.patch_embed.grid_size[0]
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed = nn.Linear(self.feature_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder = transformer(dim, sizes["decoder_depth"], sizes["decoder_heads"])
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, self.patch_size ** 2 * 3)
        self.register_buffer("decoder_pos_embed", grid_sincos(grid, dim), persistent=False)
        for module in (self.decoder_embed, self.decoder, self.decoder_norm, self.decoder_pred):
            init_like_mae(module)
        nn.init.normal_(self.mask_token, std=0.02)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        patches = patchify(images, self.patch_size)
        return normalized_pixel_targets(patches) if self.norm_pix_loss else patches

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch predictions (B, patches, patch * patch * 3) from the visible patches of `images`."""
        index = self.visible_index(mask)
        latent = self.decoder_embed(encode(self.backbone, images, index))
        b, n = mask.shape
        patches = self.mask_token.to(latent.dtype).expand(b, n, -1)
        # the visible tokens back in place (a scatter: no host sync, unlike assigning through the mask)
        patches = patches.scatter(1, index.unsqueeze(-1).expand(-1, -1, latent.shape[-1]), latent[:, 1:])
        tokens = torch.cat([latent[:, :1], patches], dim=1) + self.decoder_pos_embed
        return self.decoder_pred(self.decoder_norm(self.decoder(tokens)))[:, 1:]

    def training_step(self, batch, progress: Progress):
        images, mask = batch.views[0], batch.masks
        loss = masked_patch_loss(self.reconstruct(images, mask), self.targets(images), mask)
        return loss, {"loss": loss.detach()}
