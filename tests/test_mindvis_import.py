"""MinD-Vis' and DC-MAE's released files used here: a stage-B `finetuned.pth` in the released layout
(tiny, random: tests/fixtures/reference/mindvis.pt.xz) generates through `train.reconstruct` and is
scored by `python -m eval`; a stage-A `fmri_encoder.pth` is scored as a masked brain model and starts
a stage-B run as `encoder.checkpoint`; a file pickling an unknown class is refused in one line."""
from __future__ import annotations

import json
import math

import pytest
import torch

from data.released_pickle import Record, load_released
from eval.main import main as eval_main
from models.errors import InputError
from tests.conftest import ROOT, load_reference, train_here
from train import config, reconstruct
from train.checkpoint import CheckpointError, load_checkpoint

LDM_TINY = str(ROOT / "train/configs/fmri_ldm_tiny.yaml")
MBM_TINY = str(ROOT / "train/configs/mbm_tiny.yaml")
# Two native-space subjects of 300 and 260 voxels (the files' encoder reads 128: truncated), 32 px stimuli
# (the file's VQ-f4 gives 3 x 8 x 8 latents, its UNet's size).
SIM = ["data.simulator.n_subjects=2", "data.simulator.common_space=false", "data.simulator.voxels=[300,260]",
       "data.simulator.n_train=16", "data.simulator.n_val=4", "data.simulator.n_test=4", "data.simulator.n_repeats=2",
       "data.simulator.image_size=32"]
STAGE_B = [*SIM, "data.subject=1", "encoder.model.heads=4", "ldm.image_size=32", "generation.steps=3",
           "generation.n_samples=2", "generation.batch_size=4", "ds.bf16.enabled=false"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    fixture, folder = load_reference("mindvis.pt.xz"), tmp_path_factory.mktemp("release")
    paths = {}
    for name in ("fmri_encoder_pth", "finetuned_pth"):
        paths[name] = folder / name.replace("_pth", ".pth")
        paths[name].write_bytes(fixture[name].numpy().tobytes())
    return paths


def test_the_pickled_configs_are_plain_records(files):
    """MinD-Vis pickles its config classes (`config.Config_MBM_fMRI`, `config.Config_Generative_Model`):
    read as attribute records, nothing of the class imported."""
    stage_a = load_released(files["fmri_encoder_pth"], InputError, "unreadable")
    stage_b = load_released(files["finetuned_pth"], InputError, "unreadable")
    assert isinstance(stage_a["config"], Record) and stage_a["config"].num_heads == 4 and stage_a["epoch"] == 7
    assert isinstance(stage_b["config"], Record) and stage_b["config"].ddim_steps == 250
    assert stage_b["config"].global_pool is False and stage_b["config"].use_time_cond is True


def test_a_stage_b_file_generates_through_reconstruct_and_is_scored_by_eval(files, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    path, recons, report = str(files["finetuned_pth"]), tmp_path / "recons", tmp_path / "eval"
    common = ["--checkpoint", path, "--config", LDM_TINY, "--device", "cpu"]
    assert reconstruct.main([*common, "--out", str(recons), *STAGE_B]) == 0, capsys.readouterr().err
    made = json.loads((recons / "reconstruction.json").read_text())
    assert made["generation"]["scheduler"] == "plms" and len(list(recons.glob("*_[01].png"))) == 2 * 4
    assert eval_main([*common, "--recons", str(recons), "--out", str(report), "--random-weights", "--extractors",
                      "alexnet,inception", "--n-way-classifier", "inception", *STAGE_B]) == 0, capsys.readouterr().err
    r = json.loads((report / "results.json").read_text())
    assert r["checkpoint"] == path and r["recipe"] == "fmri_ldm" and r["n_generations"] == 2
    assert 0 <= r["inception_50way_top1"] <= 100 and 0 <= r["inception_50way_top1_best"] <= 100
    assert math.isfinite(r["noise_mse"]) and r["voxel_fit"] == "truncate"
    cfg = load_checkpoint(files["finetuned_pth"], None, ["encoder.model.heads=4"]).cfg  # without --config: the paper's
    assert (cfg.ldm.conditioning, cfg.ldm.n_context, cfg.generation.steps, cfg.encoder.model.n_voxels) == \
        ("mind_vis", 77, 250, 128)


def test_a_stage_a_file_is_scored_as_a_masked_brain_model(files, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FMRIDECODE_CACHE", str(cache))
    out = tmp_path / "eval"
    data = [*SIM, "data.heldout_subjects=[2]", "data.loader=memory"]
    assert eval_main(["--checkpoint", str(files["fmri_encoder_pth"]), "--config", MBM_TINY, "--out", str(out),
                      "--device", "cpu", *data]) == 0, capsys.readouterr().err
    r = json.loads((out / "results.json").read_text())
    assert r["recipe"] == "mbm" and r["voxel_fit"] == "truncate" and r["n_subjects"] == 1
    assert math.isfinite(r["masked_mse"]) and math.isfinite(r["masked_r"])


def test_a_stage_a_file_starts_stage_b_with_mind_vis_conditioning(files, cache, tmp_path):
    """encoder.checkpoint=fmri_encoder.pth: its sizes (heads from the pickled config) are recorded in
    the run's config, and the encoder starts from its weights."""
    run = tmp_path / "run"
    train_here(["--config", LDM_TINY, f"run_dir={run}", f"encoder.checkpoint={files['fmri_encoder_pth']}",
                "ldm.conditioning=mind_vis", "ldm.context_dim=16", "train.epochs=1", "train.batch_size=16",
                *STAGE_B[:-5], "ldm.image_size=32", "ds.bf16.enabled=false"], cache)
    saved = config.load(next((run / "checkpoints").glob("*/config.yaml")), [])
    m = saved.encoder.model
    assert (m.n_voxels, m.dim, m.depth, m.heads, m.norm_eps, saved.ldm.conditioning) == (128, 32, 2, 4, 1e-5, "mind_vis")


class Unknown:
    """A class a checkpoint might pickle that is neither a tensor, a training object nor a known config."""


def test_a_file_pickling_an_unknown_class_is_refused_in_one_line(files, tmp_path, capsys):
    fixture = load_released(files["fmri_encoder_pth"], InputError, "unreadable")
    path = tmp_path / "fmri_encoder.pth"
    torch.save({"model": fixture["model"], "config": Unknown()}, path)
    name = f"{__name__}.Unknown"
    with pytest.raises(CheckpointError, match=f"holds {name}, which is not a tensor, a known training object or a "
                                              "known config; refusing to unpickle it"):
        load_checkpoint(path)
    assert eval_main(["--checkpoint", str(path), "--out", str(tmp_path / "eval"), "--device", "cpu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and name in err[0]
