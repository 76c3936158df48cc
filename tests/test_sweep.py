"""Sweeps without Slurm: grid parsing, refusal of bad input before anything runs, a local
sweep run one job after another with its summary, Slurm's variables turned into the
process group's, and the deepspeed launcher with a hostfile."""
from __future__ import annotations

import json
import subprocess

import pytest

from launchers import sweep
from tests.conftest import ROOT, SMALL_RUN
from train import distributed

FAST = [*SMALL_RUN, "train.epochs=1", "ds.bf16.enabled=false"]


def test_grid_values_split_on_top_level_commas_only():
    assert sweep.split_values("1e-4,3e-4") == ["1e-4", "3e-4"]
    assert sweep.split_values("[1,2],[3]") == ["[1,2]", "[3]"]
    assert sweep.grid_points({"a": ["1", "2"], "b": ["x", "y", "z"]})[4] == {"a": "2", "b": "y"}
    assert sweep.run_name({"train.lr": "1e-3", "data.root": "/a b"}) == "train.lr=1e-3,data.root=_a_b"


@pytest.mark.parametrize("args, expected", [
    (["no_such_recipe", "--cluster", "local"], "no_such_recipe.yaml: no such recipe config"),
    (["mindeye_tiny", "--cluster", "local", "--grid", "train.no_such_key=1,2"], "train.no_such_key"),
    (["mindeye_tiny", "--cluster", "local", "--grid", "train.lr"], "--grid train.lr: expected key=value1,value2"),
    (["mindeye_tiny", "--cluster", "local", "--nodes", "0"], "--nodes 0: must be at least 1"),
    (["mindeye_tiny", "--cluster", "local", "--gpus-per-node", "2", "--tasks-per-node", "3"], "exceeds --gpus-per-node 2"),
    (["mindeye_tiny", "--cluster", "local", "--nodes", "2"], "--cluster local runs on this machine only"),
    (["mindeye_tiny", "--cluster", "local", "--tasks-per-node", "3", "--", "train.batch_size=16"],
     "not divisible by train.grad_accum x ranks = 3"),
])
def test_bad_sweeps_are_refused_before_anything_runs(args, expected, tmp_path, capsys):
    assert sweep.main([*args[:1], "--sweeps", str(tmp_path), *args[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err, err
    assert not list(tmp_path.glob("*/*/config.yaml"))  # nothing ran


@pytest.mark.slow  # sweep.main starts a training process per configuration
def test_a_local_sweep_runs_each_configuration_then_summarises(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for key in distributed.LAUNCHER_VARIABLES:  # left by an earlier in-process run; each run must ignore them
        monkeypatch.setenv(key, "45091" if key == "MASTER_PORT" else "127.0.0.1" if key == "MASTER_ADDR" else "0")
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({"recipe": "mindeye_tiny", "grid": {"train.lr": [1e-3, 3e-3]}, "overrides": FAST}))
    assert sweep.main(["--sweep", str(spec), "--name", "lr", "--sweeps", str(tmp_path), "--cluster", "local"]) == 0
    folder = tmp_path / "lr"
    for lr in ("0.001", "0.003"):
        run = folder / f"train.lr={lr}"
        assert (run / "checkpoints" / "latest").is_file() and (run / "test_results.json").is_file()
        assert f"lr: {lr}" in (run / "config.yaml").read_text()
    table = (folder / "summary.md").read_text().splitlines()
    assert table[0].startswith("| run | train.lr | train_loss |") and len(table) == 4
    assert all(row.endswith("| finished |") for row in table[2:])
    assert (folder / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    # Submitting the same sweep again skips the finished runs.
    assert sweep.main(["--sweep", str(spec), "--name", "lr", "--sweeps", str(tmp_path), "--cluster", "local"]) == 0
    assert capsys.readouterr().out.count("finished before, skipped") == 2


def test_slurm_variables_give_the_process_group(monkeypatch):
    monkeypatch.setattr(distributed.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 0, stdout="gpu-a017\ngpu-a018\n" if cmd[:3] == ["scontrol", "show", "hostnames"] else ""))
    for key in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.slurm_environment() == {}  # not in a job step
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu-a[017-018]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    assert distributed.slurm_environment() == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
                                               "MASTER_ADDR": "gpu-a017", "MASTER_PORT": str(20000 + 123456 % 20000)}


def test_a_two_node_deepspeed_hostfile_launch_trains_across_both(tmp_path, cache):
    """The multi-node form without ssh: the same `deepspeed --hostfile --no_ssh` command on every
    node with its `--node_rank`; here both "nodes" are processes of this machine."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run, port = tmp_path / "run", str(distributed.free_port())
    env = {**distributed.environment_without_launcher(), "OMP_NUM_THREADS": "1", "FMRIDECODE_CACHE": str(cache)}
    nodes = [subprocess.Popen([distributed.DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                               "--master_addr", "127.0.0.1", "--master_port", port, "train/main.py", f"run_dir={run}",
                               *FAST], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=1800)[0] for node in nodes]  # a hang guard
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] * 2 == ds["train_batch_size"]  # one rank on each node
    assert (run / "test_results.json").is_file()
