"""Finding a dataset folder: a converted dataset given by path, or the embedded simulated one.

The simulated dataset is generated on first use into the cache folder
(`data.cache_dir`, default `$FMRIDECODE_CACHE` or `~/.cache/fmridecode`), under a name
that encodes its full generator config, so a different seed or size never reuses or
overwrites another. Concurrent ranks wait on a file lock while one of them builds it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from filelock import FileLock

from data.shards import MANIFEST, DataError, load_manifest
from data.simulator.build import GENERATOR_VERSION, SimulatorConfig, build

logger = logging.getLogger(__name__)


def cache_dir(configured: str | None = None) -> Path:
    path = configured or os.environ.get("FMRIDECODE_CACHE") or "~/.cache/fmridecode"
    return Path(path).expanduser()


def simulated_path(sim: SimulatorConfig, cache: Path) -> Path:
    digest = hashlib.sha256(json.dumps(asdict(sim), sort_keys=True).encode()).hexdigest()[:10]
    return cache / "simulated" / f"seed{sim.seed}-v{GENERATOR_VERSION}-{digest}"


def resolve_dataset(root: str, sim: SimulatorConfig, cache: Path) -> Path:
    """`root` is a dataset folder, or "simulated" for the embedded default (built if absent)."""
    if root != "simulated":
        path = Path(root).expanduser()
        load_manifest(path)  # fails early with the file named
        return path
    path = simulated_path(sim, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / MANIFEST).is_file():
            if path.exists():
                raise DataError(f"{path}: incomplete simulated dataset without {MANIFEST}; remove it to regenerate")
            logger.info("generating the simulated dataset (seed %d) into %s", sim.seed, path)
            build(sim, path)
    return path
