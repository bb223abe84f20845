"""Masked autoencoder around a timm `VisionTransformer` encoder, as in He et al. 2022 (`models_mae.py`).

Shape legend: N batch, L patches per image (H/p * W/p), K kept patches (L * (1 - mask_ratio)),
D encoder width, E decoder width, P = p*p*3 pixels per patch.

Forward: patchify -> add fixed 2-D sin-cos position embeddings -> per-sample random masking (argsort
of uniform noise, keep the first K) -> prepend cls -> encoder blocks on K+1 tokens only -> decoder
(linear to E, append mask tokens, un-shuffle with ids_restore, fixed sin-cos pos embed, light blocks)
-> per-patch pixel prediction -> MSE on the masked patches only, against per-patch normalised pixels.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn


def sincos_pos_embed_2d(dim: int, grid_size: int, *, cls_token: bool) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, (1 + grid_size**2 if cls_token else grid_size**2, dim); cls row = 0.

    Half the channels encode the row (h) coordinate, half the column (w), each as [sin | cos] over
    dim/4 frequencies 1/10000^(k/(dim/4)); same values as MAE's numpy `get_2d_sincos_pos_embed`.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # MAE: np.meshgrid(grid_w, grid_h)

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    # MAE feeds grid[0] (= the w-varying meshgrid output) to the first half.
    table = torch.cat([embed_1d(grid_w), embed_1d(grid_h)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)
    return table.float()


class MaskedAutoencoder(nn.Module):
    """`encoder` is a timm VisionTransformer with a cls token; its pos_embed is set to fixed sin-cos."""

    def __init__(
        self,
        encoder: VisionTransformer,
        *,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if encoder.cls_token is None or encoder.num_prefix_tokens != 1 or encoder.no_embed_class:
            raise ValueError("MAE expects a timm VisionTransformer with exactly one cls token and pos_embed over it")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = encoder.patch_embed.patch_size[0]
        grid = encoder.patch_embed.grid_size
        if grid[0] != grid[1]:
            raise ValueError(f"MAE needs a square patch grid, got {grid}")
        self.grid_size = grid[0]
        num_patches = self.grid_size**2
        width = encoder.embed_dim

        self.decoder_embed = nn.Linear(width, decoder_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed (non-trainable) sin-cos; a buffer would also work but a frozen Parameter keeps MAE's key names.
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            # eps explicit, as MAE: timm 1.0.0-1.0.15's Block defaults to nn.LayerNorm (eps 1e-5), later ones to 1e-6
            [Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
             for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * 3, bias=True)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's initialisation: fixed sin-cos tables, xavier patch/linear weights, N(0, .02) tokens."""
        enc = self.encoder
        with torch.no_grad():
            enc.pos_embed.copy_(sincos_pos_embed_2d(enc.embed_dim, self.grid_size, cls_token=True).unsqueeze(0))
            self.decoder_pos_embed.copy_(
                sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True).unsqueeze(0)
            )
        enc.pos_embed.requires_grad_(False)
        w = enc.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(enc.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_keep(self) -> int:
        return int(self.num_patches * (1 - self.mask_ratio))

    def patchify(self, imgs_NCHW: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L, P), patch pixels ordered (p_h, p_w, c) as in MAE."""
        p, g = self.patch_size, self.grid_size
        x = imgs_NCHW.reshape(imgs_NCHW.shape[0], 3, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs_NCHW.shape[0], g * g, p * p * 3)

    def random_masking(
        self, x_NLD: torch.Tensor, noise_NL: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the K patches with the smallest noise, per sample.

        Returns x_kept (N, K, D), mask (N, L) with 0 = kept and 1 = removed (in the original patch
        order), ids_restore (N, L) that un-shuffles the kept+mask-token sequence back to patch order.
        """
        n, length, d = x_NLD.shape
        ids_shuffle_NL = torch.argsort(noise_NL, dim=1)
        ids_restore_NL = torch.argsort(ids_shuffle_NL, dim=1)
        ids_keep_NK = ids_shuffle_NL[:, : self.num_keep]
        x_kept_NKD = torch.gather(x_NLD, 1, ids_keep_NK.unsqueeze(-1).expand(-1, -1, d))
        mask_NL = torch.ones(n, length, device=x_NLD.device)
        mask_NL[:, : self.num_keep] = 0
        mask_NL = torch.gather(mask_NL, 1, ids_restore_NL)
        return x_kept_NKD, mask_NL, ids_restore_NL

    def forward_encoder(
        self, imgs_NCHW: torch.Tensor, noise_NL: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder on visible patches only -> latent (N, 1+K, D), mask (N, L), ids_restore (N, L)."""
        enc = self.encoder
        x_NLD = enc.patch_embed(imgs_NCHW)
        x_NLD = x_NLD + enc.pos_embed[:, 1:, :]
        x_NKD, mask_NL, ids_restore_NL = self.random_masking(x_NLD, noise_NL)
        cls_11D = enc.cls_token + enc.pos_embed[:, :1, :]
        x = torch.cat([cls_11D.expand(x_NKD.shape[0], -1, -1), x_NKD], dim=1)
        x = enc.norm_pre(x)
        x = enc.blocks(x)
        return enc.norm(x), mask_NL, ids_restore_NL

    def forward_decoder(self, latent: torch.Tensor, ids_restore_NL: torch.Tensor) -> torch.Tensor:
        """(N, 1+K, D) -> per-patch pixel prediction (N, L, P)."""
        x = self.decoder_embed(latent)
        n, length = ids_restore_NL.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # drop cls, append mask tokens
        x_ = torch.gather(x_, 1, ids_restore_NL.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # un-shuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        # Drop the cls token before the prediction (per-token ops, so same values; the result is not a view).
        return self.decoder_pred(self.decoder_norm(x[:, 1:, :]))

    def forward_loss(self, imgs_NCHW: torch.Tensor, pred_NLP: torch.Tensor, mask_NL: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE; targets normalised per patch if norm_pix_loss."""
        target_NLP = self.patchify(imgs_NCHW).float()
        if self.norm_pix_loss:
            mean = target_NLP.mean(dim=-1, keepdim=True)
            var = target_NLP.var(dim=-1, keepdim=True)
            target_NLP = (target_NLP - mean) / (var + 1.0e-6) ** 0.5
        per_patch_NL = ((pred_NLP.float() - target_NLP) ** 2).mean(dim=-1)
        return (per_patch_NL * mask_NL).sum() / mask_NL.sum()

    def forward(
        self, imgs_NCHW: torch.Tensor, noise_NL: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (loss, pred (N, L, P), mask (N, L)). `noise_NL` fixes the masking (uniform noise if None)."""
        if noise_NL is None:
            noise_NL = torch.rand(imgs_NCHW.shape[0], self.num_patches, device=imgs_NCHW.device)
        latent, mask_NL, ids_restore_NL = self.forward_encoder(imgs_NCHW, noise_NL)
        pred_NLP = self.forward_decoder(latent, ids_restore_NL)
        return self.forward_loss(imgs_NCHW, pred_NLP, mask_NL), pred_NLP, mask_NL
