"""The recipe contract: what every recipe provides, and the capabilities it may declare.

A recipe is one module `train/recipes/<name>.py` whose class `Recipe` subclasses exactly one
way of being trained and any of the capabilities below; the registry (train/registry.py)
finds it by its module name, and `recipe: <name>` in a config selects it. Declaring a
capability is subclassing its protocol, so a type checker holds the methods to the
signatures here, and the engine, `python -m eval`, `python -m train.reconstruct`, sweeps and
benchmarks dispatch on what a recipe declares, never on which methods it happens to have.

Every recipe:
- `Config`: its config schema, a dataclass deriving `train.config.RunConfig` (trained) or
  `train.config.ClosedFormConfig` (fitted), with `recipe` defaulting to the module name;
- `__init__(cfg, rank, world, device, train=True)`: with `train=False` only what scoring
  and generation need (no batch stream); every file it reads is checked first;
- `model`: the `nn.Module` whose state dict is the checkpoint;
- `data`: the `data.subject_data.SubjectData` it reads.

`forward` below is the DeepSpeed engine during training, the bare model elsewhere; `dtype`
is the dtype of its inputs; `split` is "train", "val" or "test".
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from omegaconf import DictConfig
from torch import nn

from data.subject_data import SubjectData


class Recipe(Protocol):
    Config: ClassVar[type]
    model: nn.Module
    data: SubjectData

    def __init__(self, cfg: DictConfig, rank: int, world: int, device: torch.device, train: bool = True) -> None: ...


class Trained(Recipe, Protocol):
    """Trained by train/engine.py: DeepSpeed, the optimizer, checkpoints and resume are the
    engine's; the recipe gives the batch stream and the loss."""
    loader: Any  # data.loaders.MemoryLoader or StreamLoader: `steps_per_epoch`, `epoch(epoch, start_step)`, `close()`

    def loss(self, engine, batch: dict, step: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch, and the values to log (including "loss")."""
        ...


class Fitted(Recipe, Protocol):
    """Fitted in closed form by train/closed_form.py (ridge decoders inside `model`)."""
    decoders: dict[str, tuple[nn.Module, Any]]  # name -> (models.ridge_decoder.RidgeDecoder, data.targets.TargetTable)


class HeldOutScores(Protocol):
    """The recipe's own scores of a held-out split: the engine's validation and test results,
    and the first table of `python -m eval`."""

    def score(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]: ...


class Embeds(Protocol):
    """Embeddings for retrieval: brain embeddings and the image embeddings they should
    retrieve, one row per test image; `python -m eval` draws the retrieval figure from them."""

    def embeddings(self, forward, split: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """{"brain": [N, ...], "image": [N, ...], "image_ids": [N]} on CPU, from repeat-averaged voxels."""
        ...


class PredictsLabels(Protocol):
    """Multi-label predictions (the manifest's categories), per subject; `python -m eval`
    reports mAP, ROC AUC and Hamming loss per subject and their mean."""
    subjects: list[int]

    def predict_labels(self, forward, split: str, subject: int,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(class probabilities [N, C], labels [N, C]) of one subject's split, repeat-averaged."""
        ...


class Generates(Protocol):
    """Image generation from voxels: `python -m train.reconstruct` writes the test split's
    images, and `python -m eval --recons` scores them with the image metrics. The config has
    a `generation` section with at least `n_samples`, `batch_size` and `seed`
    (`train.config.GenerationKeys`). `averages_outputs`: the recipe is given each sample's
    repeats, not their mean, and averages what the model computes from each (MindEye 2)."""
    averages_outputs: ClassVar[bool] = False

    def generate(self, voxels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Repeat-averaged voxels [B, V] (with `averages_outputs`: the repeats [B, R, V], zero
        rows beyond a sample's count) -> images [B, generation.n_samples, 3, H, W] in [0, 1];
        sample j's randomness comes from seeds[j] alone."""
        ...


class PredictsLatents(Protocol):
    """A low-level branch whose predicted Stable Diffusion latents can start another recipe's
    img2img (`python -m train.reconstruct --lowlevel`)."""

    def predict_latents(self, voxels: torch.Tensor) -> torch.Tensor:
        """Repeat-averaged voxels [B, V] -> scaled VAE latents [B, 4, S, S]."""
        ...

    def latent_source(self) -> dict:
        """What identifies the VAE the latents belong to (compared with the generator's)."""
        ...


class RefinesLatents(Generates, Protocol):
    """A generator that can start from another recipe's predicted latents (MindEye: img2img
    from the low-level branch at `generation.strength`)."""

    def start_from(self, lowlevel: PredictsLatents) -> None: ...


@dataclass
class Planned:
    """What the memory planner sizes: the trained `model`; `forward(micro_batch, ranks)`, one
    rank's training forward pass of synthetic inputs in the model's dtype and device, reduced
    to a scalar to backward through (with what its loss gathers from the other ranks); the
    `frozen` modules a run keeps on the device beside the model."""
    model: nn.Module
    forward: Callable[[int, int], torch.Tensor]
    frozen: list[nn.Module] = field(default_factory=list)


class PlansMemory(Protocol):
    """Sized by the memory planner (`python -m benchmarks.plan`) from its config alone: no
    data, no weight files; the planner builds it on the meta device."""

    @classmethod
    def planned(cls, cfg: DictConfig, voxel_counts: list[int]) -> Planned:
        """`voxel_counts`: each trained subject's voxels, in `data.subjects` order."""
        ...


CAPABILITIES: dict[str, type] = {
    "scores": HeldOutScores, "embeddings": Embeds, "labels": PredictsLabels, "generation": Generates,
    "latents": PredictsLatents, "refines": RefinesLatents, "memory": PlansMemory,
}
TRAINING_KINDS: dict[str, type] = {"trained": Trained, "fitted": Fitted}


def declares(recipe: type | object, protocol: type) -> bool:
    """Whether a recipe (class or instance) declares `protocol` by subclassing it."""
    cls = recipe if isinstance(recipe, type) else type(recipe)
    return protocol in cls.__mro__
