"""Try to break the Lipschitz bounds: exact dense comparisons, random pairs, and PGD pairs."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitz import checkpoint
from splitz.lipschitz import F1Bound, conv_bound, input_radius, layer_profile, module_bound
from splitz.nets import BasicBlock, ClipReLU, Normalize, create_model

from ..conftest import SHIPPED_MNIST, dense_a


def with_thresholds(model, scale: float | None):
    """Random clipped-ReLU thresholds in [0, scale]: many units saturate, masks get interesting.
    scale None keeps the model's own (trained) thresholds."""
    model = copy.deepcopy(model)
    if scale is None:
        return model
    with torch.no_grad():
        model.f1[2].threshold.uniform_(0, scale)
    return model


def models_under_test():
    cases = []
    for name, make in (
        ("lenet", lambda: create_model("lenet", "mnist", "conv1", 0.5)),
        ("resnet8", lambda: create_model("resnet", "cifar10", "conv1", 0.5, depth=8)),
    ):
        for scale in (0.3, 3.0):
            cases.append(pytest.param(make, scale, id=f"{name}-random-t{scale}"))
    if SHIPPED_MNIST.exists():
        cases.append(pytest.param(lambda: checkpoint.load(SHIPPED_MNIST).model, None,
                                  id="mnist-trained"))
    return cases


def test_global_bound_equals_dense_spectral_norm_mnist(lenet):
    b = F1Bound(lenet.f1, lenet.input_shape)
    exact = torch.linalg.matrix_norm(dense_a(b), ord=2).item()
    assert exact <= b.global_bound <= exact * (1 + 1e-5)


@pytest.mark.slow
def test_global_bound_equals_dense_spectral_norm_cifar(resnet8):
    b = F1Bound(resnet8.f1, resnet8.input_shape)
    a = dense_a(b)
    exact = math.sqrt(torch.linalg.eigvalsh(a.T @ a)[-1].item())
    assert exact <= b.global_bound <= exact * (1 + 1e-5)


def test_local_bound_equals_dense_masked_norm(lenet):
    model = with_thresholds(lenet, 0.5)
    b = F1Bound(model.f1, model.input_shape)
    a = dense_a(b)
    x = torch.rand(3, 1, 28, 28)
    for gamma in (0.0, 0.2, 1.0):
        local = b.local(x, gamma)
        masks = b.can_change(b.preactivation(x), torch.full((3,), gamma))
        for i in range(3):
            exact = torch.linalg.matrix_norm(a[masks[i].flatten()], ord=2).item()
            assert exact <= local[i] <= exact * (1 + 1e-5)


def small_strided_f1() -> tuple[nn.Sequential, tuple[int, int, int]]:
    """A padded, strided conv on a non-square 3-channel image: every layout corner case."""
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    f1 = nn.Sequential(Normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.25)), conv, ClipReLU((4, 5, 5), 0.5))
    return f1.eval(), (3, 10, 9)


def f1_cases():
    return [pytest.param(lambda: (lambda m: (m.f1, m.input_shape))(
                with_thresholds(create_model("lenet", "mnist", "conv1", 0.5), 0.3).eval()),
                id="lenet"),
            pytest.param(small_strided_f1, id="strided-padded")]


@pytest.mark.parametrize("make", f1_cases())
def test_banded_gram_is_the_dense_masked_gram(make):
    f1, shape = make()
    b = F1Bound(f1, shape)
    a = dense_a(b)
    order = torch.arange(b.dim).view(shape).permute(1, 2, 0).flatten()  # (row, col, channel)
    x = torch.rand(3, *shape)
    masks = b.can_change(b.preactivation(x), torch.tensor([0.0, 0.2, 5.0], dtype=torch.float64))
    for mask, band in zip(masks, b._bands(masks), strict=True):
        am = a[mask.flatten()][:, order]
        dense = am.T @ am
        assert (torch.tril(dense, -(b.bandwidth + 1)) == 0).all()  # G really is banded
        for k in range(b.bandwidth + 1):
            got = torch.from_numpy(band[k, :b.dim - k])
            assert torch.allclose(got, dense.diagonal(-k), rtol=0, atol=1e-12), k


@pytest.mark.parametrize("make", f1_cases())
def test_cholesky_test_never_proves_less_than_the_exact_norm(make):
    f1, shape = make()
    b = F1Bound(f1, shape)
    a = dense_a(b)
    gen = torch.Generator().manual_seed(3)
    units = a.shape[0]
    masks = torch.stack([torch.rand(units, generator=gen) < p for p in (0.02, 0.2, 0.6, 1.0)])
    masks = masks.view(-1, *b.threshold.shape)
    exact = torch.tensor([torch.linalg.matrix_norm(a[m.flatten()], ord=2).item() for m in masks],
                         dtype=torch.float64)
    assert not b.proves(masks, exact * (1 - 1e-9)).any()  # below the true norm: never proven
    assert b.proves(masks, exact * (1 + 3e-6)).all()  # just above it: proven
    norms = b.mask_norm(masks)
    assert (exact <= norms).all() and (norms <= exact * (1 + 3e-6)).all()
    none = torch.zeros(1, *b.threshold.shape, dtype=torch.bool)
    assert b.mask_norm(none).item() == 0.0


