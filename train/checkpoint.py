"""Finding a checkpoint's weights and config: our run folders, one checkpoint tag, or a released file.

- a run folder (`RUN_DIR`, holding `checkpoints/latest`): its latest checkpoint;
- a checkpoint folder (`RUN_DIR/checkpoints/step00000744`, or `RUN_DIR/checkpoints/ridge`
  holding a closed-form fit's `model.pt`);
- a single weights file (`.pt`, `.pth`, `.bin`, e.g. a released model), with `--config`
  giving the recipe YAML it was trained with. MindEye 1's and MindEye 2's released
  checkpoints are recognised by their keys and mapped onto ours (models/mindeye1_keys.py,
  models/mindeye2_keys.py); their training objects (DeepSpeed's, the optimizer's) are never
  unpickled (data/released_pickle.py).

MinD-Vis' and DC-MAE's released fMRI MAEs (`fmri_encoder.pth`, `checkpoint.pth`) are read as the
mbm recipe's model and MinD-Vis' stage-B `finetuned.pth` as the fmri_ldm recipe's, their sizes set
from their keys (models/mindvis_keys.py); without `--config` they take `mbm_hcp_paper.yaml` and
`fmri_ldm_god_paper.yaml`. A stage-B file is also the recipe's `ldm.weights` (its UNet's
configuration and its VQ first stage) and `encoder.checkpoint`.

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
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from data.files import load_tensors
from data.released_pickle import load_released
from models.errors import InputError
from models.mindeye1_keys import from_mindeye1, is_mindeye1
from models.mindeye2_keys import Layout, from_mindeye2, is_mindeye2, subjects_from_name
from models.strict_load import StateMismatch, load_strict
from train import config

# The configs a MindEye 2 checkpoint file gets without --config: by whether it holds several subjects.
MINDEYE2_CONFIGS = {True: "mindeye2_pretrain_paper.yaml", False: "mindeye2_finetune_paper.yaml"}
MINDVIS_CONFIGS = {"mbm": "mbm_hcp_paper.yaml", "fmri_ldm": "fmri_ldm_god_paper.yaml"}  # by the recipe a file is read as
CONFIGS = Path(__file__).resolve().parent / "configs"
logger = logging.getLogger(__name__)


class CheckpointError(InputError):
    """No usable checkpoint where the user pointed; the message names the path."""


@dataclass
class Checkpoint:
    cfg: DictConfig
    state: dict[str, torch.Tensor]
    source: str  # what was loaded, for the report
    run_dir: Path | None  # the run folder it belongs to, when there is one
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # non-persistent buffers the file sets

    def load_into(self, model: torch.nn.Module) -> None:
        """Load the weights strictly: a key missing on either side, or a shape that differs
        (the checkpoint was trained with another config), is an error naming the key."""
        try:
            load_strict(model, self.state)
            set_buffers(model, self.buffers)
        except ValueError as e:
            raise CheckpointError(f"{self.source}: {e} (recipe {self.cfg.recipe!r}); is --config the one it was "
                                  "trained with?") from None


def set_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Copy values into named buffers of `model`; a missing or misshapen one raises StateMismatch."""
    for name, value in buffers.items():
        try:
            own = model.get_buffer(name)
        except AttributeError:
            raise StateMismatch(f"{name}: the model has no such buffer") from None
        if own.numel() != value.numel():
            raise StateMismatch(f"{name} has {value.numel()} values in the weights, {own.numel()} in the model")
        with torch.no_grad():
            own.copy_(value.reshape(own.shape))


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


@dataclass
class _Released:
    state: dict[str, torch.Tensor]  # in our key layout
    layout: Layout | None = None  # a MindEye 2 file's
    recipe: str | None = None  # a MinD-Vis / DC-MAE file's: the recipe that reads it ...
    overrides: tuple[str, ...] = ()  # ... the config its keys give ...
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # ... and its position tables


