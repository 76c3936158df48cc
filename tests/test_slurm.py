"""Integration tests on a real Slurm cluster (CI starts one with launchers/local_slurm.sh):
a 2-task DeepSpeed ZeRO-2 job, a sweep of 3 configurations with its summary, a job requeued
mid-training that ends with the uninterrupted run's loss, and resource requests the
cluster cannot satisfy refused before submission. Skipped, with the reason printed, when no
cluster answers."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from launchers import sweep
from tests.conftest import SMALL_RUN, launch, train_losses


def _slurm_reachable() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(s.startswith(("idle", "mixed", "alloc")) for s in out.stdout.split())


pytestmark = pytest.mark.skipif(not _slurm_reachable(),
                                reason="no Slurm cluster reachable (sinfo); start one with launchers/local_slurm.sh")

FAST = [*SMALL_RUN, "train.epochs=2", "ds.bf16.enabled=false"]
RESOURCES = ["--cluster", "slurm", "--cpus-per-task", "1", "--mem-gb", "2", "--hours", "0.5"]


@pytest.fixture
def slurm_env(cache, monkeypatch):
    """Jobs inherit the submitting environment: the shared cache, one thread per rank, and
    launcher variables left by an earlier in-process run, which the jobs must ignore."""
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "45091"}.items():
        monkeypatch.setenv(key, value)


def _sweep(tmp_path: Path, name: str, *args: str, overrides=FAST) -> int:
    return sweep.main(["mindeye_tiny", "--name", name, "--sweeps", str(tmp_path), *RESOURCES, *args, "--", *overrides])


def test_a_two_task_job_trains_with_zero2_across_both_tasks(tmp_path, slurm_env):
    assert _sweep(tmp_path, "two", "--tasks-per-node", "2", "--wait") == 0
    run = tmp_path / "two" / "run"
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_micro_batch_size_per_gpu"] * 2 == ds["train_batch_size"]
    assert (run / "test_results.json").is_file()
    logs = sorted(p.name for p in (tmp_path / "two" / "logs").glob("*_log.out"))
    assert len(logs) == 2  # one log per task (rank)


def test_a_sweep_of_three_configurations_writes_three_checkpoints_and_the_summary(tmp_path, slurm_env):
    assert _sweep(tmp_path, "lr", "--grid", "train.lr=1e-3,2e-3,4e-3", "--wait") == 0
    folder = tmp_path / "lr"
    runs = [folder / f"train.lr={lr}" for lr in ("1e-3", "2e-3", "4e-3")]
    assert all((r / "checkpoints" / "latest").is_file() and (r / "test_results.json").is_file() for r in runs)
    jobs = json.loads((folder / "runs.json").read_text())
    assert len({j["job_id"].split("_")[0] for j in jobs}) == 1 and len(jobs) == 3  # one job array
    table = (folder / "summary.md").read_text().splitlines()
    assert len(table) == 5 and all(row.endswith("| finished |") for row in table[2:])


def _state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def test_a_job_requeued_mid_training_ends_with_the_uninterrupted_loss(tmp_path, slurm_env, cache):
    long = [*SMALL_RUN, "train.epochs=12", "train.checkpoint_every=6", "ds.bf16.enabled=false"]
    assert _sweep(tmp_path, "requeue", overrides=long) == 0  # submitted, not waited for
    folder = tmp_path / "requeue"
    run, job = folder / "run", json.loads((folder / "runs.json").read_text())[0]["job_id"]
    deadline = time.time() + 1800
    while not (run / "checkpoints" / "latest").is_file():  # let it checkpoint, then preempt it
        assert time.time() < deadline, "the job wrote no checkpoint"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    while _state(job) != "PENDING":  # requeued
        assert time.time() < deadline, f"the job was not requeued ({_state(job)})"
        time.sleep(0.5)
    # Slurm holds a requeued job for a while before it may start again; not worth waiting for here.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    while not (run / "test_results.json").is_file():
        assert time.time() < deadline + 1800, "the requeued job did not finish"
        time.sleep(2)
    log = "".join(p.read_text() for p in (folder / "logs").glob("*_log.err"))
    assert "Caught signal SIGUSR2" in log  # submitit took the signal and requeued the job
    starts = "".join(p.read_text() for p in (folder / "logs").glob("*_log.out")).count("Starting with JobEnvironment")
    assert starts >= 2  # the job ran again after the requeue

    reference = tmp_path / "uninterrupted"
    result = launch([f"run_dir={reference}", *long], 1, cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ours, theirs = train_losses(run), train_losses(reference)
    assert max(ours) == max(theirs)
    assert ours[max(ours)] == pytest.approx(theirs[max(theirs)], rel=1e-5)


def test_requests_the_cluster_cannot_satisfy_are_refused_before_submission(tmp_path, capsys):
    for args, expected in ((["--cpus-per-task", "512"], "node(s) that fit"), (["--partition", "nosuch"], "no such partition"),
                           (["--gpus-per-node", "8"], "node(s) that fit")):
        assert sweep.main(["mindeye_tiny", "--sweeps", str(tmp_path), "--cluster", "slurm", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "mindeye_tiny" / "runs.json").exists()
