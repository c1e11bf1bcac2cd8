"""Sound upper bounds on Lipschitz constants (DESIGN.md §1), all in float64.

f1 = clip(A x + c, 0, t), with A = W S^-1 the first conv composed with the input normalization
(S = diag(std), so the factor 1/std of every input channel is counted) and t the clipped-ReLU
thresholds. On the l2 ball B(x, gamma) every pre-activation u_i moves by at most ||a_i|| gamma;
units that stay dead (u_i + ||a_i|| gamma <= 0) or saturated (u_i - ||a_i|| gamma >= t_i) are
constant on the ball and the others have slope in [0, 1], so along any segment inside the (convex)
ball ||f1(x') - f1(x)|| <= ||M A||_2 ||x' - x||, with M the 0/1 mask of units that can change.

||M A||_2^2 is the largest eigenvalue of G = A^T M A. We form G exactly from the conv's patches
and diagonalize it with LAPACK; that is backward stable (error below d * eps * ||G||, about 1e-12
relative here), and REL_MARGIN covers it with a wide safety factor. Never a truncated power
iteration: that can only under-estimate a spectral norm.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nets import BasicBlock, ClipReLU, Normalize

REL_MARGIN = 1e-6  # relative safety margin on every computed norm
MASK_TOL = 1e-6  # a unit within this (relative) distance of a kink counts as one that can change
GAMMA_REL_TOL = 1e-3  # the gamma bisection stops when its bracket is this narrow (relative)
GRAM_BYTES = 256 * 2**20  # memory budget for a batch of Gram matrices


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
        std, mean = norm.std.detach().double().cpu(), norm.mean.detach().double().cpu()
        self.weight = conv.weight.detach().double().cpu() / std.view(1, -1, 1, 1)  # A = W S^-1
        bias = conv.bias.detach().double().cpu() if conv.bias is not None else 0.0
        self.bias = bias - (self.weight * mean.view(1, -1, 1, 1)).sum((1, 2, 3))  # c = b - A m
        self.conv_args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        self.kernel = self.weight.flatten(1)  # (c_out, c_in*kh*kw), ordered like F.unfold
        # Interior rows of A have exactly this norm; border rows lose padded taps, so it is >=.
        self.row_norm = self.kernel.norm(dim=1)
        out_shape = self.preactivation(torch.zeros(1, *input_shape)).shape[1:]
        self.threshold = (act.upper().detach().double().cpu() if isinstance(act, ClipReLU)
                          else torch.full(out_shape, math.inf, dtype=torch.float64))
        self._flat_index = self._gram_index(conv.kernel_size)
        ones = torch.ones(1, *out_shape, dtype=torch.bool)
        self.global_bound = float(self._mask_norm(ones)[0])

    def preactivation(self, x: Tensor) -> Tensor:
        """u = A x + c in float64."""
        return F.conv2d(x.detach().double().cpu(), self.weight, self.bias, **self.conv_args)

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
        return torch.minimum(self._mask_norm(mask), torch.tensor(self.global_bound))

    def _gram_index(self, kernel_size: tuple[int, int]) -> Tensor:
        """Flat indices into a (d+1)^2 matrix for every (patch, tap, tap); index d = padding."""
        d = self.dim
        ids = torch.arange(1, d + 1, dtype=torch.float64).view(1, *self.input_shape)
        patches = F.unfold(ids, kernel_size, **self.conv_args)[0].T  # (L, P), 0 where padded
        idx = patches.round().long() - 1
        idx[idx < 0] = d
        return (idx[:, :, None] * (d + 1) + idx[:, None, :]).flatten()

    def _mask_norm(self, mask: Tensor) -> Tensor:
        """||M A||_2 for each mask in the batch, rounded up by REL_MARGIN."""
        d = self.dim
        chunk = max(1, GRAM_BYTES // (8 * (d + 1) ** 2))
        m = mask.flatten(2).double()  # (B, c_out, L)
        out = []
        for mc in m.split(chunk):
            # Per output location l: Q_l = K^T diag(m_l) K, the Gram of that patch's active rows.
            q = torch.einsum("bol,op,oq->blpq", mc, self.kernel, self.kernel)
            g = torch.zeros(mc.shape[0], (d + 1) ** 2, dtype=torch.float64)
            g.index_add_(1, self._flat_index, q.reshape(mc.shape[0], -1))
            g = g.view(-1, d + 1, d + 1)[:, :d, :d]
            lam = torch.linalg.eigvalsh(g)[:, -1].clamp(min=0.0)
            out.append(torch.sqrt(lam * (1.0 + REL_MARGIN)))
        return torch.cat(out)


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
    """radius = min(r_z / lipschitz, gamma): Theorem 1 at the chosen gamma."""

    radius: Tensor
    gamma: Tensor
    lipschitz: Tensor


def input_radius(bound: F1Bound, x: Tensor, r_z: Tensor, rel_tol: float = GAMMA_REL_TOL,
                 max_steps: int = 40) -> InputRadius:
    """R(x) = max_gamma min(r_z / L_gamma(x), gamma), searched by bisection (SPLITZ, Theorem 1).

    Every gamma gives a valid certificate, so the search spends no confidence budget. gamma L_gamma
    grows with gamma; the bracket [lo, hi] keeps lo feasible (lo L_lo <= r_z, so lo is certified)
    and hi infeasible; the answer is the best certificate among all gammas evaluated, within a
    factor (1 - rel_tol) of the optimum. Radii are capped at the diameter of [0, 1]^d.
    """
    r_z = r_z.double()
    cap = math.sqrt(bound.dim)
    lo = _safe_div(r_z, torch.full_like(r_z, bound.global_bound)).clamp(max=cap)
    best = InputRadius(lo.clone(), lo.clone(), torch.full_like(r_z, bound.global_bound))
    if bound.identity:
        return best
    hi = _safe_div(r_z, bound.local(x, torch.zeros_like(r_z))).clamp(max=cap)
    for _ in range(max_steps):
        active = (hi - lo > rel_tol * lo) & (r_z > 0)
        if not active.any():
            break
        mid = torch.where(active, (lo + hi) / 2, lo)
        lip = bound.local(x, mid)
        cert = torch.minimum(_safe_div(r_z, lip), mid)
        better = active & (cert > best.radius)
        best = InputRadius(torch.where(better, cert, best.radius),
                           torch.where(better, mid, best.gamma),
                           torch.where(better, lip, best.lipschitz))
        feasible = mid * lip <= r_z
        lo = torch.where(active & feasible, mid, lo)
        hi = torch.where(active & ~feasible, mid, hi)
    return best


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
