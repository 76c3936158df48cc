"""The `prior.*` config of the MindEye recipes' diffusion prior (models/diffusion_prior.py);
defaults are MindEye 1's."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PriorConfig:
    enabled: bool = False
    depth: int = 6
    heads: int = 12
    dim_head: int = 64
    timesteps: int = 100
    cond_drop_prob: float = 0.2
    loss_weight: float = 30.0  # loss = contrastive + loss_weight x prior MSE
    guidance: float = 1.0  # classifier-free guidance when sampling
    sample_steps: int = 100  # sampling steps (evenly spaced over the training steps)
    checkpoint_layers: bool = False  # activation checkpointing per transformer layer
    eval_sampling: bool = True  # score retrieval of prior samples on the test split
