"""The `loss.*` schedule of the MindEye recipes' contrastive loss: BiMixCo (voxel MixCo with
soft labels) for the first `mix_fraction` of the epochs, then SoftCLIP with a temperature
annealed along a cosine from `soft_tau_start` to `soft_tau_end`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ClipLossConfig:
    mix_fraction: float = 0.33  # share of epochs trained with BiMixCo
    mix_prob: float = 0.5
    mix_alpha: float = 0.15
    mix_tau: float = 0.006
    soft_tau_start: float = 0.004
    soft_tau_end: float = 0.0075
