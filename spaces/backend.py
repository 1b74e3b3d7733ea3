"""The dependency-graph backend behind a small adapter, so it can be replaced.

prunetune needs four things from a structural-pruning library: build the dependency graph
of a model, list its prunable channel groups, score a group's channels, and remove some of
them (with every coupled layer following). `TorchPruningBackend` implements them with
torch-pruning's DepGraph (Fang et al., CVPR 2023); another library registers its own class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

BACKENDS: dict[str, type[PruningBackend]] = {}


def register_backend(name: str):
    def deco(cls):
        BACKENDS[name] = cls
        return cls
    return deco


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together, named by the layer whose outputs they are."""

    root: str               # qualified name of the conv/linear whose out-channels root the group
    size: int               # channels in the group
    members: tuple[str, ...]  # every module the group touches
    coupled: bool           # True when several producers share the channels (residual/concat stream)
    grouped: bool = False   # touches a grouped (not depthwise) conv: channels must go per conv group


class PruningBackend(ABC):
    """Dependency-graph operations on one model (the model is modified in place by `prune`)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, *, ignored: tuple[str, ...] = ()):
        self.model = model
        self.example_input = example_input
        self.ignored = ignored

    @abstractmethod
    def groups(self) -> list[ChannelGroup]:
        """All prunable groups, rooted at conv/linear layers not in `ignored`."""

    @abstractmethod
    def scores(self, root: str, importance) -> torch.Tensor:
        """One importance score per channel of the group rooted at `root` (higher = keep)."""

    @abstractmethod
    def prune(self, root: str, idxs: list[int]) -> None:
        """Remove channels `idxs` of the group rooted at `root`, and every coupled slice."""

    @abstractmethod
    def slices(self, root: str, idxs: list[int]) -> list[tuple[str, str, list[int]]]:
        """What removing `idxs` of the group would touch, without touching it: one
        (module name, operation, indices) per coupled layer; operation names the layer kind and
        side, e.g. `conv_out`, `conv_in`, `linear_in`, `batchnorm_out`, `depthwise_conv_out`."""


@register_backend("torch-pruning")
class TorchPruningBackend(PruningBackend):
    def __init__(self, model, example_input, *, ignored=()):
        import torch_pruning as tp

        super().__init__(model, example_input, ignored=ignored)
        self._tp = tp
        self._names = {m: n for n, m in model.named_modules()}
        ignored_modules = [model.get_submodule(n) for n in ignored]
        # `ignored` applies to group roots only: torch-pruning 1.6.1 given ignored_layers at build
        # time maps indices through flatten wrongly (66 indices for a 64-channel layer).
        from prunetune.spaces.lstm_pruner import LSTMHiddenPruner

        self._lstm = LSTMHiddenPruner()
        self.graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_input, customized_pruners={nn.LSTM: self._lstm})
        self._ignored_modules = ignored_modules

    def _handler(self, module):
        tp = self._tp
        if isinstance(module, nn.LSTM):
            return self._lstm.prune_out_channels
        return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels

    def _group(self, root: str, idxs: list[int]):
        module = self.model.get_submodule(root)
        return self.graph.get_pruning_group(module, self._handler(module), idxs=idxs)

    def groups(self) -> list[ChannelGroup]:
        tp = self._tp
        out = []
        for g in self.graph.get_all_groups(ignored_layers=self._ignored_modules,
                                           root_module_types=[nn.Conv2d, nn.Linear, nn.LSTM]):
            root_module = g[0].dep.target.module
            producers = [d.dep.target.module for d in g
                         if d.dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels,
                                              self._lstm.prune_out_channels)
                         and not _is_depthwise(d.dep.target.module)]
            modules = [d.dep.target.module for d in g]
            members = tuple(dict.fromkeys(self._names.get(m, "?") for m in modules))
            grouped = any(isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m) for m in modules)
            out.append(ChannelGroup(root=self._names[root_module], size=_out_size(root_module),
                                    members=members, coupled=len(producers) > 1, grouped=grouped))
        return out

    def scores(self, root: str, importance) -> torch.Tensor:
        size = _out_size(self.model.get_submodule(root))
        return importance(self._group(root, list(range(size))))

    def slices(self, root: str, idxs: list[int]) -> list[tuple[str, str, list[int]]]:
        try:
            self.model.get_submodule(root)
        except AttributeError:
            raise ValueError(f"{root}: no such layer in the model") from None
        ops = {getattr(self._tp, n): n.removeprefix("prune_").removesuffix("_channels")
               for n in dir(self._tp) if n.startswith("prune_") and n.endswith("_channels")}
        out = []
        for dep, dep_idxs in self._group(root, idxs):
            module = dep.target.module
            if isinstance(module, nn.Module) and module in self._names:
                op = next((name for fn, name in ops.items() if fn == dep.handler), repr(dep.handler))
                out.append((self._names[module], op, [int(i) for i in dep_idxs]))
        return out

    def prune(self, root: str, idxs: list[int]) -> None:
        if not idxs:
            return
        group = self._group(root, idxs)
        if not self.graph.check_pruning_group(group):
            raise ValueError(f"{root}: removing {len(idxs)} channels would empty a coupled layer")
        group.prune()


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def _out_size(m: nn.Module) -> int:
    if isinstance(m, nn.LSTM):
        return m.hidden_size
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels
