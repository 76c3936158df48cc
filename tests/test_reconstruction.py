"""The reconstruction chain on the small simulated dataset: train MindEye (with its prior) and
the low-level branch, reconstruct every test image (resumable, split across ranks), score."""
from __future__ import annotations

import json

import pytest
import torch

from eval.checkpoint import load_checkpoint
from eval.main import main as eval_main
from tests.conftest import SMALL_RUN, SMALL_SIM, launch, train_losses
from train import reconstruct

SIM = [f"data.simulator.{k}={json.dumps(v).replace(' ', '')}" for k, v in SMALL_SIM.items()]
# A 32 px generator (latent side 8) and a low-level branch that predicts 4 x 8 x 8 latents.
GENERATION = ["generation.sample_size=8", "generation.steps=3", "generation.n_samples=2", "generation.batch_size=16",
              "prior.sample_steps=5"]
LOWLEVEL = [*SIM, "vae.image_size=32", "teacher.image_size=32",
            "model.hidden=64", "model.map_side=2", "train.batch_size=16", "train.epochs=3", "ds.bf16.enabled=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("recon")
    cache = base / "cache"
    high, low = base / "mindeye", base / "lowlevel"
    for args in ([f"run_dir={high}", *SMALL_RUN, "train.epochs=6", "ds.bf16.enabled=false", *GENERATION],
                 ["--config", "train/configs/mindeye_lowlevel_tiny.yaml", f"run_dir={low}", *LOWLEVEL]):
        result = launch(args, cache=cache)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return high, low, cache


def test_lowlevel_loss_falls_and_prior_retrieval_is_reported(runs):
    high, low, _ = runs
    lows = list(train_losses(low).values())
    assert sum(lows[-5:]) / 5 < 0.8 * sum(lows[:5]) / 5
    results = json.loads((high / "test_results.json").read_text())
    assert {"prior_forward_top1", "prior_backward_top1"} <= results.keys()


def test_reconstruct_resumes_splits_across_ranks_and_is_scored(runs, tmp_path, monkeypatch):
    high, low, cache = runs
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    ckpt, lowlevel = load_checkpoint(high), load_checkpoint(low)
    out = tmp_path / "recons"
    device = torch.device("cpu")
    n_test = SMALL_SIM["n_test"]
    assert reconstruct.reconstruct(ckpt, out, lowlevel, device, rank=1, world=2) == n_test // 2  # odd samples
    written = sorted(int(p.stem) for p in out.glob("*.png"))
    assert len(written) == n_test // 2
    assert reconstruct.reconstruct(ckpt, out, lowlevel, device) == n_test // 2  # only the rest
    kept = (out / f"{written[0]}.png").read_bytes()
    (out / f"{written[1]}.png").unlink()
    assert reconstruct.reconstruct(ckpt, out, lowlevel, device) == 1  # resumes where it stopped
    assert (out / f"{written[0]}.png").read_bytes() == kept  # nothing rewritten
    assert len(list(out.glob("*.png"))) == len(list((out / "lowlevel").glob("*.png"))) == n_test

    report = tmp_path / "eval"
    assert eval_main(["--checkpoint", str(high), "--recons", str(out), "--out", str(report), "--random-weights",
                      "--extractors", "alexnet", "--device", "cpu"]) == 0
    results = json.loads((report / "results.json").read_text())
    assert results["n_test"] == n_test and 0 < results["ssim"] < 1 and "alexnet2" in results
    assert "prior_forward_top1" in results


def test_best_of_picks_the_closest_candidate():
    reference = torch.randn(3, 4, 8)
    candidates = torch.randn(3, 5, 4, 8)
    candidates[0, 2], candidates[1, 4], candidates[2, 0] = 2 * reference[0], reference[1] + 0.01, reference[2]
    assert reconstruct.best_of(candidates, reference).tolist() == [2, 4, 0]


def test_reconstruction_refuses_a_checkpoint_without_prior(runs, tmp_path):
    high, _, _ = runs
    ckpt = load_checkpoint(high, overrides=["prior.enabled=false"])
    with pytest.raises(ValueError, match="prior.enabled"):
        reconstruct.reconstruct(ckpt, tmp_path, None, torch.device("cpu"))
