"""Try to break certificates with a PGD attack on the smoothed classifier itself (SmoothAdv:
maximize the loss of the noise-averaged softmax), then re-predict with many fresh samples."""

import pytest
import torch
import torch.nn.functional as F

from splitz import checkpoint
from splitz.images import load_image
from splitz.smoothing import Smooth

from ..conftest import ROOT, SHIPPED_MNIST

pytestmark = pytest.mark.slow


def smooth_pgd(model, x: torch.Tensor, label: int, eps: float, steps: int = 20,
               samples: int = 64) -> torch.Tensor:
    """l2 PGD against E_delta[softmax(f2(f1(x) + delta))], staying in the eps ball and [0, 1]."""
    x0 = x.unsqueeze(0)
    adv = x0.clone()
    step = 2.5 * eps / steps
    for _ in range(steps):
        adv.requires_grad_(True)
        probs = F.softmax(model(adv.expand(samples, *x.shape), noise=True), dim=1).mean(0)
        loss = -torch.log(probs[label] + 1e-12)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + step * grad / grad.norm().clamp(min=1e-12)
            delta = adv - x0
            delta = delta * torch.clamp(eps / delta.norm().clamp(min=1e-12), max=1.0)
            adv = (x0 + delta).clamp(0, 1)  # clamping moves toward x0 coordinatewise: stays inside
    return adv[0].detach()


def test_pgd_cannot_flip_the_smoothed_prediction_inside_the_certified_radius():
    loaded = checkpoint.load(SHIPPED_MNIST)
    model = loaded.model.eval()
    smooth = Smooth.from_checkpoint(loaded, batch_size=1000)
    paths = sorted((ROOT / "examples").glob("mnist-*.png"))[:6]
    x = torch.stack([load_image(p, model.input_shape) for p in paths])
    certs = smooth.certify(x, n0=100, n=4000, alpha=0.001, seed=0)
    attacked = flipped_outside = 0
    for xi, c in zip(x, certs, strict=True):
        if c.abstained or c.radius == 0:
            continue
        attacked += 1
        adv = smooth_pgd(model, xi, c.prediction, c.radius)
        assert (adv - xi).norm() <= c.radius * (1 + 1e-5)
        inside = smooth.predict(adv, n=4000, alpha=0.001, seed=1)[0]
        assert inside.prediction in (c.prediction, None), (c, inside)
        far = smooth.predict(smooth_pgd(model, xi, c.prediction, 4 * c.radius + 1.0), n=4000,
                             alpha=0.001, seed=2)[0]
        flipped_outside += far.prediction != c.prediction
    assert attacked >= 3
    assert flipped_outside >= 1  # the same attack does work outside the certificate
