"""A subnet on disk (subnet.json + weights.safetensors) rebuilds exactly, without unpickling.

`rebuild(skeleton, spec)` replays a spec from `prune` on a freshly built parent (first-k
channels; the saved weights are loaded afterwards) and refuses a spec that does not match
its own vector, naming `groups.<root>` or `widths`.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

from prunetune.spaces import (
    PruningError,
    PruningVector,
    SubnetSpec,
    describe,
    example_from_spec,
    load_subnet,
    prune,
    rebuild,
    save_subnet,
    state_hash,
)
from prunetune.spaces.spec import SPEC_FILE, WEIGHTS_FILE

# key: (model name, in_channels, native resolution, vector or structure -> vector, block criterion)
CASES = {
    "r20": ("cifar:resnet20", 1, 16, PruningVector(
        channels={"layer1": 0.5, "layer3": 0.3}, depth={"layer2": 1}, resolution=12), "position"),
    "r20-weight-norm": ("cifar:resnet20", 1, 16, PruningVector(
        channels={"layer2": 0.5}, depth={"layer1": 2, "layer3": 2}), "weight_norm"),
    "r8-one-block-stages": ("cifar:resnet8", 3, 16, lambda s: PruningVector(
        channels={s.channel_stages[1].name: 0.25}), "position"),
    "tv-r18": ("torchvision:resnet18", 3, 32, PruningVector(
        channels={"layer1": 0.5, "layer3": 0.25}, depth={"layer4": 1}), "position"),
}


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def trained_like(model):
    """Give BN running stats non-trivial values so a wrong buffer would show in outputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.fixture
def saved(make_model, tmp_path):
    def _saved(key):
        name, in_ch, native, vector, criterion = CASES[key]
        parent = trained_like(make_model(name, in_channels=in_ch)).eval()
        x = torch.zeros(1, in_ch, native, native)
        structure = describe(parent, x)
        vector = vector(structure) if callable(vector) else vector
        sub = prune(parent, vector, x, model_name=name, structure=structure, block_criterion=criterion)
        out = save_subnet(tmp_path / key, sub.spec, sub.module)
        return name, in_ch, sub, out, parent
    return _saved


@pytest.mark.parametrize("key", list(CASES))
def test_save_load_rebuild_gives_the_same_function(saved, make_model, key, monkeypatch):
    name, in_ch, sub, out, _ = saved(key)
    assert {p.name for p in out.iterdir()} == {SPEC_FILE, WEIGHTS_FILE}

    def no_pickle(*a, **k):
        raise AssertionError("load_subnet must not use torch.load")
    monkeypatch.setattr(torch, "load", no_pickle)
    spec, state = load_subnet(out)
    assert spec == sub.spec

    # A freshly built parent with other random weights: structure comes from the spec only.
    skeleton = make_model(name, in_channels=in_ch, seed=123)
    model = rebuild(skeleton, spec)
    model.load_state_dict(state, strict=True)
    model.eval()

    res = spec.resolution
    x = torch.randn(3, in_ch, res, res, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - sub.module(x)).abs().max().item()
    assert diff <= 1e-6


def test_rebuild_is_deterministic_and_leaves_the_skeleton_alone(saved, make_model):
    name, in_ch, sub, out, _ = saved("r20")
    spec, _ = load_subnet(out)
    skeleton = make_model(name, in_channels=in_ch)
    before = (shapes(skeleton), state_hash(skeleton))
    a, b = rebuild(skeleton, spec), rebuild(skeleton, spec)
    assert shapes(a) == shapes(b) == shapes(sub.module)
    assert list(a.state_dict()) == list(sub.module.state_dict())
    assert (shapes(skeleton), state_hash(skeleton)) == before


