"""discover(): stages of residual blocks, their order, and the convs that may lose channels."""

import pytest
from torch import nn

from prunetune.spaces import ModelSpace, Stage, discover


def test_cifar_resnet20_has_three_stages_of_three_basic_blocks(make_model):
    space = discover(make_model("cifar:resnet20"))

    assert isinstance(space, ModelSpace)
    assert space.stage_names == ("layer1", "layer2", "layer3")
    for stage in space.stages:
        assert isinstance(stage, Stage)
        assert stage.max_depth == 3
        assert stage.blocks == tuple(f"{stage.name}.{i}" for i in range(3))
        # A BasicBlock's internal conv is conv1; conv2 writes into the residual stream and
        # the downsample conv is never a candidate.
        assert stage.internal_convs == tuple((f"{b}.conv1",) for b in stage.blocks)


def test_every_discovered_name_resolves_to_a_module(make_model):
    model = make_model("cifar:resnet20")
    for stage in discover(model).stages:
        assert isinstance(model.get_submodule(stage.name), nn.Sequential)
        for convs in stage.internal_convs:
            for name in convs:
                assert isinstance(model.get_submodule(name), nn.Conv2d)


def test_stage_lookup_by_name(make_model):
    space = discover(make_model("cifar:resnet8"))
    assert space.stage("layer2").blocks == ("layer2.0",)
    with pytest.raises(KeyError):
        space.stage("layer9")


def test_torchvision_resnet50_has_four_stages_of_bottlenecks(make_model):
    space = discover(make_model("torchvision:resnet50", in_channels=3))

    assert space.stage_names == ("layer1", "layer2", "layer3", "layer4")
    assert [s.max_depth for s in space.stages] == [3, 4, 6, 3]
    for stage in space.stages:
        # Bottleneck: conv1 (1x1) and conv2 (3x3) are internal, conv3 feeds the residual sum.
        assert stage.internal_convs == tuple((f"{b}.conv1", f"{b}.conv2") for b in stage.blocks)


def test_torchvision_resnet18_basic_blocks(make_model):
    space = discover(make_model("torchvision:resnet18", in_channels=3))
    assert [s.max_depth for s in space.stages] == [2, 2, 2, 2]
    assert space.stage("layer4").internal_convs == (("layer4.0.conv1",), ("layer4.1.conv1",))


def test_vgg_without_residual_stages_is_rejected_by_class_name(make_model):
    with pytest.raises(ValueError, match="VGG"):
        discover(make_model("torchvision:vgg11_bn", in_channels=3))


def test_plain_sequential_of_convs_is_rejected_by_class_name():
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )
    with pytest.raises(ValueError, match="Sequential") as err:
        discover(model)
    assert "residual" in str(err.value)
