"""Every shipped tiny config, end to end: trained for two steps (or fitted), scored by
`python -m eval`, and, for a recipe that declares `Generates`, reconstructed by
`python -m train.reconstruct` and scored with the image metrics. A new config is covered
without editing this file; what runs for it follows the capabilities its recipe declares."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eval.main import main as eval_main
from train import config, registry
from train.main import main as train_main
from train.reconstruct import main as reconstruct_main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "train" / "configs").glob("*_tiny.yaml"))
SMALL = {"n_train": 40, "n_val": 8, "n_test": 12, "image_size": 32}  # every config's simulator, shrunk
FAST = {"generation.steps": 2, "generation.candidates": 2, "prior.sample_steps": 2, "pretrained.fmri": "random",
        "init.checkpoint": "\"\"", "data.share": 1.0}  # no pretraining runs here; the shrunk splits whole
EVAL = ["--device", "cpu", "--random-weights", "--extractors", "alexnet"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke_cache")


def smoke_overrides(path: Path, run_dir: Path) -> tuple[list[str], type]:
    cfg = config.load(path, [])
    recipe = registry.get(cfg.recipe)
    args = [f"run_dir={run_dir}", *(f"data.simulator.{k}={v}" for k, v in SMALL.items())]
    if registry.training_kind(recipe) == "trained":
        args += ["train.max_steps=2", "train.val_every=2", "ds.bf16.enabled=false"]
    args += [f"{k}={v}" for k, v in FAST.items() if OmegaConf.select(cfg, k) is not None]
    return args, recipe


def finite_numbers(results: dict) -> bool:
    return all(math.isfinite(v) for v in results.values() if isinstance(v, float))


def test_every_tiny_config_is_covered():
    assert len(CONFIGS) >= 10
    assert {registry.name_of(registry.get(config.load(p, []).recipe)) for p in CONFIGS} == set(registry.names())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_evaluates_and_generates(path, tmp_path, shared_cache, monkeypatch):
    monkeypatch.setenv("FMRIDECODE_CACHE", str(shared_cache))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    run = tmp_path / "run"
    args, recipe = smoke_overrides(path, run)
    assert train_main(["--config", str(path), *args]) == 0
    tested = json.loads((run / "test_results.json").read_text())
    assert finite_numbers(tested) and len(tested) > 2

    caps = registry.capabilities(recipe)
    eval_args = ["--checkpoint", str(run), *EVAL]
    if "generation" in caps:
        assert reconstruct_main(["--checkpoint", str(run), "--device", "cpu"]) == 0
        n_samples = config.load(run / "config.yaml", []).generation.n_samples
        assert len(list((run / "reconstructions").glob("*.png"))) == SMALL["n_test"] * n_samples
        eval_args += ["--recons", str(run / "reconstructions")]
    else:
        assert reconstruct_main(["--checkpoint", str(run), "--device", "cpu"]) == 2  # one error line, no traceback
        assert eval_main([*eval_args, "--recons", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert eval_main(eval_args) == 0
    report = json.loads((run / "eval" / "results.json").read_text())
    assert finite_numbers(report)
    own = {k for k, v in tested.items() if k not in ("step", "split")}
    assert own <= report.keys()  # the recipe's own test scores are in the report
    if "generation" in caps:
        assert 0 < report["ssim"] <= 1 and "alexnet2" in report
    if "embeddings" in caps:
        assert (run / "eval" / "retrievals.png").is_file()
    else:
        assert "forward_top1" not in report  # retrieval only where embeddings are declared
    if "labels" in caps:
        assert 0 <= report["map"] <= 1
