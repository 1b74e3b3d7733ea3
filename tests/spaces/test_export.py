"""export_all(): TorchScript and ONNX artifacts that reload and compute what the model computes."""

from __future__ import annotations

import onnx
import pytest
import torch
import torchvision
from onnx import numpy_helper
from torch import nn

from prunetune.spaces.export import (
    ONNX, TORCHSCRIPT, check_parity, export_all, export_onnx, parity_inputs,
)
from prunetune.trainers.models import build_model

ATOL = 1e-4


class LSTMClassifier(nn.Module):
    """Token ids -> class logits from the last time step."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


class BranchOnSign(nn.Module):
    """Unscriptable (varargs) and data-dependent: a trace freezes the branch it saw."""

    def forward(self, *xs):
        x = xs[0]
        return x * 2 if x.min() > 0 else x - 1


class ReturnsList(nn.Module):
    """Returns Python floats: neither TorchScript nor ONNX can express it."""

    def forward(self, *xs):
        return xs[0].tolist()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Inputs this small gain nothing from intra-op threads, and two threads stall on each
    other's barrier whenever another process holds a core (a 64px forward: 0.02 s -> 2 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tv(name):
    return lambda: torchvision.models.get_model(name, weights=None, num_classes=10)


def _images(channels, size):
    return lambda: torch.randn(2, channels, size, size)


# id -> (model factory, example input factory)
CASES = {
    "resnet18": (_tv("resnet18"), _images(3, 64)),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), _images(3, 64)),
    "efficientnet_b0": (_tv("efficientnet_b0"), _images(3, 64)),
    "convnext_tiny": (_tv("convnext_tiny"), _images(3, 64)),
    "vit": (lambda: torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10), _images(3, 32)),
    "swin": (lambda: torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
        num_classes=10), _images(3, 64)),
    "cifar_resnet20": (lambda: build_model("cifar:resnet20", in_channels=1, num_classes=10),
                       _images(1, 16)),
    "lstm": (LSTMClassifier, lambda: torch.randint(0, 100, (2, 12))),
}


def informative(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Make random-init logits O(1), so that atol 1e-4 means the same on every architecture.

    torchvision zero-initializes ViT's head (logits exactly 0); default BatchNorm statistics
    shrink mobilenet_v3_small's and efficientnet_b0's logits to ~1e-10; with real statistics,
    efficientnet_b0's residual stream grows its logits to ~11, where fp32 noise alone (batch 1
    vs 2 in eager PyTorch) is 5e-5. So: Linears get PyTorch's default init, BatchNorm gets the
    statistics of one random batch, and the head is scaled to a max |logit| of 1 on another.
    """
    def batch():
        return torch.randn(8, *example.shape[1:]) if example.is_floating_point() else example

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for linear in linears:
        linear.reset_parameters()
    model.eval()
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.reset_running_stats()
                bn.momentum = None          # cumulative average: one batch sets the stats
                bn.train()                  # only BN: dropout and stochastic depth stay off
        model(batch())
        model.eval()
        scale = model(batch()).abs().max()  # a fresh batch: BN statistics fit the first
        linears[-1].weight /= scale
        if linears[-1].bias is not None:
            linears[-1].bias /= scale
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_export_all_matches_model(case, tmp_path):
    make_model, make_input = CASES[case]
    torch.manual_seed(0)
    example = make_input()
    model = informative(make_model(), example)
    with torch.no_grad():
        scale = max(model(x).abs().max().item() for x in parity_inputs(example))
    assert 0.3 < scale < 3, f"{case}: logits of scale {scale:.3g} make atol {ATOL} meaningless"

    records = export_all(model, example, tmp_path)

    assert set(records) == {TORCHSCRIPT, ONNX}
    assert records[TORCHSCRIPT].path == tmp_path / "model.ts"
    assert records[ONNX].path == tmp_path / "model.onnx"
    assert records[TORCHSCRIPT].method == "script"
    assert records[ONNX].method == "dynamo"
    for fmt, record in records.items():
        assert record.error is None, record.error
        assert record.ok and record.max_abs_diff <= ATOL, (fmt, record.max_abs_diff)
        assert record.path.is_file()
    assert not model.training


def test_tampered_onnx_fails_parity(tmp_path):
    torch.manual_seed(0)
    example = torch.randn(2, 1, 8, 8)
    model = informative(nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3),
    ), example)
    path = export_onnx(model, example, tmp_path / "model.onnx").path
    inputs = parity_inputs(example)
    assert check_parity(model, path, ONNX, inputs, atol=ATOL).ok

    proto = onnx.load(str(path))
    init = max(proto.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.05, init.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))

    result = check_parity(model, tampered, ONNX, inputs, atol=ATOL)
    assert result.format == ONNX
    assert not result.ok and result.max_abs_diff > ATOL


def test_trace_fallback_is_caught_by_parity_on_fresh_inputs(tmp_path):
    model = BranchOnSign().train()
    records = export_all(model, torch.ones(2, 8), tmp_path)   # positive: the trace keeps x * 2

    assert model.training                                     # exported in eval, then restored
    assert records[TORCHSCRIPT].method == "trace"
    assert records[ONNX].method == "torchscript-onnx"         # torch.export refuses the branch
    for fmt, record in records.items():
        assert not record.ok and record.max_abs_diff > ATOL, fmt
        assert fmt in record.error and "BranchOnSign" in record.error


def test_unexportable_model_reports_instead_of_raising(tmp_path):
    records = export_all(ReturnsList(), torch.ones(2, 8), tmp_path)

    for fmt, record in records.items():
        assert not record.ok and record.path is None and record.method is None
        assert record.error.startswith(f"{fmt} export of ReturnsList failed"), record.error
    assert not (tmp_path / "model.ts").exists() and not (tmp_path / "model.onnx").exists()


def test_parity_inputs_differ_from_example_and_vary_batch():
    tokens = torch.randint(3, 50, (2, 12))
    inputs = parity_inputs(tokens)

    assert [x.shape[0] for x in inputs] == [2, 1]
    assert all(x.dtype == torch.long and x.shape[1:] == tokens.shape[1:] for x in inputs)
    assert all(3 <= x.min() and x.max() <= 49 for x in inputs)
    assert not torch.equal(inputs[0], tokens)
    assert [x.shape[0] for x in parity_inputs(torch.randn(1, 3))] == [1, 2]


def test_check_parity_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="'tflite'"):
        check_parity(nn.Linear(2, 2), tmp_path / "m.tflite", "tflite", [torch.ones(1, 2)])
