"""Training objectives of randomized smoothing, on the logits of m noisy copies of a batch.

The copies are stacked copy-major: rows [k B, (k + 1) B) of `logits` are copy k of the B images
(what `torch.cat([x + noise_k for k in range(m)])` gives), so `logits.chunk(m)` splits them.
Each function returns the batch mean, as the papers' code does. SmoothMix also needs its
adversary (`smoothmix_adversary`), which searches the input with the model.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

RECIPES = ("gaussian", "consistency", "smoothmix")


def gaussian_loss(logits: Tensor, y: Tensor, m: int) -> Tensor:
    """Gaussian augmentation (Cohen et al., 2019): cross-entropy on every noisy copy."""
    return F.cross_entropy(logits, y.repeat(m))


def consistency_loss(logits: Tensor, y: Tensor, m: int, lam: float, eta: float) -> Tensor:
    """Consistency regularization (Jeong & Shin, NeurIPS 2020), for m >= 2 copies:

        (1/m) sum_i CE(p_i, y) + lam (1/m) sum_i KL(p_bar || p_i) + eta H(p_bar),

    with p_i = softmax(logits of copy i) and p_bar their mean (the paper's "default" form).
    """
    if m < 2:
        raise ValueError("consistency regularization needs m >= 2 noisy copies")
    copies = logits.chunk(m)
    log_p = [F.log_softmax(c, dim=1) for c in copies]
    p_bar = torch.stack([lp.exp() for lp in log_p]).mean(0)
    log_p_bar = p_bar.clamp(min=1e-20).log()
    kl = torch.stack([(p_bar * (log_p_bar - lp)).sum(1) for lp in log_p]).mean(0)
    entropy = -(p_bar * log_p_bar).sum(1)
    return gaussian_loss(logits, y, m) + (lam * kl + eta * entropy).mean()


def smoothmix_adversary(logits_of: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, m: int,
                        steps: int, step_size: float, mix_step: int,
                        start_norm: float) -> tuple[Tensor, Tensor]:
    """SmoothMix's adversary (Jeong et al., NeurIPS 2021; jh-jeong/smoothmix): `steps` l2 steps
    of length step_size on the pixels (clipped to [0, 1]) up the cross-entropy of the smoothed
    soft classifier, -log((1/m) sum_i softmax(logits_of(x')_i))[y], with the m noise draws held
    fixed inside logits_of. Returns (start, adversary): start is the point after `mix_step`
    steps moved back to within start_norm of x (x itself when mix_step = 0), the adversary the
    point after all steps."""
    adv = start = x.detach()
    for step in range(steps):
        if step == mix_step:
            start = adv
        adv = adv.detach().requires_grad_()
        p_bar = torch.stack([F.softmax(c, 1) for c in logits_of(adv).chunk(m)]).mean(0)
        loss = F.nll_loss(p_bar.clamp(min=1e-20).log(), y, reduction="sum")
        grad, = torch.autograd.grad(loss, [adv])
        norm = grad.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        adv = (adv + step_size * grad / (norm + 1e-8)).clamp(0, 1).detach()
    moved = (start - x).renorm(p=2, dim=0, maxnorm=start_norm) if start_norm > 0 else 0
    return (x + moved).clamp(0, 1).detach(), adv


def smoothmix_loss(clean: Tensor, mixed: Tensor, y: Tensor, m: int, mix: Tensor,
                   eta: float) -> Tensor:
    """SmoothMix's objective on the logits of m noisy copies of the start points (`clean`) and of
    their mixes x_mix = (1 - mix) start + mix adversary (`mixed`, the same noise draws):

        (1/m) sum_i CE(p_i, y) + eta (1/m) sum_i 1[argmax p_bar = y] KL(q || softmax(mixed_i)),

    with p_bar the mean softmax of the clean copies and q = (1 - mix) p_bar + mix / C, C the
    classes (the mixed point's target slides towards uniform). As in the authors' code, the
    gradient also flows through q; mix is drawn per image, uniform on [0, 1/2]."""
    p_bar = torch.stack([F.softmax(c, 1) for c in clean.chunk(m)]).mean(0)
    target = (1 - mix).view(-1, 1) * p_bar + mix.view(-1, 1) / p_bar.size(1)
    kl = F.kl_div(F.log_softmax(mixed, 1), target.repeat(m, 1), reduction="none").sum(1)
    correct = (p_bar.argmax(1) == y).float().repeat(m)
    return gaussian_loss(clean, y, m) + eta * (correct * kl).mean()
