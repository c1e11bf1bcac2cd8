"""Every registered architecture, at every split, built and checked the same way (timm-style)."""

import pytest
import torch

from splitz.data import SPECS, DatasetSpec
from splitz.nets import (
    TORCHVISION,
    ClipReLU,
    Normalize,
    create_model,
    is_network,
    list_architectures,
    splits,
)

# Whole networks run on CIFAR-10's 32x32 (torchvision's ResNets take any size from 32x32).
SMALL = {"lenet": ("mnist", {}), "lenet_small": ("mnist", {}),
         "resnet": ("cifar10", {"depth": 8}),
         **{name: ("cifar10", {}) for name in ("cifar_resnet20", "cifar_resnet110", *TORCHVISION)}}
LARGE = {"cifar_resnet110", "resnet101", "resnet152", "wide_resnet101_2"}  # seconds on a CPU
CASES = [pytest.param(arch, split, marks=[pytest.mark.slow] if arch in LARGE else [])
         for arch in list_architectures() for split in splits(arch)]


def test_every_architecture_has_a_test_config():
    assert set(list_architectures()) == set(SMALL)
    assert {"resnet18", "resnet50", "wide_resnet50_2"} <= set(TORCHVISION)


@pytest.mark.parametrize("arch,split", CASES)
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
    cohen = create_model(arch, dataset, "input", 0.5, **kwargs)
    assert len(cohen.f1) == 0 and isinstance(cohen.f2[0], Normalize)
    if is_network(arch):  # BatchNorm after conv1: no affine + clipped-ReLU f1 to split off
        assert splits(arch) == ("input",) and len(cohen.f2) == 2
        with pytest.raises(ValueError, match=f"{arch} takes split 'input' only"):
            create_model(arch, dataset, "conv1", 0.5, **kwargs)
    else:
        splitz = create_model(arch, dataset, "conv1", 0.5, **kwargs)
        assert [type(m) for m in splitz.f1][::2] == [Normalize, ClipReLU]


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


@pytest.mark.parametrize("depth,weights", [(20, 272_474), (110, 1_730_714)])
def test_cifar_resnet_is_the_published_network_by_name(depth, weights):
    """bearpaw's CIFAR ResNet as locuslab/smoothing and jh-jeong/smoothing-consistency ship it
    (archs/cifar_resnet.py): its parameter count, and its key names, so its checkpoints load."""
    net = create_model(f"cifar_resnet{depth}", "cifar10", "input", 0.5).f2[1]
    assert sum(p.numel() for p in net.parameters()) == weights
    keys = net.state_dict().keys()
    assert {"conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight",
            "layer3.0.downsample.1.running_mean", "layer3.1.conv2.weight", "fc.bias"} <= keys
    assert "conv1.bias" not in keys and not any(k.startswith("layer4") for k in keys)


def test_torchvision_networks_take_other_sizes_but_only_rgb():
    ds = DatasetSpec("custom", (3, 48, 64), ("a", "b", "c"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    model = create_model("resnet18", ds, "input", 0.5).eval()
    assert model(torch.rand(2, 3, 48, 64)).shape == (2, 3)
    gray = DatasetSpec("gray", (1, 48, 48), ("a", "b"), (0.5,), (0.25,))
    with pytest.raises(ValueError, match="3-channel"):
        create_model("resnet18", gray, "input", 0.5)
