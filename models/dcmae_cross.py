"""DC-MAE phase 2's fMRI encoder as its released code computes it, for its `checkpoint.pth`.

After the fMRI MAE's blocks and before its final norm, the tokens (class token and kept patches)
are mapped to the image MAE's width (`cross_map_in`, Linear(dim, 768)), run through `layers` (3)
cross layers against the image encoder's tokens [B, T, 768] (`support`), added back to their input
(`do_cross_residual`, True in phase 2; else they replace it) and mapped back (`cross_map_out`).

A cross layer is DC-MAE's variant of transformers' ViT-MAE layer (`ViTMAELayer(config, True)`), with
ViT-MAE base's sizes (12 heads, MLP 3072, GELU, LayerNorm eps 1e-12):

    a = self_attention(norm_before(x))
    c = cross_attention(norm_before(a), support)       the same norm; keys and values from the raw support
    h = x + c                                          a enters only as the cross-attention's query
    out = h + fc2(gelu(fc1(norm_after(h))))

This differs from the phase 2 that train/recipes/mbm_phase2.py trains (models/cross_mae.py, cross
layers in the decoders, as the paper describes); this module reproduces the release for reading
and checking it, and `encoder.checkpoint` / `python -m eval` use the fMRI MAE without it (as
DC-MAE's own stage B does).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from models.mbm import MaskedBrainModel

WIDTH = 768  # cross_map_in's output: the image MAE's width, fixed in DC-MAE's code
_RULES = [(r"cross_blocks\.(\d+)\.attention\.attention\.(query|key|value)\.", r"layers.\1.self_attention.\2."),
          (r"cross_blocks\.(\d+)\.attention\.output\.dense\.", r"layers.\1.self_attention.out."),
          (r"cross_blocks\.(\d+)\.cross_attention\.attention\.(query|key|value)\.", r"layers.\1.cross_attention.\2."),
          (r"cross_blocks\.(\d+)\.cross_attention\.output\.dense\.", r"layers.\1.cross_attention.out."),
          (r"cross_blocks\.(\d+)\.intermediate\.dense\.", r"layers.\1.fc1."),
          (r"cross_blocks\.(\d+)\.output\.dense\.", r"layers.\1.fc2."),
          (r"cross_blocks\.(\d+)\.layernorm_(before|after)\.", r"layers.\1.norm_\2."),
          (r"cross_map_(in|out)\.", r"map_\1.")]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class CrossLayer(nn.Module):
    def __init__(self, width: int = WIDTH, heads: int = 12, mlp: int = 3072, eps: float = 1e-12):
        super().__init__()
        self.self_attention, self.cross_attention = Attention(width, heads), Attention(width, heads)
        self.norm_before, self.norm_after = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.fc1, self.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)

    def forward(self, x: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        a = self.norm_before(x)
        a = self.self_attention(a, a)
        h = x + self.cross_attention(self.norm_before(a), support)
        return h + self.fc2(F.gelu(self.fc1(self.norm_after(h))))


class CrossEncoder(nn.Module):
    """The fMRI MAE `mae` with DC-MAE phase 2's cross layers before its final norm."""

    def __init__(self, mae: MaskedBrainModel, layers: int = 3, heads: int = 12, mlp: int = 3072,
                 residual: bool = True):
        super().__init__()
        self.mae, self.residual = mae, residual
        self.map_in, self.map_out = nn.Linear(mae.dim, WIDTH), nn.Linear(WIDTH, mae.dim)
        self.layers = nn.ModuleList(CrossLayer(WIDTH, heads, mlp) for _ in range(layers))

    def cross(self, tokens: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        x = self.map_in(tokens)
        c = x
        for layer in self.layers:
            c = layer(c, support)
        return self.map_out(x + c if self.residual else c)

    def encode(self, voxels: torch.Tensor, support: torch.Tensor | None, mask_ratio: float = 0.75,
               noise: torch.Tensor | None = None):
        """As models.mae.MaskedAutoencoder.encode; without `support` the cross layers do not run."""
        hook = None if support is None else lambda x: self.cross(x, support)
        return self.mae.encode(voxels, mask_ratio, noise=noise, before_norm=hook)


def cross_entries(cross: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DC-MAE phase 2's `cross_blocks.*` / `cross_map_*` entries under CrossEncoder's names (without
    `mae.`); one outside the map raises KeyError naming it."""
    ours = {}
    for key, value in cross.items():
        for pattern, target in _RULES:
            if re.match(pattern, key):
                ours[re.sub(pattern, target, key, count=1)] = value
                break
        else:
            raise KeyError(f"unexpected key {key}")
    return ours
