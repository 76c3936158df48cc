"""Run configs: one YAML file per recipe, validated against the recipe's dataclass schema.

Any key can be overridden on the command line as `key=value` (dotted paths, e.g.
`train.epochs=10 model.hidden=1024`); `ds.<key>=value` overrides a key of the DeepSpeed
JSON. Unknown keys and ill-typed values are errors naming the key. A YAML file may start
from another with `base: other.yaml` (a path relative to it) and change only some keys.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.simulator.build import SimulatorConfig


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


@dataclass
class DataConfig:
    root: str = "simulated"  # a converted dataset folder, or "simulated" for the embedded default
    cache_dir: Optional[str] = None  # default: $FMRIDECODE_CACHE or ~/.cache/fmridecode
    subject: int = 1
    loader: str = "memory"  # "memory" (rank-count independent order) or "stream" (webdataset streaming)
    num_workers: int = 2  # stream loader only
    shuffle_buffer: int = 1000  # stream loader only
    verify_checksums: bool = True
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)


@dataclass
class TrainConfig:
    epochs: int = 240
    batch_size: int = 32  # global: samples per optimizer step over all ranks
    grad_accum: int = 1
    lr: float = 3e-4  # OneCycle maximum, or the starting lr of the step schedule
    lr_scale: dict[str, float] = field(default_factory=dict)  # parameter-name substring -> lr multiplier
    weight_decay: float = 1e-2  # not applied to biases and norms (0: plain Adam)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's
    # "one_cycle"; "step": lr x step_gamma every step_epochs epochs; "warmup_cosine": linear
    # warm-up over warmup_epochs, then half a cosine to 0
    schedule: str = "one_cycle"
    pct_start: Optional[float] = None  # OneCycle warm-up share; default 2 / epochs
    final_div_factor: float = 1000.0
    step_epochs: int = 25
    step_gamma: float = 0.7
    warmup_epochs: int = 0
    grad_clip: float = 1.0
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end
    val_every: int = 0  # steps; 0 = at the end of every epoch
    log_every: int = 1
    max_steps: Optional[int] = None  # stop early (the schedules still span all epochs)
    fused_adam: bool = True  # torch's fused AdamW kernels (CPU and GPU); false: its per-tensor loop
    compile: bool = False  # torch.compile the model (DeepSpeed's engine.compile)


@dataclass
class RecipeConfig:
    """The keys of every recipe."""
    recipe: str = "mindeye"
    run_dir: str = "runs/mindeye"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class RunConfig(RecipeConfig):
    """A recipe trained by the engine (train/engine.py)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    ds: dict[str, Any] = field(default_factory=dict)  # overrides of the DeepSpeed JSON


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's keys, on top of those of its `base` file (if any)."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: base files form a cycle")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_first_line(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    if "base" not in raw:
        return raw
    base = _read_yaml(path.parent / raw.pop("base"), (*seen, path.resolve()))
    return OmegaConf.to_container(OmegaConf.merge(base, raw))


def load(path: Path, overrides: list[str]) -> DictConfig:
    """Read a recipe YAML, merge the overrides, validate against the recipe's schema."""
    raw = _read_yaml(Path(path))
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"command line: {o!r} is not a key=value override")
    cli = OmegaConf.from_dotlist(overrides)
    recipe = cli.get("recipe", raw.get("recipe", "mindeye"))
    try:
        schema = importlib.import_module(f"train.recipes.{recipe}").Config
    except ModuleNotFoundError:
        raise ConfigError(f"{path}: unknown recipe {recipe!r}") from None
    cfg = OmegaConf.structured(schema)
    for source, part in ((path, OmegaConf.create(raw)), ("command line", cli)):
        try:
            cfg = OmegaConf.merge(cfg, part)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            raise ConfigError(f"{source}: {key + ': ' if key else ''}{_first_line(e)}") from None
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
