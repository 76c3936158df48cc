"""MindEye 2's released checkpoints in our key layout.

Its checkpoints (`model_state_dict` of `last.pth`) hold `ridge.linears.<s>.*` and
`backbone.*` under the names our models/mindeye2.py uses, and the prior under
`diffusion_prior.net.*` (the DALL-E 2 prior network, mapped as MindEye 1's) beside its noise
schedule, which is dropped: ours is computed from the config.
"""
from __future__ import annotations

import torch

from models.mindeye1_keys import PRIOR_RULES, map_keys

RULES = [(r"ridge\.", "ridge."), (r"backbone\.", "backbone."),
         *((rf"diffusion_prior\.{pattern}", target) for pattern, target in PRIOR_RULES)]


def is_mindeye2(state: dict) -> bool:
    return any(k.startswith("ridge.linears.") for k in state) and any(k.startswith("backbone.backbone_linear.") for k in state)


def from_mindeye2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A MindEye 2 state dict in our key layout; a key that maps nowhere is an error naming it."""
    return map_keys(state, RULES, "MindEye 2")
