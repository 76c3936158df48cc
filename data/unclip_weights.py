"""MindEye 2's unCLIP checkpoint as users hold it, read into the diffusers UNet of models/unclip_sgm.py.

`unclip6_epoch0_step110000.ckpt` (huggingface.co/datasets/pscotti/mindeyev2) is a training checkpoint of
sgm's `DiffusionEngine`: its "state_dict" holds the UNet under `model.diffusion_model.*` beside the image
embedder (`conditioner.*`) and the VAE (`first_stage_model.*`), which are not read. It is unpickled without
running code (data/released_pickle.py); a bare state dict in that layout is read as well.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from data.pretrained_weights import WeightsError, WeightsMissing
from data.released_pickle import load_released
from models.strict_load import StateMismatch
from models.unclip_sgm import UNCLIP6, random_unclip_unet, unclip_unet

CHECKPOINT = "MindEye 2's unclip6_epoch0_step110000.ckpt"


def load_unclip_unet(weights: str, flag: str = "generation.unclip", network: dict = UNCLIP6,
                     seed: int = 0) -> UNet2DConditionModel:
    """The unCLIP UNet of `network` with the weights of file `weights` (the config key `flag`), or
    random weights for "random" (tests, the simulated dataset). A missing, unreadable or mismatched
    file is one error line naming the file, the first entry at fault and `flag`."""
    if weights == "random":
        return random_unclip_unet(network, seed)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsMissing(f"{path}: unCLIP checkpoint not found (set {flag} to a local copy of {CHECKPOINT})")
    obj = load_released(path, WeightsError, f"unreadable unCLIP checkpoint (set {flag})")
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not an sgm checkpoint (no 'state_dict' of tensors; set {flag} to {CHECKPOINT})")
    try:
        return unclip_unet(state, network)
    except StateMismatch as e:
        raise WeightsError(f"{path}: {e} (set {flag} to {CHECKPOINT})") from None
