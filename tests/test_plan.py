"""The memory planner (`python -m benchmarks.plan`) at paper scale and its error lines; its
agreement with measured bytes is tested beside the suite's measurements (test_benchmarks.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.plan import main as plan_main
from benchmarks.plan import plan
from data.convert.nsd import VOXELS as NSD_VOXELS
from tests.conftest import ROOT
from train import config

ZERO0 = ROOT / "ds_configs/zero0.json"
MINDEYE_TINY = ROOT / "train/configs/mindeye_tiny.yaml"


def test_paper_scale_mindeye2_plan(capsys):
    """MindEye 2 pretraining on NSD subjects 2-8 at paper scale, counted on the meta device:
    the 2,575,262,332 parameters of the issue less the prior's 16 rotary frequencies (a
    buffer here); activation checkpointing shrinks the activations."""
    cfg = config.load(ROOT / "train/configs/mindeye2_pretrain_paper.yaml", ["train.batch_size=16"])
    subjects_2_8 = [NSD_VOXELS[s] for s in range(2, 9)]
    checkpointed = plan(cfg, 2, subjects_2_8, ZERO0)
    assert checkpointed["n_params"] == 2_575_262_332 - 16
    assert checkpointed["voxels"] == [14278, 15226, 13153, 13039, 17907, 12682, 14386]  # nsdgeneral, subjects 2-8
    rows = checkpointed["rows"]
    # ZeRO-3: a half share, and whole the parameters of at most 1e5 elements (biases, norms)
    assert 0 < checkpointed["persistent_params"] < 1e-3 * checkpointed["n_params"]
    assert rows["ZeRO-3"]["params"] == pytest.approx(2 * (checkpointed["n_params"] / 2 + checkpointed["persistent_params"]))
    assert rows["ZeRO-2 + optimizer offload"]["optimizer"] == 0
    assert rows["ZeRO-2 + optimizer offload"]["cpu"] == pytest.approx(12 * checkpointed["n_params"] / 2)
    assert rows["ZeRO-3"]["buffers"] > 2 * 4096 * 256 * 1664  # backbone_linear gathered whole, in bf16
    full = plan(config.load(ROOT / "train/configs/mindeye2_pretrain_paper.yaml",
                            ["train.batch_size=16", "model.checkpoint_blocks=false", "prior.checkpoint_layers=false"]),
                2, subjects_2_8, ZERO0)
    assert full["activation_bytes"] > 1.3 * checkpointed["activation_bytes"]  # 5.2 against 3.5 GB
    assert plan_main(["--config", str(ROOT / "train/configs/mindeye2_pretrain_paper.yaml"), "--gpus", "2",
                      "--gpu-mem", "24", "train.batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert "| ZeRO-3 + optimizer and parameter offload |" in out and "2,575,262,316 parameters (bfloat16)" in out


def test_planner_error_lines(capsys, tmp_path: Path):
    assert plan_main(["--config", str(ROOT / "train/configs/clip_mused_tiny.yaml"), "--gpus", "1", "--gpu-mem", "8"]) == 2
    assert "does not declare 'memory'" in capsys.readouterr().err
    assert plan_main(["--config", str(MINDEYE_TINY), "--gpus", "5", "--gpu-mem", "8", "--voxels", "300",
                      "train.batch_size=8"]) == 2
    assert "train.batch_size=8 is not divisible" in capsys.readouterr().err
    assert plan_main(["--config", str(ROOT / "train/configs/mindeye2_tiny.yaml"), "--gpus", "1", "--gpu-mem", "8"]) == 2
    assert "--voxels" in capsys.readouterr().err  # simulated subjects: no NSD counts to default to
    assert plan_main(["--config", str(tmp_path / "none.yaml"), "--gpus", "1", "--gpu-mem", "8"]) == 2
    assert "none.yaml" in capsys.readouterr().err
