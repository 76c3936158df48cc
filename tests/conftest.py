"""Shared fixtures: a small simulated dataset and helpers to launch training runs."""
from __future__ import annotations

import io
import json
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.simulator.build import SimulatorConfig, build
from train import distributed

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "fixtures" / "reference"  # golden outputs of the reference code (README there)
SMALL_SIM = dict(seed=3, n_subjects=2, voxels=[300, 260], n_test=40, n_train=96, n_val=16, image_size=64)
# Overrides giving a run of a few seconds on the small dataset.
SMALL_RUN = [
    *(f"data.simulator.{k}={json.dumps(v).replace(' ', '')}" for k, v in SMALL_SIM.items()),
    "model.hidden=64", "model.proj_hidden=32", "train.batch_size=16", "train.epochs=4",
    "clip.tiny.image_size=32", "clip.tiny.width=32", "clip.tiny.layers=1", "clip.tiny.heads=2", "clip.tiny.output_dim=16",
]


SHM_BUFFERS = "deepspeed_allreduce_buffer_*"  # DeepSpeed's CPU shared-memory allreduce leaves these behind


@pytest.fixture(scope="session", autouse=True)
def remove_deepspeed_shm_buffers():
    """Every multi-rank CPU run leaves 2 x 66 MB in /dev/shm (RAM); remove the ones this session made."""
    shm = Path("/dev/shm")
    before = set(shm.glob(SHM_BUFFERS))
    yield
    for path in set(shm.glob(SHM_BUFFERS)) - before:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A target and dataset cache shared by one test module's runs."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def env(cache, monkeypatch):
    """In-process code reads and writes the module's cache."""
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sim") / "small"
    return build(SimulatorConfig(**SMALL_SIM, shard_max_bytes=40_000), root)


@pytest.fixture
def dataset_copy(small_dataset, tmp_path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(small_dataset, tmp_path / "data"))


def launch(args: list[str], ranks: int = 1, cache: Path | None = None, wait: bool = True, timeout: int = 600):
    """Run train/main.py in a subprocess: plain python for 1 rank, the deepspeed launcher otherwise."""
    # Drop any process-group variables an in-process run left behind in this interpreter.
    env = distributed.environment_without_launcher()
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if cache is not None:
        env["FMRIDECODE_CACHE"] = str(cache)
    if ranks == 1:
        cmd = [sys.executable, "train/main.py", *args]
    else:
        cmd = [distributed.DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(distributed.free_port()),
               "train/main.py", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def load_reference(name: str) -> dict:
    """A golden fixture of tests/fixtures/reference/ (`.pt`, or xz-compressed `.pt.xz`)."""
    data = (REFERENCE / name).read_bytes()
    if name.endswith(".xz"):
        data = lzma.decompress(data)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
