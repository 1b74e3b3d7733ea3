"""Switched-off channel groups and bypassed blocks compute what the physically pruned network
computes, so iterative policies can work in the parent's coordinates and remove at the end."""

import copy

import pytest
import torch

from prunetune.spaces import PruningError, describe, exact_vector, prune
from prunetune.spaces.blocks import bypass
from prunetune.spaces.masks import apply_masks, group_masks, merge


def _fit_bn(model, x):
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.mark.parametrize("name,size", [("cifar:resnet20", 16), ("torchvision:mobilenet_v2", 32)])
def test_masked_equals_physically_pruned(make_model, name, size):
    model = make_model(name)
    x = torch.randn(8, 1, size, size)
    _fit_bn(model, x)
    example = torch.zeros(1, 1, size, size)
    s = describe(model, example)
    groups = [g for st in s.channel_stages for g in st.groups]
    keep = {g.root: [i for i in range(g.size) if i % 3] for g in groups}
    off = {r: sorted(set(range(g.size)) - set(keep[r])) for r, g in ((g.root, g) for g in groups)}
    masked = copy.deepcopy(model)
    apply_masks(masked, group_masks(masked, example, off, ignored=(s.classifier,)))
    removed = [st.removable[-1] for st in s.depth_stages][:1]
    if removed:
        masked = bypass(masked, removed)
    keep = {r: k for r, k in keep.items() if not any(r.startswith(b + ".") for b in removed)}
    pruned = prune(masked, exact_vector(s, removed, keep), example, structure=s, drop_blocks=removed, keep=keep)
    torch.testing.assert_close(pruned.module(x), masked(x), atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in pruned.module.parameters()) < sum(p.numel() for p in model.parameters())
    assert pruned.spec.groups == {r: len(k) for r, k in keep.items()}


def test_masks_cover_every_coupled_slice(make_model):
    model = make_model("cifar:resnet20")
    example = torch.zeros(1, 1, 16, 16)
    masks = group_masks(model, example, {"layer1.0.conv1": [0, 5]})
    # producer rows, its BN and the consumer's input columns
    assert set(masks) == {"layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias", "layer1.0.conv2.weight"}
    assert not masks["layer1.0.conv2.weight"][:, [0, 5]].any() and masks["layer1.0.conv2.weight"][:, 1:5].all()
    both = merge(masks, group_masks(model, example, {"layer1.0.conv1": [1]}))
    assert int((~both["layer1.0.bn1.weight"]).sum()) == 3
    kept = sum(int(m.count_nonzero()) for m in both.values())
    total = sum(m.numel() for m in both.values())
    assert 0 < kept < total


def test_unknown_root_and_bad_keep_are_named(make_model):
    model = make_model("cifar:resnet20")
    example = torch.zeros(1, 1, 16, 16)
    with pytest.raises(PruningError, match="layer9.conv"):
        group_masks(model, example, {"layer9.conv": [0]})
    s = describe(model, example)
    with pytest.raises(PruningError, match="keep.nowhere"):
        exact_vector(s, [], {"nowhere": [0]})
    v = exact_vector(s, [], {"layer1.0.conv1": [0, 1, 2, 3]})
    with pytest.raises(PruningError, match="keep.layer1.0.conv1: 3 channels given"):
        prune(model, v, example, structure=s, keep={"layer1.0.conv1": [0, 1, 2]})
    with pytest.raises(PruningError, match="drop_blocks: 'layer1.7'"):
        prune(model, v, example, structure=s, drop_blocks=["layer1.7"])
