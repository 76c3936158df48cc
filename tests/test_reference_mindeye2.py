"""MindEye 2 against the golden outputs of its own code (tests/fixtures/reference/make_mindeye2.py):
its released checkpoint layout loads strictly into our models, which compute what the original
computed from the same weights and inputs, within 1e-5; and the paper configuration has the
reference's parameter counts."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from models.clip_image import FrozenCLIPImage
from models.diffusion_prior import PriorDiffusion, PriorNetwork
from models.mindeye1_keys import PRIOR_RULES, map_keys
from models.mindeye2 import MindEye2, MindEye2Backbone, SubjectRidge, repeat_average
from models.mindeye2_keys import from_mindeye2, is_mindeye2
from models.strict_load import load_strict
from tests.conftest import load_reference
from train.losses import bimixco, cosine_anneal, mix_voxels, mix_within_subjects, soft_clip, soft_contrastive


def close(ours, reference):
    """Agreement within 1e-5 of the reference output's scale (its largest magnitude, at least 1)."""
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5 * max(1.0, reference.abs().max().item()))


def backbone_of(kwargs: dict) -> MindEye2Backbone:
    return MindEye2Backbone(kwargs["h"], kwargs["n_blocks"], n_tokens=kwargs["out_dim"] // kwargs["clip_size"],
                            token_dim=kwargs["clip_size"], blurry=kwargs["blurry_recon"], seq_len=kwargs["seq_len"])


def prior_of(kwargs: dict) -> PriorNetwork:
    return PriorNetwork(kwargs["dim"], kwargs["num_tokens"], kwargs["depth"], kwargs["heads"], kwargs["dim_head"])


@pytest.fixture(scope="module")
def model():
    ref = load_reference("mindeye2_model.pt.xz")
    r = ref["ridge_kwargs"]
    net = MindEye2(SubjectRidge(r["input_sizes"], r["out_features"]), backbone_of(ref["backbone_kwargs"]),
                   prior_of(ref["prior_kwargs"]))
    assert is_mindeye2(ref["state_dict"])
    load_strict(net, from_mindeye2(ref["state_dict"]))
    return net.eval(), ref


