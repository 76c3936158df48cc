"""The compute dtype of a DeepSpeed engine's forward passes."""
from __future__ import annotations

import torch


def engine_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
