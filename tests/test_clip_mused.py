"""CLIP-MUSED recipe: subjects mixed in one model, native-space masking under 1 and 2 ranks,
the eval report, the optimiser's per-group lr, and the paper's main claim on simulated data."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from omegaconf import OmegaConf

from eval.main import main as eval_main
from models.clip_mused import CLIPMUSED
from tests.conftest import ROOT, SMALL_SIM, launch, train_losses
from train import config
from train.engine import make_schedule, param_groups

TINY = "train/configs/clip_mused_tiny.yaml"
# The 2-subject native-space dataset of the other tests (300 and 260 voxels), dropout off.
NATIVE = ["--config", TINY, "--ds_config", "ds_configs/zero2.json", *(f"data.simulator.{k}={json.dumps(v).replace(' ', '')}" for k, v in SMALL_SIM.items()),
          "data.simulator.common_space=false", "model.dropout=0.0", "train.batch_size=16", "train.epochs=2",
          "ds.bf16.enabled=false"]


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_native_space_subjects_train_together_alike_on_1_and_2_ranks_and_eval_reports_them(tmp_path, monkeypatch):
    """The RSA and orthogonality terms span the global batch, so 2 ranks give 1 rank's losses."""
    cache = tmp_path / "cache"
    runs = {1: tmp_path / "r1", 2: tmp_path / "r2"}
    for ranks, run_dir in runs.items():
        extra = ["model.checkpoint_layers=true"] if ranks == 2 else []
        _ok(launch([*NATIVE, f"run_dir={run_dir}", *extra], ranks, cache))
    one, two = (train_losses(r) for r in runs.values())
    assert len(one) == 24 and len(set(one.values())) > 20  # 96 samples x 2 subjects / 16, x 2 epochs
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-4 * abs(one[step]), f"step {step}: {two[step]} vs {one[step]}"
    results = json.loads((runs[2] / "test_results.json").read_text())
    assert results["n_subjects"] == 2
    for s in ("01", "02"):
        assert 0 <= results[f"map/subj{s}"] <= 1 and 0 <= results[f"auc/subj{s}"] <= 1
    assert results["map"] == pytest.approx((results["map/subj01"] + results["map/subj02"]) / 2)
    logged = {k for line in (runs[2] / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert {"bce", "orth", "rsa_hlv", "rsa_llv", "map/subj02"} <= logged

    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))  # in-process: `python -m eval` runs in test_eval_cli.py
    assert eval_main(["--checkpoint", str(runs[2])]) == 0
    scored = json.loads((runs[2] / "eval" / "results.json").read_text())
    assert scored["subjects"] == [1, 2]
    for key in ("map", "auc", "hamming", "map/subj01", "auc/subj02"):
        assert scored[key] == pytest.approx(results[key], abs=1e-5)
    assert "| subj02 |" in (runs[2] / "eval" / "table.md").read_text()


def test_attention_gets_a_tenth_of_the_lr_and_the_step_schedule_decays_it():
    cfg = config.load(ROOT / TINY, [])
    model = CLIPMUSED(100, 3, 7, patch_size=16, dim=32, depth=2, heads=4, classifier_hidden=24)
    groups = param_groups(model, cfg)
    named = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        names = [named[id(p)] for p in g["params"]]
        assert all(("self_attn" in n) == (g["lr"] == pytest.approx(1e-4)) for n in names), names
        assert g["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = torch.optim.AdamW(groups)
    scheduler = make_schedule(cfg, steps_per_epoch=2)(optimizer)  # 30 epochs x 2 steps per decay
    for _ in range(60):
        optimizer.step()
        scheduler.step()
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([0.7e-4, 0.7e-3])


def test_ablation_configs_change_only_their_keys():
    base = OmegaConf.to_container(config.load(ROOT / TINY, []))
    expected = {"no_rsa": {("loss", "rsa_hlv"): 0.0, ("loss", "rsa_llv"): 0.0}, "no_orth": {("loss", "orth"): 0.0},
                "one_token": {("model", "n_subject_tokens"): 1, ("loss", "orth"): 0.0},
                "single": {("data", "subjects"): [1], ("train", "batch_size"): 16, ("train", "epochs"): 360,
                           ("train", "step_epochs"): 90}}
    for name, changes in expected.items():
        cfg = OmegaConf.to_container(config.load(ROOT / f"train/configs/clip_mused_{name}_tiny.yaml", []))
        diff = {(section, k): v for section in ("data", "model", "loss", "train") for k, v in cfg[section].items()
                if v != base[section][k]}
        assert diff == changes, name


# Validation every 10^6 steps, i.e. never: it does not change training (every step draws from its
# own seed), and the single-subject runs would otherwise validate after each of their 360 epochs.
COMPARE = """
import json, sys
from train.main import main
out, runs = sys.argv[1], sys.argv[2:]
common = ["ds.bf16.enabled=false", "train.val_every=1000000"]
for run in runs:  # "multi", or the subject of a single-subject model
    if run == "multi":
        assert main(["--config", "train/configs/clip_mused_tiny.yaml", f"run_dir={out}/multi", *common]) == 0
    else:
        assert main(["--config", "train/configs/clip_mused_single_tiny.yaml", f"run_dir={out}/single{run}",
                     f"data.subjects=[{run}]", *common]) == 0
"""


def test_multi_subject_model_beats_single_subject_models_on_mean_map(tmp_path):
    """The paper's main claim, on the tiny config (9 common-space subjects, 40 training
    samples each, simulator seed 0, training seed 0): the 9-subject model's mean mAP over
    subjects 1-3 beats that of three single-subject models (each trained for more steps)
    by at least 0.02. Measured: 0.376 vs 0.315 (see the README table for all 9)."""
    subjects = [1, 2, 3]
    env = {**os.environ, "FMRIDECODE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    # Two processes side by side, one thread each: the 9-subject model, and the single-subject ones.
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda runs: subprocess.run([sys.executable, "-c", COMPARE, str(tmp_path), *runs], cwd=ROOT,
                                                         env=env, capture_output=True, text=True, timeout=1800),
                             [["multi"], [str(s) for s in subjects]]))
    for result in done:
        _ok(result)
    multi = json.loads((tmp_path / "multi" / "test_results.json").read_text())
    single = [json.loads((tmp_path / f"single{s}" / "test_results.json").read_text())["map"] for s in subjects]
    multi_mean = sum(multi[f"map/subj{s:02d}"] for s in subjects) / len(subjects)
    print(f"mean mAP over subjects {subjects}: multi-subject {multi_mean:.3f}, single-subject {sum(single) / 3:.3f}")
    assert multi["n_subjects"] == 9
    assert multi_mean >= sum(single) / len(single) + 0.02
