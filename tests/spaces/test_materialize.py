"""prune() (formerly materialize): a vector becomes a physically smaller copy; the parent is
never touched.

Semantics of the generic engine: a stage's keep ratio applies to every channel group of the
stage, its residual stream included (so the stage's residual width shrinks too); dropped
blocks are replaced by `nn.Identity` under their own names.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunetune.spaces import (
    PruningError,
    PruningVector,
    describe,
    kept_channels,
    measure_cost,
    prune,
    state_hash,
)
from prunetune.trainers.models import build_model

NUM_CLASSES = 7

# (model name, in_channels, native resolution, vector or structure -> vector)
CASES = {
    "r20-joint": ("cifar:resnet20", 1, 16, PruningVector(
        channels={"layer1": 0.5, "layer3": 0.3}, depth={"layer2": 1}, resolution=8)),
    # Channels and depth on one stage: the dropped blocks' groups are not pruned nor recorded.
    "r20-same-stage": ("cifar:resnet20", 1, 16, PruningVector(channels={"layer2": 0.5}, depth={"layer2": 2})),
    "r20-depth-only": ("cifar:resnet20", 1, 16, PruningVector(depth={"layer1": 2, "layer3": 1})),
    "r20-channels-only": ("cifar:resnet20", 3, 16, PruningVector(
        channels={"layer1": 0.25, "layer2": 0.625, "layer3": 0.125})),
    "r20-resolution-only": ("cifar:resnet20", 1, 16, PruningVector(resolution=8)),
    # resnet8's stages are named by describe(); take the second one, whatever its name.
    "r8-channels": ("cifar:resnet8", 3, 32, lambda s: PruningVector(
        channels={s.channel_stages[1].name: 0.25}, resolution=24)),
    "tv-r18": ("torchvision:resnet18", 3, 32, PruningVector(
        channels={"layer1": 0.5, "layer4": 0.25}, depth={"layer2": 1})),
    "tv-r50": ("torchvision:resnet50", 3, 32, PruningVector(
        channels={"layer2": 0.375}, depth={"layer3": 2, "layer4": 1})),
}


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def removes_structure(vector: PruningVector, structure) -> bool:
    return any(r < 1 for r in vector.channels.values()) or any(
        d < structure.depth_stage(s).max_depth for s, d in vector.depth.items())


def inside(name: str, blocks) -> bool:
    return any(name == b or name.startswith(b + ".") for b in blocks)


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request):
    """One pruning per case, shared by the read-only checks below."""
    name, in_ch, native, vector = CASES[request.param]
    torch.manual_seed(0)
    parent = build_model(name, in_channels=in_ch, num_classes=NUM_CLASSES).eval()
    x = torch.zeros(1, in_ch, native, native)
    structure = describe(parent, x)
    vector = vector(structure) if callable(vector) else vector
    before = (state_hash(parent), conv_widths(parent), parent.training)
    sub = prune(parent, vector, x, model_name=name, structure=structure)
    return dict(parent=parent, structure=structure, vector=vector, sub=sub, in_ch=in_ch,
                native=native, before=before)


def test_group_widths_follow_kept_channels(case):
    parent, sub, structure, vector = case["parent"], case["sub"], case["structure"], case["vector"]
    removed = sub.spec.removed_blocks
    expected, members = {}, set()
    for stage in structure.channel_stages:
        if stage.name not in vector.channels:
            continue
        for g in stage.groups:
            if inside(g.root, removed):
                continue
            expected[g.root] = kept_channels(g.size, vector.channels[stage.name])
            members |= set(g.members)
            assert conv_widths(sub.module)[g.root] == expected[g.root], g.root
    assert sub.spec.groups == expected
    # Layers outside every pruned group keep the parent's width; members either keep it or
    # take their group's count (a member may only consume the group's channels).
    parent_w, sub_w = conv_widths(parent), conv_widths(sub.module)
    for name, w in sub_w.items():
        if name not in members:
            assert w == parent_w[name], name
        else:
            assert w == parent_w[name] or w in expected.values(), name
    assert sub.spec.widths == sub_w
    assert sub_w[structure.classifier] == NUM_CLASSES


def test_resnet20_residual_stream_shrinks_with_its_stage(make_model):
    """Replaces the old rule "residual widths never change": the stage's ratio now applies to
    its residual stream too (stem/downsample, every conv2 and the next stage's inputs)."""
    parent = make_model("cifar:resnet20", num_classes=NUM_CLASSES)
    sub = prune(parent, PruningVector(channels={"layer1": 0.5, "layer3": 0.3}),
                torch.zeros(1, 1, 16, 16)).module
    w = conv_widths(sub)
    assert w["conv1"] == sub.bn1.num_features == 8
    for i in range(3):
        assert w[f"layer1.{i}.conv1"] == w[f"layer1.{i}.conv2"] == 8
        assert w[f"layer2.{i}.conv1"] == w[f"layer2.{i}.conv2"] == 32  # layer2 not in the vector
        assert w[f"layer3.{i}.conv1"] == w[f"layer3.{i}.conv2"] == 20  # ceil(0.3 * 64)
    assert w["layer2.0.downsample.0"] == 32 and w["layer3.0.downsample.0"] == 20
    assert sub.layer2[0].conv1.in_channels == sub.layer2[0].downsample[0].in_channels == 8
    assert sub.fc.in_features == 20 and sub.fc.out_features == NUM_CLASSES


def test_removed_blocks_are_the_last_of_each_stage(case):
    sub, structure, vector = case["sub"], case["structure"], case["vector"]
    expected = []
    for st in structure.depth_stages:
        d = vector.depth.get(st.name, st.max_depth)
        drop = list(st.removable[len(st.removable) - (st.max_depth - d):]) if d < st.max_depth else []
        expected += drop
        container = sub.module.get_submodule(st.name)
        # Names stay: a dropped block is an nn.Identity in its old place.
        assert len(container) == st.max_depth
        assert sum(not isinstance(c, nn.Identity) for c in container) == d
        for b in drop:
            assert isinstance(sub.module.get_submodule(b), nn.Identity), b
    assert sorted(sub.spec.removed_blocks) == sorted(expected)
    assert not any(inside(n, expected) and n not in expected for n, _ in sub.module.named_modules())
    assert not any(inside(k, expected) for k in sub.module.state_dict())


def test_output_shape_at_the_vectors_resolution(case):
    sub = case["sub"]
    res = case["vector"].resolution or case["native"]
    assert sub.spec.resolution == res
    assert sub.spec.native_resolution == case["native"]
    assert sub.spec.in_channels == case["in_ch"]
    assert sub.spec.input_shape == [1, case["in_ch"], case["native"], case["native"]]
    assert not sub.module.training
    with torch.no_grad():
        out = sub.module(torch.randn(2, case["in_ch"], res, res))
    assert out.shape == (2, NUM_CLASSES)


def test_cost_drops_when_something_is_removed(case):
    parent, sub, in_ch = case["parent"], case["sub"], case["in_ch"]
    full = measure_cost(parent, in_channels=in_ch, resolution=case["native"])
    small = measure_cost(sub.module, in_channels=in_ch, resolution=sub.spec.resolution)
    structural = removes_structure(case["vector"], case["structure"])
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
    sub = prune(parent, PruningVector(channels={"layer2": 0.5}, depth={"layer3": 2}),
                torch.zeros(1, 1, 16, 16))
    for model in (parent, sub.module):
        m8 = measure_cost(model, in_channels=1, resolution=8).macs
        m16 = measure_cost(model, in_channels=1, resolution=16).macs
        assert 0.2 <= m8 / m16 <= 0.3


def test_depth_only_keeps_the_first_blocks_weights_verbatim(make_model):
    parent = make_model("cifar:resnet20")
    sub = prune(parent, PruningVector(depth={"layer2": 2}), torch.zeros(1, 1, 16, 16))
    assert sub.spec.removed_blocks == ["layer2.2"] and sub.spec.groups == {}
    kept = sub.module.layer2.state_dict()
    ref = {k: v for k, v in parent.layer2.state_dict().items() if k.split(".")[0] in {"0", "1"}}
    assert kept.keys() == ref.keys()
    for k in kept:
        assert torch.equal(kept[k], ref[k]), k
    # Nothing else changed either.
    full = parent.state_dict()
    assert all(torch.equal(v, full[k]) for k, v in sub.module.state_dict().items())


@pytest.mark.parametrize("full", ["empty", "ratios-1"])
def test_full_vector_is_an_identical_copy(make_model, full):
    parent = make_model("cifar:resnet20")
    x = torch.zeros(1, 1, 16, 16)
    structure = describe(parent, x)
    vector = PruningVector() if full == "empty" else PruningVector(
        channels={s.name: 1.0 for s in structure.channel_stages},
        depth={s.name: s.max_depth for s in structure.depth_stages})
    sub = prune(parent, vector, x, structure=structure)
    assert sub.module is not parent
    assert state_hash(sub.module) == state_hash(parent)
    assert sub.spec.removed_blocks == []
    assert sub.spec.groups == ({} if full == "empty" else
                               {g.root: g.size for s in structure.channel_stages for g in s.groups})


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(0)
    return build_model("cifar:resnet20", in_channels=1, num_classes=10).eval()


@pytest.mark.parametrize(
    ("vector", "needle"),
    [
        (PruningVector(channels={"layer1": 0.0}), "channels.layer1"),
        (PruningVector(channels={"layer1": 1.5}), "channels.layer1"),
        (PruningVector(channels={"layer1": -0.5}), "channels.layer1"),
        (PruningVector(channels={"layer9": 0.5}), "channels.layer9"),
        (PruningVector(depth={"layer9": 1}), "depth.layer9"),
        (PruningVector(depth={"layer2": 0}), "depth.layer2"),
        (PruningVector(depth={"layer2": 4}), "depth.layer2"),
        (PruningVector(channels={"layer1": 0.5}, depth={"layer2": 99}), "depth.layer2"),
        (PruningVector(heads={"layer1": 0.5}), "heads.layer1"),
        (PruningVector(resolution=0), "resolution"),
    ],
    ids=["ratio0", "ratio1.5", "ratio-neg", "ch-unknown-stage", "depth-unknown-stage",
         "depth0", "depth-too-big", "depth99-with-channels", "heads-without-attention", "resolution0"],
)
def test_invalid_vectors_raise_and_leave_parent_untouched(r20, vector, needle):
    before = (state_hash(r20), conv_widths(r20))
    with pytest.raises(PruningError, match=needle.replace(".", r"\.")):
        prune(r20, vector, torch.zeros(1, 1, 16, 16))
    assert (state_hash(r20), conv_widths(r20)) == before


def test_pruning_error_is_a_value_error():
    assert issubclass(PruningError, ValueError)


def test_unknown_importance_is_rejected(r20):
    before = state_hash(r20)
    with pytest.raises(KeyError, match="nope"):
        prune(r20, PruningVector(channels={"layer1": 0.5}), torch.zeros(1, 1, 16, 16), importance="nope")
    assert state_hash(r20) == before


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
        (64, 0.3, 8, 24),      # 20 -> 2.5 multiples -> halves round up
        (32, 0.375, 8, 16),    # 12 -> 1.5 multiples -> up
        (20, 0.5, 8, 8),       # 10 -> 1.25 multiples -> down
        (64, 0.35, 8, 24),     # 23 -> 2.875 multiples -> 24
    ],
)
def test_kept_channels(n, ratio, round_to, expected):
    assert kept_channels(n, ratio, round_to) == expected


