"""Remove whole attention heads from torchvision transformers, and prune their MLP width.

nn.MultiheadAttention and Swin's functional window attention both derive head_dim from the
model width, so neither can run with fewer heads. `prune_heads` swaps each attention module
for a replacement that keeps the original head_dim (and its 1/sqrt(head_dim) scaling) but
only the kept heads: `PrunedMultiheadAttention` (ViT) and `PrunedShiftedWindowAttention`
(Swin). The residual width never changes, so nothing outside the attention is touched;
keeping every head reproduces the original outputs. `prune_mlp` narrows the hidden layer
of each transformer MLP through a torch-pruning DepGraph group.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention
from torchvision.models.vision_transformer import EncoderBlock
from torchvision.ops.misc import MLP

from prunetune.spaces.common import kept_channels


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with a free head count: q/k/v project to num_heads*head_dim and
    out_proj maps that back to embed_dim.

    Called like nn.MultiheadAttention and returns (output, weights or None). Masks and
    is_causal are not supported (torchvision's ViT uses neither); inputs must be batched.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = True, device=None, dtype=None):
        super().__init__()
        inner = num_heads * head_dim
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias, **factory)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias, **factory)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **factory)

    def _split(self, x: Tensor) -> Tensor:
        # (B, L, heads*head_dim) -> (B, heads, L, head_dim)
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError("PrunedMultiheadAttention: key_padding_mask, attn_mask and is_causal "
                             "are not supported")
        if query.dim() != 3:
            raise ValueError("PrunedMultiheadAttention: expects batched 3-D inputs")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q = self._split(self.q_proj(query))
        k = self._split(self.k_proj(key))
        v = self._split(self.v_proj(value))
        p = self.dropout if self.training else 0.0
        weights: Optional[Tensor] = None
        if need_weights:
            attn = torch.softmax((q * self.head_dim ** -0.5) @ k.transpose(-2, -1), dim=-1)
            out = F.dropout(attn, p=p, training=self.training) @ v
            weights = attn.mean(dim=1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _relative_position_index(window_size: list[int]) -> Tensor:
    """Index into the bias table for every (query, key) pair of a window (as torchvision)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size[0]), torch.arange(window_size[1]),
                                        indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window_size[0] - 1
    rel[:, :, 1] += window_size[1] - 1
    rel[:, :, 0] *= 2 * window_size[1] - 1
    return rel.sum(-1).flatten()


