"""Generated from the architecture registry (trainers/zoo.py): every registered model is
described, pruned at channel ratio 0.5 (plus depth, heads and resolution where it has them),
rebuilt from its spec and reloaded with identical outputs. Registering a model tests it."""

import warnings

import pytest
import torch

from prunetune.spaces.cost import measure_cost
from prunetune.spaces.engine import describe, prune, rebuild
from prunetune.spaces.vector import PruningVector
from prunetune.trainers.zoo import ARCHS

warnings.filterwarnings("ignore", message=".*Unwrapped parameters.*")

# Architectures whose channels the backend cannot prune today, and why (reported in docs/coverage.md).
NO_CHANNELS = {"torchvision:shufflenet_v2_x1_0": "channel shuffle"}


def half_vector(structure, arch) -> PruningVector:
    return PruningVector(
        channels={s.name: 0.5 for s in structure.channel_stages if s.groups},
        heads={s.name: 0.5 for s in structure.channel_stages if s.attention},
        depth={s.name: s.max_depth - 1 for s in structure.depth_stages},
        resolution=arch.resolution if structure.resolution_adaptable else None,
    )


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_prune_rebuild_roundtrip(name):
    torch.manual_seed(0)
    arch = ARCHS[name]
    parent = arch.build().eval()
    x = arch.example_input()
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    structure = describe(parent, x)
    if name in NO_CHANNELS:
        assert not structure.channel_stages and structure.channel_error
        return
    assert structure.channel_stages, f"{name}: no prunable channel stage found"
    vector = half_vector(structure, arch)
    pruned = prune(parent, vector, x, model_name=name, structure=structure)
    xr = x if vector.resolution is None else torch.randn(2, x.shape[1], vector.resolution, vector.resolution)
    with torch.no_grad():
        y = pruned.module(xr)
    assert y.shape[-1] == parent(x).shape[-1]
    cost_parent = measure_cost(parent, example_input=x)
    cost = measure_cost(pruned.module, example_input=xr[:1])
    assert cost.macs < cost_parent.macs and cost.params < cost_parent.params
    assert all(torch.equal(before[k], v) for k, v in parent.state_dict().items()), "parent modified"
    torch.manual_seed(1)
    rebuilt = rebuild(arch.build(), pruned.spec)
    rebuilt.load_state_dict(pruned.module.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(xr), y, atol=1e-5)


def test_the_issue_list_is_covered():
    wanted = {"resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2",
              "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny",
              "densenet121", "vgg11_bn", "squeezenet1_0", "shufflenet_v2_x1_0", "googlenet",
              "vit_b_16", "swin_t"}
    assert {f"torchvision:{n}" for n in wanted} <= set(ARCHS)
    assert any(n.startswith("cifar:") for n in ARCHS) and "text:lstm" in ARCHS