@pytest.fixture(scope="module")
def r56():
    torch.manual_seed(0)
    parent = build_model("cifar:resnet56", in_channels=1, num_classes=10).eval()
    return parent, describe(parent, torch.zeros(1, 1, 16, 16))


def test_round_to_gives_multiples(r56):
    parent, structure = r56
    vector = PruningVector(channels={"layer1": 0.3, "layer2": 0.45, "layer3": 0.6})
    sub = prune(parent, vector, torch.zeros(1, 1, 16, 16), round_to=8, structure=structure)
    widths = conv_widths(sub.module)
    assert len(sub.spec.groups) == sum(len(s.groups) for s in structure.channel_stages)
    for stage in structure.channel_stages:
        for g in stage.groups:
            k = sub.spec.groups[g.root]
            assert k % 8 == 0 and widths[g.root] == k, (g.root, k)
            assert k == kept_channels(g.size, vector.channels[stage.name], 8)
    with torch.no_grad():
        assert sub.module(torch.randn(1, 1, 16, 16)).shape == (1, 10)


def test_round_to_8_resnet56_layer3_ratio_0_3_keeps_24(r56):
    parent, structure = r56
    sub = prune(parent, PruningVector(channels={"layer3": 0.3}), torch.zeros(1, 1, 16, 16),
                round_to=8, structure=structure)
    assert sub.spec.groups == {g.root: 24 for g in structure.channel_stage("layer3").groups}
    # Every conv of the stage (internal and residual stream) keeps 24; fc reads 24.
    assert {w for n, w in conv_widths(sub.module).items() if n.startswith("layer3.")} == {24}
    assert sub.module.fc.in_features == 24
