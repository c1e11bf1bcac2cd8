"""The Monte Carlo engine: exact Cohen radii, abstention, reproducibility, no over-certifying."""

import math

import pytest
import torch
from scipy.stats import beta, norm
from torch import nn

from splitz.data import DatasetSpec
from splitz.errors import InputError
from splitz.lipschitz import F1Bound
from splitz.nets import ClipReLU, Normalize, SplitModel, create_model
from splitz.smoothing import Smooth, adaptive_plan, out_of_reach, query_plan
from splitz.stats import (
    auxiliary_uniform,
    clopper_pearson_lower,
    cs_lower,
    fixed_lower,
    randomized_clopper_pearson_lower,
    round_down,
)

from ..conftest import dense_a


def test_identity_split_gives_exactly_cohens_radius():
    model = create_model("lenet", "mnist", "input", sigma=0.25)
    with torch.no_grad():
        model.f2[-1].bias[3] = 50.0  # a confident base classifier: class 3 almost everywhere
    cert = Smooth(model, batch_size=500).certify(torch.rand(1, 28, 28), n0=50, n=2000,
                                                 alpha=0.001, seed=3)[0]
    p_lower = beta.ppf(0.001, cert.n_a, cert.n - cert.n_a + 1)
    assert cert.prediction == 3 and cert.lipschitz == 1.0
    assert cert.p_a_lower == pytest.approx(p_lower, rel=1e-12)
    assert cert.radius == round_down(0.25 * norm.ppf(p_lower))


def uniform_vote_model() -> SplitModel:
    """f1 = identity on a 10-pixel image, f2 = the pixels themselves as logits: at x = 0 every
    class wins a noisy vote with probability 1/10."""
    spec = DatasetSpec("toy", (1, 1, 10), tuple("abcdefghij"), (0.0,), (1.0,))
    return SplitModel(nn.Sequential(), nn.Sequential(nn.Flatten()), 1.0, spec)


def test_abstains_when_no_class_dominates():
    smooth = Smooth(uniform_vote_model(), batch_size=300)
    x = torch.zeros(2, 1, 1, 10)
    certs = smooth.certify(x, n0=100, n=1000, alpha=0.001)
    assert all(c.abstained and c.radius == 0.0 for c in certs)
    assert all(c.p_a_lower < 0.5 for c in certs)
    preds = smooth.predict(x, n=1000, alpha=0.001)
    assert all(p.prediction is None for p in preds)


def test_predict_returns_a_dominant_class():
    x = torch.zeros(1, 1, 1, 10)
    x[..., 4] = 5.0  # class e wins by 5 sigma
    pred = Smooth(uniform_vote_model()).predict(x, n=500)[0]
    assert pred.prediction == 4 and pred.p_value < 1e-6


def test_same_seed_same_certificate_and_batching_does_not_matter():
    model = create_model("lenet", "mnist", "conv1", sigma=0.5)
    smooth = Smooth(model, batch_size=256)
    x = torch.rand(3, 1, 28, 28)
    together = smooth.certify(x, n0=100, n=600, seed=11)
    alone = smooth.certify(x[2:], n0=100, n=600, seed=13)[0]
    again = smooth.certify(x, n0=100, n=600, seed=11)
    assert [c.n_a for c in together] == [c.n_a for c in again]
    assert (together[2].n_a, together[2].radius, together[2].seed) == (
        alone.n_a, alone.radius, alone.seed)
    mixed = smooth.certify(x[[2, 0]], n0=100, n=600, seed=[13, 11])  # one seed per image
    assert [(c.seed, c.n_a) for c in mixed] == [(13, alone.n_a), (11, together[0].n_a)]
    with pytest.raises(InputError, match="2 seeds for 3 images"):
        smooth.certify(x, n0=10, n=10, seed=[1, 2])