def test_weights_file_is_safetensors(saved):
    _, _, sub, out, _ = saved("r20")
    raw = (out / WEIGHTS_FILE).read_bytes()
    # safetensors: u64 little-endian header length, then a JSON header, then raw tensor bytes.
    (n,) = struct.unpack("<Q", raw[:8])
    assert 0 < n < len(raw)
    header = json.loads(raw[8:8 + n])
    state = sub.module.state_dict()
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert set(tensors) == set(state)
    for k, v in state.items():
        assert tuple(tensors[k]["shape"]) == tuple(v.shape), k
    # Not a pickle (0x80 protocol byte) nor a torch zip archive.
    assert raw[:1] != b"\x80" and raw[:2] != b"PK"


def test_subnet_json_round_trips_through_the_spec_model(saved):
    _, _, sub, out, parent = saved("r20")
    data = json.loads((out / SPEC_FILE).read_text())
    assert set(data) == set(SubnetSpec.model_fields)
    assert data["vector"] == {"channels": {"layer1": 0.5, "layer3": 0.3},
                              "depth": {"layer2": 1}, "heads": {}, "resolution": 12}
    # Position criterion: the last blocks go, the last one first.
    assert data["removed_blocks"] == ["layer2.2", "layer2.1"]
    assert data["groups"] == {
        "conv1": 8, "layer1.0.conv1": 8, "layer1.1.conv1": 8, "layer1.2.conv1": 8,
        "layer3.0.downsample.0": 20, "layer3.0.conv1": 20, "layer3.1.conv1": 20, "layer3.2.conv1": 20}
    assert data["widths"]["layer1.0.conv2"] == 8 and data["widths"]["fc"] == 10
    assert {k: data[k] for k in ("engine", "heads", "block_criterion", "input_shape", "input_dtype",
                                 "parent_args", "parent_id", "resolution", "native_resolution",
                                 "in_channels", "round_to", "importance", "seed")} == {
        "engine": "generic", "heads": {}, "block_criterion": "position", "input_shape": [1, 1, 16, 16],
        "input_dtype": "float32", "parent_args": {}, "parent_id": "cifar:resnet20", "resolution": 12,
        "native_resolution": 16, "in_channels": 1, "round_to": 1, "importance": "l2", "seed": 0}
    assert data["parent_hash"] == state_hash(parent)
    assert SubnetSpec.model_validate(data) == sub.spec
    assert SubnetSpec.model_validate_json(sub.spec.model_dump_json()) == sub.spec
    # parent_args (filled by the CLI) survive the round trip too.
    with_args = sub.spec.model_copy(update={"parent_args": {"in_channels": 1, "num_classes": 10}})
    assert SubnetSpec.model_validate_json(with_args.model_dump_json()) == with_args
    example = example_from_spec(sub.spec)
    assert example.shape == (1, 1, 16, 16) and example.dtype == torch.float32


def test_spec_rejects_unknown_fields(saved):
    _, _, sub, _, _ = saved("r8-one-block-stages")
    data = json.loads(sub.spec.model_dump_json())
    data["surprise"] = 1
    with pytest.raises(ValueError, match="surprise"):
        SubnetSpec.model_validate(data)


def refused(make_model, name, in_ch, spec, match):
    with pytest.raises(PruningError, match=match) as err:
        rebuild(make_model(name, in_channels=in_ch), spec)
    return str(err.value)


@pytest.mark.parametrize(
    ("layer", "value"),
    [
        ("layer1.0.conv2", 15),   # residual stream of a pruned stage: 8 in the spec
        ("fc", 11),
        ("layer1.0.conv1", 20),   # wider than the parent
        ("layer3.0.downsample.0", 32),
        ("layer2.0.conv1", 16),   # internal width of an unpruned stage (32 in parent and subnet)
    ],
)
def test_tampered_width_is_refused(saved, make_model, layer, value):
    name, in_ch, sub, _, _ = saved("r20")
    widths = dict(sub.spec.widths)
    widths[layer] = value
    msg = refused(make_model, name, in_ch, sub.spec.model_copy(update={"widths": widths}), "widths")
    assert layer in msg


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_missing_or_extra_width_is_refused(saved, make_model, change):
    name, in_ch, sub, _, _ = saved("r20")
    widths = dict(sub.spec.widths)
    layer = "layer1.1.conv1" if change == "missing" else "layer2.2.conv1"  # layer2.2 was removed
    if change == "missing":
        del widths[layer]
    else:
        widths[layer] = 32
    msg = refused(make_model, name, in_ch, sub.spec.model_copy(update={"widths": widths}), "widths")
    assert layer in msg


