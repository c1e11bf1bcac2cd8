"""Training objectives of randomized smoothing, on the logits of m noisy copies of a batch.

The copies are stacked copy-major: rows [k B, (k + 1) B) of `logits` are copy k of the B images
(what `torch.cat([x + noise_k for k in range(m)])` gives), so `logits.chunk(m)` splits them.
Each function returns the batch mean, as the papers' code does.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

RECIPES = ("gaussian", "consistency")


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
