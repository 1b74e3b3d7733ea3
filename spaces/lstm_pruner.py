"""A correct hidden-size pruner for single-layer nn.LSTM, plugged into torch-pruning.

torch-pruning 1.6.1's own LSTM pruner slices `weight_hh` twice along the gate rows with
unexpanded indices and `weight_ih` along its input columns, so it fails or corrupts the
layer. Here the four gates' rows (i, f, g, o blocks of `hidden_size`) of every weight and
bias keep the same hidden units, and `weight_hh` also loses the matching columns.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_pruning.pruner.function import BasePruningFunc


def _keep(n: int, idxs) -> torch.Tensor:
    drop = set(int(i) for i in idxs)
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long)


def _set(layer: nn.LSTM, name: str, value: torch.Tensor) -> None:
    setattr(layer, name, nn.Parameter(value.contiguous(), requires_grad=getattr(layer, name).requires_grad))


class LSTMHiddenPruner(BasePruningFunc):
    TARGET_MODULES = (nn.LSTM,)

    def prune_out_channels(self, layer: nn.LSTM, idxs) -> nn.LSTM:
        if layer.num_layers != 1 or layer.proj_size:
            raise ValueError("LSTM: only single-layer LSTMs without projection can lose hidden units")
        h = layer.hidden_size
        keep = _keep(h, idxs)
        rows = torch.cat([keep + g * h for g in range(4)])
        for sfx in ("", "_reverse") if layer.bidirectional else ("",):
            _set(layer, f"weight_ih_l0{sfx}", getattr(layer, f"weight_ih_l0{sfx}").data[rows])
            _set(layer, f"weight_hh_l0{sfx}", getattr(layer, f"weight_hh_l0{sfx}").data[rows][:, keep])
            if layer.bias:
                _set(layer, f"bias_ih_l0{sfx}", getattr(layer, f"bias_ih_l0{sfx}").data[rows])
                _set(layer, f"bias_hh_l0{sfx}", getattr(layer, f"bias_hh_l0{sfx}").data[rows])
        layer.hidden_size = len(keep)
        layer._init_flat_weights()
        return layer

    def prune_in_channels(self, layer: nn.LSTM, idxs) -> nn.LSTM:
        keep = _keep(layer.input_size, idxs)
        for sfx in ("", "_reverse") if layer.bidirectional else ("",):
            _set(layer, f"weight_ih_l0{sfx}", getattr(layer, f"weight_ih_l0{sfx}").data[:, keep])
        layer.input_size = len(keep)
        layer._init_flat_weights()
        return layer

    def get_out_channels(self, layer: nn.LSTM) -> int:
        return layer.hidden_size

    def get_in_channels(self, layer: nn.LSTM) -> int:
        return layer.input_size
