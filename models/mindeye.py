"""MindEye 1's high-level branch: voxels -> residual MLP -> CLIP tokens -> projector, plus the
diffusion prior that maps the backbone tokens to CLIP image tokens.

Backbone: `ResidualMLP` (GELU, dropout 0.5 / 0.15), then Linear(h, T * D) to CLIP space.
Projector (applied to every token): LN -> GELU -> Linear(D, p) -> LN -> GELU ->
Linear(p, p) -> LN -> GELU -> Linear(p, D). The backbone output is what the diffusion
prior and reconstruction consume; the projector output is what contrastive retrieval
uses. At V=15724, h=4096, 4 blocks, T*D=257*768, p=2048 the backbone has 947,579,904
parameters; with the prior (models/diffusion_prior.py) 1,003,635,072.
"""
from __future__ import annotations

import torch
from torch import nn

from models.diffusion_prior import PriorNetwork
from models.residual_mlp import ResidualMLP


class MindEyeBackbone(nn.Module):
    def __init__(self, n_voxels: int, n_tokens: int, token_dim: int, hidden: int = 4096, n_blocks: int = 4,
                 input_dropout: float = 0.5, block_dropout: float = 0.15, proj_hidden: int = 2048,
                 checkpoint_blocks: bool = False):
        super().__init__()
        self.n_tokens, self.token_dim = n_tokens, token_dim
        self.trunk = ResidualMLP(n_voxels, hidden, n_blocks, input_dropout, block_dropout,
                                 checkpoint_blocks=checkpoint_blocks)
        self.to_clip = nn.Linear(hidden, n_tokens * token_dim)
        d, p = token_dim, proj_hidden
        self.projector = nn.Sequential(
            nn.LayerNorm(d), nn.GELU(), nn.Linear(d, p),
            nn.LayerNorm(p), nn.GELU(), nn.Linear(p, p),
            nn.LayerNorm(p), nn.GELU(), nn.Linear(p, d),
        )

    def forward(self, voxels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """voxels [B, V] -> (backbone tokens, projected tokens), each [B, T, D]."""
        tokens = self.to_clip(self.trunk(voxels)).view(-1, self.n_tokens, self.token_dim)
        return tokens, self.projector(tokens)


class MindEye(nn.Module):
    """Backbone and (optionally) prior as one module, so one DeepSpeed engine shards and
    checkpoints both and every parameter is used inside the engine's forward."""

    def __init__(self, backbone: MindEyeBackbone, prior: PriorNetwork | None = None):
        super().__init__()
        self.backbone, self.prior = backbone, prior

    def forward(self, voxels: torch.Tensor, noised: torch.Tensor | None = None, t: torch.Tensor | None = None,
                brain_keep: torch.Tensor | None = None, image_keep: torch.Tensor | None = None):
        """(backbone tokens, projected tokens), plus the prior's x0 prediction for `noised` image
        tokens at steps `t` when those are given (conditioned on the backbone tokens)."""
        tokens, proj = self.backbone(voxels)
        if noised is None:
            return tokens, proj
        return tokens, proj, self.prior(noised, t, tokens, brain_keep, image_keep)
