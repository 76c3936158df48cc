"""The reconstruction chain on the small simulated dataset: train MindEye (with its prior) and
the low-level branch, reconstruct every test image (resumable, split across ranks), score."""
from __future__ import annotations

import json

import pytest
import torch

from eval.main import main as eval_main
from models.errors import ConfigError
from tests.conftest import ROOT, SMALL_RUN, SMALL_SIM, train_losses
from train import config, reconstruct, registry
from train import main as train_main
from train.recipes.mindeye import best_of

SIM = [f"data.simulator.{k}={json.dumps(v).replace(' ', '')}" for k, v in SMALL_SIM.items()]
# A 32 px generator (latent side 8) and a low-level branch that predicts 4 x 8 x 8 latents.
GENERATION = ["generation.sample_size=8", "generation.steps=3", "generation.candidates=2", "generation.batch_size=16",
              "prior.sample_steps=5"]
LOWLEVEL = [*SIM, "vae.image_size=32", "teacher.image_size=32",
            "model.hidden=64", "model.map_side=2", "train.batch_size=16", "train.epochs=3", "ds.bf16.enabled=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("recon")
    cache = base / "cache"
    high, low = base / "mindeye", base / "lowlevel"
    with pytest.MonkeyPatch.context() as mp:  # trained in-process: no process start-up
        mp.setenv("FMRIDECODE_CACHE", str(cache))
        for args in ([f"run_dir={high}", *SMALL_RUN, "train.epochs=6", "ds.bf16.enabled=false", *GENERATION],
                     ["--config", str(ROOT / "train/configs/mindeye_lowlevel_tiny.yaml"), f"run_dir={low}", *LOWLEVEL]):
            assert train_main.main(args) == 0
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
    device = torch.device("cpu")
    _, recipe = registry.from_checkpoint(high, None, [], device)
    _, lowlevel = registry.from_checkpoint(low, None, [], device)
    recipe.start_from(lowlevel)  # img2img from the low-level branch's latents
    out = tmp_path / "recons"
    n_test = SMALL_SIM["n_test"]
    assert reconstruct.generate(recipe, out, rank=1, world=2) == n_test // 2  # odd samples
    written = sorted(int(p.stem) for p in out.glob("*.png"))
    assert len(written) == n_test // 2
    assert reconstruct.generate(recipe, out) == n_test // 2  # only the rest
    kept = (out / f"{written[0]}.png").read_bytes()
    (out / f"{written[1]}.png").unlink()
    assert reconstruct.generate(recipe, out) == 1  # resumes where it stopped
    assert (out / f"{written[0]}.png").read_bytes() == kept  # nothing rewritten
    assert len(list(out.glob("*.png"))) == n_test

    report = tmp_path / "eval"
    assert eval_main(["--checkpoint", str(high), "--recons", str(out), "--out", str(report), "--random-weights",
                      "--extractors", "alexnet", "--device", "cpu"]) == 0
    results = json.loads((report / "results.json").read_text())
    assert results["n_test"] == n_test and 0 < results["ssim"] < 1 and "alexnet2" in results
    assert "prior_forward_top1" in results


def test_best_of_picks_the_closest_candidates():
    reference = torch.randn(3, 4, 8)
    candidates = torch.randn(3, 5, 4, 8)
    candidates[0, 2], candidates[1, 4], candidates[2, 0] = 2 * reference[0], reference[1] + 0.01, reference[2]
    assert best_of(candidates, reference).tolist() == [[2], [4], [0]]
    candidates[0, 3] = reference[0] + 0.3 * torch.randn(4, 8)
    assert best_of(candidates, reference, 2)[0].tolist() == [2, 3]


def test_reconstruction_needs_the_prior_and_a_lowlevel_run_that_predicts_latents(runs, tmp_path, monkeypatch, capsys):
    high, _, cache = runs
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    cfg = config.load(high / "config.yaml", ["prior.enabled=false"])
    recipe = registry.get("mindeye")(cfg, 0, 1, torch.device("cpu"), train=False)
    with pytest.raises(ConfigError, match="prior.enabled"):
        recipe.generate(torch.zeros(1, recipe.data.n_voxels), [0])
    assert reconstruct.main(["--checkpoint", str(high), "--lowlevel", str(high), "--out", str(tmp_path),
                             "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --lowlevel") and "'latents'" in errors[0]
    assert "Traceback" not in err
