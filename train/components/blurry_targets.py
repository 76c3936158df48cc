"""The targets of a blurry (low-level) branch: the `vae.*` and `teacher.*` config, the Stable
Diffusion VAE latents of the stimuli and the stimuli at the ConvNeXt teacher's size (both
computed once and cached), and the frozen teacher whose per-position features the branch's
soft contrastive loss matches. Used by MindEye 1's low-level recipe and MindEye 2."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from data.diffusers_weights import load_vae
from data.pretrained_weights import load_convnext_features
from data.subject_data import SubjectData
from data.targets import cached_targets, stimuli_at
from models.errors import ConfigError
from models.image_variation import stimulus_latents


@dataclass
class VAEConfig:
    weights: str = ""  # local diffusers folder with a vae/ subfolder (Versatile or Stable Diffusion), or "random"
    image_size: int = 512  # stimuli are resized to this before encoding
    seed: int = 0  # initialisation of a random VAE
    batch_size: int = 16


@dataclass
class TinyConvNeXtConfig:
    dims: list[int] = field(default_factory=lambda: [16, 32, 64])
    depths: list[int] = field(default_factory=lambda: [1, 1, 1])


@dataclass
class TeacherConfig:
    arch: str = "convnext_xlarge"  # convnext_large, convnext_xlarge, or tiny (random weights only)
    weights: str = ""  # local torchvision-layout state dict, or "random"
    stage: int = 2  # features after this stage (stride 8; 512 channels for xlarge)
    image_size: int = 256
    seed: int = 0
    tiny: Optional[TinyConvNeXtConfig] = None


class BlurryTargets:
    """`vae` and `teacher` (ConvNeXt features on a grid x grid map), read from their files
    first (before any dataset work); then `cache` computes `latents` (TargetTable of scaled VAE
    latents) and `images` (TargetTable of uint8 stimuli at teacher.image_size)."""

    def __init__(self, cfg: DictConfig, grid: int, device: torch.device):
        for key in ("vae.weights", "teacher.weights"):
            if not OmegaConf.select(cfg, key):
                raise ConfigError(f"{key} is not set: give a local weights path, or 'random'")
        v, t = cfg.vae, cfg.teacher
        self.vae = load_vae(v.weights, "vae.weights", v.seed, v.image_size // 4)
        tiny = OmegaConf.to_container(t.tiny) if t.tiny is not None else None
        self.teacher = load_convnext_features(t.arch, t.weights, t.stage, t.image_size, grid, t.seed, tiny).to(device)
        self.cfg = cfg

    def cache(self, data: SubjectData, subjects: list[int]) -> None:
        v, t = self.cfg.vae, self.cfg.teacher
        self.latents = cached_targets(partial(stimulus_latents, self.vae, v.image_size),
                                      {"kind": "vae", "weights": v.weights, "seed": v.seed, "size": v.image_size},
                                      data.root, data.manifest, subjects, data.cache, v.batch_size, "VAE latents")
        self.images = cached_targets(stimuli_at(t.image_size), {"kind": "images", "size": t.image_size}, data.root,
                                     data.manifest, subjects, data.cache, 64, "stimuli for the ConvNeXt teacher")
