"""CLIP-MUSED: one transformer for many subjects, with two learned tokens per subject.

A voxel vector is cut into patches of `patch_size` voxels (zero-padded at the end), each
embedded by one shared Linear(patch_size, dim) plus a learned position embedding. The
subject's low-level and high-level tokens are prepended, a pre-norm transformer runs, and
the two token outputs are layer-normed into z_llv and z_hlv; an MLP on [z_llv; z_hlv]
gives multi-label logits. Adding a subject adds only its tokens (2 x dim parameters).

Inputs come in two kinds: common space (every subject has the same voxel layout) and
native space (each subject its own voxel count, padded to the longest, with a voxel mask;
patches with no real voxel are masked out of attention). `n_subject_tokens=1` is the
one-token ablation: one token per subject serves as both outputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class CLIPMUSED(nn.Module):
    def __init__(self, n_voxels: int, n_subjects: int, n_classes: int, patch_size: int = 64, dim: int = 512,
                 depth: int = 6, heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.1,
                 classifier_hidden: int = 512, n_subject_tokens: int = 2, checkpoint_layers: bool = False):
        super().__init__()
        if n_subject_tokens not in (1, 2):
            raise ValueError(f"n_subject_tokens: {n_subject_tokens}, expected 1 or 2")
        self.patch_size, self.n_patches = patch_size, math.ceil(n_voxels / patch_size)
        self.n_tok, self.checkpoint_layers = n_subject_tokens, checkpoint_layers
        self.patch_embed = nn.Linear(patch_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(self.n_patches, dim) * 0.02)
        self.subject_tokens = nn.Embedding(n_subjects, n_subject_tokens * dim)
        nn.init.normal_(self.subject_tokens.weight, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm_llv, self.norm_hlv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.classifier = nn.Sequential(nn.Linear(2 * dim, classifier_hidden), nn.GELU(), nn.Dropout(dropout),
                                        nn.Linear(classifier_hidden, n_classes))

    def forward(self, voxels: torch.Tensor, subjects: torch.Tensor, voxel_mask: torch.Tensor | None = None):
        """voxels [B, V] (V <= the configured count), subject indices [B], optional bool mask [B, V]
        of real voxels (native space) -> (z_llv [B, D], z_hlv [B, D], logits [B, C])."""
        b, v = voxels.shape
        pad = self.n_patches * self.patch_size - v
        if pad < 0:
            raise ValueError(f"{v} voxels, but the model was built for at most {self.n_patches * self.patch_size}")
        if voxel_mask is not None:
            voxels = voxels.masked_fill(~voxel_mask, 0.0)
        x = self.patch_embed(F.pad(voxels, (0, pad)).view(b, self.n_patches, self.patch_size)) + self.pos_embed
        tokens = self.subject_tokens(subjects).view(b, self.n_tok, -1)
        x = torch.cat((tokens, x), dim=1)
        padding = None
        if voxel_mask is not None:
            real = F.pad(voxel_mask, (0, pad)).view(b, self.n_patches, self.patch_size).any(-1)
            padding = torch.cat((torch.zeros(b, self.n_tok, dtype=torch.bool, device=x.device), ~real), dim=1)
        for layer in self.layers:
            if self.checkpoint_layers and self.training:
                x = checkpoint(layer, x, src_key_padding_mask=padding, use_reentrant=False)
            else:
                x = layer(x, src_key_padding_mask=padding)
        z_llv, z_hlv = self.norm_llv(x[:, 0]), self.norm_hlv(x[:, self.n_tok - 1])
        return z_llv, z_hlv, self.classifier(torch.cat((z_llv, z_hlv), dim=-1))