def padded(voxels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two subjects' [N, 1, V_s] voxels as one zero-padded batch and its subject rows."""
    width = max(v.shape[-1] for v in voxels)
    rows = torch.cat([torch.full((len(v),), s) for s, v in enumerate(voxels)])
    return torch.cat([F.pad(v[:, 0], (0, width - v.shape[-1])) for v in voxels]), rows


@torch.no_grad()
def test_ridge_layers_backbone_projector_and_blurry_branch_of_a_mixed_batch(model):
    net, ref = model
    voxels, rows = padded(ref["voxels"])
    latent = net.ridge(voxels, rows)
    close(latent, ref["voxel_ridge"])
    for s, v in enumerate(ref["voxels"]):
        close(latent[rows == s], ref["ridge"][s])
    tokens, projected, (latents, features) = net(voxels, rows)
    close(tokens, ref["backbone"])
    close(projected, ref["clip_voxels"])
    close(latents, ref["blurry_latents"])
    close(features, ref["blurry_aux"])


@torch.no_grad()
def test_test_time_average_of_the_outputs_over_repeats(model):
    net, ref = model
    repeats = ref["repeats"]  # [N, 3, V] of subject 0
    averaged = repeat_average(net, repeats, torch.zeros(len(repeats), dtype=torch.long))
    close(averaged["tokens"], ref["averaged"]["backbone"])
    close(averaged["projected"], ref["averaged"]["clip_voxels"])
    close(averaged["latents"], ref["averaged"]["blurry_latents"])


@torch.no_grad()
def test_backbone_without_the_blurry_branch():
    ref = load_reference("mindeye2_no_blurry.pt.xz")
    backbone = backbone_of(ref["backbone_kwargs"])
    load_strict(backbone, ref["state_dict"])
    tokens, projected, blurry = backbone.eval()(ref["input"])
    close(tokens, ref["backbone"])
    close(projected, ref["clip_voxels"])
    assert blurry is None


@pytest.fixture(scope="module")
def prior():
    ref = load_reference("mindeye2_prior.pt.xz")
    state = {k.removeprefix("prior."): v for k, v in map_keys(ref["state_dict"], PRIOR_RULES, "MindEye 2").items()}
    net = prior_of(ref["prior_kwargs"])
    load_strict(net, state)
    return net.eval(), ref


@pytest.mark.parametrize("case", ["kept", "brain_dropped", "image_dropped", "both_dropped"])
@torch.no_grad()
def test_prior_network_with_conditions_kept_and_dropped(prior, case):
    net, ref = prior
    keep = torch.ones(len(ref["brain"]), dtype=torch.bool)
    brain_keep = ~keep if case in ("brain_dropped", "both_dropped") else keep
    image_keep = ~keep if case in ("image_dropped", "both_dropped") else keep
    close(net(ref["noised"], ref["times"], ref["brain"], brain_keep, image_keep), ref["net"][case])


@torch.no_grad()
def test_prior_loss_diffuses_unscaled_tokens(prior):
    """MindEye 2's prior loss: x_t from the raw (unscaled) bigG tokens, MSE of the x0 prediction."""
    net, ref = prior
    diffusion = PriorDiffusion(net, ref["prior_kwargs"]["dim"], ref["diffusion_kwargs"]["timesteps"],
                               scale_targets=False)
    noised = diffusion.scheduler.add_noise(ref["image"], ref["noise"], ref["times"])
    close(noised, ref["q_sample"])
    keep = torch.ones(len(ref["brain"]), dtype=torch.bool)
    for case, mask in (("kept", keep), ("dropped", ~keep)):
        pred = net(noised, ref["times"], ref["brain"], mask, mask)
        close(pred, ref["p_losses"][case]["pred"])
        close(F.mse_loss(pred, ref["image"]), ref["p_losses"][case]["loss"])


@torch.no_grad()
def test_prior_samples_as_mindeye2_does_with_20_ddim_steps(prior):
    """recon_inference.ipynb's p_sample_loop(timesteps=20): DALL-E 2's DDIM (eta 1) from the
    global generator; ours from a generator seeded alike draws the same numbers."""
    net, ref = prior
    diffusion = PriorDiffusion(net, ref["prior_kwargs"]["dim"], ref["diffusion_kwargs"]["timesteps"],
                               scale_targets=False)
    assert ref["ddim_timesteps"] == 20
    out = diffusion.sample_ddim(ref["brain"], 20, torch.Generator().manual_seed(ref["ddim_global_seed"]))
    close(out, ref["ddim"])


def test_losses_of_the_training_step():
    ref = load_reference("mindeye2_losses.pt.xz")
    p, t = ref["preds"], ref["targs"]
    assert not (ref["perm"] == torch.arange(len(p))).any()  # where bimixco deliberately differs: see train/losses.py
    close(bimixco(p, t, ref["perm"], ref["betas"], 0.006), ref["mixco_nce"])
    close(soft_clip(p, t, 0.005), ref["soft_clip_loss"])
    close(soft_contrastive(ref["student"], ref["teacher"], ref["teacher_aug"], 0.2), ref["soft_cont_loss"])
    ours = torch.tensor(cosine_anneal(0.004, 0.0075, len(ref["cosine_anneal"])), dtype=torch.float64)
    torch.testing.assert_close(ours, ref["cosine_anneal"].double(), rtol=1e-6, atol=0)  # the SoftCLIP temperatures


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_configuration_has_the_reference_parameter_counts():
    """Built on the meta device (no memory): MindEye 2 at hidden 4096, 4 blocks, ViT-bigG/14's
    256 x 1664 tokens, the blurry branch, the prior of depth 6 with 32 heads of 52."""
    full = load_reference("mindeye2_model.pt.xz")["param_counts_full"]
    with torch.device("meta"):
        backbone = MindEye2Backbone(4096, 4, n_tokens=256, token_dim=1664, blurry=True)
        prior = PriorNetwork(1664, 256, depth=6, heads=32, dim_head=52)
        ridge = SubjectRidge([15724], 4096)
    assert count(backbone) == full["backbone"] == 1_903_020_028
    assert count(prior) == full["prior_trainable"] == 259_865_200  # + 16 rotary frequencies, a buffer here
    assert count(ridge) == full["ridge_subj01_15724"] == 64_409_600


def test_bimixco_labels_of_mixed_samples_stay_inside_their_subject():
    """The reference's two-subject step draws each subject's permutation over its own 0..b-1 and
    concatenates them, so the second subject's mixing targets point into the first subject's
    rows; ours index the whole batch within each subject."""
    step = load_reference("mindeye2_losses.pt.xz")["train_step"]
    b = len(step["voxels"][0])
    subjects = torch.tensor([0] * b + [1] * b)
    reference_perm = step["perm"]
    assert (reference_perm[subjects == 1] < b).all()  # the defect: subject 2's labels in subject 1's rows
    voxels = torch.randn(len(subjects), 8)
    for seed in range(20):
        _, perm, betas = mix_within_subjects(voxels, subjects, np.random.default_rng(seed))
        assert torch.equal(subjects[perm], subjects)
    same = torch.zeros(6, dtype=torch.long)
    a, b_ = mix_voxels(torch.randn(6, 8), np.random.default_rng(3)), mix_within_subjects(torch.randn(6, 8), same,
                                                                                         np.random.default_rng(3))
    assert torch.equal(a[1], b_[1]) and torch.equal(a[2], b_[2])  # one subject: MindEye 1's draws


@pytest.mark.parametrize("size", ["224", "256", "64", "200x300"])
@torch.no_grad()
def test_bigg_patch_token_targets_and_their_preprocessing(size):
    """MindEye 2's CLIP targets (sgm's FrozenOpenCLIPImageEmbedder, only_tokens) by a tiny ViT:
    the model input (kornia's antialiased bicubic resize, (x + 1) / 2, normalisation) and the
    patch tokens after ln_post, without CLS or projection."""
    ref = load_reference("mindeye2_targets.pt.xz")
    v = ref["tiny_config"]["vision_cfg"]
    visual = VisionTransformer(image_size=v["image_size"], patch_size=v["patch_size"], width=v["width"],
                               layers=v["layers"], heads=v["width"] // v["head_width"], mlp_ratio=v["mlp_ratio"],
                               output_dim=ref["tiny_config"]["embed_dim"])
    load_strict(visual, ref["visual_state_dict"])
    encoder = FrozenCLIPImage(visual, "patch_tokens")
    out = ref["outputs"][size]
    close(encoder.preprocess(out["image"]), out["model_input"])
    close(encoder(out["image"]), out["tokens"])
    assert encoder.target_shape == tuple(out["tokens"].shape[1:])
