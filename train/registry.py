"""Recipe names -> recipe classes: every module `train/recipes/<name>.py` that defines a
`Recipe` (train/recipe.py says what it provides). Adding a recipe adds a module; nothing
here or elsewhere lists them."""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import torch

import train.recipes
from models.errors import ConfigError
from train.checkpoint import Checkpoint, load_checkpoint
from train.recipe import CAPABILITIES, TRAINING_KINDS, declares


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(train.recipes.__path__) if not m.name.startswith("_"))


def get(name: str) -> type:
    """The recipe class registered as `name`; an unknown name is a ConfigError listing the known ones."""
    known = names()
    if name not in known:
        raise ConfigError(f"recipe: unknown recipe {name!r}; known: {', '.join(known)}")
    module = importlib.import_module(f"{train.recipes.__name__}.{name}")
    cls = getattr(module, "Recipe", None)
    if cls is None or not hasattr(cls, "Config"):
        raise ConfigError(f"recipe {name!r}: train/recipes/{name}.py defines no Recipe class with a Config")
    kinds = [k for k, p in TRAINING_KINDS.items() if declares(cls, p)]
    if len(kinds) != 1:
        raise ConfigError(f"recipe {name!r}: its Recipe must declare one of {', '.join(TRAINING_KINDS)}, not {kinds}")
    return cls


def name_of(recipe: type | object) -> str:
    cls = recipe if isinstance(recipe, type) else type(recipe)
    return cls.__module__.rsplit(".", 1)[-1]


def training_kind(recipe: type | object) -> str:
    return next(k for k, p in TRAINING_KINDS.items() if declares(recipe, p))


def capabilities(recipe: type | object) -> set[str]:
    """The capability names (train.recipe.CAPABILITIES) a recipe declares."""
    return {k for k, p in CAPABILITIES.items() if declares(recipe, p)}


def require(recipe: type | object, capability: str, asked: str) -> None:
    """A ConfigError, in one line, when a recipe lacks the capability that `asked` needs."""
    if capability not in capabilities(recipe):
        have = ", ".join(sorted(capabilities(recipe))) or "none"
        raise ConfigError(f"{asked}: recipe {name_of(recipe)!r} does not declare {capability!r} "
                          f"(train/recipe.py; it declares: {have})")


def from_checkpoint(path: Path, config_path: Path | None, overrides: list[str], device: torch.device):
    """(checkpoint, recipe built for scoring with the checkpoint's weights, in eval mode on `device`)."""
    ckpt: Checkpoint = load_checkpoint(path, config_path, overrides)
    recipe = get(ckpt.cfg.recipe)(ckpt.cfg, 0, 1, device, train=False)
    ckpt.load_into(recipe.model)
    recipe.model.to(device).eval()
    return ckpt, recipe
