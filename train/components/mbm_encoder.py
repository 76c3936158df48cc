"""The fMRI masked autoencoder shared by the MinD-Vis / DC-MAE recipes: its `model.*`
architecture config, building one, and loading a pretrained one: a pretraining run's (recipe
mbm, or phase 2, whose fMRI model's weights sit under `fmri.`), a released file (MinD-Vis'
`fmri_encoder.pth`, DC-MAE's phase-1 or phase-2 `checkpoint.pth`), or the encoder of a stage-B
run or file (recipe fmri_ldm, under `encoder.`; MinD-Vis' `finetuned.pth`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from models.mbm import MaskedBrainModel, strip_decoder
from models.strict_load import load_strict
from train.checkpoint import CheckpointError, load_checkpoint, set_buffers


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
    norm_eps: float = 1e-5  # LayerNorm eps (MinD-Vis' and DC-MAE's: torch's default)


def build_encoder(model_cfg: DictConfig) -> MaskedBrainModel:
    return MaskedBrainModel(**OmegaConf.to_container(model_cfg))


def load_pretrained_encoder(path: str, flag: str) -> MaskedBrainModel:
    """The fMRI masked autoencoder of a pretraining run: a run folder or a checkpoint folder.
    `flag` is the config key that gave `path`, named in errors."""
    try:
        ckpt = load_checkpoint(Path(path))
    except CheckpointError as e:
        raise CheckpointError(f"{e} (set {flag})") from None
    state, buffers, model_cfg = ckpt.state, ckpt.buffers, ckpt.cfg.get("model")
    for prefix in ("fmri.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            buffers = {k.removeprefix(prefix): v for k, v in buffers.items()}
    if ckpt.cfg.recipe == "fmri_ldm":  # its encoder without the decoder
        model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), ckpt.cfg.encoder.model, {"decoder_depth": 0})
    model = build_encoder(model_cfg)
    if ckpt.cfg.recipe == "fmri_ldm":
        model = strip_decoder(model)
    try:
        load_strict(model, state)
        set_buffers(model, buffers)
    except ValueError as e:
        raise CheckpointError(f"{ckpt.source}: {e} (set {flag})") from None
    return model
