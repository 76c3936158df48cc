"""End-to-end training runs: rank-count agreement, exact resume after SIGKILL, artefacts."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from tests.conftest import SMALL_RUN, launch, train_here, train_losses
from train import main

# No dropout: the only difference between rank counts and ZeRO stages is the order of
# floating-point reductions (and, in bf16, where rounding happens), so the first 20 losses
# agree to these relative tolerances.
RTOL = {"fp32": 1e-5, "bf16": 2e-2}  # observed: 3.4e-7 and 6.5e-3
DETERMINISTIC = ["model.input_dropout=0", "model.block_dropout=0", "train.max_steps=20"]


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_first_20_losses_agree_across_rank_counts_and_zero_stages(precision, cache, tmp_path):
    """Losses include the prior's MSE (its noise draws are global-batch draws sliced per rank)."""
    runs = {"1 rank, ZeRO-2": (1, "zero2", []), "2 ranks, ZeRO-3": (2, "zero3", [])}
    if precision == "fp32":  # the rank count alone, then with the stage and activation checkpointing
        runs = {"1 rank, ZeRO-2": (1, "zero2", []), "2 ranks, ZeRO-2": (2, "zero2", []),
                "2 ranks, ZeRO-3, activation checkpointing": (2, "zero3", ["model.checkpoint_blocks=true",
                                                                            "prior.checkpoint_layers=true"])}
    losses = {}
    for name, (ranks, zero, extra) in runs.items():
        run_dir = tmp_path / name.replace(" ", "").replace(",", "_")
        bf16 = f"ds.bf16.enabled={precision == 'bf16'}"
        args = ["--ds_config", f"ds_configs/{zero}.json", f"run_dir={run_dir}", *SMALL_RUN, *DETERMINISTIC, bf16, *extra]
        if ranks == 1:
            train_here(args, cache)
        else:
            _ok(launch(args, ranks, cache))
        losses[name] = [train_losses(run_dir)[s] for s in range(1, 21)]
    reference = losses.pop("1 rank, ZeRO-2")
    assert len(set(reference)) > 15  # the losses move
    for name, values in losses.items():
        for step, (a, b) in enumerate(zip(reference, values), 1):
            assert abs(a - b) <= RTOL[precision] * abs(a), f"{name}, {precision}, step {step}: {b} vs {a}"


def test_killed_run_resumes_with_the_same_losses(cache, tmp_path, monkeypatch):
    args = [*SMALL_RUN, "ds.bf16.enabled=false", "train.epochs=6", "train.checkpoint_every=5"]
    # The uninterrupted run trains alongside the one to be killed (one rank and thread each).
    uninterrupted = launch([f"run_dir={tmp_path / 'straight'}", *args], cache=cache, wait=False)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(uninterrupted.communicate()[0]))
    reader.start()

    killed = tmp_path / "killed"
    proc = launch([f"run_dir={killed}", *args], cache=cache, wait=False)
    deadline = time.time() + 1800
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").exists() and max(train_losses(killed), default=0) >= 17:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join()
    assert uninterrupted.returncode == 0, output[0][-6000:]
    straight = train_losses(tmp_path / "straight")
    assert len(straight) == 36
    assert max(train_losses(killed)) < 36
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    assert main.main([f"run_dir={killed}", *args]) == 2  # refuses to overwrite (train/main.py's exit status)
    _ok(launch(["--resume", f"run_dir={killed}", *args], cache=cache))
    assert train_losses(killed) == straight  # exact
    results = [json.loads((d / "test_results.json").read_text()) for d in (tmp_path / "straight", killed)]
    assert results[0] == results[1]
    ckpt = killed / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000036"
    assert "run_dir:" in (ckpt / "step00000036" / "config.yaml").read_text()
    assert list((killed / "tensorboard").iterdir())
