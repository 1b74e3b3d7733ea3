"""measure_cost: MACs and params against counts done by hand."""

import torch
from torch import nn

from prunetune.spaces import Cost, measure_cost


def tiny(res: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(4 * res * res, 3, bias=False),
    )


def test_tiny_model_matches_the_hand_count():
    res = 8
    cost = measure_cost(tiny(res), in_channels=1, resolution=res)
    conv_macs = 4 * res * res * (1 * 3 * 3)   # out positions x out channels x (in x k x k) = 2304
    linear_macs = (4 * res * res) * 3          # in_features x out_features = 768
    assert cost == Cost(macs=conv_macs + linear_macs, params=4 * 1 * 3 * 3 + 4 * res * res * 3)
    assert isinstance(cost.macs, int) and isinstance(cost.params, int)


def test_strided_conv_hand_count():
    model = nn.Sequential(nn.Conv2d(2, 6, 3, stride=2, padding=1, bias=False),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5, bias=False))
    cost = measure_cost(model, in_channels=2, resolution=10)
    # 10x10 -> 5x5 output; avg-pool output (6 values) counted by torch-pruning as well.
    conv = 6 * 5 * 5 * (2 * 3 * 3)
    linear = 6 * 5
    assert conv + linear <= cost.macs <= conv + linear + 6 * 5 * 5
    assert cost.params == 6 * 2 * 9 + 30


def test_measuring_does_not_change_the_model():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_cost(model, in_channels=1, resolution=8)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
