"""CLIP weights files as users hold them, read into OpenAI's state-dict layout (models/clip_keys.py).

Accepted (`FORMATS`): OpenAI's TorchScript releases (`ViT-L-14.pt`, as the `clip` package
and open_clip download them), a state dict in OpenAI's or open_clip's layout (torch or
safetensors file, bare or under "state_dict"), and Hugging Face transformers' CLIP weights
(`pytorch_model.bin` or `model.safetensors` of e.g. `openai/clip-vit-large-patch14`, whose
`CLIPVisionModelWithProjection` MindEye 1 used).

The activation belongs to the weights: OpenAI's CLIP was trained with QuickGELU, open_clip's
own trainings (LAION) with GELU. A file says which when it is OpenAI's TorchScript release
(QuickGELU) or a Hugging Face file with its `config.json` beside it (`hidden_act`); a bare
state dict does not, and then the config must (`clip.activation`).
"""
from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors

from data.files import read_json
from data.pretrained_weights import WeightsMissing
from models.clip_keys import OPENAI_SIZE_ENTRIES, clip_layout, to_openai_layout

FORMATS = ("OpenAI's TorchScript release (e.g. ViT-L-14.pt), an OpenAI or open_clip state dict, or a Hugging Face "
           "transformers CLIP file (pytorch_model.bin or model.safetensors)")
ACTIVATIONS = ("auto", "quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPWeights:
    path: Path
    state: dict[str, torch.Tensor]  # OpenAI's layout
    quick_gelu: bool | None  # what the file says: True for QuickGELU, False for GELU, None when it does not say
    says: str = ""  # what says it, for messages


def _tensors(path: Path) -> tuple[dict, bool]:
    """(the file's tensors, whether it is a TorchScript archive)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any("/code/" in name for name in archive.namelist()):
                with warnings.catch_warnings():  # torch deprecates TorchScript, the format of OpenAI's releases
                    warnings.simplefilter("ignore", FutureWarning)
                    return torch.jit.load(str(path), map_location="cpu").state_dict(), True
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then JSON
        return load_safetensors(str(path)), False
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if isinstance(state, dict) and state and all(str(k).startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DistributedDataParallel
    return state, False


def read_clip_weights(path: str | Path, error: type[Exception], flag: str) -> CLIPWeights:
    """The CLIP weights in file `path` and what the file says of its activation.

    A missing file raises WeightsMissing, a file in none of the FORMATS `error`, each one
    line naming the file and `flag` (where the user gave it, e.g. "clip.weights").
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsMissing(f"{path}: CLIP weights not found ({flag})")
    try:
        raw, torchscript = _tensors(path)
        state = to_openai_layout(raw) if isinstance(raw, dict) else None
    except Exception:  # noqa: BLE001 - whatever fails to read gets the same one-line error
        state = None
    if state is None:
        raise error(f"{path}: not CLIP weights in an accepted format ({flag}); accepted: {FORMATS}")
    if torchscript and all(k in raw for k in OPENAI_SIZE_ENTRIES):
        return CLIPWeights(path, state, True, "OpenAI's TorchScript release")
    config = path.with_name("config.json")
    if clip_layout(raw) == "hf" and config.is_file():
        settings = read_json(config, error, "not found")
        vision = (settings.get("vision_config") or settings) if isinstance(settings, dict) else {}
        act = vision.get("hidden_act", "quick_gelu")  # transformers' default for CLIP
        if act not in ("quick_gelu", "gelu"):
            raise error(f"{config}: hidden_act {act!r}; CLIP weights use quick_gelu or gelu")
        return CLIPWeights(path, state, act == "quick_gelu", f"{config} (hidden_act {act})")
    return CLIPWeights(path, state, None)


def use_quick_gelu(weights: CLIPWeights, activation: str, error: type[Exception], key: str) -> bool:
    """Whether to build the model with QuickGELU: what the file says when `activation` (the
    value of config key `key`, one of ACTIVATIONS) is "auto", else `activation`, which must then
    agree with the file."""
    if activation == "auto":
        if weights.quick_gelu is None:
            raise error(f"{weights.path}: the file does not say whether its CLIP uses QuickGELU (OpenAI's weights) or "
                        f"GELU (e.g. LAION's open_clip weights); set {key}=quick_gelu or {key}=gelu")
        return weights.quick_gelu
    wanted = activation == "quick_gelu"
    if weights.quick_gelu is not None and weights.quick_gelu != wanted:
        said = "quick_gelu" if weights.quick_gelu else "gelu"
        raise error(f"{weights.path}: {weights.says} says {said}, but {key}={activation}")
    return wanted


def config_weights(weights: str, activation: str, error: type[Exception]) -> tuple[dict | None, bool]:
    """A recipe's `clip.weights` (a file, or "random") and `clip.activation` -> (the state dict
    in OpenAI's layout, or None for a random model; whether to build it with QuickGELU)."""
    if not weights:
        raise error(f"clip.weights is not set: give a local CLIP weights file ({FORMATS}), or 'random'")
    if activation not in ACTIVATIONS:
        raise error(f"clip.activation: {activation!r}, expected one of {', '.join(ACTIVATIONS)}")
    if weights == "random":
        return None, activation == "quick_gelu"
    read = read_clip_weights(weights, error, "clip.weights")
    return read.state, use_quick_gelu(read, activation, error, "clip.activation")
