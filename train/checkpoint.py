"""Finding a checkpoint's weights and config: our run folders, one checkpoint tag, or a released file.

- a run folder (`RUN_DIR`, holding `checkpoints/latest`): its latest checkpoint;
- a checkpoint folder (`RUN_DIR/checkpoints/step00000744`, or `RUN_DIR/checkpoints/ridge`
  holding a closed-form fit's `model.pt`);
- a single weights file (`.pt`, `.pth`, `.bin`, e.g. a released model), with `--config`
  giving the recipe YAML it was trained with. MindEye 1's and MindEye 2's released
  checkpoints are recognised by their keys and mapped onto ours (models/mindeye1_keys.py,
  models/mindeye2_keys.py); their training objects (DeepSpeed's, the optimizer's) are never
  unpickled (data/released_pickle.py).

A MindEye 2 file also sets the mindeye2 recipe's model sizes, prior and blurry branch from its
keys, and `data.subjects` from its folder name when that follows MindEye 2's naming, before the
command-line overrides; `init.checkpoint` is cleared (the file holds every weight). Without
`--config` it takes the paper config: fine-tuning for one subject, pretraining for several (so
the mindeye2 recipe's `init.checkpoint` takes a released file too).

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
from data.released_pickle import load_released
from models.errors import InputError
from models.mindeye1_keys import from_mindeye1, is_mindeye1
from models.mindeye2_keys import Layout, from_mindeye2, is_mindeye2, subjects_from_name
from models.strict_load import load_strict
from train import config

# The configs a MindEye 2 checkpoint file gets without --config: by whether it holds several subjects.
MINDEYE2_CONFIGS = {True: "mindeye2_pretrain_paper.yaml", False: "mindeye2_finetune_paper.yaml"}
CONFIGS = Path(__file__).resolve().parent / "configs"


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


def _released_state(path: Path, what: str) -> tuple[dict[str, torch.Tensor], Layout | None]:
    """The file's weights in our key layout, and what a MindEye 2 file's keys say of its model."""
    obj = load_released(path, CheckpointError, what)
    for key in ("model_state_dict", "state_dict", "module", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    state = {k.removeprefix("module."): v.float() for k, v in obj.items()}
    try:
        if is_mindeye1(state):
            return from_mindeye1(state), None
        if is_mindeye2(state):
            return from_mindeye2(state), Layout.of(state)
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from None
    return state, None


def _weights_file(path: Path, config_path: Path | None, overrides: list[str]) -> Checkpoint:
    """A single weights file: its config is --config (or a MindEye 2 file's default) with what its
    keys say merged in before the overrides (see the module docstring)."""
    what = ("unreadable checkpoint file" if config_path else
            "a single weights file needs --config unless it is a MindEye 2 checkpoint, and this one is unreadable")
    state, layout = _released_state(path, what)
    if layout is None:
        if config_path is None:
            raise CheckpointError(f"{path}: a single weights file needs --config (the recipe YAML it was trained "
                                  "with); only MindEye 2's checkpoints have a default")
        return Checkpoint(config.load(config_path, overrides), state, str(path), None)
    n, named = len(layout.voxel_counts), config_path is not None
    config_path = config_path or CONFIGS / MINDEYE2_CONFIGS[n > 1]
    recipe = config.load(config_path, overrides).recipe
    if recipe != "mindeye2":
        raise CheckpointError(f"{path}: a MindEye 2 checkpoint, but {config_path} is a {recipe!r} config "
                              f"(give a mindeye2 one, e.g. train/configs/{MINDEYE2_CONFIGS[n > 1]})")
    subjects = subjects_from_name(path.parent.name, n)
    inferred = [*layout.overrides(), "init.checkpoint=''",
                *([f"data.subjects=[{','.join(map(str, subjects))}]"] if subjects else [])]
    cfg = config.load(config_path, [*inferred, *overrides])
    # Checked against a config the user named; a default config may serve only to read the weights
    # (the recipe's init.checkpoint), and a mismatch there still fails when they are loaded.
    if named and cfg.data.subjects and len(cfg.data.subjects) != n:
        raise CheckpointError(f"{path}: holds the linear layers of {n} subjects (voxel counts "
                              f"{', '.join(map(str, layout.voxel_counts))}) but data.subjects lists "
                              f"{len(cfg.data.subjects)}; set data.subjects to the subjects it was trained on, "
                              "in order")
    return Checkpoint(cfg, state, str(path), None)


def load_checkpoint(path: Path, config_path: Path | None = None, overrides: list[str] = ()) -> Checkpoint:
    """Weights and resolved config of the checkpoint at `path` (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        return _weights_file(path, config_path, list(overrides))
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
