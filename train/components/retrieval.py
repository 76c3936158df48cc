"""Test retrieval as MindEye scores it: the `eval.*` settings and the scores of retrieval pairs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from models.scores import retrieval


@dataclass
class RetrievalConfig:
    n_way: int = 300
    n_trials: int = 30
    seed: int = 0
    batch_size: int = 128


def retrieval_scores(pairs: dict[str, torch.Tensor], e: DictConfig) -> dict[str, float]:
    """n-way top-1/top-5 retrieval both ways of pairs["brain"] against pairs["image"] (and, when
    present, of the prior's samples pairs["prior"], as prior_*), by the `eval.*` settings `e`."""
    results = retrieval(pairs["brain"], pairs["image"], e.n_way, e.n_trials, e.seed)
    if "prior" in pairs:
        sampled = retrieval(pairs["prior"], pairs["image"], e.n_way, e.n_trials, e.seed)
        results.update({f"prior_{k}": v for k, v in sampled.items() if k.startswith(("forward", "backward"))})
    return results
