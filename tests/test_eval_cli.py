"""`python -m eval` on a trained checkpoint: JSON, table, figures, and clear errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from eval.main import main
from tests.conftest import ROOT, SMALL_RUN
from train import main as train_main

FAST = ["--extractors", "alexnet,inception", "--random-weights"]  # the others are covered in test_features.py


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMRIDECODE_CACHE", str(cache))
        assert train_main.main(["--ds_config", str(ROOT / "ds_configs/zero2.json"), f"run_dir={run}", *SMALL_RUN,
                                "ds.bf16.enabled=false"]) == 0
    return run


@pytest.fixture(scope="module")
def test_images(run_dir, cache):
    """The test split's ids and images, read the way the report reads them."""
    from omegaconf import OmegaConf

    from data.datasets import cache_dir, resolve_dataset
    from data.shards import load_manifest
    from train.checkpoint import load_checkpoint
    from eval.images import split_images

    cfg = load_checkpoint(run_dir).cfg
    root = resolve_dataset(cfg.data.root, OmegaConf.to_object(cfg.data.simulator), cache_dir(str(cache)))
    return split_images(root, load_manifest(root), cfg.data.subject, "test")


def _write_pngs(folder, ids, images, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image_id in enumerate(ids):
        array = (images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / (names[i] if names else f"{image_id}.png"))
    return folder


def test_eval_reproduces_training_retrieval_and_writes_report(run_dir, env, tmp_path, test_images, capsys):
    ids, truth = test_images
    noisy = (truth + 0.15 * torch.randn_like(truth)).clamp(0, 1)
    recons = _write_pngs(tmp_path / "recons", ids, noisy)
    assert main(["--checkpoint", str(run_dir), "--recons", str(recons), *FAST]) == 0
    out = run_dir / "eval"
    results = json.loads((out / "results.json").read_text())
    trained = json.loads((run_dir / "test_results.json").read_text())
    for key in ("forward_top1", "backward_top1", "forward_top1_full", "backward_top5_full"):
        assert results[key] == pytest.approx(trained[key], abs=1e-9), key
    assert results["n_test"] == len(ids) and results["n_generations"] == 1
    assert 0.5 < results["pixcorr"] < 1 and 0 < results["ssim"] < 1
    assert results["alexnet2"] > 90 and results["inception"] > 50 and math.isfinite(results["fid"])
    assert results["random_feature_weights"] == ["alexnet", "inception"]
    assert results["resize_convention"] == "reference" and results["ssim_window"] == "2d"
    table = (out / "table.md").read_text()
    assert "images resized without antialiasing" in table and "MindEye 2's paper" in table
    header = table.splitlines()[0]
    order = ["PixCorr", "SSIM", "Alex(2)", "Alex(5)", "Incep", "CLIP", "EffNet-B", "SwAV", "Image retrieval", "Brain retrieval"]
    assert [header.index(c) for c in order] == sorted(header.index(c) for c in order)
    assert "| MindEye 1, subject 1 | 0.392 | 0.347 | 97.40% | 98.70% |" in table
    assert "RANDOM feature-extractor weights" in table
    assert "| **step" in table and table.splitlines()[2].count("–") == 3  # every column filled but those not run
    for name, rows in (("retrievals.png", 6), ("reconstructions.png", 6)):
        with Image.open(out / name) as im:
            assert im.size[1] > rows * 128
    assert "report written to" in capsys.readouterr().out
    # A second report into the same folder needs --overwrite.
    assert main(["--checkpoint", str(run_dir), "--extractors", "", "--random-weights"]) == 2
    assert "already holds a report" in capsys.readouterr().err


def test_exact_reconstructions_score_perfectly_from_a_tensor_file(run_dir, env, tmp_path, test_images):
    ids, truth = test_images
    path = tmp_path / "recons.pt"
    order = torch.randperm(len(ids))  # any order, matched by id
    torch.save({"image_ids": [ids[i] for i in order], "images": truth[order]}, path)
    out = tmp_path / "report"
    assert main(["--checkpoint", str(run_dir / "checkpoints" / "step00000024"), "--recons", str(path),
                 "--out", str(out), "--extractors", "alexnet,effnet", "--random-weights", "--resize", "antialias",
                 "--ssim-window", "columns"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["resize_convention"] == "antialias" and r["ssim_window"] == "columns"
    assert "WITH antialiasing" in (out / "table.md").read_text()
    assert r["pixcorr"] == pytest.approx(1, abs=1e-6) and r["ssim"] == pytest.approx(1, abs=1e-9)
    assert r["alexnet2"] == r["alexnet5"] == 100.0 and r["effnet"] == pytest.approx(0, abs=1e-5)


def test_a_single_weights_file_scores_like_its_run(run_dir, env, tmp_path):
    from train.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir).state
    released = tmp_path / "released.pth"
    torch.save({"model_state_dict": {f"module.{k}": v.to(torch.bfloat16) for k, v in state.items()}}, released)
    out = tmp_path / "report"
    assert main(["--checkpoint", str(released), "--config", str(run_dir / "config.yaml"), "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    trained = json.loads((run_dir / "test_results.json").read_text())
    assert r["checkpoint"] == str(released)
    assert abs(r["forward_top1_full"] - trained["forward_top1_full"]) <= 100 / r["n_test"]  # bf16 weights: within one sample


def test_several_generations_use_takagis_variant(run_dir, env, tmp_path, test_images):
    ids, truth = test_images
    folder = tmp_path / "gens"
    for g in range(3):
        noisy = (truth + 0.1 * (g + 1) * torch.randn_like(truth)).clamp(0, 1)
        _write_pngs(folder, ids, noisy, [f"{i}_{g}.png" for i in ids])
    out = tmp_path / "report"
    assert main(["--checkpoint", str(run_dir), "--recons", str(folder), "--out", str(out),
                 "--extractors", "alexnet", "--random-weights"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["n_generations"] == 3 and r["alexnet2"] > 90
    assert "Takagi" in (out / "table.md").read_text()


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_reconstructions_are_one_line_errors(run_dir, env, tmp_path, test_images, capsys):
    ids, truth = test_images
    base = ["--checkpoint", str(run_dir), "--out", str(tmp_path / "report"), "--extractors", "alexnet", "--random-weights"]
    missing = _write_pngs(tmp_path / "missing", ids[1:], truth[1:])
    assert f"no reconstruction for test id {ids[0]}" in _error(capsys, [*base, "--recons", str(missing)])
    broken = _write_pngs(tmp_path / "broken", ids, truth)
    (broken / f"{ids[3]}.png").write_bytes(b"garbage")
    assert f"{ids[3]}.png: unreadable image" in _error(capsys, [*base, "--recons", str(broken)])
    extra = _write_pngs(tmp_path / "extra", ids, truth)
    _write_pngs(extra, [999999], truth[:1])
    assert "id 999999" in _error(capsys, [*base, "--recons", str(extra)])
    nan = truth.clone()
    nan[2, 0, 0, 0] = math.nan
    torch.save(nan, tmp_path / "nan.pt")
    assert "NaN" in _error(capsys, [*base, "--recons", str(tmp_path / "nan.pt")])
    torch.save(truth[:-1], tmp_path / "short.pt")
    assert f"{len(ids) - 1} reconstructions for {len(ids)} test samples" in _error(capsys, [*base, "--recons", str(tmp_path / "short.pt")])
    assert "reconstructions not found" in _error(capsys, [*base, "--recons", str(tmp_path / "nowhere")])
    assert not (tmp_path / "report" / "results.json").exists()


def test_missing_weights_and_checkpoints_are_one_line_errors(run_dir, env, tmp_path, test_images, capsys):
    ids, truth = test_images
    recons = _write_pngs(tmp_path / "recons", ids, truth)
    err = _error(capsys, ["--checkpoint", str(run_dir), "--recons", str(recons), "--out", str(tmp_path / "r"),
                          "--weights-dir", str(tmp_path)])
    assert f"{tmp_path}/alexnet-owt-7be5be79.pth" in err and "--weights alexnet=PATH" in err
    assert "no checkpoint here" in _error(capsys, ["--checkpoint", str(tmp_path)])
    (tmp_path / "model.pth").write_bytes(b"junk")
    assert "needs --config" in _error(capsys, ["--checkpoint", str(tmp_path / "model.pth")])
    assert "model.pth: unreadable checkpoint file" in _error(
        capsys, ["--checkpoint", str(tmp_path / "model.pth"), "--config", str(run_dir / "config.yaml"), "--out", str(tmp_path)])
    assert "unknown extractor 'vgg'" in _error(capsys, ["--checkpoint", str(run_dir), "--extractors", "vgg"])


def test_python_dash_m_eval_runs(run_dir, cache, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "FMRIDECODE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "eval", "--checkpoint", str(run_dir), "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "results.json").is_file() and (out / "retrievals.png").is_file() and "Image retrieval" in r.stdout
