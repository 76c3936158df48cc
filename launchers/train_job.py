"""One training run as a submitit job: every Slurm task is one DeepSpeed rank.

`train/main.py` takes the process group from Slurm's variables (train/distributed.py), so
the job simply calls it. The run resumes whenever its run folder already has a checkpoint:
after submitit requeues it (time limit or preemption: USR2, caught by submitit, which calls
`checkpoint` and requeues the same call), after Slurm itself requeues it, or when a sweep is
submitted again. A finished run (test results written) is not run again. Work since the
last periodic checkpoint (`train.checkpoint_every`) is redone; resume itself is exact.
"""
from __future__ import annotations

import os
from pathlib import Path

import submitit


def run_dir_of(argv: list[str]) -> Path:
    return Path(next(a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")))


def resume_flags(run_dir: Path) -> list[str] | None:
    """None for a finished run (test results written); otherwise the flags that continue it:
    `--resume` when it has a checkpoint, nothing when it has not begun."""
    if (run_dir / "test_results.json").is_file():
        return None
    return ["--resume"] if (run_dir / "checkpoints" / "latest").is_file() else []


class TrainJob(submitit.helpers.Checkpointable):
    def __call__(self, argv: list[str]) -> int:
        from train import distributed
        from train.main import main  # imported in the job, not at submission

        # This task's rank comes from Slurm; launcher variables the submitting shell exported
        # (sbatch passes its environment on) would make every task think it is rank 0.
        os.environ.update(distributed.slurm_environment())
        run_dir = run_dir_of(argv)
        resume = resume_flags(run_dir)
        if resume is None:
            return 0
        code = main([*resume, *argv])
        if code:
            raise RuntimeError(f"{run_dir}: training failed (exit {code}); see the job's log")
        return code
