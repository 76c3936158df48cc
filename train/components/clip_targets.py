"""CLIP image targets (MindEye's): the `clip.*` config, the frozen encoder it names, and the
subject's targets computed once and cached. Used by every recipe that decodes to CLIP image
space (mindeye, ridge_clip) and by reconstruction, which scores generated images with it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from data.clip_weights import config_weights
from data.subject_data import SubjectData
from data.targets import TargetTable, cached_targets
from models.clip_image import build_clip_image, target_shape
from models.errors import ConfigError


@dataclass
class TinyViTConfig:
    image_size: int = 64
    patch_size: int = 16
    width: int = 128
    layers: int = 4
    heads: int = 4
    output_dim: int = 64


@dataclass
class ClipConfig:
    arch: str = "ViT-L-14"  # open_clip architecture name
    weights: str = ""  # local CLIP weights file (OpenAI, open_clip or Hugging Face), or "random" (tests, embedded default)
    activation: str = "auto"  # "auto" (from the weights file: OpenAI's -> QuickGELU), "quick_gelu" or "gelu"
    # "tokens" (257 x 768 for ViT-L/14) or "pooled" (1 x 768), as MindEye 1; "patch_tokens"
    # (256 x 1664 for ViT-bigG/14), as MindEye 2
    target: str = "tokens"
    seed: int = 0  # initialisation of a random encoder
    batch_size: int = 64
    tiny: Optional[TinyViTConfig] = None  # architecture of a random encoder


def clip_key(c: DictConfig) -> dict:
    """What identifies the CLIP targets of `clip.*` in the target cache ("preprocess" names
    MindEye 1's preprocessing, so that targets computed otherwise are never reused)."""
    return {"arch": c.arch, "weights": c.weights, "activation": c.activation, "target": c.target, "seed": c.seed,
            "tiny": OmegaConf.to_container(c.tiny) if c.tiny is not None else None, "preprocess": "mindeye1"}


def clip_encoder(c: DictConfig):
    """The frozen CLIP image encoder of `clip.*` (random or loaded from `clip.weights`)."""
    state, quick_gelu = config_weights(c.weights, c.activation, ConfigError)
    k = clip_key(c)
    try:
        return build_clip_image(k["arch"], state, k["target"], quick_gelu, k["seed"], k["tiny"])
    except ValueError as e:
        raise ConfigError(str(e) if state is None else f"{c.weights}: {e} (clip.weights for clip.arch={c.arch})") from None


def clip_target_shape(c: DictConfig) -> tuple[int, int]:
    """(tokens, dim) of the targets of `clip.*`, from the architecture alone (no weights)."""
    try:
        return target_shape(c.arch, c.target, OmegaConf.to_container(c.tiny) if c.tiny is not None else None)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def clip_targets(c: DictConfig, data: SubjectData, encoder) -> TargetTable:
    """The CLIP targets of every image `data`'s subjects saw, by `encoder` (`clip_encoder(c)`),
    computed once and cached."""
    return cached_targets(encoder, clip_key(c), data.root, data.manifest, data.subjects, data.cache, c.batch_size)
