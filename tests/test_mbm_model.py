import pytest
import torch

from models.mbm import MaskedBrainModel, sincos_positions, wrap_pad

SMALL = dict(patch_size=8, dim=32, depth=2, heads=4, decoder_dim=16, decoder_depth=1, decoder_heads=2)


def _layer_params(d: int, hidden: int) -> int:
    """A pre-norm transformer layer: attention (qkv + out), MLP, two layer norms."""
    return (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d) + 4 * d


def test_reference_configuration_parameter_count():
    """MinD-Vis at HCP V1-V4 (4183 voxels): 24 x 1024 encoder (16 heads, MLP ratio 1),
    512 x 8 decoder, patches of 16; 164,419,600 parameters (sin-cos positions are fixed)."""
    with torch.device("meta"):
        model = MaskedBrainModel(4183)
    assert (model.n_patches, model.padded_voxels) == (262, 4192)
    expected = (1024 * 16 + 1024) + 1024 + 24 * _layer_params(1024, 1024) + 2 * 1024 \
        + (1024 * 512 + 512) + 512 + 8 * _layer_params(512, 512) + 2 * 512 + (512 * 16 + 16)
    assert sum(p.numel() for p in model.parameters()) == expected == 164_419_600


def test_wrap_padding_repeats_the_first_voxels():
    x = torch.arange(20.0).view(2, 10)
    padded = wrap_pad(x, 16)
    assert torch.equal(padded[:, :10], x) and torch.equal(padded[:, 10:], x[:, :6])
    assert torch.equal(wrap_pad(x[:, :3], 8)[0], torch.tensor([0.0, 1, 2, 0, 1, 2, 0, 1]))
    pos = sincos_positions(5, 8)
    assert torch.equal(pos[0], torch.tensor([0.0] * 4 + [1.0] * 4)) and pos.abs().max() <= 1


def test_masking_drops_three_quarters_per_sample_and_the_loss_reads_only_masked_patches():
    torch.manual_seed(0)
    model = MaskedBrainModel(100, **SMALL).eval()  # 13 patches, 104 padded voxels
    x = torch.randn(4, 100)
    loss, pred, mask = model(x, generator=torch.Generator().manual_seed(1))
    assert pred.shape == (4, 13, 8) and mask.shape == (4, 13)
    assert (mask.sum(1) == 13 - 3).all()  # int(13 x 0.25) = 3 kept, as MAE's code
    assert len({tuple(m.tolist()) for m in mask}) > 1  # each sample draws its own mask
    target = model.patchify(x)
    per_patch = (pred - target).square().mean(-1)
    torch.testing.assert_close(loss, per_patch[mask.bool()].mean())
    tokens, none_masked, keep = model.encode(x)
    assert tokens.shape == (4, 14, 32) and none_masked.sum() == 0 and keep.shape == (4, 13)
    again = model(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again[0], loss)  # a seeded generator gives the same masks


def test_block_checkpointing_gives_the_same_gradients():
    torch.manual_seed(2)
    model = MaskedBrainModel(60, **SMALL)
    x = torch.randn(3, 60)
    grads = []
    for flag in (False, True):
        model.checkpoint_blocks = flag
        model.zero_grad()
        model(x, generator=torch.Generator().manual_seed(3))[0].backward()
        grads.append(model.patch_embed.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("n_voxels", [16, 17])
def test_any_voxel_count_is_padded_to_whole_patches(n_voxels):
    model = MaskedBrainModel(n_voxels, **{**SMALL, "patch_size": 16})
    assert model.padded_voxels == 16 * ((n_voxels + 15) // 16)
    loss, pred, _ = model(torch.randn(2, n_voxels), mask_ratio=0.5)
    assert torch.isfinite(loss) and pred.shape[1] == model.n_patches
