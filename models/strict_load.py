"""Strict state-dict loading whose error names the first entry that does not fit."""
from __future__ import annotations

import torch
from torch import nn


class StateMismatch(ValueError):
    """A state dict that does not fit the model; the message says where, and whoever read the
    weights names their file."""


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Load the entries of `state` under `prefix` into `module`, strictly.

    A missing, unexpected or misshapen entry raises StateMismatch naming the first one (e.g. the
    weights of another architecture or config, or an image-only file where a text tower is
    needed).
    """
    given = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    misshapen = [k for k in own if k in given and given[k].shape != own[k].shape]
    more = lambda names: f" and {len(names) - 1} more" if len(names) > 1 else ""  # noqa: E731
    if misshapen:
        k = misshapen[0]
        raise StateMismatch(f"{prefix}{k} is {list(given[k].shape)} in the weights, {list(own[k].shape)} in the model"
                            f"{more(misshapen)}")
    if missing:
        raise StateMismatch(f"the weights lack {prefix}{missing[0]}{more(missing)}")
    if unexpected:
        raise StateMismatch(f"the weights hold {prefix}{unexpected[0]}{more(unexpected)}, which the model has not")
    module.load_state_dict(given)
