"""Rank-aware logging for every command: rank 0 logs INFO to stderr (and, for a training run,
to `run_dir/train.log`); other ranks log warnings and errors only, prefixed with their rank.
Modules log through `logging.getLogger(__name__)`; each CLI sets up the handlers once."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

PACKAGES = ("train", "data", "models", "eval", "launchers")


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (test captures replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup(rank: int, run_dir: Path | None = None) -> None:
    """(Re)configure the project's loggers for this process; `run_dir` adds train.log (rank 0)."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0 else
                            f"[rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [_Stderr()]
    if rank == 0 and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
    for name in PACKAGES:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
            old.close()
        for h in handlers:
            logger.addHandler(h)
        logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        logger.propagate = False
