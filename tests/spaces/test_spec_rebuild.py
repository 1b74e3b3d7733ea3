"""A subnet on disk (subnet.json + weights.safetensors) rebuilds exactly, without unpickling."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from prunetune.spaces import (
    PruningError,
    PruningVector,
    SubnetSpec,
    load_subnet,
    materialize,
    rebuild,
    save_subnet,
)
from prunetune.spaces.spec import SPEC_FILE, WEIGHTS_FILE

CASES = {
    "r20": ("cifar:resnet20", 1, 16, PruningVector(
        channels={"layer1": 0.5, "layer3": 0.3}, depth={"layer2": 1}, resolution=12)),
    "r8-bn-only-stage": ("cifar:resnet8", 3, 16, PruningVector(channels={"layer2": 0.25})),
    "tv-r18": ("torchvision:resnet18", 3, 32, PruningVector(
        channels={"layer1": 0.5, "layer3": 0.25}, depth={"layer4": 1})),
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
        name, in_ch, native, vector = CASES[key]
        parent = trained_like(make_model(name, in_channels=in_ch))
        sub = materialize(parent, vector, in_channels=in_ch, native_resolution=native,
                          parent_id=name)
        out = save_subnet(tmp_path / key, sub.spec, sub.module)
        return name, in_ch, sub, out
    return _saved


@pytest.mark.parametrize("key", list(CASES))
def test_save_load_rebuild_gives_the_same_function(saved, make_model, key, monkeypatch):
    name, in_ch, sub, out = saved(key)
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
    name, in_ch, sub, out = saved("r20")
    spec, _ = load_subnet(out)
    skeleton = make_model(name, in_channels=in_ch)
    before = shapes(skeleton)
    a, b = rebuild(skeleton, spec), rebuild(skeleton, spec)
    assert shapes(a) == shapes(b) == shapes(sub.module)
    assert list(a.state_dict()) == list(sub.module.state_dict())
    assert shapes(skeleton) == before


def test_weights_file_is_safetensors(saved):
    _, _, sub, out = saved("r20")
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
    _, _, sub, out = saved("r20")
    data = json.loads((out / SPEC_FILE).read_text())
    assert set(data) == set(SubnetSpec.model_fields)
    assert data["vector"] == {"channels": {"layer1": 0.5, "layer3": 0.3},
                              "depth": {"layer2": 1}, "heads": {}, "resolution": 12}
    assert data["removed_blocks"] == ["layer2.1", "layer2.2"]
    assert SubnetSpec.model_validate(data) == sub.spec
    assert SubnetSpec.model_validate_json(sub.spec.model_dump_json()) == sub.spec


def test_spec_rejects_unknown_fields(saved):
    _, _, sub, _ = saved("r8-bn-only-stage")
    data = json.loads(sub.spec.model_dump_json())
    data["surprise"] = 1
    with pytest.raises(ValueError, match="surprise"):
        SubnetSpec.model_validate(data)


@pytest.mark.parametrize(
    ("layer", "value"),
    [
        ("layer1.0.conv2", 15),   # residual-stream width is never pruned by rebuild
        ("fc", 11),
        ("layer1.0.conv1", 20),   # wider than the parent
        ("layer3.0.downsample.0", 32),
    ],
)
def test_tampered_width_is_refused(saved, make_model, layer, value):
    name, in_ch, sub, _ = saved("r20")
    widths = dict(sub.spec.widths)
    widths[layer] = value
    spec = sub.spec.model_copy(update={"widths": widths})
    with pytest.raises(PruningError, match="widths") as err:
        rebuild(make_model(name, in_channels=in_ch), spec)
    assert layer in str(err.value)


def test_missing_width_is_refused(saved, make_model):
    name, in_ch, sub, _ = saved("r20")
    widths = dict(sub.spec.widths)
    del widths["layer1.1.conv1"]
    with pytest.raises(PruningError, match=r"widths\.layer1\.1\.conv1"):
        rebuild(make_model(name, in_channels=in_ch), sub.spec.model_copy(update={"widths": widths}))


def test_tampered_removed_blocks_are_refused(saved, make_model):
    name, in_ch, sub, _ = saved("r20")
    spec = sub.spec.model_copy(update={"removed_blocks": ["layer2.2"]})
    with pytest.raises(PruningError, match="removed_blocks"):
        rebuild(make_model(name, in_channels=in_ch), spec)


def test_rebuild_on_another_architecture_is_refused(saved, make_model):
    _, in_ch, sub, _ = saved("r20")
    with pytest.raises(PruningError):
        rebuild(make_model("cifar:resnet8", in_channels=in_ch), sub.spec)


def test_tampered_internal_width_of_an_unpruned_stage_is_refused(saved, make_model):
    name, in_ch, sub, _ = saved("r20")
    assert "layer2" not in sub.spec.vector.channels
    widths = dict(sub.spec.widths)
    widths["layer2.0.conv1"] = 16  # parent and subnet: 32
    with pytest.raises(PruningError, match="widths"):
        rebuild(make_model(name, in_channels=in_ch), sub.spec.model_copy(update={"widths": widths}))