def test_normalization_factor_is_counted(lenet):
    b = F1Bound(lenet.f1, lenet.input_shape)
    base = b.global_bound
    halved = copy.deepcopy(lenet)
    halved.f1[0].std /= 2  # dividing by a smaller std doubles A = W S^-1
    assert F1Bound(halved.f1, halved.input_shape).global_bound == pytest.approx(2 * base, rel=1e-9)
    # The bound is ||W S^-1||: the raw convolution's operator norm over std. (Comparing with
    # ||W|| as a kernel matrix, as before, held even without 1/std: that matrix is a block of
    # the convolution's, so its norm is below the convolution's anyway.)
    eye = torch.eye(b.dim, dtype=torch.float64).view(b.dim, *b.input_shape)
    conv = F.conv2d(eye, lenet.f1[1].weight.double(), None, **b.conv_args).flatten(1)
    w_only = torch.linalg.matrix_norm(conv, ord=2).item()
    std = lenet.f1[0].std.item()
    assert w_only / std <= base <= w_only / std * (1 + 1e-5)
    assert base > 3 * w_only  # 1/std = 3.2 on MNIST: forgetting it would inflate radii 3.2-fold


def test_bound_grows_with_gamma_and_stays_below_global(lenet):
    model = with_thresholds(lenet, 0.5)
    b = F1Bound(model.f1, model.input_shape)
    x = torch.rand(2, 1, 28, 28)
    values = torch.stack([b.local(x, g) for g in (0.0, 0.05, 0.2, 1.0, 10.0)])
    assert (values.diff(dim=0) >= 0).all()
    assert (values <= b.global_bound).all()
    assert values[0].max() < values[-1].min()  # saturation really shrinks the bound


def _ratio(f1, x1, x2):
    num = (f1(x1) - f1(x2)).flatten(1).norm(dim=1)
    return num / (x1 - x2).flatten(1).norm(dim=1)


def _project(x, center, gamma):
    d = x - center
    norm = d.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
    return center + d * torch.clamp(gamma / norm, max=1.0)


@pytest.mark.parametrize("make,scale", models_under_test())
def test_bound_survives_random_and_pgd_pairs(make, scale):
    model = make().eval()
    if scale is not None:
        model = with_thresholds(model, scale)
    b = F1Bound(model.f1, model.input_shape)
    f1 = copy.deepcopy(model.f1).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, *model.input_shape, generator=gen, dtype=torch.float64)
    worst = 0.0
    for gamma in (0.05, 0.5, 2.0):
        bound = b.local(x, gamma)
        # random pairs inside the ball
        for _ in range(5):
            d1 = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            d2 = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            x1 = _project(x + d1, x, gamma * torch.rand(4, 1, 1, 1, generator=gen))
            x2 = _project(x + 0.05 * d2, x, gamma)
            r = _ratio(f1, x1, x2).detach()
            assert (r <= bound).all(), (r, bound)
            worst = max(worst, (r / bound).max().item())
        # PGD: maximize the ratio over pairs in the ball
        x1 = _project(x + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64), x,
                      gamma).requires_grad_()
        x2 = (x1.detach() + 1e-3 * torch.randn(x.shape, generator=gen,
                                                dtype=torch.float64)).requires_grad_()
        opt = torch.optim.Adam([x1, x2], lr=gamma / 20)
        for _ in range(60):
            r = _ratio(f1, x1, x2)
            assert (r.detach() <= bound).all(), (r, bound)
            worst = max(worst, (r.detach() / bound).max().item())
            opt.zero_grad()
            (-r.sum()).backward()
            opt.step()
            with torch.no_grad():
                x1.copy_(_project(x1, x, gamma))
                x2.copy_(_project(x2, x, gamma))
    assert worst > 0.2  # the attack gets near the bound: it is tight enough to matter


@pytest.mark.parametrize("make,scale", models_under_test()[:2])
def test_input_radius_is_a_theorem1_certificate_and_near_optimal(make, scale):
    model = with_thresholds(make().eval(), scale)
    b = F1Bound(model.f1, model.input_shape)
    x = torch.rand(3, *model.input_shape)
    r_z = torch.tensor([0.05, 0.5, 2.0], dtype=torch.float64)
    res = input_radius(b, x, r_z)
    # valid: at the reported gamma, the sound bound proves the reported radius
    check = b.local(x, res.gamma)
    assert (res.radius <= res.gamma + 1e-15).all()
    assert (res.radius <= r_z / check * (1 + 1e-12)).all()
    assert (res.lipschitz >= check * (1 - 1e-7)).all()  # local() is proven to within 1e-8
    # near optimal: no gamma on a grid certifies more than (1 + tol) times our answer
    for g in torch.linspace(0, 3 * res.gamma.max().item(), 40):
        grid = torch.minimum(r_z / b.local(x, g.item()), g)
        assert (grid <= res.radius * (1 + 2e-3)).all()
    assert (res.radius >= r_z / b.global_bound).all()  # never worse than the global bound


