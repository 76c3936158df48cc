"""Process-group setup and the collectives recipes use."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

# What a launcher (deepspeed, torchrun) or `init` sets for a process; a child process started
# from one must not inherit them, or it joins the wrong group.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")  # the launcher of this environment


def environment_without_launcher() -> dict[str, str]:
    """This process's environment less LAUNCHER_VARIABLES: for starting a new process group."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}


def free_port() -> int:
    """A TCP port free on this host now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_environment() -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT of this task of a Slurm job step
    (`srun`, or a submitit job), from Slurm's variables; empty outside one. The master is the
    step's first node; the port is derived from the job id, so every task agrees on it."""
    if "SLURM_PROCID" not in os.environ or "SLURM_STEP_NUM_TASKS" not in os.environ:
        return {}
    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_STEP_NODELIST"]], capture_output=True,
                           text=True, check=True).stdout.split()
    return {"RANK": os.environ["SLURM_PROCID"], "LOCAL_RANK": os.environ["SLURM_LOCALID"],
            "WORLD_SIZE": os.environ["SLURM_STEP_NUM_TASKS"], "MASTER_ADDR": nodes[0],
            "MASTER_PORT": str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)}


def init() -> tuple[int, int, int]:
    """Initialise the process group (nccl on GPU, gloo on CPU); returns (rank, local rank, world).

    Under a launcher (deepspeed, torchrun) its variables are used; in a Slurm job step,
    Slurm's; a plain `python train/main.py` runs as a group of one.
    """
    if "RANK" not in os.environ:
        os.environ.update(slurm_environment())
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
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
