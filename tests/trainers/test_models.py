"""Model registry: every registered model builds; torchvision models adapt to grayscale."""

import pytest
import torch
import torch_pruning as tp
from torch import nn

from prunetune.trainers.models import (
    BasicBlock,
    UnknownModelError,
    build_model,
    is_known_model,
    model_names,
    register_model,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_builds_and_runs(name):
    model = build_model(name, in_channels=3, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("cifar:resnet20", 0.25e6, 0.30e6),
        ("cifar:resnet32", 0.44e6, 0.50e6),
        ("cifar:resnet56", 0.83e6, 0.90e6),
        ("cifar:resnet110", 1.70e6, 1.80e6),
    ],
)
def test_cifar_resnet_param_counts_match_the_paper(name, low, high):
    assert low <= n_params(build_model(name, in_channels=3, num_classes=10)) <= high


def test_cifar_resnet_grayscale_small_input_and_class_count():
    model = build_model("cifar:resnet8", in_channels=1, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 16, 16)).shape == (3, 7)


def test_cifar_resnet_has_torchvision_attribute_layout():
    model = build_model("cifar:resnet20", in_channels=3, num_classes=10)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == 64
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    for stage, width in ((model.layer1, 16), (model.layer2, 32), (model.layer3, 64)):
        assert isinstance(stage, nn.Sequential) and len(stage) == 3
        assert all(isinstance(block, BasicBlock) for block in stage)
        assert stage[-1].bn2.num_features == width
    assert model.layer1[0].downsample is None
    shortcut = model.layer2[0].downsample
    assert isinstance(shortcut, nn.Sequential)
    assert isinstance(shortcut[0], nn.Conv2d) and shortcut[0].kernel_size == (1, 1)
    assert shortcut[0].stride == (2, 2) and isinstance(shortcut[1], nn.BatchNorm2d)


def test_cifar_resnet_is_prunable_by_torch_pruning():
    model = build_model("cifar:resnet20", in_channels=3, num_classes=10)
    example = torch.randn(1, 3, 32, 32)
    before = n_params(model)
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[model.fc],
    )
    pruner.step()
    assert n_params(model) < before / 2
    assert model(example).shape == (1, 10)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_torchvision_models_accept_grayscale(name):
    model = build_model(f"torchvision:{name}", in_channels=1, num_classes=5).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)


def test_torchvision_model_keeps_rgb_stem():
    model = build_model("torchvision:resnet18", in_channels=3, num_classes=4)
    assert model.conv1.in_channels == 3 and model.fc.out_features == 4


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("cifar:resnet21", "cifar:resnet20"),
        ("torchvision:nope", None),
        ("resnet18", "torchvision:resnet18"),
    ],
)
def test_unknown_model_names_close_matches(name, suggestion):
    with pytest.raises(UnknownModelError) as info:
        build_model(name, in_channels=3, num_classes=10)
    assert isinstance(info.value, KeyError)
    assert repr(name) in str(info.value)
    if suggestion:
        assert f"Did you mean {suggestion}" in str(info.value)


def test_is_known_model():
    assert all(is_known_model(name) for name in model_names())
    assert is_known_model("torchvision:resnet50")
    assert not is_known_model("torchvision:nope")
    assert not is_known_model("cifar:resnet21")
    assert not is_known_model("resnet18")


def test_model_names_optionally_lists_torchvision():
    names = model_names(include_torchvision=True)
    assert set(model_names()) < set(names)
    assert "torchvision:mobilenet_v3_small" in names


def test_register_model_rejects_duplicates_and_reserved_prefix():
    with pytest.raises(ValueError, match="already registered"):
        register_model("cifar:resnet20")(lambda **kw: nn.Identity())
    with pytest.raises(ValueError, match="reserved"):
        register_model("torchvision:mine")