def test_identity_split_has_lipschitz_one():
    model = create_model("lenet", "mnist", "input", 0.5)
    b = F1Bound(model.f1, model.input_shape)
    x = torch.rand(2, 1, 28, 28)
    assert b.global_bound == 1.0 and (b.local(x, 1.0) == 1.0).all()
    r = input_radius(b, x, torch.tensor([0.7, 0.0], dtype=torch.float64))
    assert r.radius.tolist() == [0.7, 0.0]


def test_unsupported_f1_is_refused():
    with pytest.raises(ValueError, match="f1 must be"):
        F1Bound(nn.Sequential(nn.Linear(3, 3)), (1, 1, 3))


@pytest.mark.parametrize("stride,padding,size", [(1, 1, 8), (2, 1, 8), (1, 0, 7), (1, 2, 6)])
def test_conv_bound_is_an_upper_bound_and_tight(stride, padding, size):
    conv = nn.Conv2d(3, 5, 3 if padding < 2 else 5, stride=stride, padding=padding)
    d = 3 * size * size
    eye = torch.eye(d, dtype=torch.float64).view(d, 3, size, size)
    dense = F.conv2d(eye, conv.weight.double(), None, stride, padding).flatten(1).T
    exact = torch.linalg.matrix_norm(dense, ord=2).item()
    bound = conv_bound(conv, (3, size, size))
    assert exact <= bound * (1 + 1e-9)
    assert bound <= 2.0 * exact


def test_block_and_profile_bounds_hold_on_random_pairs():
    block = BasicBlock(4, 8, 2).eval()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-2, 2)
    bound, out = module_bound(block, (4, 8, 8))
    assert out == (8, 4, 4)
    x1, x2 = torch.randn(64, 4, 8, 8), torch.randn(64, 4, 8, 8)
    assert (_ratio(block, x1, x2 * 0.01 + x1) <= bound).all()
    rows = layer_profile(create_model("resnet", "cifar10", "conv1", 0.5, depth=8).eval())
    assert rows[0].bound == pytest.approx(1 / 0.2435 * (1 + 1e-6))  # 1/min(std)
    assert [r.in_f1 for r in rows[:4]] == [True, True, True, False]
    assert rows[-1].cumulative == pytest.approx(math.prod(r.bound for r in rows), rel=1e-9)


@pytest.mark.parametrize("make,scale", models_under_test()[::2])
def test_exact_f1_is_the_model_in_float64(make, scale):
    """The bound's f1 (used for masks and as the deployed f1) is the model's f1, borders included:
    zero padding happens in normalized space, not pixel space."""
    model = with_thresholds(make().eval(), scale)
    b = F1Bound(model.f1, model.input_shape)
    x = torch.rand(3, *model.input_shape, dtype=torch.float64)
    assert (b.exact(x) - copy.deepcopy(model.f1).double()(x)).abs().max() <= 1e-12


@pytest.mark.parametrize("make,scale", models_under_test()[::2])
def test_float_slack_covers_rounding_to_float32_on_the_ball(make, scale):
    model = with_thresholds(make().eval(), scale)
    b = F1Bound(model.f1, model.input_shape)
    x = torch.rand(2, *model.input_shape)
    gamma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    slack = b.float_slack(x, gamma)
    for _ in range(5):
        d = torch.randn(x.shape, dtype=torch.float64)
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * gamma.view(-1, 1, 1, 1)
        for point in (x.double(), x.double() + d):
            z = b.exact(point)
            err = (z.float().double() - z).flatten(1).norm(dim=1)
            assert (err <= slack / 2).all()
    assert (slack < 1e-3).all()  # and it costs almost nothing


def test_query_and_certify_paths_report_the_proven_float64_bound():
    """Where every unit of f1 can change, L_gamma is the global bound: the query path (local)
    must report the same float64 number as certify, never a float32 rounding below it."""
    from splitz.images import load_image
    from splitz.smoothing import Smooth

    smooth = Smooth.from_checkpoint(checkpoint.load(SHIPPED_MNIST))
    x = load_image(SHIPPED_MNIST.parents[1] / "examples" / "mnist-7-0000.png", (1, 28, 28))
    local = smooth.bound.local(x[None], 100.0)
    assert local.dtype == torch.float64 and local.item() == smooth.bound.global_bound
    answer = smooth.query(x, radius=100.0, n0=10, n_max=100, seed=0)[0]
    cert = smooth.certify(x, n0=10, n=100, seed=0)[0]
    # cert.lipschitz_global is global_bound by construction; what certify proves and reports is
    # cert.lipschitz, L_gamma at its gamma, where every unit can change as well
    assert smooth.bound.local(x[None], cert.gamma).item() == smooth.bound.global_bound
    assert answer.lipschitz == cert.lipschitz == smooth.bound.global_bound
    rounded = torch.tensor(smooth.bound.global_bound, dtype=torch.float32).item()
    assert rounded < smooth.bound.global_bound  # what either path would report if it rounded
