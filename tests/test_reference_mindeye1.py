"""MindEye 1 against the golden outputs of its own code (tests/fixtures/reference/make_mindeye1.py):
its released checkpoint layouts load into our models, which then compute what the original
computed from the same weights and inputs, within 1e-5."""

import pytest
import torch

from eval.main import main as eval_main
from models.diffusion_prior import PriorDiffusion, PriorNetwork
from models.lowlevel import LowLevelDecoder
from models.mindeye import MindEye, MindEyeBackbone
from models.mindeye1_keys import from_mindeye1
from tests.conftest import ROOT, SMALL_SIM, load_reference
from train.losses import bimixco, cosine_anneal, soft_clip, soft_contrastive


def close(ours, reference):
    """Agreement within 1e-5 of the reference output's scale (its largest magnitude, at least 1)."""
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5 * max(1.0, reference.abs().max().item()))


@pytest.fixture(scope="module")
def high():
    ref = load_reference("mindeye1_high_level.pt.xz")
    s = ref["sizes"]
    model = MindEye(MindEyeBackbone(s["voxels"], s["tokens"], s["dim"], hidden=s["hidden"]),
                    PriorNetwork(s["dim"], s["tokens"], s["depth"], s["heads"], s["dim_head"]))
    model.load_state_dict(from_mindeye1(ref["state_dict"]))  # strict
    return model.eval(), ref


def test_backbone_and_projector(high):
    model, ref = high
    tokens, projected = model.backbone(ref["voxels"])
    close(tokens.flatten(1), ref["backbone"])
    close(projected, ref["projected"])


@pytest.mark.parametrize("case", ["kept", "brain_dropped", "image_dropped", "both_dropped"])
def test_prior_network_with_conditions_kept_and_dropped(high, case):
    model, ref = high
    keep = torch.ones(len(ref["voxels"]), dtype=torch.bool)
    brain_keep = ~keep if case in ("brain_dropped", "both_dropped") else keep
    image_keep = ~keep if case in ("image_dropped", "both_dropped") else keep
    brain = ref["backbone"].view(len(keep), ref["sizes"]["tokens"], -1)
    with torch.no_grad():
        close(model.prior(ref["noised"], ref["times"], brain, brain_keep, image_keep), ref["net"][case])


def test_prior_sampling_loop_draws_the_same_samples(high):
    """MindEye 1's 100-step ancestral sampling (`p_sample_loop`, cond_scale 1) from the same seed."""
    model, ref = high
    brain = ref["backbone"].view(len(ref["voxels"]), ref["sizes"]["tokens"], -1)
    sampled = PriorDiffusion(model.prior, ref["sizes"]["dim"]).sample(
        brain, generator=torch.Generator().manual_seed(ref["sample_seed"]))
    close(sampled, ref["sampled"])


def low_level_model(sizes: dict) -> LowLevelDecoder:
    return LowLevelDecoder(sizes["voxels"], sizes["hidden"], 4, decoder_channels=tuple(sizes["decoder_channels"]),
                           norm_groups=sizes["norm_groups"]).eval()


def test_low_level_model_from_diffusers_0_13_key_names():
    ref = load_reference("mindeye1_low_level.pt.xz")
    assert "upsampler.mid_block.attentions.0.query.weight" in ref["state_dict"]  # the layout MindEye 1 saved
    model = low_level_model(ref["sizes"])
    model.load_state_dict(from_mindeye1(ref["state_dict"]))  # strict
    with torch.no_grad():
        latents, features = model(ref["voxels"])
    close(latents, ref["latents"])
    close(features, ref["features"])


@pytest.fixture(scope="module")
def losses():
    return load_reference("mindeye1_losses.pt.xz")


def test_bimixco_equals_mixco_nce(losses):
    r = losses
    close(bimixco(r["preds"], r["targs"], r["perm"], r["betas"], tau=0.006), r["mixco_nce"])
    n = len(r["preds"])
    close(bimixco(r["preds"], r["targs"], torch.arange(n), torch.ones(n), tau=0.006), r["nce"])


def test_bimixco_keeps_the_own_share_of_a_sample_left_in_place(losses):
    """A deliberate difference: where perm(i) = i, MindEye's soft-target row sums to 1 - b_i; ours to 1."""
    r = losses
    perm, betas = r["fixed_perm"], r["betas"]
    ours = bimixco(r["preds"], r["targs"], perm, betas, tau=0.006)
    assert not torch.isclose(ours, r["mixco_nce_fixed_perm"])
    kept = betas.clone()
    in_place = perm == torch.arange(len(perm))
    kept[in_place] = 1.0  # a sample mixed with itself is itself: no other stimulus shares its row
    close(ours, bimixco(r["preds"], r["targs"], perm, kept, tau=0.006))


def test_soft_clip_and_soft_contrastive_equal_the_reference(losses):
    r = losses
    close(soft_clip(r["preds"], r["targs"], tau=0.005), r["soft_clip_loss"])
    close(soft_contrastive(r["student"], r["teacher"], r["teacher_aug"], tau=0.075), r["soft_cont_loss"])
    close(torch.tensor(cosine_anneal(0.004, 0.0075, 11), dtype=torch.float32), r["cosine_anneal"])


def test_released_low_level_checkpoint_is_scored_by_the_eval_cli(small_dataset, tmp_path, monkeypatch, capsys):
    """A low-level checkpoint as MindEye 1 saved it (diffusers 0.13 names) loads strictly via `python -m eval`."""
    ref = load_reference("mindeye1_low_level.pt.xz")
    s = ref["sizes"]
    assert s["voxels"] == SMALL_SIM["voxels"][0]
    released = tmp_path / "last.pth"
    torch.save({"epoch": 0, "model_state_dict": ref["state_dict"]}, released)
    overrides = [f"data.root={small_dataset}", f"model.hidden={s['hidden']}", "model.n_blocks=4", "model.map_channels=64",
                 "model.map_side=16", f"model.decoder_channels=[{','.join(map(str, s['decoder_channels']))}]",
                 f"model.norm_groups={s['norm_groups']}", "model.feature_hidden=512", "teacher.tiny.dims=[16,512,16]",
                 "vae.image_size=256"]
    config = ["--config", str(ROOT / "train/configs/mindeye_lowlevel_tiny.yaml")]
    monkeypatch.setenv("FMRIDECODE_CACHE", str(tmp_path / "cache"))
    assert eval_main(["--checkpoint", str(released), *config, "--out", str(tmp_path / "eval"), *overrides]) == 0
    assert "latent_r_across_samples" in (tmp_path / "eval" / "table.md").read_text()

    broken = {k: v for k, v in ref["state_dict"].items() if "mid_block.attentions.0.query" not in k}
    torch.save({"model_state_dict": broken}, released)
    capsys.readouterr()
    assert eval_main(["--checkpoint", str(released), *config, "--out", str(tmp_path / "eval2"), *overrides]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error:") and "mid_block.attentions.0.to_q" in lines[-1] and "Traceback" not in err