class PrunedShiftedWindowAttention(nn.Module):
    """Swin (v1) shifted-window attention with a free head count and a fixed head_dim.

    A line-by-line port of torchvision's `shifted_window_attention` (padding to whole
    windows, cyclic shift, shift mask, reverse shift, unpadding) in which the inner width is
    num_heads*head_dim instead of the channel count.
    """

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int,
                 head_dim: int, *, qkv_bias: bool = True, proj_bias: bool = True,
                 attention_dropout: float = 0.0, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if len(window_size) != 2 or len(shift_size) != 2:
            raise ValueError("window_size and shift_size must be of length 2")
        factory = {"device": device, "dtype": dtype}
        inner = num_heads * head_dim
        self.window_size = list(window_size)
        self.shift_size = list(shift_size)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias, **factory)
        self.proj = nn.Linear(inner, dim, bias=proj_bias, **factory)
        table = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table, num_heads, **factory))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        index = _relative_position_index(self.window_size)
        self.register_buffer("relative_position_index", index.to(device) if device else index)

    def get_relative_position_bias(self) -> Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        ws = self.window_size
        heads = self.num_heads
        B, H, W, C = x.shape
        pad_r = (ws[1] - W % ws[1]) % ws[1]
        pad_b = (ws[0] - H % ws[0]) % ws[0]
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, pad_H, pad_W, _ = x.shape
        # no shift along an axis that a single window already covers
        shift = [self.shift_size[0] if ws[0] < pad_H else 0, self.shift_size[1] if ws[1] < pad_W else 0]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))

        num_windows = (pad_H // ws[0]) * (pad_W // ws[1])
        x = x.view(B, pad_H // ws[0], ws[0], pad_W // ws[1], ws[1], C)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, ws[0] * ws[1], C)

        qkv = self.qkv(x).reshape(x.size(0), x.size(1), 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.head_dim ** -0.5).matmul(k.transpose(-2, -1))
        attn = attn + self.get_relative_position_bias()
        if sum(shift) > 0:
            mask = x.new_zeros((pad_H, pad_W))
            h_slices = ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None))
            w_slices = ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None))
            count = 0
            for h in h_slices:
                for w in w_slices:
                    mask[h[0]:h[1], w[0]:w[1]] = count
                    count += 1
            mask = mask.view(pad_H // ws[0], ws[0], pad_W // ws[1], ws[1])
            mask = mask.permute(0, 2, 1, 3).reshape(num_windows, ws[0] * ws[1])
            mask = mask.unsqueeze(1) - mask.unsqueeze(2)
            mask = mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))
            attn = attn.view(x.size(0) // num_windows, num_windows, heads, x.size(1), x.size(1))
            attn = attn + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, heads, x.size(1), x.size(1))
        attn = F.softmax(attn, dim=-1)
        attn = F.dropout(attn, p=self.attention_dropout, training=self.training)

        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), heads * self.head_dim)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)

        x = x.view(B, pad_H // ws[0], pad_W // ws[1], ws[0], ws[1], C)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :H, :W, :].contiguous()


_MHA_TYPES = (nn.MultiheadAttention, PrunedMultiheadAttention)
_SWIN_TYPES = (ShiftedWindowAttention, PrunedShiftedWindowAttention)


def _check_supported(name: str, module: nn.Module) -> None:
    if isinstance(module, ShiftedWindowAttention) and type(module) is not ShiftedWindowAttention:
        raise TypeError(f"{name}: {type(module).__name__} (Swin v2 attention) is not supported")
    if isinstance(module, nn.MultiheadAttention) and (
            module.bias_k is not None or module.bias_v is not None or module.add_zero_attn):
        raise TypeError(f"{name}: nn.MultiheadAttention with bias_k/bias_v or add_zero_attn "
                        "is not supported")


def _head_layout(module: nn.Module):
    """Per-head views of a supported attention module: q, k, v weights (heads, head_dim, in),
    their biases (heads, head_dim) or None, and the output weight (out, heads, head_dim)."""
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            ws = list(module.in_proj_weight.chunk(3))
        else:
            ws = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
        bias = module.in_proj_bias
        out = module.out_proj.weight
    elif isinstance(module, PrunedMultiheadAttention):
        ws = [module.q_proj.weight, module.k_proj.weight, module.v_proj.weight]
        bias = (None if module.q_proj.bias is None
                else torch.cat([module.q_proj.bias, module.k_proj.bias, module.v_proj.bias]))
        out = module.out_proj.weight
    elif isinstance(module, _SWIN_TYPES):
        ws = list(module.qkv.weight.chunk(3))
        bias = module.qkv.bias
        out = module.proj.weight
    else:
        raise TypeError(f"{type(module).__name__} is not a supported attention module")
    heads = module.num_heads
    head_dim = out.shape[1] // heads
    ws = [w.reshape(heads, head_dim, -1) for w in ws]
    bs = [None] * 3 if bias is None else [b.reshape(heads, head_dim) for b in bias.chunk(3)]
    return ws, bs, out.reshape(out.shape[0], heads, head_dim)


def head_importance(module: nn.Module) -> Tensor:
    """L2 norm of each head's q, k and v weight slices together with its out-projection
    columns (biases excluded); shape (num_heads,)."""
    ws, _, out = _head_layout(module)
    squares = sum(w.detach().pow(2).sum(dim=(1, 2)) for w in ws) + out.detach().pow(2).sum(dim=(0, 2))
    return squares.sqrt()


@torch.no_grad()
def pruned_attention(module: nn.Module, heads: Sequence[int]) -> nn.Module:
    """A replacement for `module` holding only `heads` (indices, in that order), with the
    same head_dim, dropout and mode; the module itself is not changed."""
    heads = list(heads)
    n = module.num_heads
    if not heads or len(set(heads)) != len(heads) or not all(0 <= h < n for h in heads):
        raise ValueError(f"heads must be distinct indices in [0, {n}), got {heads}")
    ws, bs, out = _head_layout(module)
    idx = torch.tensor(heads, dtype=torch.long, device=out.device)
    head_dim = out.shape[2]
    factory = {"device": out.device, "dtype": out.dtype}
    if isinstance(module, _MHA_TYPES):
        new = PrunedMultiheadAttention(
            out.shape[0], len(heads), head_dim, kdim=ws[1].shape[2], vdim=ws[2].shape[2],
            bias=bs[0] is not None, dropout=module.dropout, batch_first=module.batch_first,
            **factory)
        for linear, w, b in zip((new.q_proj, new.k_proj, new.v_proj), ws, bs):
            linear.weight.copy_(w[idx].flatten(0, 1))
            if b is not None:
                linear.bias.copy_(b[idx].flatten())
        new.out_proj.weight.copy_(out[:, idx].flatten(1))
        if module.out_proj.bias is not None:
            new.out_proj.bias.copy_(module.out_proj.bias)
    else:
        new = PrunedShiftedWindowAttention(
            out.shape[0], module.window_size, module.shift_size, len(heads), head_dim,
            qkv_bias=bs[0] is not None, proj_bias=module.proj.bias is not None,
            attention_dropout=module.attention_dropout, dropout=module.dropout, **factory)
        new.qkv.weight.copy_(torch.cat([w[idx].flatten(0, 1) for w in ws]))
        if bs[0] is not None:
            new.qkv.bias.copy_(torch.cat([b[idx].flatten() for b in bs]))
        new.proj.weight.copy_(out[:, idx].flatten(1))
        if module.proj.bias is not None:
            new.proj.bias.copy_(module.proj.bias)
        new.relative_position_bias_table.copy_(module.relative_position_bias_table[:, idx])
    return new.train(module.training)


def find_attention(model: nn.Module) -> dict[str, int]:
    """Qualified name -> head count of every attention module `prune_heads` can shrink.

    Raises TypeError naming the module for attention variants it cannot (Swin v2,
    nn.MultiheadAttention with bias_k/bias_v or add_zero_attn)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, _MHA_TYPES + _SWIN_TYPES):
            _check_supported(name, module)
            found[name] = module.num_heads
    return found


def _heads_to_keep(keep: dict[str, int] | float, found: dict[str, int]) -> dict[str, int]:
    if isinstance(keep, dict):
        for name, k in keep.items():
            if name not in found:
                raise KeyError(f"{name}: not an attention module (found: {list(found)})")
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= found[name]:
                raise ValueError(f"{name}: heads kept must be an int in [1, {found[name]}], got {k!r}")
        return dict(keep)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep: ratio must be in (0, 1], got {keep!r}")
    return {name: kept_channels(n, keep) for name, n in found.items()}


def prune_heads(model: nn.Module, keep: dict[str, int] | float) -> nn.Module:
    """A deep copy of `model` in which each attention module keeps its `k` most important
    heads (`head_importance`, kept in their original order); `model` is not changed.

    `keep` maps module names (as `find_attention` lists them) to head counts; modules not
    named are left as they are. A float is a keep ratio for every module: ceil(ratio * heads),
    at least one. Every module named is replaced, also when it keeps all its heads.
    """
    found = find_attention(model)
    targets = _heads_to_keep(keep, found)
    pruned = copy.deepcopy(model)
    for name, k in targets.items():
        module = pruned.get_submodule(name)
        order = torch.argsort(head_importance(module), descending=True, stable=True)
        new = pruned_attention(module, sorted(order[:k].tolist()))
        parent_name, _, attr = name.rpartition(".")
        parent = pruned.get_submodule(parent_name)
        setattr(parent, attr, new)
        if isinstance(parent, EncoderBlock):
            parent.num_heads = k
    return pruned


def prune_mlp(model: nn.Module, ratio: float, example_input: Tensor) -> nn.Module:
    """A deep copy of `model` in which every transformer MLP (torchvision.ops.MLP: ViT's
    MLPBlock, Swin's block MLP) keeps `ratio` of each hidden layer's width (ceil, at least
    one unit); the rows of lowest L2 norm go, and the next Linear loses the matching columns
    through a DepGraph group built on `example_input`. `model` is not changed."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio: keep ratio must be in (0, 1], got {ratio!r}")
    pruned = copy.deepcopy(model)
    hidden = [(f"{mlp_name}.{name}", layer)
              for mlp_name, mlp in pruned.named_modules() if isinstance(mlp, MLP)
              for name, layer in [(n, m) for n, m in mlp.named_children() if isinstance(m, nn.Linear)][:-1]]
    if not hidden:
        raise ValueError(f"{type(model).__name__}: no transformer MLP (torchvision.ops.MLP) found")
    training = pruned.training
    pruned.eval()
    dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=example_input)
    for name, linear in hidden:
        n = linear.out_features
        k = kept_channels(n, ratio)
        if k == n:
            continue
        drop = torch.argsort(linear.weight.detach().norm(dim=1), stable=True)[: n - k]
        group = dg.get_pruning_group(linear, tp.prune_linear_out_channels, idxs=sorted(drop.tolist()))
        if not dg.check_pruning_group(group):
            raise ValueError(f"{name}: removing {n - k} of {n} units would empty a coupled layer")
        group.prune()
    return pruned.train(training)
