"""Model registry: named factories for the networks a search can prune.

Names are either registered here (``@register_model("cifar:resnet56")``, like timm) or
``"torchvision:<name>"`` for any torchvision classification model, always built without
weights. Every factory takes ``in_channels`` and ``num_classes`` so one config drives all.

Example:
    >>> model = build_model("cifar:resnet20", in_channels=1, num_classes=10)
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable

import torch
import torchvision
from torch import nn

ModelFactory = Callable[..., nn.Module]

TORCHVISION_PREFIX = "torchvision:"

_REGISTRY: dict[str, ModelFactory] = {}


class UnknownModelError(KeyError):
    """Raised for a model name that is neither registered nor a torchvision model."""

    def __init__(self, name: str, candidates: list[str]) -> None:
        self.name = name
        close = _close_matches(name, candidates)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        self.message = (
            f"unknown model {name!r}.{hint} Known: {', '.join(model_names())}, "
            f"or '{TORCHVISION_PREFIX}<name>' for a torchvision classification model."
        )
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory(*, in_channels, num_classes) -> nn.Module`` under ``name``.

    Example:
        >>> @register_model("toy:linear")
        ... def toy(*, in_channels, num_classes):
        ...     return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
    """
    if name.startswith(TORCHVISION_PREFIX):
        raise ValueError(f"{TORCHVISION_PREFIX!r} names are reserved for torchvision models")

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def model_names(*, include_torchvision: bool = False) -> list[str]:
    """Sorted registered names.

    Any torchvision classification model also works as ``"torchvision:<name>"``; pass
    ``include_torchvision=True`` to list those too.
    """
    names = sorted(_REGISTRY, key=_natural_key)
    if include_torchvision:
        names += [TORCHVISION_PREFIX + n for n in _torchvision_names()]
    return names


def is_known_model(name: str) -> bool:
    """True when ``build_model(name, ...)`` can resolve ``name``."""
    if name in _REGISTRY:
        return True
    return name.startswith(TORCHVISION_PREFIX) and (
        name.removeprefix(TORCHVISION_PREFIX) in _torchvision_names()
    )


def build_model(name: str, *, in_channels: int, num_classes: int) -> nn.Module:
    """Build a freshly initialised model (never downloads weights)."""
    if name in _REGISTRY:
        return _REGISTRY[name](in_channels=in_channels, num_classes=num_classes)
    if is_known_model(name):
        return _build_torchvision(
            name.removeprefix(TORCHVISION_PREFIX), in_channels=in_channels, num_classes=num_classes
        )
    raise UnknownModelError(name, model_names(include_torchvision=True))


def _natural_key(name: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _close_matches(name: str, candidates: list[str], n: int = 5) -> list[str]:
    """Candidates whose part after the namespace (``cifar:``) resembles ``name``'s."""
    tail = name.rpartition(":")[2]
    scored = []
    for cand in candidates:
        ratio = difflib.SequenceMatcher(None, tail, cand.rpartition(":")[2]).ratio()
        if ratio >= 0.6:
            scored.append((-ratio, cand))
    return [cand for _, cand in sorted(scored)[:n]]


def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _build_torchvision(name: str, *, in_channels: int, num_classes: int) -> nn.Module:
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d (module order) for one reading ``in_channels`` channels."""
    path, old = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, new)


class BasicBlock(nn.Module):
    """Two 3x3 convs plus a shortcut; a 1x1 conv + BN shortcut when the shape changes.

    Attribute names match torchvision's BasicBlock so pruning code treats both alike.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class CifarResNet(nn.Module):
    """ResNet for small images (He et al. 2016, sec. 4.2): 6n+2 layers, widths 16/32/64.

    3x3 stride-1 stem and no max-pool; adaptive pooling so any input resolution works.
    Top-level attribute names mirror torchvision's ResNet (conv1, bn1, relu, layer1..3,
    avgpool, fc).
    """

    def __init__(self, n: int, *, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _register_cifar_resnet(depth: int) -> None:
    n = (depth - 2) // 6

    @register_model(f"cifar:resnet{depth}")
    def factory(*, in_channels: int, num_classes: int) -> nn.Module:
        return CifarResNet(n, in_channels=in_channels, num_classes=num_classes)

    factory.__doc__ = f"CIFAR ResNet-{depth} ({n} BasicBlocks per stage)."


for _depth in (8, 20, 32, 56, 110):
    _register_cifar_resnet(_depth)

from prunetune.trainers import paper_models as _paper_models  # noqa: E402,F401  (registration)
