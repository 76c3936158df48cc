"""The fMRI masked autoencoder shared by the MinD-Vis / DC-MAE recipes: its `model.*`
architecture config, building one, and loading a pretraining run's (recipe mbm, or phase 2,
whose fMRI model's weights sit under `fmri.`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from models.mbm import MaskedBrainModel
from models.strict_load import load_strict
from train.checkpoint import CheckpointError, load_checkpoint


@dataclass
class ModelConfig:  # models.mbm.MaskedBrainModel's arguments; defaults: MinD-Vis on HCP V1-V4
    n_voxels: int = 0  # encoder input; 0: the first pretraining subject's count (saved resolved)
    patch_size: int = 16
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 1.0
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_ratio: float = 0.75
    checkpoint_blocks: bool = False  # activation checkpointing per transformer block


def build_encoder(model_cfg: DictConfig) -> MaskedBrainModel:
    return MaskedBrainModel(**OmegaConf.to_container(model_cfg))


def load_pretrained_encoder(path: str, flag: str) -> MaskedBrainModel:
    """The fMRI masked autoencoder of a pretraining run: a run folder or a checkpoint folder.
    `flag` is the config key that gave `path`, named in errors."""
    try:
        ckpt = load_checkpoint(Path(path))
    except CheckpointError as e:
        raise CheckpointError(f"{e} (set {flag})") from None
    state = ckpt.state
    if any(k.startswith("fmri.") for k in state):
        state = {k.removeprefix("fmri."): v for k, v in state.items() if k.startswith("fmri.")}
    model = build_encoder(ckpt.cfg.model)
    try:
        load_strict(model, state)
    except ValueError as e:
        raise CheckpointError(f"{ckpt.source}: {e} (set {flag})") from None
    return model
