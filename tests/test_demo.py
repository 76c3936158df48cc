"""The README's main job: MindEye on the embedded simulated dataset, 2 CPU ranks, ZeRO-2.

Runs the same command as `make demo` (in a private cache, so the simulated dataset is
generated from scratch: the default one, seed 0); it must reach 10% top-1 retrieval in both
directions on the 300-way test protocol (chance is 0.33%). The jointly trained diffusion prior
must bring its MSE below half its starting value, and image tokens it samples must retrieve
their test images at least 1.5% top-1 (4.5x chance) both ways. MindEye must beat the ridge
baseline (ridge_clip_tiny.yaml: the same CLIP targets, fitted in closed form on the same
dataset) in both directions. One run, about 3 minutes on 2 CPU cores: the suite no longer
repeats it for a second simulator seed.
"""
import json

from tests.conftest import launch, train_here

DEMO_ARGS = ["--ds_config", "ds_configs/zero2.json", "ds.bf16.enabled=false"]  # as in the Makefile


def test_demo_reaches_10_percent_retrieval_both_ways_and_beats_the_ridge_baseline(tmp_path):
    run_dir = tmp_path / "run"
    result = launch([*DEMO_ARGS, f"run_dir={run_dir}"], ranks=2, cache=tmp_path / "cache", timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((run_dir / "test_results.json").read_text())
    print(f"demo: forward {results['forward_top1']:.1f}%, backward {results['backward_top1']:.1f}%")
    assert results["n_way"] == 300 and results["n_trials"] == 30
    assert results["forward_top1"] >= 10 and results["backward_top1"] >= 10
    prior = [json.loads(line)["prior_mse"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    print(f"prior MSE {sum(prior[:5]) / 5:.3f} -> {sum(prior[-20:]) / 20:.3f}; prior-sampled retrieval "
          f"{results['prior_forward_top1']:.1f}% / {results['prior_backward_top1']:.1f}%")
    assert sum(prior[-20:]) / 20 < 0.5 * sum(prior[:5]) / 5
    assert results["prior_forward_top1"] >= 1.5 and results["prior_backward_top1"] >= 1.5
    assert "test results" in result.stderr
    assert (run_dir / "checkpoints" / "latest").is_file() and list((run_dir / "tensorboard").iterdir())
    ridge_dir = tmp_path / "ridge"
    train_here(["--config", "train/configs/ridge_clip_tiny.yaml", f"run_dir={ridge_dir}"], tmp_path / "cache")
    baseline = json.loads((ridge_dir / "test_results.json").read_text())
    print(f"ridge baseline: forward {baseline['forward_top1']:.1f}%, backward {baseline['backward_top1']:.1f}%")
    assert baseline["n_way"] == results["n_way"] and baseline["forward_top1"] > 1  # the baseline itself works
    assert results["forward_top1"] > baseline["forward_top1"] and results["backward_top1"] > baseline["backward_top1"]
