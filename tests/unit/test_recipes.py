"""Each training recipe's loss against the paper's definition, computed by hand on a tiny batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from splitz import recipes

# One image, two noisy copies, two classes: p_1 = (1/2, 1/2), p_2 = (3/4, 1/4), label 0.
LOGITS = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
Y = torch.tensor([0])


def test_gaussian_is_the_cross_entropy_of_every_copy():
    expected = (math.log(2) - math.log(0.75)) / 2
    assert recipes.gaussian_loss(LOGITS, Y, 2).item() == pytest.approx(expected, rel=1e-6)


def test_consistency_is_ce_plus_lambda_kl_plus_eta_entropy_by_hand():
    p1, p2, pbar = (0.5, 0.5), (0.75, 0.25), (0.625, 0.375)
    ce = (-math.log(p1[0]) - math.log(p2[0])) / 2
    kl = sum(sum(b * math.log(b / p[c]) for c, b in enumerate(pbar)) for p in (p1, p2)) / 2
    entropy = -sum(b * math.log(b) for b in pbar)
    loss = recipes.consistency_loss(LOGITS, Y, 2, lam=10.0, eta=0.5)
    assert loss.item() == pytest.approx(ce + 10.0 * kl + 0.5 * entropy, rel=1e-6)


def test_consistency_matches_the_authors_formulation_on_a_batch():
    """jh-jeong/smoothing-consistency: F.kl_div(log_softmax(logit_i), p_bar) summed over classes."""
    torch.manual_seed(0)
    m, b, c = 3, 5, 10
    logits, y = torch.randn(m * b, c) * 3, torch.randint(0, c, (b,))
    copies = logits.chunk(m)
    pbar = sum(F.softmax(x, 1) for x in copies) / m
    kl = sum(F.kl_div(F.log_softmax(x, 1), pbar, reduction="none").sum(1) for x in copies) / m
    ent = -(pbar * pbar.clamp(min=1e-20).log()).sum(1)
    ref = F.cross_entropy(logits, y.repeat(m)) + (20.0 * kl + 0.5 * ent).mean()
    got = recipes.consistency_loss(logits, y, m, lam=20.0, eta=0.5)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_identical_copies_cost_no_kl():
    logits = torch.tensor([[2.0, -1.0, 0.5]]).repeat(2, 1)
    no_reg = recipes.consistency_loss(logits, torch.tensor([1]), 2, lam=0.0, eta=0.0)
    assert recipes.consistency_loss(logits, torch.tensor([1]), 2, lam=50.0, eta=0.0).item() == (
        pytest.approx(no_reg.item()))


def test_consistency_needs_two_copies():
    with pytest.raises(ValueError, match="m >= 2"):
        recipes.consistency_loss(LOGITS[:1], Y, 1, lam=1.0, eta=0.5)
