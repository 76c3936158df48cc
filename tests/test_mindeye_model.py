import torch

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
        outs.append((proj.detach(), m.stem[0].weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
