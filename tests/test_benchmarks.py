"""The benchmark suite: what it measures is right (FLOP counts, loss agreement of the two
loops, ZeRO partitioning), its files and tables, and regression checks. No timing is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from torch import nn

from benchmarks import compare
from benchmarks.__main__ import main as benchmarks_main
from benchmarks.plan import plan
from benchmarks.step import count_flops, synthetic_batches, synthetic_recipe
from tests.conftest import ROOT
from train import config

# DeepSpeed's sizes cut to the tiny model's scale: its gradient bucket (by default 5e8 elements,
# which would dwarf every other figure of a ZeRO 1-3 rank) and ZeRO-3's persistence threshold
# (by default 1e5 elements: every tiny parameter would stay whole on every rank)
ZERO_SCALE = ["ds.zero_optimization.reduce_bucket_size=20000",
              "ds.zero_optimization.stage3_param_persistence_threshold=1000"]
TINY = ["model.hidden=64", "model.proj_hidden=32", "prior.depth=1", "prior.heads=2", "prior.dim_head=8",
        "clip.tiny.image_size=32", "clip.tiny.output_dim=16", "train.batch_size=8"]


def test_flop_count_matches_the_backbone_matmuls(tmp_path):
    cfg = config.load(ROOT / "train/configs/mindeye_tiny.yaml", [*TINY, "prior.enabled=false"])
    recipe = synthetic_recipe(cfg, 300, 0, torch.device("cpu"), tmp_path)
    counted = count_flops(recipe, synthetic_batches(cfg, 300, 1, 0, 1)[0], 0, recipe.mix_epochs)
    b, backbone = cfg.train.batch_size, recipe.model.backbone
    tokens = backbone.n_tokens
    per_sample = sum(m.in_features * m.out_features for m in [*backbone.trunk.modules(), backbone.to_clip]
                     if isinstance(m, nn.Linear))
    per_token = sum(m.in_features * m.out_features for m in backbone.projector if isinstance(m, nn.Linear))
    forward = 2 * b * (per_sample + tokens * per_token)
    first = next(m for m in backbone.trunk.modules() if isinstance(m, nn.Linear))
    # backward costs twice the forward, less the input gradient of the first layer (voxels need none)
    assert counted["backbone_flops_per_step"] == 3 * forward - 2 * b * first.in_features * first.out_features
    assert counted["flops_per_step"] > counted["backbone_flops_per_step"]  # + the contrastive loss


@pytest.fixture(scope="module")
def suite_results(tmp_path_factory):
    """One small suite of every kind, run once through the command line."""
    tmp = tmp_path_factory.mktemp("bench")
    common = {"config": "train/configs/mindeye_tiny.yaml", "voxels": 300}
    suite = {"runs": [
        {"name": "step", "kind": "step", "precision": "fp32", "steps": 4, "warmup": 1,
         "overrides": [*TINY, "ds.bf16.enabled=false", "train.epochs=12"], **common},
        {"name": "zero", "kind": "zero", "ranks": 2, "stages": [0, 1, 3], "overrides": [*TINY, *ZERO_SCALE], **common},
        {"name": "loader", "kind": "pipeline", "train": 120, "epochs": 2, "target_shape": [17, 16], **common},
        {"name": "flops", "kind": "flops", "device": "H100", "overrides": TINY, **common},
        # One extractor shows the timing loop works (each is tested in test_features.py); the other
        # four add about 20 s, ViT-H/14 minutes.
        {"name": "metrics", "kind": "image_metrics", "images": 4, "extractors": ["alexnet"]},
    ]}
    (tmp / "suite.yaml").write_text(yaml.safe_dump(suite))
    env_cache = {"FMRIDECODE_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--suite", str(tmp / "suite.yaml"), "--out", str(tmp / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800, env={**os.environ, **env_cache})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return tmp / "out", json.loads((tmp / "out/results.json").read_text()), done.stdout


def test_engine_and_reference_loop_train_alike(suite_results):
    """Same weights, batches and seeds: the two loops must compute the same losses (fp32, 1 rank)."""
    out, results, _ = suite_results
    ref = json.loads((out / "step.reference.rank0.json").read_text())
    eng = json.loads((out / "step.engine.rank0.json").read_text())
    assert len(ref["losses"]) == len(eng["losses"]) == 5
    assert ref["losses"][0] == pytest.approx(eng["losses"][0], rel=1e-5)
    assert ref["losses"] == pytest.approx(eng["losses"], rel=1e-3)
    assert ref["losses"][-1] != ref["losses"][0]  # the weights moved
    step = results["runs"]["step"]
    assert step["reference"]["samples_per_s"] > 0 and step["engine"]["samples_per_s"] > 0
    assert step["engine_over_reference"] == pytest.approx(step["engine"]["samples_per_s"] / step["reference"]["samples_per_s"])
    assert step["engine"]["voxels_per_s"] == pytest.approx(300 * step["engine"]["samples_per_s"])


def test_zero_stages_partition_what_each_rank_holds(suite_results):
    _, results, _ = suite_results
    zero = results["runs"]["zero"]
    n = zero["n_params"]
    # bf16 parameters: every rank holds all of them under ZeRO 0 and 1; under ZeRO-3 half, and
    # whole the few below the persistence threshold (ZERO_SCALE: biases and norms, 10% here)
    assert zero["zero0"]["params_per_rank"] == pytest.approx(2 * n, rel=0.01)
    assert zero["zero1"]["params_per_rank"] == zero["zero0"]["params_per_rank"]
    assert 0.55 < zero["zero3"]["params_vs_first"] < 0.65
    # fp32 master weights + two Adam moments: 12 bytes per parameter, split over the 2 ranks from ZeRO-1 on
    assert zero["zero1"]["optimizer_per_rank"] == pytest.approx(12 * n / 2, rel=0.05)
    assert zero["zero3"]["optimizer_per_rank"] == pytest.approx(12 * n / 2, rel=0.05)


def test_loader_flops_and_image_metric_figures(suite_results):
    _, results, _ = suite_results
    loader, flops, metrics = results["runs"]["loader"], results["runs"]["flops"], results["runs"]["metrics"]
    assert metrics["n_images"] == 4 and metrics["images_per_s"] == pytest.approx(4 / metrics["seconds"])
    assert loader["loader"] == "memory" and loader["n_voxels"] == 300 and loader["samples_per_s"] > 0
    assert 0 < loader["samples_per_s_with_targets"]
    assert flops["max_samples_per_s"] == pytest.approx(989.4e12 / flops["flops_per_sample"])
    assert 0 < flops["backbone_flops_share"] < 1


def test_results_files_and_table(suite_results):
    out, results, stdout = suite_results
    md = (out / "results.md").read_text()
    assert results["hardware"]["date"] in md and results["hardware"]["cpu"] in md
    for row in ("| step |", "| 0 |", "| 3 |", "| loader |", "| flops |", "| metrics |"):
        assert row in md
    assert md in stdout


def test_baseline_comparison_flags_regressions(suite_results, tmp_path, capsys):
    out, results, _ = suite_results
    assert benchmarks_main(["--compare", str(out / "results.json"), "--baseline", str(out / "results.json")]) == 0
    slower = json.loads(json.dumps(results))
    slower["runs"]["step"]["engine"]["samples_per_s"] *= 2  # the baseline was twice as fast
    (tmp_path / "base.json").write_text(json.dumps(slower))
    assert benchmarks_main(["--compare", str(out / "results.json"), "--baseline", str(tmp_path / "base.json")]) == 1
    assert "step.engine.samples_per_s" in capsys.readouterr().err


def test_compare_tolerances():
    def results(speed, memory):
        return {"runs": {"a": {"engine": {"samples_per_s": speed, "peak_memory_per_rank": memory, "precision": "fp32"}}}}
    rows = {r["figure"]: r for r in compare.compare(results(80, 104), results(100, 100))}
    assert not rows["a.engine.samples_per_s"]["regressed"] and not rows["a.engine.peak_memory_per_rank"]["regressed"]
    rows = {r["figure"]: r for r in compare.compare(results(70, 106), results(100, 100))}
    assert rows["a.engine.samples_per_s"]["regressed"] and rows["a.engine.peak_memory_per_rank"]["regressed"]
    assert "precision" not in " ".join(rows)  # text is not a figure


def test_bad_suite_and_baseline_files(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("runs:\n  - {name: a, kind: sprint}\n")
    assert benchmarks_main(["--suite", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "runs[0].kind: 'sprint'" in capsys.readouterr().err
    assert benchmarks_main(["--compare", str(tmp_path / "missing.json"), "--baseline", str(tmp_path / "s.yaml")]) == 2
    assert "missing.json: not a readable results file (--compare)" in capsys.readouterr().err


def within(planned: float, measured: float, tolerance: float = 0.10) -> bool:
    return abs(planned - measured) <= tolerance * measured


def test_planner_agrees_with_measured_bytes_per_rank(suite_results):
    """The suite's 2-rank bf16 engine runs under ZeRO 0, 1 and 3 (what each rank holds) and its
    fp32 reference loop (activations), against the planner for the same config."""
    _, results, _ = suite_results
    mindeye_tiny, zero0 = ROOT / "train/configs/mindeye_tiny.yaml", ROOT / "ds_configs/zero0.json"
    planned = plan(config.load(mindeye_tiny, [*TINY, *ZERO_SCALE]), 2, [300], zero0)
    zero = results["runs"]["zero"]
    assert planned["n_params"] == zero["n_params"]
    for stage, label in (("zero0", "ZeRO-0"), ("zero1", "ZeRO-1"), ("zero3", "ZeRO-3")):
        measured, row = zero[stage], planned["rows"][label]
        for key in ("params", "optimizer"):
            assert within(row[key], measured[f"{key}_per_rank"]), (stage, key, row[key], measured[f"{key}_per_rank"])
        # what the passes create: activations, the gradients in flight (counted with the gradients
        # they join) and DeepSpeed's gradient bucket; ZeRO-3's gathers are an estimate (below)
        if stage != "zero3":
            live = row["activations"] + row["buffers"] + planned["gradient_in_flight"]
            assert within(live, measured["live_per_rank"]), (stage, live, measured["live_per_rank"])
        if stage != "zero1":  # ZeRO-1 holds whole gradients through the backward pass, a share at the step
            assert within(row["gradients"], measured["gradients_per_rank"]), (stage, row, measured)
    assert zero["zero1"]["gradients_per_rank"] < planned["rows"]["ZeRO-1"]["gradients"]
    # ZeRO-3's gathered parameters: the planner's estimate (largest module and prefetch) is below
    # what gloo ranks hold; the partition, persistent parameters and bucket agree (above)
    zero3 = planned["rows"]["ZeRO-3"]
    assert zero3["activations"] + zero3["buffers"] < zero["zero3"]["live_per_rank"]
    fp32 = plan(config.load(mindeye_tiny, [*TINY, "ds.bf16.enabled=false"]), 1, [300], zero0)
    measured = results["runs"]["step"]["reference"]["activations_per_rank"]
    assert within(fp32["activation_bytes"], measured), (fp32["activation_bytes"], measured)
