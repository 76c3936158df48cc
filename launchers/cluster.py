"""The cluster parameters users set, checked before anything is submitted, and the
submitit executor made from them. Nothing here is specific to one cluster: partition,
account, QoS and constraint are passed through as given."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import submitit

from models.errors import InputError


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """A launcher's own arguments, and those after `--` that it passes on."""
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1 :]


def wait(named_jobs: list[tuple[str, submitit.Job]]) -> list[int]:
    """Wait for every job (all its tasks) and report each; 0 per finished job, 1 per failed one."""
    codes = []
    for name, job in named_jobs:
        try:
            job.results()
            print(f"{name}: done", flush=True)
            codes.append(0)
        except Exception as e:  # noqa: BLE001 - report every job, then fail
            print(f"{name}: failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
            codes.append(1)
    return codes


class ResourceError(InputError):
    """A resource request that cannot be satisfied; the message names the option."""


def add_arguments(p: argparse.ArgumentParser, cpus: int = 4, mem_gb: int = 32, hours: float = 24) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--cluster", choices=["slurm", "local"], default=None,
                   help="slurm (default when sbatch is on the PATH) or local (this machine, one job after another)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0)
    g.add_argument("--tasks-per-node", type=int, help="ranks per node (default: one per GPU, or 1)")
    g.add_argument("--cpus-per-task", type=int, default=cpus)
    g.add_argument("--mem-gb", type=int, default=mem_gb, help="memory per node")
    g.add_argument("--hours", type=float, default=hours, help="time limit")
    g.add_argument("--parallel", type=int, default=16, help="array tasks running at once")
    g.add_argument("--logs", type=Path, help="submitit log folder")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other options, and refuse impossible requests: counts
    below 1, and on Slurm more nodes, CPUs, memory or GPUs than the partition's nodes have."""
    if args.cluster is None:
        args.cluster = "slurm" if shutil.which("sbatch") else "local"
    if args.tasks_per_node is None:
        args.tasks_per_node = max(1, args.gpus_per_node)
    for name in ("nodes", "tasks_per_node", "cpus_per_task", "mem_gb", "parallel"):
        if getattr(args, name) < 1:
            raise ResourceError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.gpus_per_node < 0 or args.hours <= 0:
        raise ResourceError("--gpus-per-node must be >= 0 and --hours > 0")
    if args.gpus_per_node and args.tasks_per_node > args.gpus_per_node:
        raise ResourceError(f"--tasks-per-node {args.tasks_per_node} exceeds --gpus-per-node {args.gpus_per_node}")
    if args.cluster == "slurm":
        _check_partition(args)
    return args


def _check_partition(args: argparse.Namespace) -> None:
    cmd = ["sinfo", "-h", "-N", "-o", "%P %c %m %G"] + (["-p", args.partition] if args.partition else [])
    try:
        lines = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError) as e:
        raise ResourceError(f"--cluster slurm: cannot query Slurm with sinfo ({type(e).__name__})") from None
    nodes = [line.split() for line in lines if line.strip()]
    if not args.partition:
        nodes = [n for n in nodes if n[0].endswith("*")]  # the default partition
    where = f"partition {args.partition}" if args.partition else "the default partition"
    if not nodes:
        raise ResourceError(f"--partition {args.partition}: no such partition (sinfo lists none)")
    fits = [n for n in nodes if int(n[1].rstrip("+")) >= args.tasks_per_node * args.cpus_per_task
            and int(n[2].rstrip("+")) >= args.mem_gb * 1000 * 0.95 and _gpus(n[3]) >= args.gpus_per_node]
    if len(fits) < args.nodes:
        best = max(nodes, key=lambda n: int(n[1].rstrip("+")))
        raise ResourceError(
            f"--nodes {args.nodes} x (--tasks-per-node {args.tasks_per_node} x --cpus-per-task {args.cpus_per_task} CPUs, "
            f"--mem-gb {args.mem_gb}, --gpus-per-node {args.gpus_per_node}): {where} has {len(fits)} node(s) that "
            f"fit, of {len(nodes)} (largest: {best[1]} CPUs, {best[2]} MB, GRES {best[3]})")


def _gpus(gres: str) -> int:
    """GPU count from a GRES string such as "gpu:a100:8(S:0-1)" or "(null)"."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def executor(args: argparse.Namespace, folder: Path, name: str) -> submitit.Executor:
    """A Slurm executor with the requested resources; the job gets USR2 two minutes before its
    time limit so that submitit can requeue it."""
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    slurm = {f"slurm_{k}": v for k, v in {"partition": args.partition, "account": args.account, "qos": args.qos,
                                            "constraint": args.constraint}.items() if v}
    ex.update_parameters(name=name, nodes=args.nodes, tasks_per_node=args.tasks_per_node,
                         cpus_per_task=args.cpus_per_task, gpus_per_node=args.gpus_per_node or None,
                         mem_gb=args.mem_gb, timeout_min=max(1, int(args.hours * 60)),
                         slurm_array_parallelism=args.parallel, slurm_signal_delay_s=120, **slurm)
    return ex
