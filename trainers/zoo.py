"""The architectures prunetune's engine is tested and documented on (the coverage matrix).

Each entry builds a randomly initialised model and a small example input, so the
registry-driven test (tests/spaces/test_coverage.py) and the generated docs/coverage.md
cover every registered architecture. Register one with `@register_arch("name")`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from prunetune.trainers.models import build_model


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], nn.Module]
    example_input: Callable[[], torch.Tensor]
    resolution: int | None          # a smaller input resolution to try, None when not an image model


ARCHS: dict[str, Arch] = {}


def register_arch(name: str, *, input_shape: tuple[int, ...], resolution: int | None,
                  dtype: torch.dtype = torch.float32):
    def deco(build: Callable[[], nn.Module]):
        def example() -> torch.Tensor:
            if dtype == torch.long:
                return torch.randint(0, 100, input_shape, generator=torch.Generator().manual_seed(0))
            return torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
        ARCHS[name] = Arch(name, build, example, resolution)
        return build
    return deco


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None, num_classes=10, **kw)


for _name in ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2",
              "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny",
              "densenet121", "vgg11_bn", "squeezenet1_0", "shufflenet_v2_x1_0"):
    register_arch(f"torchvision:{_name}", input_shape=(1, 3, 64, 64), resolution=48)(_tv(_name))
register_arch("torchvision:googlenet", input_shape=(1, 3, 64, 64), resolution=48)(
    _tv("googlenet", aux_logits=False, init_weights=True))
register_arch("torchvision:vit_b_16", input_shape=(1, 3, 64, 64), resolution=48)(_tv("vit_b_16", image_size=64))
register_arch("torchvision:swin_t", input_shape=(1, 3, 64, 64), resolution=48)(_tv("swin_t"))
for _depth in (20, 56):
    register_arch(f"cifar:resnet{_depth}", input_shape=(1, 3, 32, 32), resolution=24)(
        lambda d=_depth: build_model(f"cifar:resnet{d}", in_channels=3, num_classes=10))


class LSTMClassifier(nn.Module):
    """A small text classifier: token embedding -> LSTM -> linear on the last time step."""

    def __init__(self, vocab: int = 100, embed: int = 32, hidden: int = 64, num_classes: int = 4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(tokens))
        return self.fc(out[:, -1])


register_arch("text:lstm", input_shape=(1, 16), resolution=None, dtype=torch.long)(LSTMClassifier)
