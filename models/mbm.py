"""Masked brain modeling (MinD-Vis; DC-MAE phase 1): a masked autoencoder over voxel patches.

A voxel vector is wrap-padded to a multiple of `patch_size` (the first voxels repeat at
the end), cut into patches by Conv1d(1, dim, k=patch_size, s=patch_size), given fixed 1-D
sin-cos positions (`token_positions`) and a class token, and a random `mask_ratio` of its patches is dropped.
The encoder (pre-norm transformer) sees only the kept patches; the decoder sees the encoded
tokens plus a learned mask token at every dropped position and predicts every patch's
voxels. The loss is the MSE over the masked patches only. LayerNorms use torch's default eps,
1e-5, as MinD-Vis' blocks (timm `Block` with `norm_layer=nn.LayerNorm`; the image MAE's 1e-6). Encoding, decoding and the loss
are the masked-autoencoder core shared with the image MAE (models/mae.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.mae import MaskedAutoencoder


def sincos_positions(n: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sin-cos position embeddings [n, dim]: sines then cosines of n positions at
    dim / 2 frequencies 1 / 10000^(2i / dim)."""
    freq = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(n, dtype=torch.float64)[:, None] * freq[None]
    return torch.cat((angles.sin(), angles.cos()), dim=1).float()


def token_positions(n_patches: int, dim: int) -> torch.Tensor:
    """MinD-Vis' fixed table [1 + n_patches, dim]: an all-zero class-token row, then the codes of
    positions 0 .. n_patches - 1."""
    return torch.cat((torch.zeros(1, dim), sincos_positions(n_patches, dim)))


def wrap_pad(voxels: torch.Tensor, length: int) -> torch.Tensor:
    """[..., V] -> [..., length], V <= length, by repeating the first voxels at the end."""
    reps = math.ceil(length / voxels.shape[-1])
    return voxels.repeat(*[1] * (voxels.dim() - 1), reps)[..., :length]


def voxel_fit(n_data: int, n_model: int) -> str:
    """How a dataset's voxel vectors meet an encoder built for another count, as MinD-Vis
    transfers an HCP-pretrained encoder: "wrap-pad" shorter ones, "truncate" longer ones, or "none"."""
    return "none" if n_data == n_model else "wrap-pad" if n_data < n_model else "truncate"


def fit_voxels(voxels: torch.Tensor, n_model: int) -> torch.Tensor:
    """[..., V] -> [..., n_model] by `voxel_fit`'s rule."""
    return wrap_pad(voxels, n_model) if voxels.shape[-1] < n_model else voxels[..., :n_model]


class MaskedBrainModel(MaskedAutoencoder):
    def __init__(self, n_voxels: int, patch_size: int = 16, dim: int = 1024, depth: int = 24, heads: int = 16,
                 mlp_ratio: float = 1.0, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16,
                 mask_ratio: float = 0.75, checkpoint_blocks: bool = False, norm_eps: float = 1e-5):
        n_patches = math.ceil(n_voxels / patch_size)
        super().__init__(nn.Conv1d(1, dim, patch_size, stride=patch_size), n_patches, patch_size,
                         token_positions(n_patches, dim), token_positions(n_patches, decoder_dim), dim, depth,
                         heads, mlp_ratio, decoder_dim, decoder_depth, decoder_heads, mask_ratio, checkpoint_blocks,
                         norm_eps)
        self.patch_size, self.n_voxels = patch_size, n_voxels

    @property
    def padded_voxels(self) -> int:
        return self.n_patches * self.patch_size

    def embed_patches(self, voxels: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(wrap_pad(voxels, self.padded_voxels)[:, None]).transpose(1, 2)

    def patchify(self, voxels: torch.Tensor) -> torch.Tensor:
        """[B, V] -> wrap-padded patches [B, n_patches, patch_size]."""
        return wrap_pad(voxels, self.padded_voxels).view(len(voxels), self.n_patches, self.patch_size)


def strip_decoder(mae: MaskedBrainModel) -> MaskedBrainModel:
    """The encoder alone (as the LDM's conditioning uses it): the decoder is dropped, so that it is
    neither stored nor trained."""
    for name in ("decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred"):
        setattr(mae, name, None)
    mae.mask_token = None
    return mae