def linear_toy(sigma: float, seed: int) -> tuple[SplitModel, torch.Tensor, torch.Tensor]:
    """f1 = clip(conv(normalize(x))) kept in its linear region by a large bias; f2 = a linear
    two-class head whose weight w is A's top left singular vector. The smoothed classifier of a
    linear head is that head, so its exact input-space robust radius is |w.z + b| / ||A^T w||,
    and ||A^T w|| = ||A||: any under-estimate of the Lipschitz bound over-certifies here."""
    g = torch.Generator().manual_seed(seed)
    spec = DatasetSpec("toy", (1, 6, 6), ("neg", "pos"), (0.5,), (0.25,))
    conv = nn.Conv2d(1, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
        conv.bias.fill_(100.0)
    f1 = nn.Sequential(Normalize(spec.mean, spec.std), conv, ClipReLU((3, 6, 6), init=1e9))
    a = dense_a(F1Bound(f1, spec.input_shape))
    w = torch.linalg.svd(a, full_matrices=False)[0][:, 0]
    x = torch.rand(8, 1, 6, 6, generator=g)
    with torch.no_grad():
        wz = f1(x).flatten(1).double() @ w
    head = nn.Linear(108, 2).double()
    with torch.no_grad():
        head.weight.copy_(torch.stack([-w, w]) / 2)
        head.bias.copy_(torch.stack([wz.median(), -wz.median()]) / 2)
    f2 = nn.Sequential(nn.Flatten(), head.float())
    margin = wz - wz.median()
    true_radius = margin.abs() / torch.linalg.matrix_norm(a, ord=2)
    return SplitModel(f1, f2, sigma, spec), x, (margin, true_radius)


MODES = {"fixed": {}, "randomized": {"bound": "randomized-clopper-pearson"},
         "adaptive": {"tolerance": 0.02},
         "adaptive randomized": {"tolerance": 0.02, "bound": "randomized-clopper-pearson"}}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(4))
def test_linear_toy_is_never_over_certified(seed, mode):
    model, x, (margin, true_radius) = linear_toy(sigma=0.5, seed=seed)
    certs = Smooth(model, batch_size=1000).certify(x, n0=100, n=4000, alpha=0.001, seed=seed,
                                                   **MODES[mode])
    useful = 0
    for c, m, r in zip(certs, margin, true_radius, strict=True):
        assert c.abstained or c.prediction == int(m > 0)
        assert c.radius <= r.item() * (1 + 1e-4), (c.radius, r.item())
        useful += c.radius > 0.5 * min(r.item(), 1.0 / c.lipschitz_global)
    assert useful >= 3  # and the certificate is not vacuous


@pytest.mark.parametrize("kwargs,match", [
    ({"n": 0}, "positive"), ({"n0": 0}, "positive"), ({"alpha": 1.5}, "alpha"),
    ({"alpha": math.nan}, "alpha"), ({"radius": -1.0}, "radius"), ({"radius": math.inf}, "radius"),
    ({"bound": "wald"}, "bound"), ({"tolerance": 1.5}, "tolerance"),
    ({"seed": -1}, "seeds"), ({"seed": [2**64]}, "seeds"),  # numpy's ValueError, torch's
])
def test_bad_parameters_are_input_errors(kwargs, match):
    smooth = Smooth(create_model("lenet", "mnist", "conv1", 0.5))
    with pytest.raises(InputError, match=match):
        smooth.certify(torch.rand(1, 1, 28, 28), **({"n": 10, "n0": 10} | kwargs))


