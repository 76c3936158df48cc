"""Finding a checkpoint's weights and config: our run folders, one checkpoint tag, or a released file.

- a run folder (`RUN_DIR`, holding `checkpoints/latest`): its latest checkpoint;
- a checkpoint folder (`RUN_DIR/checkpoints/step00000744`, or `RUN_DIR/checkpoints/ridge`
  holding a closed-form fit's `model.pt`);
- a single weights file (`.pt`, `.pth`, `.bin`, e.g. a released model), with `--config`
  giving the recipe YAML it was trained with. MindEye 1's and MindEye 2's released
  checkpoints are recognised by their keys and mapped onto ours (models/mindeye1_keys.py,
  models/mindeye2_keys.py).

DeepSpeed checkpoints are consolidated into one float32 state dict (the optimizer's fp32
master weights under ZeRO 1-3, so bf16 runs lose nothing).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from data.files import load_tensors
from models.errors import InputError
from models.mindeye1_keys import from_mindeye1, is_mindeye1
from models.mindeye2_keys import from_mindeye2, is_mindeye2
from models.strict_load import load_strict
from train import config


class CheckpointError(InputError):
    """No usable checkpoint where the user pointed; the message names the path."""


@dataclass
class Checkpoint:
    cfg: DictConfig
    state: dict[str, torch.Tensor]
    source: str  # what was loaded, for the report
    run_dir: Path | None  # the run folder it belongs to, when there is one

    def load_into(self, model: torch.nn.Module) -> None:
        """Load the weights strictly: a key missing on either side, or a shape that differs
        (the checkpoint was trained with another config), is an error naming the key."""
        try:
            load_strict(model, self.state)
        except ValueError as e:
            raise CheckpointError(f"{self.source}: {e} (recipe {self.cfg.recipe!r}); is --config the one it was "
                                  "trained with?") from None


def _deepspeed_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = ckpt_dir / tag
    if not any(folder.glob("*optim_states.pt")):  # ZeRO-0 without a partitioned optimizer
        model_file = folder / "mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise CheckpointError(f"{folder}: no DeepSpeed model states (mp_rank_00_model_states.pt)")
        module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in module.items()}
    chatter = io.StringIO()  # the consolidation prints per-parameter lines and a progress bar
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k: v.float() for k, v in state.items()}


def _released_state(path: Path) -> dict[str, torch.Tensor]:
    obj = load_tensors(path, CheckpointError, "unreadable checkpoint file")
    for key in ("model_state_dict", "state_dict", "module", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    state = {k.removeprefix("module."): v.float() for k, v in obj.items()}
    for released, mapping in ((is_mindeye1, from_mindeye1), (is_mindeye2, from_mindeye2)):
        if released(state):
            try:
                return mapping(state)
            except KeyError as e:
                raise CheckpointError(f"{path}: {e.args[0]}") from None
    return state


def load_checkpoint(path: Path, config_path: Path | None = None, overrides: list[str] = ()) -> Checkpoint:
    """Weights and resolved config of the checkpoint at `path` (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        if config_path is None:
            raise CheckpointError(f"{path}: a single weights file needs --config (the recipe YAML it was trained with)")
        return Checkpoint(config.load(config_path, list(overrides)), _released_state(path), str(path), None)
    if (path / "checkpoints" / "latest").is_file():
        ckpt_dir = path / "checkpoints"
        tag = (ckpt_dir / "latest").read_text().strip()
    elif (path / "mp_rank_00_model_states.pt").is_file() or (path / "model.pt").is_file():
        ckpt_dir, tag = path.parent, path.name
    else:
        raise CheckpointError(f"{path}: no checkpoint here (expected a run folder with checkpoints/latest, "
                              "a checkpoint folder, or a weights file)")
    cfg_file = config_path or ckpt_dir / tag / "config.yaml"
    if not Path(cfg_file).is_file():
        raise CheckpointError(f"{cfg_file}: the checkpoint's config is missing (pass --config)")
    cfg = config.load(Path(cfg_file), list(overrides))
    closed_form = ckpt_dir / tag / "model.pt"  # a closed-form fit (train/closed_form.py)
    if closed_form.is_file():
        state = load_tensors(closed_form, CheckpointError, "unreadable checkpoint file")
    else:
        state = _deepspeed_state(ckpt_dir, tag)
    return Checkpoint(cfg, state, str(ckpt_dir / tag), ckpt_dir.parent)
