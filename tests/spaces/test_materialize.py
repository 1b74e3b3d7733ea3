"""materialize(): a vector becomes a physically smaller copy; the parent is never touched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunetune.spaces import PruningError, PruningVector, discover, materialize, measure_cost
from prunetune.spaces.materialize import kept_channels, state_hash
from prunetune.trainers.models import build_model

NUM_CLASSES = 7

# (model name, in_channels, native resolution, vector)
CASES = {
    "r20-joint": ("cifar:resnet20", 1, 16, PruningVector(
        channels={"layer1": 0.5, "layer3": 0.3}, depth={"layer2": 1}, resolution=8)),
    "r20-depth-only": ("cifar:resnet20", 1, 16, PruningVector(depth={"layer1": 2, "layer3": 1})),
    "r20-channels-only": ("cifar:resnet20", 3, 16, PruningVector(
        channels={"layer1": 0.25, "layer2": 0.625, "layer3": 0.125})),
    "r20-resolution-only": ("cifar:resnet20", 1, 16, PruningVector(resolution=8)),
    "r8-channels": ("cifar:resnet8", 3, 32, PruningVector(channels={"layer2": 0.25}, resolution=24)),
    "tv-r18": ("torchvision:resnet18", 3, 32, PruningVector(
        channels={"layer1": 0.5, "layer4": 0.25}, depth={"layer2": 1})),
    "tv-r50": ("torchvision:resnet50", 3, 32, PruningVector(
        channels={"layer2": 0.375}, depth={"layer3": 2, "layer4": 1})),
}


def removes_structure(vector: PruningVector, space) -> bool:
    return any(r < 1 for r in vector.channels.values()) or any(
        d < space.stage(s).max_depth for s, d in vector.depth.items())


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request):
    """One materialization per case, shared by the read-only checks below."""
    name, in_ch, native, vector = CASES[request.param]
    torch.manual_seed(0)
    parent = build_model(name, in_channels=in_ch, num_classes=NUM_CLASSES)
    space = discover(parent)
    before = (state_hash(parent), conv_widths(parent), parent.training)
    sub = materialize(parent, vector, in_channels=in_ch, native_resolution=native)
    return dict(parent=parent, space=space, vector=vector, sub=sub, in_ch=in_ch,
                native=native, before=before)


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_internal_conv_widths_follow_kept_channels(case):
    parent, sub, space, vector = case["parent"], case["sub"].module, case["space"], case["vector"]
    removed = set(case["sub"].spec.removed_blocks)
    internal = set()
    for stage in space.stages:
        ratio = vector.channels.get(stage.name, 1.0)
        for block, convs in zip(stage.blocks, stage.internal_convs):
            if block in removed:
                continue
            for conv in convs:
                internal.add(conv)
                n = parent.get_submodule(conv).out_channels
                assert sub.get_submodule(conv).out_channels == kept_channels(n, ratio), conv
    # Everything else (stem, residual-stream convs, downsample, fc) keeps the parent's width.
    parent_w, sub_w = conv_widths(parent), conv_widths(sub)
    for name, w in sub_w.items():
        if name not in internal:
            assert w == parent_w[name], name
    assert case["sub"].spec.widths == sub_w


def test_removed_blocks_are_the_last_of_each_stage(case):
    sub, space, vector = case["sub"], case["space"], case["vector"]
    expected = []
    for stage in space.stages:
        d = vector.depth.get(stage.name, stage.max_depth)
        assert len(sub.module.get_submodule(stage.name)) == d
        expected += list(stage.blocks[d:])
    assert sub.spec.removed_blocks == expected
    names = {n for n, _ in sub.module.named_modules()}
    assert not names & set(expected)


def test_output_shape_at_the_vectors_resolution(case):
    sub = case["sub"]
    res = case["vector"].resolution or case["native"]
    assert sub.spec.resolution == res
    assert sub.spec.native_resolution == case["native"]
    assert not sub.module.training
    with torch.no_grad():
        out = sub.module(torch.randn(2, case["in_ch"], res, res))
    assert out.shape == (2, NUM_CLASSES)


def test_cost_drops_when_something_is_removed(case):
    parent, sub, in_ch = case["parent"], case["sub"], case["in_ch"]
    full = measure_cost(parent, in_channels=in_ch, resolution=case["native"])
    small = measure_cost(sub.module, in_channels=in_ch, resolution=sub.spec.resolution)
    structural = removes_structure(case["vector"], case["space"])
    if structural or sub.spec.resolution < case["native"]:
        assert small.macs < full.macs
    if structural:
        assert small.params < full.params
        # ...also at equal resolution: the drop is not only the smaller input.
        same_res = measure_cost(parent, in_channels=in_ch, resolution=sub.spec.resolution)
        assert small.macs < same_res.macs
    else:
        assert small.params == full.params


def test_parent_is_untouched(case):
    parent = case["parent"]
    assert (state_hash(parent), conv_widths(parent), parent.training) == case["before"]
    assert case["sub"].spec.parent_hash == case["before"][0]
    assert case["sub"].module is not parent


def test_macs_scale_with_resolution_squared(make_model):
    parent = make_model("cifar:resnet20")
    sub = materialize(parent, PruningVector(channels={"layer2": 0.5}, depth={"layer3": 2}),
                      in_channels=1, native_resolution=16)
    for model in (parent, sub.module):
        m8 = measure_cost(model, in_channels=1, resolution=8).macs
        m16 = measure_cost(model, in_channels=1, resolution=16).macs
        assert 0.2 <= m8 / m16 <= 0.3


def test_depth_only_keeps_the_first_blocks_weights_verbatim(make_model):
    parent = make_model("cifar:resnet20")
    sub = materialize(parent, PruningVector(depth={"layer2": 2}), in_channels=1, native_resolution=16)
    kept = sub.module.layer2.state_dict()
    ref = {k: v for k, v in parent.layer2.state_dict().items() if k.split(".")[0] in {"0", "1"}}
    assert kept.keys() == ref.keys()
    for k in kept:
        assert torch.equal(kept[k], ref[k]), k


def test_full_vector_is_an_identical_copy(make_model):
    parent = make_model("cifar:resnet8")
    sub = materialize(parent, PruningVector(), in_channels=1, native_resolution=16)
    assert state_hash(sub.module) == state_hash(parent)
    assert sub.spec.removed_blocks == []


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("vector", "needle"),
    [
        (PruningVector(channels={"layer1": 0.0}), "channels.layer1"),
        (PruningVector(channels={"layer1": 1.5}), "channels.layer1"),
        (PruningVector(channels={"layer1": -0.5}), "channels.layer1"),
        (PruningVector(channels={"layer9": 0.5}), "layer9"),
        (PruningVector(depth={"layer9": 1}), "layer9"),
        (PruningVector(depth={"layer2": 0}), "depth.layer2"),
        (PruningVector(depth={"layer2": 4}), "depth.layer2"),
        (PruningVector(channels={"layer1": 0.5}, depth={"layer2": 99}), "depth.layer2"),
        (PruningVector(resolution=0), "resolution"),
    ],
    ids=["ratio0", "ratio1.5", "ratio-neg", "ch-unknown-stage", "depth-unknown-stage",
         "depth0", "depth-too-big", "depth99-with-channels", "resolution0"],
)
def test_invalid_vectors_raise_and_leave_parent_untouched(make_model, vector, needle):
    parent = make_model("cifar:resnet20")
    before = (state_hash(parent), conv_widths(parent))
    with pytest.raises(PruningError, match=needle.replace(".", r"\.")):
        materialize(parent, vector, in_channels=1, native_resolution=16)
    assert (state_hash(parent), conv_widths(parent)) == before


def test_pruning_error_is_a_value_error():
    assert issubclass(PruningError, ValueError)


def test_unknown_importance_is_rejected(make_model):
    with pytest.raises(KeyError, match="nope"):
        materialize(make_model("cifar:resnet8"), PruningVector(channels={"layer1": 0.5}),
                    in_channels=1, native_resolution=16, importance="nope")


# ---------------------------------------------------------------- round_to


@pytest.mark.parametrize(
    ("n", "ratio", "round_to", "expected"),
    [
        (16, 0.5, 1, 8),
        (16, 0.3, 1, 5),       # ceil(4.8)
        (64, 0.3, 1, 20),      # ceil(19.2); float noise must not add a channel
        (10, 0.3, 1, 3),       # 0.3 * 10 == 3.0000000000000004
        (16, 0.01, 1, 1),      # never zero
        (16, 1.0, 1, 16),
        (16, 0.1, 8, 8),       # at least round_to
        (16, 1.0, 8, 16),
        (12, 1.0, 8, 12),      # never more than n
        (64, 0.5, 8, 32),
    ],
)
def test_kept_channels(n, ratio, round_to, expected):
    assert kept_channels(n, ratio, round_to) == expected


def test_round_to_gives_multiples(make_model):
    parent = make_model("cifar:resnet56")
    vector = PruningVector(channels={"layer1": 0.3, "layer2": 0.45, "layer3": 0.6})
    sub = materialize(parent, vector, in_channels=1, native_resolution=16, round_to=8)
    space = discover(parent)
    for stage in space.stages:
        for convs in stage.internal_convs:
            for conv in convs:
                width = sub.module.get_submodule(conv).out_channels
                assert width % 8 == 0, (conv, width)
                assert width == kept_channels(parent.get_submodule(conv).out_channels,
                                              vector.channels[stage.name], 8)
    with torch.no_grad():
        assert sub.module(torch.randn(1, 1, 16, 16)).shape == (1, 10)


def test_round_to_8_resnet56_layer3_ratio_0_3_keeps_24(make_model):
    parent = make_model("cifar:resnet56")
    sub = materialize(parent, PruningVector(channels={"layer3": 0.3}), in_channels=1,
                      native_resolution=16, round_to=8)
    widths = {sub.module.get_submodule(c).out_channels
              for convs in discover(parent).stage("layer3").internal_convs for c in convs}
    assert widths == {24}
