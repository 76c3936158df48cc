"""Masked brain modeling (MinD-Vis; DC-MAE phase 1): a masked autoencoder over voxel patches.

A voxel vector is wrap-padded to a multiple of `patch_size` (the first voxels repeat at
the end), cut into patches by Conv1d(1, dim, k=patch_size, s=patch_size), given fixed 1-D
sin-cos positions and a class token, and a random `mask_ratio` of its patches is dropped.
The encoder (pre-norm transformer) sees only the kept patches; the decoder sees the encoded
tokens plus a learned mask token at every dropped position and predicts every patch's
voxels. The loss is the MSE over the masked patches only.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def sincos_positions(n: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sin-cos position embeddings [n, dim]: sines then cosines of n positions at
    dim / 2 frequencies 1 / 10000^(2i / dim)."""
    freq = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(n, dtype=torch.float64)[:, None] * freq[None]
    return torch.cat((angles.sin(), angles.cos()), dim=1).float()


def wrap_pad(voxels: torch.Tensor, length: int) -> torch.Tensor:
    """[B, V] -> [B, length], V <= length, by repeating the first voxels at the end."""
    reps = math.ceil(length / voxels.shape[1])
    return voxels.repeat(1, reps)[:, :length]


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    return nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                                    batch_first=True, norm_first=True) for _ in range(depth))


class MaskedBrainModel(nn.Module):
    def __init__(self, n_voxels: int, patch_size: int = 16, dim: int = 1024, depth: int = 24, heads: int = 16,
                 mlp_ratio: float = 1.0, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 mask_ratio: float = 0.75, checkpoint_blocks: bool = False):
        super().__init__()
        self.patch_size, self.n_patches = patch_size, math.ceil(n_voxels / patch_size)
        self.n_voxels, self.mask_ratio, self.checkpoint_blocks = n_voxels, mask_ratio, checkpoint_blocks
        self.patch_embed = nn.Conv1d(1, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.register_buffer("pos", sincos_positions(1 + self.n_patches, dim)[None], persistent=False)
        self.blocks, self.norm = _blocks(dim, depth, heads, mlp_ratio), nn.LayerNorm(dim)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim) * 0.02)
        self.register_buffer("decoder_pos", sincos_positions(1 + self.n_patches, decoder_dim)[None], persistent=False)
        self.decoder_blocks = _blocks(decoder_dim, decoder_depth, heads=decoder_heads, mlp_ratio=mlp_ratio)
        self.decoder_norm, self.decoder_pred = nn.LayerNorm(decoder_dim), nn.Linear(decoder_dim, patch_size)

    @property
    def padded_voxels(self) -> int:
        return self.n_patches * self.patch_size

    def patchify(self, voxels: torch.Tensor) -> torch.Tensor:
        """[B, V] -> wrap-padded patches [B, n_patches, patch_size]."""
        return wrap_pad(voxels, self.padded_voxels).view(len(voxels), self.n_patches, self.patch_size)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpoint_blocks and self.training else block(x)
        return x

    def encode(self, voxels: torch.Tensor, mask_ratio: float = 0.0, generator: torch.Generator | None = None):
        """-> (tokens [B, 1 + kept, dim] after the final norm, mask [B, n_patches] with 1 at
        dropped patches, kept patch indices [B, kept]). Which patches drop is random per sample."""
        b = len(voxels)
        x = self.patch_embed(wrap_pad(voxels, self.padded_voxels)[:, None]).transpose(1, 2) + self.pos[:, 1:]
        n_keep = self.n_patches - int(round(self.n_patches * mask_ratio))
        noise = torch.rand(b, self.n_patches, generator=generator, device=generator.device if generator else x.device)
        keep = noise.to(x.device).argsort(dim=1)[:, :n_keep].sort(dim=1).values
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos[:, :1]).expand(b, -1, -1)
        x = self.norm(self._run(self.blocks, torch.cat((cls, x), dim=1)))
        mask = torch.ones(b, self.n_patches, device=x.device).scatter_(1, keep, 0.0)
        return x, mask, keep

    def decode(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoded tokens and kept indices -> predicted voxels of every patch [B, n_patches, patch_size]."""
        x = self.decoder_embed(tokens)
        b, d = len(x), x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(b, self.n_patches, d).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, d), x[:, 1:])
        x = torch.cat((x[:, :1], full), dim=1) + self.decoder_pos
        return self.decoder_pred(self.decoder_norm(self._run(self.decoder_blocks, x)))[:, 1:]

    def forward(self, voxels: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None):
        """-> (MSE over masked patches, predictions [B, n_patches, patch_size], mask [B, n_patches])."""
        tokens, mask, keep = self.encode(voxels, self.mask_ratio if mask_ratio is None else mask_ratio, generator)
        pred = self.decode(tokens, keep)
        per_patch = (pred.float() - self.patchify(voxels).float()).square().mean(-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1), pred, mask
