"""Process-group setup and the collectives recipes use."""
from __future__ import annotations

import logging
import os
import socket

import deepspeed
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def init() -> tuple[int, int, int]:
    """Initialise the process group (nccl on GPU, gloo on CPU); returns (rank, local rank, world).

    A plain `python train/main.py` without a launcher runs as a group of one.
    """
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    else:  # DeepSpeed's CPU ops build with torch's extension builder, which warns about CUDA_HOME
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), local_rank, dist.get_world_size()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def gather(x: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (rank order). With grad, gradients flow back."""
    if world() == 1:
        return x
    if with_grad:
        return torch.cat(dist_fn.all_gather(x), 0)
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over ranks (for logging values each rank computes on its own slice)."""
    if world() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world()
