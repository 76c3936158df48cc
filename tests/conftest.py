"""Shared fixtures: a small simulated dataset and helpers to launch training runs; the test tiers."""
from __future__ import annotations

import ast
import inspect
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import textwrap
from functools import cache as _memo
from pathlib import Path

import pytest
import torch

from data.simulator.build import SimulatorConfig, build
from train import distributed

ROOT = Path(__file__).resolve().parent.parent
# DeepSpeed compiles its CPU allreduce op once per environment into this folder (as `make test`
# sets it), instead of a per-user folder that environments at other paths keep rebuilding.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
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


def launch(args: list[str], ranks: int = 1, cache: Path | None = None, wait: bool = True, timeout: int = 1800):
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


def train_here(args: list[str], cache: Path) -> None:
    """A one-rank run of train/main.py in this process (no process start-up), which must succeed."""
    from train import main
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMRIDECODE_CACHE", str(cache))
        assert main.main(args) == 0


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def load_reference(name: str) -> dict:
    """A golden fixture of tests/fixtures/reference/ (`.pt`, or xz-compressed `.pt.xz`)."""
    data = (REFERENCE / name).read_bytes()
    if name.endswith(".xz"):
        data = lzma.decompress(data)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# Test tiers. `make test` runs everything; `make test-fast` (pytest -m "not slow") leaves out
# the tests marked `slow`: every test that, itself or through a helper or fixture of the test
# code, starts a process (`launch`, `subprocess.run`/`Popen`/...) or calls a training entry point
# (RUNNERS) in-process other than to assert a refusal (`== 2`); this covers new tests of either
# kind automatically. Plus the in-process tests of SLOW_TESTS, those using SLOW_FIXTURES and
# those marked `@pytest.mark.slow`. A test left in the fast tier that takes longer than
# FAST_LIMIT_S is named at the end of the session.
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}
RUNNERS = {("train.main", "main"), ("train.reconstruct", "main"),  # (module, function) that train or generate
           ("tests.conftest", "train_here")}
SLOW_FIXTURES = {"slurm_env"}  # jobs of a Slurm cluster
SLOW_TESTS = {  # "file::test" (parameters left out): in-process tests that train for many steps
    "test_diffusion_prior.py::test_prior_learns_and_its_samples_retrieve_their_images",
    "test_mindeye2.py::test_pretraining_on_other_subjects_beats_scratch_on_a_small_share",
}
FAST_LIMIT_S = 30.0


def _is_test_code(fn) -> bool:
    code = getattr(inspect.unwrap(fn), "__code__", None)
    return code is not None and Path(code.co_filename).resolve().is_relative_to(ROOT / "tests")


def _is_runner(fn, func: ast.expr) -> bool:
    """Whether `func` (the callee of a call in fn) is a training entry point: `main(...)`, `main.main(...)`."""
    if isinstance(func, ast.Name):
        called = fn.__globals__.get(func.id)
        return inspect.isfunction(called) and (called.__module__, called.__name__) in RUNNERS
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        module = fn.__globals__.get(func.value.id)
        return inspect.ismodule(module) and (module.__name__, func.attr) in RUNNERS
    return False


@_memo
def starts_processes(fn, _seen: frozenset = frozenset()) -> bool:
    """Whether fn, or a function of the test code it calls by name, starts a process or a run."""
    fn = inspect.unwrap(fn)
    _seen |= {fn}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    refusals = {id(node.left) for node in ast.walk(tree)  # `main(...) == 2`: refused before anything runs
                if isinstance(node, ast.Compare) and isinstance(node.left, ast.Call) and len(node.ops) == 1
                and isinstance(node.ops[0], ast.Eq) and isinstance(node.comparators[0], ast.Constant)
                and node.comparators[0].value == 2}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "subprocess" \
                and f.attr in SUBPROCESS_CALLS:
            return True
        if _is_runner(fn, f) and id(node) not in refusals:
            return True
        if isinstance(f, ast.Name):
            called = fn.__globals__.get(f.id)
            if inspect.isfunction(called) and called not in _seen and _is_test_code(called) \
                    and starts_processes(called, _seen):
                return True
    return False


def _slow(item) -> bool:
    if f"{Path(item.path).name}::{item.originalname}" in SLOW_TESTS or SLOW_FIXTURES & set(item.fixturenames):
        return True
    if starts_processes(item.function):
        return True
    for name in item.fixturenames:
        for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):
            if _is_test_code(fixturedef.func) and starts_processes(fixturedef.func):
                return True
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if isinstance(item, pytest.Function) and not item.get_closest_marker("slow") and _slow(item):
            item.add_marker(pytest.mark.slow)


_unmarked_slow: list[tuple[str, float]] = []


def pytest_runtest_logreport(report):
    if report.when == "call" and report.duration > FAST_LIMIT_S and "slow" not in report.keywords:
        _unmarked_slow.append((report.nodeid, report.duration))


def pytest_terminal_summary(terminalreporter):
    if _unmarked_slow:
        terminalreporter.section("slow tests not marked slow")
        for nodeid, seconds in _unmarked_slow:
            terminalreporter.write_line(f"{seconds:.0f} s {nodeid}: add it to SLOW_TESTS in tests/conftest.py")
