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


def test_smoothmix_is_ce_plus_eta_kl_to_the_mixed_target_by_hand():
    # clean copies p_1 = (1/2, 1/2), p_2 = (3/4, 1/4): p_bar = (5/8, 3/8), argmax 0 = the label
    # mixed copies r_1 = (1/2, 1/2), r_2 = (1/4, 3/4); mix 1/2: q = p_bar / 2 + (1/2) / 2
    mixed = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    q, r1, r2 = (0.5625, 0.4375), (0.5, 0.5), (0.25, 0.75)
    ce = (-math.log(0.5) - math.log(0.75)) / 2
    kl = sum(sum(a * math.log(a / r[c]) for c, a in enumerate(q)) for r in (r1, r2)) / 2
    half = torch.tensor([0.5])
    loss = recipes.smoothmix_loss(LOGITS, mixed, Y, 2, half, eta=5.0)
    assert loss.item() == pytest.approx(ce + 5.0 * kl, rel=1e-6)
    # where the clean copies' mean already errs (label 1), only the cross-entropy is left
    wrong = recipes.smoothmix_loss(LOGITS, mixed, torch.tensor([1]), 2, half, eta=5.0)
    assert wrong.item() == pytest.approx((-math.log(0.5) - math.log(0.25)) / 2, rel=1e-6)


def test_smoothmix_matches_the_authors_formulation_on_a_batch():
    """jh-jeong/smoothmix train.py: mixed target (1 - lam) avg_softmax + lam uniform, kl_div
    summed over classes, masked by the clean mean's correctness, mean over all copies."""
    torch.manual_seed(0)
    m, b, c = 4, 5, 10
    clean, mixed = torch.randn(m * b, c) * 3, torch.randn(m * b, c) * 3
    y, lam = torch.randint(0, c, (b,)), torch.rand(b) / 2
    avg = sum(F.softmax(x, 1) for x in clean.chunk(m)) / m
    target = (1 - lam).view(-1, 1) * avg + lam.view(-1, 1) * torch.eye(c).mean(0, keepdim=True)
    kl = F.kl_div(F.log_softmax(mixed, 1), target.repeat(m, 1), reduction="none").sum(1)
    correct = (avg.argmax(1) == y).float().repeat(m)
    ref = F.cross_entropy(clean, y.repeat(m), reduction="none").mean() + 5.0 * (correct * kl).mean()
    got = recipes.smoothmix_loss(clean, mixed, y, m, lam, eta=5.0)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_smoothmix_adversary_climbs_the_loss_in_unit_steps_and_stays_in_the_image_box():
    # two classes, logits (0, w.x) on every copy: the loss of class 0 grows fastest along w
    w = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    unit = w / 5

    def logits_of(v):
        return torch.cat([torch.zeros(len(v), 1), (v * w).flatten(1).sum(1, keepdim=True)],
                         1).repeat(2, 1)

    x, y = torch.full((1, 1, 1, 2), 0.5), torch.tensor([0])
    start, adv = recipes.smoothmix_adversary(logits_of, x, y, 2, steps=3, step_size=0.05,
                                             mix_step=0, start_norm=0.0)
    assert torch.equal(start, x)  # mix_step 0: the mix starts at x itself
    assert torch.allclose(adv, x + 0.15 * unit, atol=1e-6)
    start, _ = recipes.smoothmix_adversary(logits_of, x, y, 2, steps=3, step_size=0.05,
                                           mix_step=1, start_norm=0.02)
    assert torch.allclose(start, x + 0.02 * unit, atol=1e-6)  # one step, pulled back to 0.02
    _, far = recipes.smoothmix_adversary(logits_of, x, y, 2, steps=4, step_size=1.0,
                                         mix_step=0, start_norm=0.0)
    assert torch.equal(far, torch.ones_like(x))  # clipped to the image box


def _authors_attack(model, inputs, labels, noises, steps, mix_step, alpha, maxnorm_s):
    """SmoothMix_PGD.attack of jh-jeong/smoothmix (code/train.py), maxnorm None, transcribed."""
    def project(x, x0, maxnorm=None):
        if maxnorm is not None:
            x = x0 + (x - x0).renorm(p=2, dim=0, maxnorm=maxnorm)
        return torch.clamp(x, 0, 1).detach()

    adv = init = inputs.detach()
    for i in range(steps):
        if i == mix_step:
            init = adv.detach()
        adv.requires_grad_()
        avg = sum(F.softmax(model(adv + noise), dim=1) for noise in noises) / len(noises)
        loss = F.nll_loss(torch.log(avg.clamp(min=1e-20)), labels, reduction="sum")
        grad = torch.autograd.grad(loss, [adv])[0]
        grad = grad / (grad.reshape(grad.size(0), -1).norm(dim=1).view(-1, 1, 1, 1) + 1e-8)
        adv = project(adv + alpha * grad, inputs, None)
    return project(init, inputs, maxnorm_s), adv


@pytest.mark.parametrize("mix_step", [0, 1, 2])
def test_smoothmix_adversary_matches_the_authors_attack_on_a_batch(mix_step):
    from splitz.nets import create_model

    torch.manual_seed(0)
    model = create_model("lenet_small", "mnist", "input", 0.5).eval()
    m, b = 3, 4
    x, y = torch.rand(b, 1, 28, 28), torch.randint(0, 10, (b,))
    noise = 0.5 * torch.randn(m * b, 1, 28, 28)  # a distinct draw per copy and image
    start_norm = 0.3 * mix_step  # the warm-up's bound, below the steps' reach: it binds

    def logits_of(v):
        return model.f2(v.repeat(m, 1, 1, 1) + noise)

    start, adv = recipes.smoothmix_adversary(logits_of, x, y, m, 3, 1.0, mix_step, start_norm)
    ref_start, ref_adv = _authors_attack(model.f2, x, y, list(noise.chunk(m)), 3, mix_step, 1.0,
                                         start_norm)
    assert torch.allclose(adv, ref_adv, atol=1e-5) and torch.allclose(start, ref_start, atol=1e-5)
    moved = (start - x).flatten(1).norm(dim=1)
    assert (moved <= start_norm + 1e-5).all()
    if mix_step:
        assert (moved > start_norm - 1e-3).any()  # the bound was active
