"""Shared fixture for the `spaces` tests: real registry models, random init, fixed seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunetune.trainers.models import build_model


@pytest.fixture
def make_model():
    """`make_model(name, in_channels=1, num_classes=10, seed=0)`; never downloads weights."""

    def _make(name: str, in_channels: int = 1, num_classes: int = 10, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(name, in_channels=in_channels, num_classes=num_classes)

    return _make
