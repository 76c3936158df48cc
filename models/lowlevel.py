"""MindEye 1's low-level branch: voxels -> a Stable Diffusion VAE latent (the "blurry" image).

`ResidualMLP` (SiLU, no biases, dropout 0.5 / 0.25) -> Linear(h, C * s * s, no bias) ->
C x s x s map -> GroupNorm -> a VAE-style decoder (diffusers' `Decoder`, one layer per up
block) -> latent [4, S, S] with S = s * 2 ** (len(decoder_channels) - 1): 64 x 16 x 16 ->
4 x 64 x 64 at the paper configuration. A 1x1-conv projector maps the C x s x s map to
per-position features that a soft contrastive loss aligns with ConvNeXt features of the
seen image; it serves training only.
"""
from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import Decoder
from torch import nn

from models.residual_mlp import ResidualMLP


class LowLevelDecoder(nn.Module):
    def __init__(self, n_voxels: int, hidden: int = 4096, n_blocks: int = 4, map_channels: int = 64,
                 map_side: int = 16, decoder_channels: tuple[int, ...] = (64, 128, 256), latent_channels: int = 4,
                 norm_groups: int = 32, feature_dim: int = 512, feature_hidden: int = 512,
                 input_dropout: float = 0.5, block_dropout: float = 0.25, checkpoint_blocks: bool = False):
        super().__init__()
        self.map_channels, self.map_side = map_channels, map_side
        self.trunk = ResidualMLP(n_voxels, hidden, n_blocks, input_dropout, block_dropout, act=nn.SiLU, bias=False,
                                 checkpoint_blocks=checkpoint_blocks)
        self.to_map = nn.Linear(hidden, map_channels * map_side * map_side, bias=False)
        self.norm = nn.GroupNorm(1, map_channels)
        self.upsampler = Decoder(in_channels=map_channels, out_channels=latent_channels,
                                 up_block_types=("UpDecoderBlock2D",) * len(decoder_channels),
                                 block_out_channels=tuple(decoder_channels), layers_per_block=1,
                                 norm_num_groups=norm_groups)
        c, f = map_channels, feature_hidden
        self.feature_projector = nn.Sequential(
            nn.Conv2d(c, f, 1, bias=False), nn.GroupNorm(1, f), nn.ReLU(),
            nn.Conv2d(f, f, 1, bias=False), nn.GroupNorm(1, f), nn.ReLU(),
            nn.Conv2d(f, feature_dim, 1),
        )

    @property
    def latent_side(self) -> int:
        return self.map_side * 2 ** (len(self.upsampler.up_blocks) - 1)

    def forward(self, voxels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """voxels [B, V] -> (VAE latents [B, 4, S, S], features [B, s * s, feature_dim])."""
        x = self.to_map(self.trunk(voxels))
        x = self.norm(x.view(len(x), self.map_channels, self.map_side, self.map_side))
        return self.upsampler(x), self.feature_projector(x).flatten(2).transpose(1, 2)
