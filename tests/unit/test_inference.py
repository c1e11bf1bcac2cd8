"""f2 as certification runs it computes the trained f2: bit for bit where only pooling is
rewritten, up to float rounding where BatchNorm is folded."""

import copy

import pytest
import torch
from torch import nn

from splitz.data import SPECS
from splitz.inference import MaxPool2x2, fold_batchnorm, for_certification
from splitz.nets import create_model
from tests.unit.test_nets import CASES, SMALL


def _as_before(f2: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The engine's f2 before pooling was rewritten: BatchNorm folded, dtype, channels_last."""
    return fold_batchnorm(copy.deepcopy(f2)).to(dtype).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("arch,split", CASES)
def test_every_architecture_certifies_the_trained_f2(arch, split):
    dataset, kwargs = SMALL[arch]
    torch.manual_seed(0)
    model = create_model(arch, dataset, split, sigma=0.5, **kwargs).eval()
    trained = copy.deepcopy(model.f2.state_dict())
    z = model.f1(torch.rand(3, *SPECS[dataset].input_shape)) + 0.5 * torch.randn(1)
    z = z.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            fast = for_certification(model.f2, dtype)(z.to(dtype))
            assert torch.equal(fast, _as_before(model.f2, dtype)(z.to(dtype)))
        assert torch.allclose(for_certification(model.f2, torch.float32)(z), model.f2(z),
                              rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, model.f2.state_dict()[k]) for k, v in trained.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 5, 7, 9), (1, 1, 3, 4)])
def test_max_pool_2x2_is_nn_max_pool(shape, dtype):
    x = torch.randn(shape).to(dtype)
    x.view(-1)[::7] = float("nan")
    x.view(-1)[3::11] = float("-inf")
    for layout in (torch.contiguous_format, torch.channels_last):
        x = x.contiguous(memory_format=layout)
        want, got = nn.MaxPool2d(2)(x), MaxPool2x2()(x)
        assert got.shape == want.shape
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
        assert torch.equal(got.isnan(), want.isnan())


def test_relu_moves_after_any_plain_max_pool_and_nowhere_else():
    kept = [nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d(2, return_indices=True)]
    layers = nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 2, padding=1), nn.Conv2d(2, 2, 1),
                           nn.ReLU(), kept[0], nn.ReLU(), nn.MaxPool2d(2), nn.ReLU(), kept[1])
    fast = for_certification(layers[:8], torch.float32)
    assert [type(m) for m in fast] == [nn.MaxPool2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.MaxPool2d,
                                       MaxPool2x2, nn.ReLU, nn.ReLU]
    assert fast[4].ceil_mode  # a ceil-mode window can hang off the edge: not rewritten
    x = torch.randn(2, 2, 13, 13).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(fast(x), layers[:8](x))
    kept_last = for_certification(layers[7:], torch.float32)
    assert isinstance(kept_last[1], nn.MaxPool2d) and kept_last[1].return_indices
