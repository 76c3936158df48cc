"""The residual MLP trunk both MindEye branches share.

Linear(V, h) -> LN -> act -> Dropout, then `n_blocks` residual blocks
x <- x + [Linear(h, h) -> LN -> act -> Dropout](x). The high-level branch uses GELU with
biases (dropout 0.5 / 0.15), the low-level branch SiLU without biases (0.5 / 0.25).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _layer(n_in: int, n_out: int, act: type[nn.Module], bias: bool, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out, bias=bias), nn.LayerNorm(n_out), act(), nn.Dropout(dropout))


class ResidualBlock(nn.Module):
    def __init__(self, dim: int, dropout: float, act: type[nn.Module] = nn.GELU, bias: bool = True):
        super().__init__()
        self.net = _layer(dim, dim, act, bias, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResidualMLP(nn.Module):
    def __init__(self, n_in: int, hidden: int, n_blocks: int, input_dropout: float, block_dropout: float,
                 act: type[nn.Module] = nn.GELU, bias: bool = True, checkpoint_blocks: bool = False):
        super().__init__()
        self.checkpoint_blocks = checkpoint_blocks
        self.stem = _layer(n_in, hidden, act, bias, input_dropout)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, block_dropout, act, bias) for _ in range(n_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            # Recomputing a block in backward keeps only its input alive: activation checkpointing.
            x = checkpoint(block, x, use_reentrant=False) if self.checkpoint_blocks and self.training else block(x)
        return x
