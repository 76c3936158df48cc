"""Per-step random seeds: dropout, mixing and noise depend only on (seed, step, rank), so a
resumed run draws exactly what an uninterrupted one would."""
from __future__ import annotations

import numpy as np


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
