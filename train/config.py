"""Run configs: one YAML file per recipe, validated against the recipe's dataclass schema.

Any key can be overridden on the command line as `key=value` (dotted paths, e.g.
`train.epochs=10 model.hidden=1024`); `ds.<key>=value` overrides a key of the DeepSpeed
JSON. Unknown keys and ill-typed values are errors naming the key. A YAML file may start
from another with `base: other.yaml` (a path relative to it) and change only some keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.simulator.build import SimulatorConfig
from models.errors import ConfigError  # noqa: F401  (train.config.ConfigError is what recipes raise)


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


@dataclass
class RidgeConfig:
    alphas: list[float] = field(default_factory=lambda: [10 ** (e / 2) for e in range(2, 15)])  # 10 to 1e7
    folds: int = 5  # k-fold CV over images (an image's repeats stay in one fold)
    chunk: int = 4096  # targets solved at a time
    device: str = "auto"  # "auto": cuda when available; also where frozen target models run
    dtype: str = "float32"  # of the target passes ("float64" for exactness; the decomposition is float64)


@dataclass
class ClosedFormConfig(RecipeConfig):
    """A recipe fitted in closed form (train/closed_form.py): no optimizer, schedule or DeepSpeed keys."""
    ridge: RidgeConfig = field(default_factory=RidgeConfig)


@dataclass
class GenerationKeys:
    """The `generation` keys every generating recipe has (train/recipe.py `Generates`)."""
    n_samples: int = 1  # images per test sample
    batch_size: int = 4  # test samples per generation batch
    seed: int = 0  # with the test image id, seeds each sample's randomness


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
    from train import registry  # the recipes import this module

    try:
        schema = registry.get(recipe).Config
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg = OmegaConf.structured(schema)
    for source, part in ((path, OmegaConf.create(raw)), ("command line", cli)):
        try:
            cfg = OmegaConf.merge(cfg, part)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            raise ConfigError(f"{source}: {key + ': ' if key else ''}{_first_line(e)}") from None
    check_ranges(cfg)
    return cfg


# Allowed ranges of numeric keys, by the key's last name (any section, any recipe): a value
# outside is one ConfigError naming the key. (low, high, low inclusive, high inclusive).
_AT_LEAST_1 = (1, None, True, True)
_AT_LEAST_0 = (0, None, True, True)
_POSITIVE = (0, None, False, True)
_FRACTION = (0, 1, True, True)
_OPEN_FRACTION = (0, 1, False, False)
RANGES: dict[str, tuple] = {
    **dict.fromkeys(("epochs", "batch_size", "grad_accum", "checkpoint_every", "log_every", "max_steps",
                     "step_epochs", "n_samples", "steps", "sample_steps", "timesteps", "n_trials", "chunk",
                     "cache_batch_size", "vae_batch_size", "shuffle_buffer", "depth", "heads", "layers", "dim",
                     "hidden", "n_blocks", "patch_size", "image_size", "latent_size", "sample_size", "size",
                     "dim_head", "decoder_dim", "decoder_depth", "decoder_heads", "proj_hidden", "feature_hidden",
                     "classifier_hidden", "map_channels", "map_side", "norm_groups", "n_context", "context_dim",
                     "n_subject_tokens", "llv_pool", "width", "output_dim", "embed_dim", "context_length",
                     "vocab_size", "n_repeats", "n_subjects", "n_train", "n_test", "shard_max_bytes", "subject",
                     "stage", "sessions", "prior_steps"), _AT_LEAST_1),
    **dict.fromkeys(("val_every", "warmup_epochs", "num_workers", "weight_decay", "grad_clip", "seed", "n_val",
                     "n_voxels", "bce", "orth", "rsa_hlv", "rsa_llv", "recon", "self_contrast", "cross_contrast",
                     "fmri_recon", "image_recon", "loss_weight", "contrastive_weight", "mix_alpha", "guidance",
                     "noise_voxel_fraction", "individuality", "snr_scale"), _AT_LEAST_0),
    **dict.fromkeys(("lr", "mix_tau", "soft_tau_start", "soft_tau_end", "contrastive_tau", "temperature",
                     "latent_scale", "final_div_factor", "step_gamma", "mlp_ratio"), _POSITIVE),
    **dict.fromkeys(("input_dropout", "block_dropout", "dropout", "cond_drop_prob", "mix_prob", "mix_fraction",
                     "early_fraction", "blend"), _FRACTION),
    **dict.fromkeys(("mask_ratio", "pct_start"), _OPEN_FRACTION),
    "strength": (0, 1, False, True),
    "n_way": (2, None, True, True),
    "folds": (2, None, True, True),
}


def _expected(low, high, low_in, high_in) -> str:
    if high is None:
        return f"{'at least' if low_in else 'more than'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def check_ranges(cfg: DictConfig, prefix: str = "") -> None:
    """Every numeric key within its allowed range (RANGES); a NaN or infinite float is refused too."""
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            if not str(key) == "ds":  # DeepSpeed's own keys are DeepSpeed's to check
                check_ranges(value, f"{name}.")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value}: expected a finite number")
        rule = RANGES.get(str(key))
        if rule is None:
            continue
        low, high, low_in, high_in = rule
        ok = (value >= low if low_in else value > low) and (high is None or (value <= high if high_in else value < high))
        if not ok:
            raise ConfigError(f"{name}={value}: expected {_expected(*rule)}")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
