import torch

from models.clip_mused import CLIPMUSED

SMALL = dict(n_voxels=100, n_classes=7, patch_size=16, dim=32, depth=2, heads=4, classifier_hidden=24, dropout=0.0)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_each_added_subject_adds_exactly_its_two_512d_tokens():
    with torch.device("meta"):
        counts = [_count(CLIPMUSED(4000, n, 80, dim=512)) for n in (9, 10, 184)]
        one_token = [_count(CLIPMUSED(4000, n, 80, dim=512, n_subject_tokens=1)) for n in (9, 10)]
    assert counts[1] - counts[0] == 1024
    assert counts[2] - counts[0] == 175 * 1024
    assert one_token[1] - one_token[0] == 512


def test_shapes_subject_tokens_matter_and_padding_is_ignored():
    torch.manual_seed(0)
    model = CLIPMUSED(n_subjects=3, **SMALL).eval()
    x = torch.randn(4, 100)
    z_llv, z_hlv, logits = model(x, torch.tensor([0, 1, 2, 0]))
    assert z_llv.shape == z_hlv.shape == (4, 32) and logits.shape == (4, 7)
    same = x[:1].expand(2, -1)
    a, _, _ = model(same, torch.tensor([0, 1]))
    assert not torch.allclose(a[0], a[1])  # the subject's tokens change the output
    # Native space: a 70-voxel subject padded to 100 gives the same output whatever the padding holds.
    mask = torch.arange(100)[None] < 70
    noisy = x[:1].clone()
    noisy[:, 70:] = 1e3  # masked voxels: zeroed, and whole patches of them leave attention
    clean = x[:1].clone()
    clean[:, 70:] = 0
    out = [model(v, torch.tensor([1]), mask)[2] for v in (noisy, clean)]
    torch.testing.assert_close(out[0], out[1])


def test_layer_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    model = CLIPMUSED(n_subjects=2, **SMALL)
    x, s = torch.randn(3, 100), torch.tensor([0, 1, 1])
    grads = []
    for flag in (False, True):
        model.checkpoint_layers = flag
        model.zero_grad()
        model(x, s)[2].square().sum().backward()
        grads.append(model.patch_embed.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
