import torch

from models import scores


def test_retrieval_perfect_and_chance():
    torch.manual_seed(0)
    image = torch.randn(500, 4, 8)
    perfect = scores.retrieval(image + 0.01 * torch.randn_like(image), image, n_way=300, n_trials=30)
    assert perfect["forward_top1"] == perfect["backward_top1"] == 100.0
    assert perfect["n_way"] == 300 and perfect["n_full"] == 500
    chance = scores.retrieval(torch.randn(500, 32), image, n_way=300, n_trials=30)
    assert chance["forward_top1"] < 3 and chance["backward_top1"] < 3
    assert chance["forward_top1_ci95"] > 0


def test_retrieval_directions_differ_as_defined():
    # Brain 0 matches image 0 and image 1 is closer to brain 0 than brain 1 is: forward and backward differ.
    image = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    brain = torch.tensor([[1.0, 0.05], [0.0, 1.0]])
    r = scores.retrieval(brain, image, n_way=2, n_trials=1)
    assert r["forward_top1_full"] == 100.0  # brain 0 -> image 0; brain 1 -> image 1
    assert r["backward_top1_full"] == 50.0  # image 1 is closer to brain 0 than to brain 1


def test_own_rank_counts_ties_against():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # Query 0's own key ties with key 2: rank 1, not retrieved first; query 1 is alone at the top.
    assert scores.own_rank(q, q).tolist() == [1, 0, 1]
