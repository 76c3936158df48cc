import torch

from models.scores import retrieval
from models.diffusion_prior import (
    PriorDiffusion,
    PriorNetwork,
    relative_position_buckets,
    rotate,
)
from models.mindeye import MindEyeBackbone

SMALL = dict(dim=32, n_tokens=5, depth=2, heads=2, dim_head=16)


def test_parameter_count_at_mindeye1_configuration():
    with torch.device("meta"):
        prior = PriorNetwork(dim=768, n_tokens=257, depth=6, heads=12, dim_head=64)
        backbone = MindEyeBackbone(15724, 257, 768)
    n_prior = sum(p.numel() for p in prior.parameters())
    assert n_prior == 56_055_168  # MindEye 1: 56,055,184, counting its 16 untrained rotary frequencies
    assert n_prior + sum(p.numel() for p in backbone.parameters()) == 1_003_635_088 - 16


def test_rotary_dot_products_depend_only_on_offset():
    torch.manual_seed(0)
    freqs = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    q, k = torch.randn(16), torch.randn(16)
    rq, rk = rotate(q.expand(10, 16), freqs), rotate(k.expand(10, 16), freqs)
    dots = rq @ rk.T
    for offset in (0, 1, 3):
        diag = dots.diagonal(offset)
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-5)
    assert not torch.allclose(dots.diagonal(0)[0], dots.diagonal(1)[0])
    assert torch.equal(rq[:, 8:], q[8:].expand(10, 8))  # only the first 2 * len(freqs) features turn
    assert torch.allclose(rq.norm(dim=1), q.norm().expand(10))


def test_relative_position_buckets():
    b = relative_position_buckets(300, 301)
    assert b[0, 5] == 0 and b[10, 10] == 0  # keys at or after the query
    assert b[20, 15] == 5 and b[40, 25] == 15  # exact below 16
    assert b[40, 24] == 16 and b[299, 0] == 31  # log-spaced, capped
    assert (b[299, :300].flip(0).diff() >= 0).all()  # grows with distance


def test_dropped_conditions_use_the_null_embeddings():
    torch.manual_seed(1)
    net = PriorNetwork(**SMALL).eval()
    noised, t = torch.randn(3, 5, 32), torch.tensor([0, 10, 99])
    a, b = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    off = torch.zeros(3, dtype=torch.bool)
    assert torch.allclose(net(noised, t, a, off), net(noised, t, b, off))
    assert not torch.allclose(net(noised, t, a), net(noised, t, b))
    assert torch.allclose(net(noised, t, a, off, off), net(torch.randn(3, 5, 32), t, b, off, off))


def test_layer_checkpointing_gives_the_same_values_and_gradients():
    torch.manual_seed(2)
    net = PriorNetwork(**SMALL)
    inputs = (torch.randn(4, 5, 32), torch.tensor([1, 2, 3, 4]), torch.randn(4, 5, 32))
    grads = []
    for flag in (False, True):
        net.checkpoint_layers = flag
        net.zero_grad()
        out = net(*inputs)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0][0], grads[1][0])
    assert len(grads[0][1]) == len(grads[1][1]) > 10
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_prior_learns_and_its_samples_retrieve_their_images():
    torch.manual_seed(3)
    n, dim = 24, 32
    image = torch.nn.functional.normalize(torch.randn(n, 5, dim), dim=-1)
    brain = image @ torch.randn(dim, dim) / dim ** 0.5 + 0.05 * torch.randn(n, 5, dim)  # a noisy linear view
    diffusion = PriorDiffusion(PriorNetwork(**SMALL), dim)
    opt = torch.optim.AdamW(diffusion.net.parameters(), lr=3e-3)  # cosine attention: 1e-3 only halves the loss here
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(400):
        loss = diffusion.loss(brain, image, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.4 * sum(losses[:20]) / 20  # measured 0.32
    diffusion.net.eval()
    sampled = diffusion.sample(brain, generator=torch.Generator().manual_seed(1))
    r = retrieval(sampled, image, n_way=n, n_trials=1)
    assert r["forward_top1_full"] > 3 * 100 / n  # chance is 1 / 24
