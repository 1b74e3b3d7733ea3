"""The generic engine's contracts: errors name the key, nothing half-pruned, specs are checked."""

import pytest
import torch

from prunetune.spaces.engine import describe, prune, rebuild
from prunetune.spaces.common import PruningError
from prunetune.spaces.vector import PruningVector
from prunetune.trainers.models import build_model
from prunetune.trainers.zoo import ARCHS

X = torch.zeros(1, 1, 16, 16)


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    model = build_model("cifar:resnet20", in_channels=1, num_classes=10).eval()
    return model, describe(model, X)


def test_resnet_stages_blocks_and_groups(resnet20):
    _, s = resnet20
    assert [c.name for c in s.channel_stages] == ["layer1", "layer2", "layer3"]
    assert [d.name for d in s.depth_stages] == ["layer1", "layer2", "layer3"]
    assert s.depth_stage("layer2").min_depth == 1 and s.depth_stage("layer1").max_depth == 3
    assert s.classifier == "fc"
    assert any(g.coupled for g in s.channel_stage("layer1").groups)  # the residual stream


@pytest.mark.parametrize("vector,key", [
    (PruningVector(channels={"layer9": 0.5}), "channels.layer9"),
    (PruningVector(channels={"layer1": 0.0}), "channels.layer1"),
    (PruningVector(channels={"layer1": 1.5}), "channels.layer1"),
    (PruningVector(depth={"layer2": 0}), "depth.layer2"),
    (PruningVector(depth={"layer2": 4}), "depth.layer2"),
    (PruningVector(heads={"layer1": 0.5}), "heads.layer1"),
    (PruningVector(resolution=0), "resolution"),
])
def test_bad_vector_names_the_key_and_leaves_parent_untouched(resnet20, vector, key):
    model, s = resnet20
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=key.replace(".", r"\.")):
        prune(model, vector, X, structure=s)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_round_to_and_coupled_groups(resnet20):
    model, s = resnet20
    p = prune(model, PruningVector(channels={"layer3": 0.3}), X, structure=s, round_to=8)
    assert set(p.spec.groups.values()) == {24}
    assert p.module.layer3[0].conv2.out_channels == 24  # residual stream of the stage pruned too


def test_tampered_spec_is_refused(resnet20):
    model, s = resnet20
    p = prune(model, PruningVector(channels={"layer2": 0.5}), X, structure=s)
    bad = p.spec.model_copy(update={"groups": {**p.spec.groups, "layer2.1.conv1": 5}})
    with pytest.raises(PruningError, match="groups.layer2.1.conv1"):
        rebuild(build_model("cifar:resnet20", in_channels=1, num_classes=10), bad)


@pytest.mark.parametrize("criterion", ["position", "weight_norm", "kl", "cka"])
def test_block_criteria_choose_removed_blocks(resnet20, criterion):
    model, s = resnet20
    probes = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    p = prune(model, PruningVector(depth={"layer1": 1}), X, structure=s, block_criterion=criterion, probes=probes)
    assert len(p.spec.removed_blocks) == 2 and all(b.startswith("layer1.") for b in p.spec.removed_blocks)
    r = rebuild(build_model("cifar:resnet20", in_channels=1, num_classes=10), p.spec)
    r.load_state_dict(p.module.state_dict())


def test_vit_heads_are_really_removed():
    arch = ARCHS["torchvision:vit_b_16"]
    torch.manual_seed(0)
    model = arch.build().eval()
    s = describe(model, arch.example_input())
    (stage,) = [c for c in s.channel_stages if c.attention]
    p = prune(model, PruningVector(heads={stage.name: 0.25}), arch.example_input(), structure=s)
    attn = p.module.encoder.layers[0].self_attention
    assert attn.num_heads == 3 and attn.q_proj.out_features == 3 * 64


def test_per_group_ratio_overrides_the_stage_ratio(resnet20):
    model, s = resnet20
    p = prune(model, PruningVector(channels={"layer2": 0.5, "layer2.1.conv1": 0.25}), X, structure=s)
    assert p.spec.groups["layer2.1.conv1"] == 8 and p.spec.groups["layer2.2.conv1"] == 16
    r = rebuild(build_model("cifar:resnet20", in_channels=1, num_classes=10), p.spec)
    r.load_state_dict(p.module.state_dict())


def test_group_granularity_distributions(resnet20):
    from prunetune.spaces import SpaceConfig, optuna_distributions

    _, s = resnet20
    dists = optuna_distributions(s, SpaceConfig(granularity="group"))
    roots = {g.root for c in s.channel_stages for g in c.groups}
    assert {k[3:] for k in dists if k.startswith("ch.")} == roots


def test_taylor_uses_gradients_and_is_deterministic(resnet20):
    model, s = resnet20
    probes = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    v = PruningVector(channels={"layer2": 0.5})
    a = prune(model, v, X, structure=s, importance="taylor", probes=probes).module
    b = prune(model, v, X, structure=s, importance="taylor", probes=probes).module
    c = prune(model, v, X, structure=s, importance="l2").module
    assert torch.equal(a.layer2[1].conv1.weight, b.layer2[1].conv1.weight)
    assert not torch.equal(a.layer2[1].conv1.weight, c.layer2[1].conv1.weight)
    assert all(p.grad is None for p in a.parameters())
