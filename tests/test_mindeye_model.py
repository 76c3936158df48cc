import pytest
import torch

from data.pretrained_weights import WeightsMissing, load_convnext_features
from models.convnext_features import build_convnext_features
from models.lowlevel import LowLevelDecoder
from models.mindeye import MindEyeBackbone


def test_paper_configuration_parameter_count():
    with torch.device("meta"):
        model = MindEyeBackbone(n_voxels=15724, n_tokens=257, token_dim=768, hidden=4096, n_blocks=4, proj_hidden=2048)
    assert sum(p.numel() for p in model.parameters()) == 947_579_904


def test_shapes_and_activation_checkpointing_give_identical_results():
    torch.manual_seed(0)
    plain = MindEyeBackbone(50, 5, 8, hidden=32, proj_hidden=16, input_dropout=0, block_dropout=0)
    ckpt = MindEyeBackbone(50, 5, 8, hidden=32, proj_hidden=16, input_dropout=0, block_dropout=0, checkpoint_blocks=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 50)
    outs = []
    for m in (plain, ckpt):
        tokens, proj = m(x)
        assert tokens.shape == proj.shape == (4, 5, 8)
        proj.square().sum().backward()
        outs.append((proj.detach(), m.trunk.stem[0].weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_lowlevel_branch_paper_count_and_shapes():
    with torch.device("meta"):
        paper = LowLevelDecoder(15724)
    assert sum(p.numel() for p in paper.parameters()) == 206_065_604
    assert paper.latent_side == 64
    small = LowLevelDecoder(50, hidden=32, n_blocks=2, map_channels=16, map_side=4, decoder_channels=(16, 32, 32),
                            norm_groups=8, feature_dim=24, feature_hidden=32)
    latents, features = small(torch.randn(3, 50))
    assert latents.shape == (3, 4, 16, 16) and features.shape == (3, 16, 24)
    assert small.trunk.stem[0].bias is None and isinstance(small.trunk.stem[2], torch.nn.SiLU)


def test_convnext_teacher_features_and_missing_weights(tmp_path):
    tiny = {"dims": [8, 16, 32], "depths": [1, 1, 1]}
    teacher = build_convnext_features("tiny", None, 2, 32, 4, tiny=tiny)
    assert teacher.channels == 16 and teacher(torch.rand(2, 3, 48, 48)).shape == (2, 16, 16)
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(WeightsMissing, match="teacher.weights"):
        load_convnext_features("convnext_large", str(tmp_path / "none.pth"), 2, 224, 16)