def _mindvis(path: Path, state: dict[str, torch.Tensor], record) -> _Released | None:
    """A MinD-Vis / DC-MAE file's weights for the mbm or fmri_ldm recipe (see the module docstring), or
    None for another file. Imported here: the key maps bring diffusers, seconds of import in every
    process that loads this module, and training processes never read such files."""
    from diffusers import UNet2DConditionModel

    from models.mindvis_keys import (
        MAELayout,
        diffusers_unet_config,
        from_fmri_mae,
        from_mindvis_ldm,
        is_fmri_mae,
        is_mindvis_ldm,
        split_cross,
        stage_b_layout,
    )
    if is_mindvis_ldm(state):
        layout = stage_b_layout(state)
        with torch.device("meta"):  # only its names and shapes: the conversion's target
            unet = UNet2DConditionModel.from_config(diffusers_unet_config(layout.unet, [1], 8, "mind_vis"))
        fields = layout.encoder.overrides("encoder.model")  # heads: not in the file, MinD-Vis' DEFAULT_HEADS
        ours, buffers = from_mindvis_ldm(state, unet)
        return _Released(ours, recipe="fmri_ldm", buffers=buffers, overrides=(
            f"ldm.weights={path}", "ldm.conditioning=mind_vis", f"encoder.checkpoint={path}", *fields,
            f"ldm.context_dim={layout.context_dim}", f"ldm.n_context={layout.n_context}"))
    if not is_fmri_mae(state):
        return None
    mae, cross = split_cross(state)
    if cross:
        logger.info("%s: DC-MAE phase 2's cross-attention entries (%d) are not part of the fMRI MAE; not read",
                    path, len(cross))
    layout = MAELayout.of(mae, record)
    ours, buffers = from_fmri_mae(mae)
    return _Released(ours, recipe="mbm", overrides=tuple(layout.overrides("model")), buffers=buffers)


def _released_state(path: Path, what: str) -> _Released:
    """The file's weights in our key layout, and what its keys (and pickled config) say of its model."""
    obj = load_released(path, CheckpointError, what)
    record = obj.get("config") if isinstance(obj, dict) else None
    for key in ("model_state_dict", "state_dict", "module", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    state = {k.removeprefix("module."): v.float() for k, v in obj.items()}
    try:
        if is_mindeye1(state):
            return _Released(from_mindeye1(state))
        if is_mindeye2(state):
            return _Released(from_mindeye2(state), Layout.of(state))
        return _mindvis(path, state, record) or _Released(state)
    except (KeyError, StateMismatch) as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from None


def _weights_file(path: Path, config_path: Path | None, overrides: list[str]) -> Checkpoint:
    """A single weights file: its config is --config (or a recognised file's default) with what its
    keys say merged in before the overrides (see the module docstring)."""
    what = ("unreadable checkpoint file" if config_path else
            "a single weights file needs --config unless it is a MindEye 2, MinD-Vis or DC-MAE checkpoint, and "
            "this one is unreadable")
    released = _released_state(path, what)
    state, layout = released.state, released.layout
    if released.recipe:
        config_path = config_path or CONFIGS / MINDVIS_CONFIGS[released.recipe]
        recipe = config.load(config_path, overrides).recipe
        if recipe != released.recipe:
            raise CheckpointError(f"{path}: read by the {released.recipe} recipe, but {config_path} is a {recipe!r} "
                                  f"config (give a {released.recipe} one, e.g. "
                                  f"train/configs/{MINDVIS_CONFIGS[released.recipe]})")
        return Checkpoint(config.load(config_path, [*released.overrides, *overrides]), state, str(path), None,
                          released.buffers)
    if layout is None:
        if config_path is None:
            raise CheckpointError(f"{path}: a single weights file needs --config (the recipe YAML it was trained "
                                  "with); only MindEye 2's, MinD-Vis' and DC-MAE's checkpoints have a default")
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