def test_bad_images_and_devices_are_input_errors():
    model = create_model("lenet", "mnist", "conv1", 0.5)
    smooth = Smooth(model)
    with pytest.raises(InputError, match="shape"):
        smooth.certify(torch.rand(1, 3, 28, 28), n=10, n0=10)
    with pytest.raises(InputError, match="NaN"):
        smooth.certify(torch.full((1, 1, 28, 28), math.nan), n=10, n0=10)
    with pytest.raises(InputError, match="batch"):
        Smooth(model, batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            Smooth(model, device="cuda")


def test_adaptive_plan_looks_at_a_third_and_at_the_budget_in_whole_batches():
    plan = adaptive_plan(100_000, 0.001, 200)
    assert plan.looks == ((33_400, 0.0005), (100_000, 0.0005)) and plan.cs_alpha == 0.0
    assert adaptive_plan(1000, 0.001, 1000).looks == ((1000, 0.001),)  # one look: all of alpha
    with pytest.raises(InputError, match="tolerance"):
        adaptive_plan(1000, 0.001, 100, tolerance=0.0)


def confident_model() -> SplitModel:
    model = create_model("lenet", "mnist", "input", sigma=0.25)
    with torch.no_grad():
        model.f2[-1].bias[3] = 50.0  # class 3 almost everywhere
    return model


def test_query_stops_early_both_ways():
    smooth = Smooth(confident_model(), batch_size=500)
    x = torch.rand(1, 28, 28)
    easy = smooth.query(x, radius=0.1, n_max=100_000)[0]
    assert easy.certified and easy.prediction == 3 and easy.samples == 500 and easy.looks == 1
    assert easy.bound == "beta-binomial-cs" and easy.bound_level == 0.0005
    assert easy.p_a_lower == cs_lower(easy.n_a, easy.samples, 0.0005)
    noisy = Smooth(uniform_vote_model(), batch_size=100).query(
        torch.zeros(1, 1, 10), radius=0.0, n_max=64_000)[0]
    assert not noisy.certified and noisy.samples <= 300  # the upper end rules it out quickly


def test_query_at_its_budget_has_the_fixed_n_bound_say():
    """Undecided by the sequence at n_max, the query answers from Clopper-Pearson at alpha/2, so
    it agrees with fixed-n certify near the threshold (same votes: the same seed and batches)."""
    model, x, (_, true_radius) = linear_toy(sigma=0.5, seed=0)
    smooth = Smooth(model, batch_size=1000)
    fixed = smooth.certify(x[:1], n0=100, n=4000, seed=7)[0]
    # a radius just inside the fixed-n certificate: the sequence cannot tell within 4000 votes
    answer = smooth.query(x[:1], radius=0.98 * fixed.radius, n_max=4000, seed=7)[0]
    assert answer.samples == 4000 and answer.n_a == fixed.n_a
    assert answer.bound == "clopper-pearson" and answer.bound_level == 0.0005
    assert answer.p_a_lower == clopper_pearson_lower(fixed.n_a, 4000, 0.0005)
    assert answer.certified == (answer.p_a_lower > answer.p_needed)


@pytest.mark.parametrize("seed", range(2))
def test_query_agrees_with_the_exact_radius_of_the_linear_toy(seed):
    model, x, (_, true_radius) = linear_toy(sigma=0.5, seed=seed)
    smooth = Smooth(model, batch_size=2000)
    at_zero = smooth.query(x, radius=0.0, n_max=8000, seed=seed)
    for i, r in enumerate(true_radius.tolist()):
        outside = smooth.query(x[i:i + 1], radius=1.05 * r, n_max=8000, seed=seed)[0]
        assert not outside.certified  # never certified past the true radius
    assert sum(a.certified for a in at_zero) >= 6  # radius 0 = "does g predict?": mostly yes


def test_bfloat16_f2_certifies_the_classifier_as_computed():
    model = create_model("lenet", "mnist", "conv1", sigma=0.25)
    with torch.no_grad():
        model.f2[-1].bias[2] = 50.0
    x = torch.rand(2, 1, 28, 28)
    half = Smooth(model, batch_size=500, precision="bfloat16").certify(x, n0=50, n=1000)
    full = Smooth(model, batch_size=500).certify(x, n0=50, n=1000)
    assert [c.prediction for c in half] == [c.prediction for c in full] == [2, 2]
    assert {c.precision for c in half} == {"bfloat16"} and full[0].precision == "float32"
    assert model.f2[-1].weight.dtype == torch.float32  # the model itself is left as it was
    with pytest.raises(InputError, match="precision"):
        Smooth(model, precision="float8")


def test_seed_none_draws_a_secure_seed_and_says_so():
    smooth = Smooth(uniform_vote_model(), batch_size=100)
    x = torch.zeros(2, 1, 1, 10)
    drawn = smooth.certify(x, n0=10, n=200, seed=None)
    assert [c.seed_source for c in drawn] == ["random", "random"]
    assert drawn[1].seed == drawn[0].seed + 1 and drawn[0].seed != 0
    again = smooth.certify(x[:1], n0=10, n=200, seed=drawn[0].seed)[0]
    assert again.seed_source == "client" and again.n_a == drawn[0].n_a
    assert smooth.certify(x[:1], n0=10, n=200, seed=None)[0].seed != drawn[0].seed
    answer = smooth.query(x[:1], 0.0, n0=10, n_max=200, seed=None)[0]
    pred = smooth.predict(x[:1], n=100, seed=None)[0]
    assert (answer.seed_source, pred.seed_source) == ("random", "random")
    assert smooth.predict(x[:1], n=100, seed=4)[0].seed_source == "client"


def votes_for_e(margin: float, images: int) -> torch.Tensor:
    """Inputs of uniform_vote_model where class e leads every other pixel by `margin` sigma."""
    x = torch.zeros(images, 1, 1, 10)
    x[..., 4] = margin
    return x


def test_randomized_bound_uses_the_seeds_uniform_and_never_loses_to_clopper_pearson():
    smooth = Smooth(uniform_vote_model(), batch_size=500)
    x = votes_for_e(2.5, 4)  # pA around 0.9
    plain = smooth.certify(x, n0=50, n=2000, seed=5)
    rand = smooth.certify(x, n0=50, n=2000, seed=5, bound="randomized-clopper-pearson")
    for p, r in zip(plain, rand, strict=True):
        assert r.n_a == p.n_a and r.bound == "randomized-clopper-pearson"
        assert r.bound_u == auxiliary_uniform(r.seed, 0) and p.bound_u is None
        assert r.p_a_lower == randomized_clopper_pearson_lower(r.n_a, r.n, 0.001, r.bound_u)
        assert r.p_a_lower >= p.p_a_lower and r.radius >= p.radius
    assert any(r.radius > p.radius for p, r in zip(plain, rand, strict=True))


def test_adaptive_certify_stops_early_and_records_how():
    smooth = Smooth(uniform_vote_model(), batch_size=500)
    x = votes_for_e(3.0, 2)  # pA around 0.97
    certs = smooth.certify(x, n0=100, n=30_000, seed=1, tolerance=0.02)
    for c in certs:
        assert c.prediction == 4 and c.budget == 30_000 and c.n in (10_000, 30_000)
        assert c.stopping == "adaptive(tolerance=0.02,looks=10000,30000)"
        assert (c.bound, c.bound_level) == ("clopper-pearson", 0.0005)
        assert c.p_a_lower == clopper_pearson_lower(c.n_a, c.n, 0.0005)
    # tolerance 10 %: the first look is good enough
    loose = smooth.certify(x, n0=100, n=30_000, seed=1, tolerance=0.1)
    assert [c.n for c in loose] == [10_000, 10_000]
    assert [c.n for c in smooth.certify(x, n0=100, n=30_000, seed=1, tolerance=0.001)] == [
        30_000, 30_000]  # and 0.1 %: only the whole budget is
    noisy = Smooth(uniform_vote_model(), batch_size=100).certify(
        torch.zeros(2, 1, 1, 10), n0=100, n=30_000, tolerance=0.02)
    for c in noisy:  # no class can pass 1/2: abstain after a few batches, on the sequence
        assert c.abstained and c.n <= 500 and c.bound == "beta-binomial-cs"
        assert c.p_a_lower == cs_lower(c.n_a, c.n, 0.001) <= 0.5


@pytest.mark.parametrize("bound", ["clopper-pearson", "randomized-clopper-pearson"])
def test_adaptive_certificate_is_reproduced_by_its_seed(bound):
    model, x, _ = linear_toy(sigma=0.5, seed=1)
    smooth = Smooth(model, batch_size=1000)
    certs = smooth.certify(x, n0=100, n=9000, seed=3, tolerance=0.02, bound=bound)
    again = smooth.certify(x[[5, 2]], n0=100, n=9000, seed=[8, 5], tolerance=0.02, bound=bound)
    assert [(c.n, c.n_a, c.radius) for c in again] == [
        (c.n, c.n_a, c.radius) for c in (certs[5], certs[2])]
    for c in certs:
        # its votes are fixed-n certify's first n votes, and its bound recomputes from the record
        fixed = smooth.certify(x[c.seed - 3], n0=100, n=c.n, seed=c.seed)[0]
        assert fixed.n_a == c.n_a
        if c.bound != "beta-binomial-cs":
            assert c.p_a_lower == fixed_lower(c.bound, c.n_a, c.n, c.bound_level, c.bound_u)


def test_batchnorm_is_folded_into_the_convolutions_for_certification():
    model = create_model("resnet", "cifar10", "conv1", sigma=0.25)
    for m in model.modules():  # trained-looking statistics, so folding has work to do
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
    smooth = Smooth(model, batch_size=10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in smooth.f2.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.f2.modules())  # model left as it was
    z = torch.randn(4, 16, 32, 32)
    with torch.no_grad():
        assert torch.allclose(smooth.f2(z.contiguous(memory_format=torch.channels_last)),
                              model.eval().f2(z), rtol=1e-4, atol=1e-5)


def test_a_query_beyond_what_its_budget_can_certify_stops_at_once():
    """Every vote for class 3, yet at n_max = 100,000 Clopper-Pearson reaches at most
    0.001^(1 / 100,000): Phi^-1 = 3.81, radius 0.953 at sigma = 0.25. At radius 1.0 the query
    says "not certified" after its first batch (before: all 100,000 votes); just inside the
    reach it samples on and certifies."""
    smooth = Smooth(confident_model(), batch_size=500)
    x = torch.rand(1, 28, 28)
    far = smooth.query(x, radius=1.0, n_max=100_000)[0]
    assert not far.certified and far.samples == 500 and far.n_a == 500
    near = smooth.query(x, radius=0.8, n_max=100_000)[0]
    assert near.certified and near.samples > 500


def test_out_of_reach_agrees_with_fixed_n_clopper_pearson():
    """Where it stops a query, fixed-n Clopper-Pearson at the whole alpha cannot certify even
    with every vote left; for a p* just below what that reaches, it does not stop."""
    plan = query_plan(1000, 0.001, "clopper-pearson")
    for k, t in [(100, 100), (90, 100), (500, 600)]:
        reach = clopper_pearson_lower(k + 1000 - t, 1000, 0.001)
        assert out_of_reach(plan, k, t, 1000, reach)
        assert not out_of_reach(plan, k, t, 1000, reach - 1e-9)
    randomized = query_plan(1000, 0.001, "randomized-clopper-pearson")
    assert not out_of_reach(randomized, 100, 100, 1000, 0.999999)  # all votes: near 1 is reachable
