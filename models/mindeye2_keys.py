"""MindEye 2's released checkpoints in our key layout, and the model config their keys and names say.

Its checkpoints (`model_state_dict` of `last.pth`) hold `ridge.linears.<s>.*` and
`backbone.*` under the names our models/mindeye2.py uses, and the prior under
`diffusion_prior.net.*` (the DALL-E 2 prior network, mapped as MindEye 1's) beside its noise
schedule, which is dropped: ours is computed from the config.

The keys give the model's sizes (`Layout`); the subjects are named only by the folder MindEye 2
saved into (`train_logs/<model name>/last.pth`): `..._multisubject_subj0S...` was pretrained
on subjects 1-8 without S, `..._subj0S_...` trained on subject S alone (`subjects_from_name`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from models.mindeye1_keys import PRIOR_RULES, map_keys

RULES = [(r"ridge\.", "ridge."), (r"backbone\.", "backbone."),
         *((rf"diffusion_prior\.{pattern}", target) for pattern, target in PRIOR_RULES)]
NSD_SUBJECTS = range(1, 9)
_PRIOR_LAYER = "diffusion_prior.net.causal_transformer.layers.0.0."


def is_mindeye2(state: dict) -> bool:
    return (any(k.startswith("ridge.linears.") for k in state)
            and any(k.startswith("backbone.backbone_linear.") for k in state))


def from_mindeye2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A MindEye 2 state dict in our key layout; a key that maps nowhere is an error naming it."""
    return map_keys(state, RULES, "MindEye 2")


def _indices(state: dict, prefix: str) -> set[int]:
    return {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}


@dataclass(frozen=True)
class Layout:
    """The sizes of the mindeye2 recipe's model that a MindEye 2 state dict (its own key names) holds."""

    hidden: int
    n_blocks: int
    voxel_counts: tuple[int, ...]  # per subject, in the order of its linear layers
    blurry: bool
    prior: tuple[int, int, int] | None  # depth, heads, dim_head; None: saved without a prior

    @classmethod
    def of(cls, state: dict[str, torch.Tensor]) -> Layout:
        """A missing subject layer (the indices have a gap) is a KeyError naming it."""
        ridge = [f"ridge.linears.{i}.weight" for i in range(max(_indices(state, "ridge.linears.")) + 1)]
        missing = [k for k in ridge if k not in state]
        if missing:
            raise KeyError(f"MindEye 2 checkpoint lacks {missing[0]}")
        prior = None
        if any(k.startswith("diffusion_prior.") for k in state):
            dim_head = state[f"{_PRIOR_LAYER}null_kv"].shape[1]
            prior = (len(_indices(state, "diffusion_prior.net.causal_transformer.layers.")),
                     state[f"{_PRIOR_LAYER}to_q.weight"].shape[0] // dim_head, dim_head)
        return cls(state[ridge[0]].shape[0], len(_indices(state, "backbone.mixer_blocks1.")),
                   tuple(state[k].shape[1] for k in ridge), any(k.startswith("backbone.blin1.") for k in state), prior)

    def overrides(self) -> list[str]:
        """The mindeye2 recipe's config keys that must take these values for the weights to load."""
        model = [f"model.hidden={self.hidden}", f"model.n_blocks={self.n_blocks}",
                 f"model.blurry={str(self.blurry).lower()}", f"prior.enabled={str(self.prior is not None).lower()}"]
        if self.prior is None:
            return model
        depth, heads, dim_head = self.prior
        return [*model, f"prior.depth={depth}", f"prior.heads={heads}", f"prior.dim_head={dim_head}"]


def subjects_from_name(name: str, count: int) -> list[int] | None:
    """The NSD subjects of a MindEye 2 model folder name, in the order of its linear layers, when
    the name follows MindEye 2's convention and agrees with `count` layers; otherwise None."""
    match = re.search(r"(multisubject_)?subj0([1-8])", name)
    if match is None:
        return None
    held_out = int(match.group(2))
    subjects = [s for s in NSD_SUBJECTS if s != held_out] if match.group(1) else [held_out]
    return subjects if len(subjects) == count else None
