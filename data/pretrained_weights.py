"""Pretrained weights files as users hold them, read into the models of models/: the ConvNeXt
teacher of the low-level branch (a torchvision-layout state dict) and the image MAE of DC-MAE
phase 2 (an official MAE checkpoint with its decoder).

Each reader takes the value of a config key (a local file, or "random" for the tiny random
models of tests and the simulated dataset) and the key itself; a file that is missing,
unreadable or not the expected weights raises one line naming the file and the key.
"""
from __future__ import annotations

from pathlib import Path

import torch

from data.files import load_tensors
from models.convnext_features import ConvNeXtFeatures, build_convnext_features
from models.errors import InputError
from models.image_mae import ImageMAE, build_image_mae
from models.strict_load import StateMismatch


class WeightsError(InputError):
    """Pretrained weights (a file or a diffusers folder) that cannot be used; the message names
    them and the config key that gave them."""


class WeightsMissing(WeightsError):
    """The weights, or a part of them, are not where the config says."""


def read_weights_file(weights: str, missing: str, unreadable: str) -> tuple[Path, object]:
    """(the path, the tensors of file `weights`); an absent file raises WeightsMissing as
    "<path>: <missing>", an unreadable one WeightsError as "<path>: <unreadable> (<reason>)"."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsMissing(f"{path}: {missing}")
    return path, load_tensors(path, WeightsError, unreadable)


def load_convnext_features(arch: str, weights: str, stage: int, image_size: int, grid: int, seed: int = 0,
                           tiny: dict | None = None) -> ConvNeXtFeatures:
    """`build_convnext_features` with the state dict in file `weights` (`teacher.weights`), or
    random weights for "random" (tests, embedded default)."""
    if weights == "random":
        return build_convnext_features(arch, None, stage, image_size, grid, seed, tiny)
    path, state = read_weights_file(
        weights, f"ConvNeXt weights not found (set teacher.weights to a local torchvision-layout {arch} state dict)",
        "unreadable ConvNeXt weights")
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a torchvision {arch} state dict")
    try:
        return build_convnext_features(arch, state, stage, image_size, grid, seed, tiny)
    except StateMismatch as e:
        raise WeightsError(f"{path}: {e}") from None


def load_image_mae(weights: str, flag: str, seed: int = 0, **arch) -> ImageMAE:
    """`build_image_mae` with the state of a local official MAE checkpoint (with its decoder),
    or an initialisation from `seed` for "random"; `arch`: ImageMAE's arguments, which must
    match the file. `flag` is the config key that gave `weights`, named in errors."""
    if weights == "random":
        return build_image_mae(None, seed, **arch)
    path, obj = read_weights_file(
        weights, f"image MAE weights not found (set {flag} to a local official MAE .pth with its decoder, "
        "e.g. mae_visualize_vit_base.pth, or 'random')", f"unreadable image MAE weights (set {flag})")
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not an MAE checkpoint (no 'model' dict of tensors; set {flag})")
    try:
        return build_image_mae(state, seed, **arch)
    except StateMismatch as e:
        raise WeightsError(f"{path}: {e} (set {flag})") from None
