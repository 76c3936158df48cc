"""MindEye 1's voxel-to-CLIP model: a residual MLP backbone and a per-token projector.

Backbone: Linear(V, h) -> LN -> GELU -> Dropout(0.5), `n_blocks` residual blocks
[Linear(h, h) -> LN -> GELU -> Dropout(0.15)], then Linear(h, T * D) to CLIP space.
Projector (applied to every token): LN -> GELU -> Linear(D, p) -> LN -> GELU ->
Linear(p, p) -> LN -> GELU -> Linear(p, D). The backbone output is what the diffusion
prior and reconstruction consume; the projector output is what contrastive retrieval
uses. At V=15724, h=4096, 4 blocks, T*D=257*768, p=2048 the model has 947,579,904
parameters.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class ResidualBlock(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class MindEyeBackbone(nn.Module):
    def __init__(self, n_voxels: int, n_tokens: int, token_dim: int, hidden: int = 4096, n_blocks: int = 4,
                 input_dropout: float = 0.5, block_dropout: float = 0.15, proj_hidden: int = 2048,
                 checkpoint_blocks: bool = False):
        super().__init__()
        self.n_tokens, self.token_dim, self.checkpoint_blocks = n_tokens, token_dim, checkpoint_blocks
        self.stem = nn.Sequential(nn.Linear(n_voxels, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(input_dropout))
        self.blocks = nn.ModuleList(ResidualBlock(hidden, block_dropout) for _ in range(n_blocks))
        self.to_clip = nn.Linear(hidden, n_tokens * token_dim)
        d, p = token_dim, proj_hidden
        self.projector = nn.Sequential(
            nn.LayerNorm(d), nn.GELU(), nn.Linear(d, p),
            nn.LayerNorm(p), nn.GELU(), nn.Linear(p, p),
            nn.LayerNorm(p), nn.GELU(), nn.Linear(p, d),
        )

    def forward(self, voxels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """voxels [B, V] -> (backbone tokens, projected tokens), each [B, T, D]."""
        x = self.stem(voxels)
        for block in self.blocks:
            # Recomputing a block in backward keeps only its input alive: activation checkpointing.
            x = checkpoint(block, x, use_reentrant=False) if self.checkpoint_blocks and self.training else block(x)
        tokens = self.to_clip(x).view(-1, self.n_tokens, self.token_dim)
        return tokens, self.projector(tokens)
