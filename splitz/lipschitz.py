"""Sound upper bounds on Lipschitz constants (DESIGN.md §1), all in float64.

f1 = clip(A x + c, 0, t), with A = W S^-1 the first conv composed with the input normalization
(S = diag(std), so the factor 1/std of every input channel is counted) and t the clipped-ReLU
thresholds. On the l2 ball B(x, gamma) every pre-activation u_i moves by at most ||a_i|| gamma;
units that stay dead (u_i + ||a_i|| gamma <= 0) or saturated (u_i - ||a_i|| gamma >= t_i) are
constant on the ball and the others have slope in [0, 1], so along any segment inside the (convex)
ball ||f1(x') - f1(x)|| <= ||M A||_2 ||x' - x||, with M the 0/1 mask of units that can change.

||M A||_2^2 is the largest eigenvalue of G = A^T M A. We form G from the conv's patches with the
pixels in (row, column, channel) order, where it is a band matrix (bandwidth about
(kernel_h - 1) * width * channels), and prove ||M A||_2 <= tau with a banded Cholesky
factorization of s I - G, s = tau^2 shrunk by safety margins: if it runs to completion, s I - G
is positive semi-definite up to Higham's backward error (Accuracy and Stability of Numerical
Algorithms, 2nd ed., Thm 10.3: the computed factor satisfies R^T R = H + dH with
|dH| <= gamma_{d+1} |R^T| |R|, for any order of the inner products, so also for blocked LAPACK),
hence lambda_max(G) <= s (1 + cholesky_margin(d)). REL_MARGIN covers the rounding in forming G.
Norms are the smallest tau proven by bisection; Theorem 1's gamma search tests its candidates
directly. Never a truncated power iteration: that can only under-estimate a spectral norm.

Floating point (Voracek & Hein, 2023): the deployed f1 is `exact(x)` -- f1 evaluated in float64
-- rounded to float32 for f2. `float_slack` bounds how far that is from the real-valued f1, at x
and anywhere on the ball, and `input_radius` takes it off R_z before dividing by L.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import LinAlgError, cholesky_banded
from threadpoolctl import ThreadpoolController
from torch import Tensor, nn

from .nets import BasicBlock, ClipReLU, Normalize

REL_MARGIN = 1e-6  # relative safety margin on every computed norm
U32, U64 = 2.0**-24, 2.0**-53  # unit roundoff of float32 / float64
MASK_TOL = 1e-6  # a unit within this (relative) distance of a kink counts as one that can change
GAMMA_REL_TOL = 1e-4  # the gamma bisection stops when its bracket is this narrow (relative)
NORM_REL_TOL = 1e-8  # norms are proven to within this factor of the computed Gram's
GRAM_BYTES = 256 * 2**20  # memory budget for a batch of banded Gram matrices
_BLAS = ThreadpoolController()  # scanning the loaded libraries is slow: once per process


class F1Bound:
    """Global and local Lipschitz upper bounds for f1 = [] or [Normalize, Conv2d, ClipReLU/ReLU]."""

    def __init__(self, f1: nn.Sequential, input_shape: tuple[int, int, int]):
        self.input_shape = input_shape
        self.dim = math.prod(input_shape)
        layers = list(f1)
        self.identity = not layers
        if self.identity:
            self.global_bound = 1.0
            return
        norm, conv, act = _affine_clip_layers(layers)
        self.std = norm.std.detach().double().cpu()
        self.mean = norm.mean.detach().double().cpu()
        self.conv_weight = conv.weight.detach().double().cpu()
        self.conv_bias = (conv.bias.detach().double().cpu() if conv.bias is not None
                          else torch.zeros(conv.out_channels, dtype=torch.float64))
        self.weight = self.conv_weight / self.std.view(1, -1, 1, 1)  # A = W S^-1
        self.conv_args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        self.kernel = self.weight.flatten(1)  # (c_out, c_in*kh*kw), ordered like F.unfold
        # Interior rows of A have exactly this norm; border rows lose padded taps, so it is >=.
        self.row_norm = self.kernel.norm(dim=1)
        # Row l of G's contributions: sum_o m[o, l] K[o, p] K[o, q], one matmul with this.
        self.tap_products = torch.einsum("op,oq->opq", self.kernel, self.kernel).flatten(1)
        out_shape = self.preactivation(torch.zeros(1, *input_shape)).shape[1:]
        self.threshold = (act.upper().detach().double().cpu() if isinstance(act, ClipReLU)
                          else torch.full(out_shape, math.inf, dtype=torch.float64))
        self._band_index, self.bandwidth = self._band_layout(conv.kernel_size)
        self.cholesky_margin = cholesky_margin(self.dim)
        ones = torch.ones(1, *out_shape, dtype=torch.bool)
        self.global_bound = float(self.mask_norm(ones)[0])

    def preactivation(self, x: Tensor) -> Tensor:
        """u = W pad((x - m) / s) + b in float64, exactly as the model computes it (the padding
        is zero in normalized space); its linear part is A."""
        normed = (x.detach().double().cpu() - self.mean) / self.std
        return F.conv2d(normed, self.conv_weight, self.conv_bias, **self.conv_args)

    def exact(self, x: Tensor) -> Tensor:
        """f1(x) in float64: the deployed f1 is this, rounded to float32."""
        if self.identity:
            return x.detach().double().cpu()
        return torch.minimum(self.preactivation(x).clamp(min=0.0), self.threshold)

    def float_slack(self, x: Tensor, gamma: Tensor) -> Tensor:
        """Upper bound on |round32(exact(x)) - f1(x)| + |round32(exact(x')) - f1(x')| for every x'
        on B(x, gamma), per image (0 for the identity split: the float32 input is f1's output).

        Rounding to float32 moves each unit by at most U32 |value|, so the l2 norm by at most
        U32 ||f1(x')|| <= U32 (||f1(x)|| + L gamma). The float64 evaluation adds, per unit, at
        most gamma_k (sum_j |W_ij| N + |b_i|) with N >= |(x'_j - m) / s| and k = P + 3 (Higham's
        bound for a length-P dot product plus the bias, the subtraction and the division)."""
        if self.identity:
            return torch.zeros(x.shape[0], dtype=torch.float64)
        gamma = gamma.double().view(-1)
        z_norm = self.exact(x).flatten(1).norm(dim=1)
        reach = z_norm + self.global_bound * gamma
        k = self.kernel.shape[1] + 3
        gamma_k = k * U64 / (1 - k * U64)
        x_max = x.detach().double().abs().flatten(1).amax(dim=1) + gamma
        normed_max = (x_max + self.mean.abs().max()) / self.std.min()
        per_channel = gamma_k * (self.conv_weight.abs().flatten(1).sum(1)[None]
                                 * normed_max[:, None] + self.conv_bias.abs()[None])
        positions = self.threshold[0].numel()
        f64_error = (positions * per_channel.square().sum(1)).sqrt()
        return 2 * ((U32 * (1 + U32)) * reach + f64_error)

    def can_change(self, u: Tensor, gamma: Tensor) -> Tensor:
        """Mask of units whose output can move on B(x, gamma); gamma has one entry per image."""
        reach = self.row_norm.view(1, -1, 1, 1) * gamma.view(-1, 1, 1, 1)
        tol = MASK_TOL * (1.0 + u.abs())
        return (u + reach > -tol) & (u - reach < self.threshold + tol)

    def local(self, x: Tensor, gamma: Tensor | float) -> Tensor:
        """L_gamma(x) >= Lipschitz constant of f1 on B(x, gamma), for a batch x (float64, (B,))."""
        gamma = torch.as_tensor(gamma, dtype=torch.float64).expand(x.shape[0])
        if self.identity:
            return torch.ones(x.shape[0], dtype=torch.float64)
        mask = self.can_change(self.preactivation(x), gamma)
        # clamp keeps the proven float64 bound: torch.tensor(float) would round it to float32
        return self.mask_norm(mask).clamp(max=self.global_bound)

    def proves(self, mask: Tensor, limit: Tensor) -> Tensor:
        """Per mask: True where ||M A||_2 <= limit is proven (False: not proven)."""
        bands = self._bands(mask)
        proven = [self._proves(band, float(t)) for band, t in zip(bands, limit, strict=True)]
        return torch.tensor(proven, dtype=torch.bool)

    def mask_norm(self, mask: Tensor) -> Tensor:
        """||M A||_2 for each mask in the batch: the smallest bound proven by bisection."""
        return torch.tensor([self._band_norm(band) for band in self._bands(mask)],
                            dtype=torch.float64)

    def _band_layout(self, kernel_size: tuple[int, int]) -> tuple[Tensor, int]:
        """Where each (patch, tap, tap) product lands in the lower band storage of G (LAPACK's
        layout, flattened: entry (i, j), i >= j, at (i - j) * d + j; a last slot takes the
        unused products), with pixels in (row, column, channel) order; and the bandwidth."""
        c, h, w = self.input_shape
        d = self.dim
        ids = torch.arange(1, d + 1, dtype=torch.float64).view(1, c, h, w)
        patches = F.unfold(ids, kernel_size, **self.conv_args)[0].T.round().long() - 1  # -1: pad
        new_index = torch.arange(d).view(c, h, w).permute(1, 2, 0).flatten().argsort()
        idx = torch.where(patches >= 0, new_index[patches.clamp(min=0)], -1)
        i, j = idx[:, :, None], idx[:, None, :]
        keep = (i >= j) & (j >= 0)
        bandwidth = int((i - j)[keep].max())
        flat = torch.where(keep, (i - j) * d + j, (bandwidth + 1) * d)
        return flat.flatten(), bandwidth

    def _bands(self, mask: Tensor):
        """G = A^T M A for each mask in the batch, as (bandwidth + 1, d) lower band arrays."""
        d, rows = self.dim, self.bandwidth + 1
        m = mask.flatten(2).double()  # (B, c_out, L)
        for mc in m.split(max(1, GRAM_BYTES // (8 * rows * d))):
            # Per output location l: Q_l = K^T diag(m_l) K, the Gram of that patch's active rows.
            q = mc.transpose(1, 2) @ self.tap_products  # (B, L, P * P)
            g = torch.zeros(mc.shape[0], rows * d + 1, dtype=torch.float64)
            g.index_add_(1, self._band_index, q.reshape(mc.shape[0], -1))
            yield from g[:, :-1].view(-1, rows, d).numpy()

    def _proves(self, band: np.ndarray, limit: float) -> bool:
        """True if ||M A||_2 <= limit is proven for the Gram G in `band` (module docstring):
        lambda_max(G) <= limit^2 / (1 + REL_MARGIN) by a Cholesky factorization of s I - G."""
        s = limit * limit / ((1.0 + REL_MARGIN) * (1.0 + self.cholesky_margin))
        if not s > 0 or band[0].max() > s:  # a diagonal entry of G is a lower bound on lambda_max
            return False
        shifted = -band
        shifted[0] += s
        try:
            with _BLAS.limit(limits=1, user_api="blas"):  # small factorizations: threads only cost
                cholesky_banded(shifted, lower=True, overwrite_ab=True, check_finite=False)
        except LinAlgError:
            return False
        return True

    def _band_norm(self, band: np.ndarray) -> float:
        top = float(band[0].max())
        if not math.isfinite(top) or top < 0:
            raise ValueError("the Gram matrix of f1 is not finite")
        if top == 0:  # a PSD matrix with a zero diagonal is zero, and so is ||M A||_2
            return 0.0
        # sqrt(max diagonal) <= ||M A||_2 <= Frobenius norm = sqrt(trace)
        lo, hi = math.sqrt(top), math.sqrt(float(band[0].sum())) * (1 + 2 * REL_MARGIN)
        for _ in range(64):  # the Frobenius norm is proven at once unless rounding is extreme
            if self._proves(band, hi):
                break
            lo, hi = hi, 2 * hi
        else:
            raise ValueError("no bound on ||M A||_2 could be proven")
        while hi > lo * (1 + NORM_REL_TOL):
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if self._proves(band, mid) else (mid, hi)
        return hi


def cholesky_margin(d: int) -> float:
    """Relative slack of the Cholesky test on a d x d matrix (module docstring): the completed
    factorization of H = fl(s I - G) gives lambda_min(H) >= -gamma ||R||_F^2 >=
    -gamma/(1-gamma) trace(H) with gamma = gamma_{d+1} and trace(H) <= d s (1 + u); rounding
    H's diagonal costs u s more, and computing s itself a few units of roundoff."""
    gamma = (d + 1) * U64 / (1 - (d + 1) * U64)
    return d * (1 + U64) * gamma / (1 - gamma) + 16 * U64


def _affine_clip_layers(layers: list[nn.Module]) -> tuple[Normalize, nn.Conv2d, nn.Module]:
    kinds = (Normalize, nn.Conv2d, (ClipReLU, nn.ReLU))
    if len(layers) != 3 or not all(isinstance(m, k) for m, k in zip(layers, kinds, strict=True)):
        raise ValueError("f1 must be empty or [Normalize, Conv2d, ClipReLU|ReLU]; "
                         f"got {[type(m).__name__ for m in layers]}")
    conv = layers[1]
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("f1's conv must have groups=1 and explicit zero padding")
    return layers[0], conv, layers[2]


@dataclass(frozen=True)
class InputRadius:
    """radius = min((r_z - float_slack) / lipschitz, gamma): Theorem 1 at the chosen gamma."""

    radius: Tensor
    gamma: Tensor
    lipschitz: Tensor
    float_slack: Tensor


def input_radius(bound: F1Bound, x: Tensor, r_z: Tensor, rel_tol: float = GAMMA_REL_TOL,
                 max_steps: int = 60) -> InputRadius:
    """R(x) = max_gamma min(r_z / L_gamma(x), gamma), searched by bisection (SPLITZ, Theorem 1).

    Every gamma gives a valid certificate, so the search spends no confidence budget. gamma is
    feasible when gamma L_gamma <= r_z, proven by `bound.proves` at the limit r_z / gamma; then
    gamma itself is certified. gamma L_gamma grows with gamma, and past the largest feasible
    gamma the certificate r_z / L_gamma is below it, so that gamma is the optimum. lo starts at
    r_z / L_global (feasible) and hi doubles until infeasible; r_z is then reduced by the float
    slack of f1 on B(x, hi), the largest ball the search can reach, and the bracket is bisected
    to a relative width rel_tol. The reported L_gamma is the tighter of the limit proven at gamma
    and `bound.local` there. Radii are capped at the diameter of [0, 1]^d.
    """
    r_z, cap = r_z.double(), math.sqrt(bound.dim)
    if bound.identity:
        lo = r_z.clamp(max=cap)
        return InputRadius(lo, lo.clone(), torch.ones_like(r_z), torch.zeros_like(r_z))
    u = bound.preactivation(x)
    glob = torch.full_like(r_z, bound.global_bound)
    hi = _safe_div(r_z, glob).clamp(max=cap)
    grow = (r_z > 0) & (hi < cap)
    for _ in range(max_steps):
        if not grow.any():
            break
        hi = torch.where(grow, (2 * hi).clamp(max=cap), hi)
        grow &= _feasible(bound, u, hi, r_z, grow) & (hi < cap)
    slack = bound.float_slack(x, hi)
    r_z = (r_z - slack).clamp(min=0.0)
    lo = torch.minimum(_safe_div(r_z, glob), hi)
    lip = glob.clone()
    for _ in range(max_steps):
        active = (hi - lo > rel_tol * lo) & (r_z > 0)
        if not active.any():
            break
        mid = torch.where(active, (lo + hi) / 2, lo)
        ok = _feasible(bound, u, mid, r_z, active)
        lo, lip = torch.where(ok, mid, lo), torch.where(ok, r_z / mid, lip)
        hi = torch.where(active & ~ok, mid, hi)
    tight = bound.mask_norm(bound.can_change(u, lo))
    return InputRadius(lo, lo.clone(), torch.minimum(tight, lip), slack)


def _feasible(bound: F1Bound, u: Tensor, gamma: Tensor, r_z: Tensor, which: Tensor) -> Tensor:
    """gamma L_gamma <= r_z proven (u: the images' preactivations), evaluated only for the
    images in `which` (else False)."""
    out = torch.zeros_like(which)
    idx = which.nonzero()[:, 0]
    mask = bound.can_change(u[idx], gamma[idx])
    out[idx] = bound.proves(mask, r_z[idx] / gamma[idx])
    return out


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(num, math.inf))


# -- per-layer profile of a whole network (informational: why SPLITZ splits early) ---------------

@dataclass(frozen=True)
class LayerBound:
    name: str
    bound: float  # upper bound on this layer's l2 Lipschitz constant
    cumulative: float  # product of the bounds up to and including this layer
    in_f1: bool


def layer_profile(model: nn.Module) -> list[LayerBound]:
    """Upper bounds for each top-level layer of f1 then f2, and their running product."""
    shape, cum, rows = tuple(model.input_shape), 1.0, []
    for part, in_f1 in ((model.f1, True), (model.f2, False)):
        for i, layer in enumerate(part):
            b, shape = module_bound(layer, shape)
            cum *= b
            name = f"{'f1' if in_f1 else 'f2'}.{i} {type(layer).__name__}"
            rows.append(LayerBound(name, b, cum, in_f1))
    return rows


def module_bound(m: nn.Module, shape: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
    """(upper bound on the l2 Lipschitz constant of m on inputs of `shape`, output shape)."""
    with torch.no_grad():
        out = tuple(m.eval()(torch.zeros(1, *shape)).shape[1:])
    if isinstance(m, nn.Sequential):
        b = 1.0
        for child in m:
            cb, shape = module_bound(child, shape)
            b *= cb
        return b, out
    if isinstance(m, BasicBlock):  # relu(branch(x) + shortcut(x))
        return module_bound(m.branch, shape)[0] + module_bound(m.shortcut, shape)[0], out
    return _leaf_bound(m, shape) * (1.0 + REL_MARGIN), out


def _leaf_bound(m: nn.Module, shape: tuple[int, ...]) -> float:
    if isinstance(m, (nn.ReLU, ClipReLU, nn.Flatten, nn.Identity)):
        return 1.0
    if isinstance(m, Normalize):
        return float(1.0 / m.std.min())
    if isinstance(m, nn.Linear):
        return float(torch.linalg.matrix_norm(m.weight.detach().double(), ord=2))
    if isinstance(m, nn.Conv2d):
        return conv_bound(m, shape)
    if isinstance(m, nn.BatchNorm2d):  # eval mode: a per-channel scale
        scale = m.weight.detach().double() / (m.running_var.double() + m.eps).sqrt()
        return float(scale.abs().max())
    if isinstance(m, nn.MaxPool2d):  # each input sits in at most ceil(k/s)^2 windows
        k, s = _pair(m.kernel_size), _pair(m.stride)
        return float(max(math.ceil(k[0] / s[0]), math.ceil(k[1] / s[1])))
    if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
        return 1.0 / math.sqrt(shape[1] * shape[2])
    raise ValueError(f"no Lipschitz bound for layer {type(m).__name__}")


def conv_bound(conv: nn.Conv2d, shape: tuple[int, ...]) -> float:
    """Spectral norm of the circular conv on the padded grid: the zero-padded (and strided) conv
    is a row-subset of it, so this is an upper bound (exact per-frequency SVDs, float64)."""
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise ValueError("conv_bound supports groups=1, dilation=1")
    ph, pw = conv.padding
    kh, kw = conv.kernel_size
    n = (max(shape[1] + 2 * ph, kh), max(shape[2] + 2 * pw, kw))
    spectrum = torch.fft.fft2(conv.weight.detach().double(), s=n)  # (c_out, c_in, nh, nw)
    return float(torch.linalg.matrix_norm(spectrum.permute(2, 3, 0, 1), ord=2).max())


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)
