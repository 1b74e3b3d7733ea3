"""The small networks of the SAP paper (Diao et al., "Pruning Deep Neural Networks from a
Sparsity Perspective", ICLR 2023, arXiv 2302.05601), registered as ``paper:mlp`` and ``paper:cnn``.

- ``paper:mlp``: 2 hidden layers of 128 units with ReLU, then the classifier (the paper's "MLP").
  An ``AdaptiveAvgPool2d(28)`` in front keeps the input size fixed at 28x28 so other
  resolutions still work; at 28x28 it is the identity.
- ``paper:cnn``: stages of conv3x3 + BatchNorm + ReLU + 2x2 max-pool (no pool after the last
  stage), global average pooling and one linear classifier. The paper uses widths
  ``PAPER_CNN_WIDTHS`` = [64, 128, 256, 512]; the registered model uses ``CNN_WIDTHS``, the
  paper's widths divided by ``CNN_WIDTH_DIVISOR`` so that many prune-retrain rounds fit on a CPU.

Initialisation follows the paper's code: conv weights Kaiming-normal (fan_out, ReLU), linear
weights PyTorch's default, every bias zero, BatchNorm 1/0. It lives in the layers'
``reset_parameters``, so re-seeding and resetting every module (how the SAP policy builds its
rewind point w_init) reproduces the weights ``build_model`` gives under the same seed.

Example:
    >>> import torch
    >>> from prunetune.trainers.models import build_model
    >>> build_model("paper:cnn", in_channels=1, num_classes=10)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from prunetune.trainers.models import register_model

MLP_HIDDEN = 128
MLP_LAYERS = 2
MLP_INPUT_SIZE = 28

PAPER_CNN_WIDTHS = (64, 128, 256, 512)
CNN_WIDTH_DIVISOR = 4
CNN_WIDTHS = tuple(w // CNN_WIDTH_DIVISOR for w in PAPER_CNN_WIDTHS)  # (16, 32, 64, 128)


class PaperConv2d(nn.Conv2d):
    """Conv2d initialised as the paper's code: Kaiming-normal weights (fan_out, ReLU), zero bias."""

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class PaperLinear(nn.Linear):
    """Linear with PyTorch's default weight initialisation and a zero bias, as the paper's code."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def paper_mlp(in_channels: int, num_classes: int, *, hidden: int = MLP_HIDDEN,
              layers: int = MLP_LAYERS) -> nn.Sequential:
    """Pool to 28x28, flatten, ``layers`` x (Linear(hidden) + ReLU), Linear(num_classes)."""
    blocks: list[nn.Module] = [nn.AdaptiveAvgPool2d(MLP_INPUT_SIZE), nn.Flatten()]
    width = in_channels * MLP_INPUT_SIZE * MLP_INPUT_SIZE
    for _ in range(layers):
        blocks += [PaperLinear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    blocks.append(PaperLinear(width, num_classes))
    return nn.Sequential(*blocks)


class PaperCNN(nn.Module):
    """conv3x3-BN-ReLU-maxpool stages (last stage unpooled), global average pool, linear head."""

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = CNN_WIDTHS) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        width_in = in_channels
        for i, width in enumerate(widths):
            stages += [PaperConv2d(width_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                stages.append(nn.MaxPool2d(2))
            width_in = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = PaperLinear(width_in, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


@register_model("paper:mlp")
def _mlp(*, in_channels: int, num_classes: int) -> nn.Module:
    """SAP paper MLP: 2 hidden layers of 128 units (28x28 input)."""
    return paper_mlp(in_channels, num_classes)


@register_model("paper:cnn")
def _cnn(*, in_channels: int, num_classes: int) -> nn.Module:
    """SAP paper CNN with widths CNN_WIDTHS (the paper's [64, 128, 256, 512] / CNN_WIDTH_DIVISOR)."""
    return PaperCNN(in_channels, num_classes)
