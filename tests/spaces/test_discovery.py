"""describe(): channel stages and their groups, removable blocks, classifier, on ResNets.

Ported from the ResNet-only `discover()`: a stage now holds DepGraph channel groups (the
stage's residual stream, coupled, plus one group per internal conv) and, separately, the
blocks that depth search may bypass.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunetune.spaces import ModelStructure, PruningError, PruningVector, describe, prune, state_hash
from prunetune.spaces.blocks import StageInfo

X1 = torch.zeros(1, 1, 16, 16)
X3 = torch.zeros(1, 3, 32, 32)


def groups_by_root(structure):
    return {g.root: (s.name, g) for s in structure.channel_stages for g in s.groups}


def test_cifar_resnet20_channel_stages_and_groups(make_model):
    s = describe(make_model("cifar:resnet20"), X1)

    assert isinstance(s, ModelStructure)
    assert [c.name for c in s.channel_stages] == ["layer1", "layer2", "layer3"]
    assert [c.positions for c in s.channel_stages] == [16 * 16, 8 * 8, 4 * 4]
    assert s.classifier == "fc" and s.resolution_adaptable
    assert s.attention == {} and s.skipped_groups == () and s.channel_error == ""
    streams = {"layer1": "conv1", "layer2": "layer2.0.downsample.0", "layer3": "layer3.0.downsample.0"}
    for stage, width in zip(s.channel_stages, (16, 32, 64)):
        stream, *internal = stage.groups
        # The residual stream: every block's conv2 (and the stem or downsample conv) writes it.
        assert (stream.root, stream.size, stream.coupled) == (streams[stage.name], width, True)
        for i in range(3):
            assert f"{stage.name}.{i}.conv2" in stream.members
        # One internal group per BasicBlock, rooted at conv1; conv2 is never a root.
        assert [g.root for g in internal] == [f"{stage.name}.{i}.conv1" for i in range(3)]
        for g in internal:
            assert (g.size, g.coupled, g.grouped) == (width, False, False)
            block = g.root.rsplit(".", 1)[0]
            assert {g.root, f"{block}.bn1", f"{block}.conv2"} <= set(g.members)
    # The classifier reads the last stream but is never a root.
    assert "fc" in s.channel_stage("layer3").groups[0].members
    assert "fc" not in groups_by_root(s)


def test_cifar_resnet20_depth_stages(make_model):
    s = describe(make_model("cifar:resnet20"), X1)
    assert [d.name for d in s.depth_stages] == ["layer1", "layer2", "layer3"]
    for d in s.depth_stages:
        assert isinstance(d, StageInfo)
        assert d.children == tuple(f"{d.name}.{i}" for i in range(3))
        assert (d.min_depth, d.max_depth) == (1, 3)
    # A block with a downsample changes the shape: it stays, the others may go.
    assert s.depth_stage("layer1").removable == ("layer1.0", "layer1.1", "layer1.2")
    assert s.depth_stage("layer1").max_drop == 2
    for name in ("layer2", "layer3"):
        assert s.depth_stage(name).removable == (f"{name}.1", f"{name}.2")
        assert s.depth_stage(name).max_drop == 2


def test_every_described_name_resolves_to_a_module(make_model):
    model = make_model("cifar:resnet20")
    s = describe(model, X1)
    for stage in s.channel_stages:
        for g in stage.groups:
            assert isinstance(model.get_submodule(g.root), (nn.Conv2d, nn.Linear))
            assert g.size == model.get_submodule(g.root).out_channels
            # "?" stands for torch-pruning's pseudo-modules (functional ops), which have no name.
            for m in g.members:
                if m != "?":
                    model.get_submodule(m)
    for d in s.depth_stages:
        assert isinstance(model.get_submodule(d.name), nn.Sequential)
        assert set(d.removable) <= set(d.children)
        for child in d.children:
            model.get_submodule(child)
    assert isinstance(model.get_submodule(s.classifier), nn.Linear)


def test_describe_leaves_the_model_alone(make_model):
    model = make_model("cifar:resnet20").train()
    before = state_hash(model)
    describe(model, X1)
    assert state_hash(model) == before and model.training


def test_stage_lookup_by_name(make_model):
    s = describe(make_model("cifar:resnet20"), X1)
    assert s.channel_stage("layer2").groups[1].root == "layer2.0.conv1"
    assert s.depth_stage("layer2").removable == ("layer2.1", "layer2.2")
    with pytest.raises(KeyError):
        s.channel_stage("layer9")
    with pytest.raises(KeyError):
        s.depth_stage("layer9")


def test_resnet8_one_block_stages_have_channels_but_no_depth(make_model):
    s = describe(make_model("cifar:resnet8"), X1)
    # One block per stage: nothing may be bypassed (a stage never loses every block).
    assert s.depth_stages == ()
    roots = [[g.root for g in c.groups] for c in s.channel_stages]
    assert roots == [["conv1", "layer1.0.conv1"],
                     ["layer2.0.downsample.0", "layer2.0.conv1"],
                     ["layer3.0.downsample.0", "layer3.0.conv1"]]


def test_torchvision_resnet50_bottlenecks(make_model):
    model = make_model("torchvision:resnet50", in_channels=3)
    s = describe(model, X3)
    assert [(d.name, d.max_depth) for d in s.depth_stages] == [
        ("layer1", 3), ("layer2", 4), ("layer3", 6), ("layer4", 3)]
    for d in s.depth_stages:
        assert d.removable == d.children[1:]  # block 0 has a downsample
    roots = groups_by_root(s)
    coupled = {r: g.size for r, (_, g) in roots.items() if g.coupled}
    assert coupled == {f"layer{k}.0.downsample.0": 256 * 2 ** (k - 1) for k in range(1, 5)}
    for d in s.depth_stages:
        stream = roots[f"{d.name}.0.downsample.0"][1]
        for block in d.children:
            # Bottleneck: conv1 (1x1) and conv2 (3x3) are internal, conv3 feeds the residual sum.
            for conv in ("conv1", "conv2"):
                assert not roots[f"{block}.{conv}"][1].coupled
            assert f"{block}.conv3" not in roots and f"{block}.conv3" in stream.members
    # Stages are cut by resolution: layer2.0.conv1 (1x1, stride 1) still runs at layer1's size.
    assert roots["layer2.0.conv1"][0] == "layer1" and roots["layer2.0.conv2"][0] == "layer2"


def test_torchvision_resnet18_basic_blocks(make_model):
    s = describe(make_model("torchvision:resnet18", in_channels=3), X3)
    assert [d.max_depth for d in s.depth_stages] == [2, 2, 2, 2]
    assert s.depth_stage("layer1").removable == ("layer1.0", "layer1.1")
    assert s.depth_stage("layer4").removable == ("layer4.1",)
    layer4 = s.channel_stage("layer4").groups
    assert [g.root for g in layer4 if not g.coupled] == ["layer4.0.conv1", "layer4.1.conv1"]
    assert [g.root for g in layer4 if g.coupled] == ["layer4.0.downsample.0"]
    # The stem conv roots layer1's stream; it runs before the max-pool, so it is its own stage.
    (stem,) = s.channel_stage("conv1").groups
    assert stem.coupled and {"layer1.0.conv2", "layer1.1.conv2"} <= set(stem.members)


def test_plain_sequential_has_channels_but_no_depth():
    # Formerly rejected (no residual stages); the generic engine prunes its channels.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    ).eval()
    s = describe(model, torch.zeros(1, 1, 8, 8))
    assert s.depth_stages == () and s.classifier == "5"
    assert [g.root for c in s.channel_stages for g in c.groups] == ["0", "2"]
    stage = s.channel_stages[0].name
    sub = prune(model, PruningVector(channels={stage: 0.5}), torch.zeros(1, 1, 8, 8), structure=s)
    assert (sub.module[0].out_channels, sub.module[2].out_channels, sub.module[5].in_features) == (4, 4, 4)
    with pytest.raises(PruningError, match=r"depth\.0"):
        prune(model, PruningVector(depth={"0": 1}), torch.zeros(1, 1, 8, 8), structure=s)
