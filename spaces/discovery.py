"""Find the searchable structure of a model: stages, their blocks, and prunable convs.

A stage is an `nn.Sequential` whose children are all residual blocks. This first engine
recognises ResNet-style blocks (a `downsample` attribute next to `conv1`): torchvision's
BasicBlock/Bottleneck and prunetune's CIFAR ResNets. Inside a block every conv except the
last one (which writes into the residual stream) is "internal" and can lose channels
without touching the stage's residual width.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Stage:
    """A run of residual blocks; `blocks` are qualified module names in forward order."""

    name: str
    blocks: tuple[str, ...]
    internal_convs: tuple[tuple[str, ...], ...]  # per block, the convs whose outputs may shrink

    @property
    def max_depth(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True)
class ModelSpace:
    """Everything a vector can address in one model."""

    stages: tuple[Stage, ...]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)


def is_residual_block(module: nn.Module) -> bool:
    return hasattr(module, "downsample") and isinstance(getattr(module, "conv1", None), nn.Conv2d)


def _internal_convs(block_name: str, block: nn.Module) -> tuple[str, ...]:
    convs = [(n, m) for n, m in block.named_modules()
             if isinstance(m, nn.Conv2d) and not n.startswith("downsample")]
    return tuple(f"{block_name}.{n}" for n, _ in convs[:-1])


def discover(model: nn.Module) -> ModelSpace:
    """Return the stages of `model`; raises ValueError when it has none this engine knows."""
    stages = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and len(module) > 0 and all(
            is_residual_block(b) for b in module
        ):
            blocks = tuple(f"{name}.{i}" for i in range(len(module)))
            internal = tuple(_internal_convs(bn, b) for bn, b in zip(blocks, module))
            stages.append(Stage(name=name, blocks=blocks, internal_convs=internal))
    if not stages:
        raise ValueError(
            f"{type(model).__name__}: no stages of residual blocks found; this engine prunes "
            "ResNet-style models (blocks with conv1 and a downsample attribute)"
        )
    return ModelSpace(stages=tuple(stages))