@pytest.mark.parametrize(
    ("groups", "needle"),
    [
        (lambda g: {**g, "layer3.1.conv1": 21}, r"groups\.layer3\.1\.conv1"),   # other count
        (lambda g: {k: v for k, v in g.items() if k != "conv1"}, r"groups\.conv1"),  # missing
        (lambda g: {**g, "layer2.1.conv1": 32}, r"groups.*layer2\.1\.conv1"),   # unpruned stage
        (lambda g: {**g, "layer2.2.conv1": 16}, r"groups.*layer2\.2\.conv1"),   # in a removed block
    ],
    ids=["count", "missing", "extra", "removed-block"],
)
def test_tampered_groups_are_refused(saved, make_model, groups, needle):
    name, in_ch, sub, _, _ = saved("r20")
    spec = sub.spec.model_copy(update={"groups": groups(dict(sub.spec.groups))})
    refused(make_model, name, in_ch, spec, needle)


def test_tampered_vector_is_refused(saved, make_model):
    name, in_ch, sub, _, _ = saved("r20")
    vector = sub.spec.vector.model_copy(update={"channels": {"layer1": 0.25, "layer3": 0.3}})
    refused(make_model, name, in_ch, sub.spec.model_copy(update={"vector": vector}), r"groups\.conv1")


@pytest.mark.parametrize(
    "removed",
    [["layer2.2"], [], ["layer2.1", "layer1.2"], ["layer2.2", "layer3.2"]],
    ids=["one-block-back", "none", "other-blocks", "one-more"],
)
def test_tampered_removed_blocks_are_refused(saved, make_model, removed):
    """The recorded widths (and groups) no longer match the blocks the spec says it removed."""
    name, in_ch, sub, _, _ = saved("r20")
    spec = sub.spec.model_copy(update={"removed_blocks": removed})
    refused(make_model, name, in_ch, spec, "widths|groups|removed_blocks")


def _drop(mapping, blocks):
    return {k: v for k, v in mapping.items() if not any(k.startswith(b + ".") for b in blocks)}


@pytest.mark.parametrize(
    "removed",
    [["layer2.2", "layer2.1", "layer3.2"],   # vector says depth.layer3 == 3: accepted anyway
     ["layer2.2", "layer2.1", "layer2.0"],   # layer2.0 is not removable: raw RuntimeError
     ["layer2.2", "layer2.9"]],              # no such block: plain ValueError
    ids=["consistent-extra-block", "non-removable-block", "unknown-block"],
)
def test_removed_blocks_must_match_the_vector(saved, make_model, removed):
    """Tamper removed_blocks together with widths and groups so that only a check of
    removed_blocks against the vector (depth per stage, removable blocks) can refuse it."""
    name, in_ch, sub, _, _ = saved("r20")
    spec = sub.spec.model_copy(update={"removed_blocks": removed,
                                       "widths": _drop(sub.spec.widths, removed),
                                       "groups": _drop(dict(sub.spec.groups), removed)})
    refused(make_model, name, in_ch, spec, "removed_blocks|depth")


@pytest.mark.parametrize("other", ["cifar:resnet8", "cifar:resnet32"])
def test_rebuild_on_another_architecture_is_refused(saved, make_model, other):
    _, in_ch, sub, _, _ = saved("r20")
    with pytest.raises(PruningError):
        rebuild(make_model(other, in_channels=in_ch), sub.spec)
