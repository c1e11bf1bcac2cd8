"""Every registered architecture, at every split, built and checked the same way (timm-style)."""

import pytest
import torch

from splitz.data import SPECS
from splitz.nets import SPLITS, ClipReLU, Normalize, create_model, list_architectures

SMALL = {"lenet": ("mnist", {}), "lenet_small": ("mnist", {}),
         "resnet": ("cifar10", {"depth": 8})}


def test_every_architecture_has_a_test_config():
    assert set(list_architectures()) == set(SMALL)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("arch", list_architectures())
def test_shapes_finite_and_gradients_reach_every_parameter(arch, split):
    dataset, kwargs = SMALL[arch]
    model = create_model(arch, dataset, split, sigma=0.25, **kwargs).train()
    x = torch.rand(4, *SPECS[dataset].input_shape)
    logits = model(x, noise=True)
    assert logits.shape == (4, SPECS[dataset].num_classes)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


@pytest.mark.parametrize("arch", list_architectures())
def test_split_layout(arch):
    dataset, kwargs = SMALL[arch]
    splitz = create_model(arch, dataset, "conv1", 0.5, **kwargs)
    cohen = create_model(arch, dataset, "input", 0.5, **kwargs)
    assert [type(m) for m in splitz.f1][::2] == [Normalize, ClipReLU]
    assert len(cohen.f1) == 0 and isinstance(cohen.f2[0], Normalize)


def test_noise_only_when_asked():
    model = create_model("lenet", "mnist", "conv1", 0.5).eval()
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model(x), model(x))
    assert not torch.equal(model(x, noise=True), model(x, noise=True))


def test_clip_relu_clips_per_unit():
    act = ClipReLU((2, 1, 1), init=1.0)
    with torch.no_grad():
        act.threshold[1] = 0.5
    out = act(torch.tensor([[[[-1.0]], [[3.0]]]]))
    assert out.flatten().tolist() == [0.0, 0.5]


@pytest.mark.parametrize("bad", [{"arch": "vgg"}, {"split": "conv7"}, {"dataset": "svhn"}])
def test_unknown_names_are_refused(bad):
    args = {"arch": "lenet", "dataset": "mnist", "split": "conv1"} | bad
    with pytest.raises(ValueError, match="unknown"):
        create_model(args["arch"], args["dataset"], args["split"])


def test_resnet_depth_must_be_6k_plus_2():
    with pytest.raises(ValueError, match="6k\\+2"):
        create_model("resnet", "cifar10", depth=21)


def test_lenet_small_is_the_published_lenet():
    """conv 1->20 5x5, pool, conv 20->50 5x5, pool, fc 800->500, fc 500->10: 431,080 weights."""
    model = create_model("lenet_small", "mnist", "input", 0.5)
    assert sum(p.numel() for p in model.parameters()) == 431_080
    assert [m.out_features for m in model.f2 if isinstance(m, torch.nn.Linear)] == [500, 10]


def test_resnet110_is_the_published_cifar_network():
    """He et al.'s CIFAR ResNet-110 (the published smoothing tables' network): 54 basic blocks,
    1,730,714 weights there; ours has a bias on conv1 (16) in place of its BatchNorm (32), so that
    f1 = conv1 + clipped ReLU has a plain affine first layer to bound."""
    model = create_model("resnet", "cifar10", "input", 0.5, depth=110)
    blocks = [m for m in model.f2.modules() if m.__class__.__name__ == "BasicBlock"]
    assert len(blocks) == 54
    assert sum(p.numel() for p in model.parameters()) == 1_730_714 - 32 + 16
