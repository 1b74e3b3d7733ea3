"""The cost model: MACs/params, peak activation bytes, latency, structural signature, cache."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
import torch_pruning as tp
from torch import nn

from prunetune.spaces.cost import Cost, measure_cost, measure_full_cost, peak_activation_bytes
from prunetune.spaces.cost_cache import (SHAPE_ATTRS, CostCache, latency_key, static_key,
                                         structural_signature)
from prunetune.spaces.latency import device_label, measure_latency

CPU = device_label("cpu")
F32 = 4  # bytes per float32


def image(res: int, channels: int = 1) -> torch.Tensor:
    return torch.zeros(1, channels, res, res)


def tiny(res: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * res * res, 10))


class TokenLSTM(nn.Module):
    """A non-image model: token ids (batch, seq_len) -> class logits."""

    def __init__(self, vocab: int = 50, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.head(out[:, -1])


def counting(model: nn.Module) -> tuple[nn.Module, list[int]]:
    """`model` behind a wrapper whose every forward (deep copies' too) appends to `calls`."""
    calls: list[int] = []

    class Counted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            return self.inner(x)

    return Counted(), calls


# --- MACs and params ------------------------------------------------------------------------

def test_macs_and_params_match_measure_cost_for_resnet20(make_model):
    model = make_model("cifar:resnet20")
    old = measure_cost(model, in_channels=1, resolution=16)
    full = measure_full_cost(model, image(16), latency=False)
    assert (full.macs, full.params) == (old.macs, old.params)
    assert measure_cost(model, example_input=image(16)) == old


def test_example_input_measures_a_token_model():
    model = TokenLSTM()
    ids = torch.randint(0, 50, (1, 12))
    cost = measure_cost(model, example_input=ids)
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.macs > 12 * 4 * 16 * (8 + 16)  # at least the LSTM gates' matmuls
    full = measure_full_cost(model, ids, batch=2, repeats=3, warmup=1)
    assert (full.macs, full.params) == (cost.macs, cost.params)
    assert full.peak_activation_bytes > 0 and full.latency_ms > 0 and full.batch == 2


@pytest.mark.parametrize("kwargs", [{}, {"in_channels": 1}, {"resolution": 8},
                                    {"in_channels": 1, "resolution": 8, "example_input": image(8)}])
def test_measure_cost_needs_exactly_one_way_to_build_the_input(kwargs):
    with pytest.raises(ValueError, match="example_input"):
        measure_cost(tiny(8), **kwargs)


def test_cost_keeps_its_two_field_constructor():
    cost = Cost(macs=3, params=4)
    assert cost.peak_activation_bytes is None and cost.latency_ms is None
    assert (cost.latency_ms_batch, cost.batch, cost.device, cost.threads) == (None,) * 4


# --- peak activation bytes ------------------------------------------------------------------

def test_peak_activation_of_a_tiny_model_matches_the_hand_count():
    conv = 1 * 8 * 8 * F32 + 4 * 8 * 8 * F32   # input image + conv output: 256 + 1024
    flatten = 4 * 8 * 8 * F32                  # its output is a view of its input: counted once
    linear = 4 * 8 * 8 * F32 + 10 * F32        # 1024 + 40
    assert peak_activation_bytes(tiny(8), image(8)) == max(conv, flatten, linear) == 1280


def test_peak_activation_roughly_quadruples_when_resolution_doubles(make_model):
    assert peak_activation_bytes(tiny(16), image(16)) / peak_activation_bytes(tiny(8), image(8)) == 4
    model = make_model("cifar:resnet20")
    ratio = peak_activation_bytes(model, image(32)) / peak_activation_bytes(model, image(16))
    assert 3.5 <= ratio <= 4.5


def test_in_place_results_share_memory_and_count_once():
    x = image(8)
    assert peak_activation_bytes(nn.Sequential(nn.ReLU(inplace=True)), x.clone()) == 64 * F32
    assert peak_activation_bytes(nn.Sequential(nn.ReLU()), x) == 2 * 64 * F32


def test_peak_activation_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    before = copy.deepcopy(model.state_dict())
    peak_activation_bytes(model, image(8))
    assert model.training
    assert not model[0]._forward_hooks and not model._forward_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- latency --------------------------------------------------------------------------------

def test_latency_stats_are_ordered_and_threads_are_restored(make_model):
    model = make_model("cifar:resnet20").train()
    threads = torch.get_num_threads()
    stats = measure_latency(model, image(16), warmup=2, repeats=10, threads=2)
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert (stats.repeats, stats.threads, stats.device) == (10, 2, CPU)
    assert torch.get_num_threads() == threads
    assert model.training


def test_latency_restores_threads_and_mode_when_the_model_fails():
    class Boom(nn.Module):
        def forward(self, x):
            assert torch.get_num_threads() == 1 and not self.training
            raise RuntimeError("boom")

    model, threads = Boom().train(), torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        measure_latency(model, image(4), threads=1)
    assert torch.get_num_threads() == threads and model.training


def test_warmup_runs_are_discarded_and_only_repeats_timed():
    model, calls = counting(nn.Identity())
    measure_latency(model, image(4), warmup=3, repeats=7)
    assert len(calls) == 10


def test_larger_resolution_is_slower(make_model):
    model = make_model("cifar:resnet20")
    small = measure_latency(model, image(8), warmup=3, repeats=25)
    large = measure_latency(model, image(32), warmup=3, repeats=25)  # 16x the MACs
    assert small.median_ms < large.median_ms


@pytest.mark.parametrize("kwargs, word", [({"warmup": -1}, "warmup"), ({"repeats": 0}, "repeats"),
                                          ({"threads": 0}, "threads")])
def test_latency_rejects_bad_settings(kwargs, word):
    with pytest.raises(ValueError, match=word):
        measure_latency(nn.Identity(), image(4), **kwargs)


# --- structural signature -------------------------------------------------------------------

def test_signature_ignores_weights(make_model):
    a, b = make_model("cifar:resnet20", seed=0), make_model("cifar:resnet20", seed=1)
    assert not torch.equal(a.conv1.weight, b.conv1.weight)
    assert structural_signature(a, image(16)) == structural_signature(b, image(16))


def test_signature_sees_a_pruned_conv_and_the_resolution(make_model):
    model = make_model("cifar:resnet20")
    pruned = copy.deepcopy(model)
    dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=image(16))
    dg.get_pruning_group(pruned.layer2[0].conv1, tp.prune_conv_out_channels, idxs=[0, 1]).prune()
    assert pruned.layer2[0].conv1.out_channels == 30
    base = structural_signature(model, image(16))
    assert structural_signature(pruned, image(16)) != base
    assert structural_signature(model, image(32)) != base
    assert structural_signature(model, image(16).double()) != base


# One pair per registered class, differing in a shape-defining attribute; where possible one
# that leaves every parameter shape alone, so only the registry can tell them apart.
SIGNATURE_PAIRS = {
    nn.modules.conv._ConvNd: (lambda: nn.Conv2d(4, 4, 3), lambda: nn.Conv2d(4, 4, 3, stride=2)),
    nn.Linear: (lambda: nn.Linear(4, 8), lambda: nn.Linear(4, 6)),
    nn.modules.batchnorm._NormBase: (lambda: nn.BatchNorm2d(4), lambda: nn.BatchNorm2d(4, affine=False)),
    nn.LayerNorm: (lambda: nn.LayerNorm(8), lambda: nn.LayerNorm([2, 4])),
    nn.GroupNorm: (lambda: nn.GroupNorm(2, 8), lambda: nn.GroupNorm(4, 8)),
    nn.MultiheadAttention: (lambda: nn.MultiheadAttention(8, 2), lambda: nn.MultiheadAttention(8, 4)),
    nn.RNNBase: (lambda: nn.LSTM(4, 8), lambda: nn.LSTM(4, 8, batch_first=True)),
    nn.Embedding: (lambda: nn.Embedding(10, 4), lambda: nn.Embedding(12, 4)),
    nn.TransformerEncoderLayer: (lambda: nn.TransformerEncoderLayer(8, 2, 16),
                                 lambda: nn.TransformerEncoderLayer(8, 2, 16, norm_first=True)),
    nn.TransformerDecoderLayer: (lambda: nn.TransformerDecoderLayer(8, 2, 16),
                                 lambda: nn.TransformerDecoderLayer(8, 2, 16, norm_first=True)),
}


def test_every_registered_class_has_a_signature_pair():
    assert set(SIGNATURE_PAIRS) == set(SHAPE_ATTRS)


@pytest.mark.parametrize("cls", list(SHAPE_ATTRS), ids=lambda c: c.__name__)
def test_signature_reads_registered_attributes(cls):
    make_a, make_b = SIGNATURE_PAIRS[cls]
    x = image(4)
    assert structural_signature(make_a(), x) == structural_signature(make_a(), x)
    assert structural_signature(make_a(), x) != structural_signature(make_b(), x)


def test_signature_of_unregistered_modules_uses_their_extra_repr():
    x = image(4)
    assert (structural_signature(nn.Upsample(scale_factor=2), x)
            != structural_signature(nn.Upsample(scale_factor=3), x))


# --- cache ----------------------------------------------------------------------------------

def stored_entries(cache: CostCache, signature: str) -> dict:
    return json.loads(cache.path(signature).read_text())["entries"]


def test_second_measurement_comes_from_the_cache_without_any_forward(make_model, tmp_path):
    cache = CostCache(tmp_path)
    first_model, first_calls = counting(make_model("cifar:resnet20", seed=0))
    first = measure_full_cost(first_model, image(8), batch=4, cache=cache, warmup=2, repeats=5)
    assert 4 in first_calls and 1 in first_calls  # timed at batch 1 and batch 4

    again_model, again_calls = counting(make_model("cifar:resnet20", seed=1))
    again = measure_full_cost(again_model, image(8), batch=4, cache=cache, warmup=2, repeats=5)
    assert again_calls == []
    assert again == first
    entries = stored_entries(cache, structural_signature(again_model, image(8)))
    assert again.latency_ms == entries[latency_key(CPU, 1, 1)]["median_ms"]
    assert again.latency_ms_batch == entries[latency_key(CPU, 1, 4)]["median_ms"]
    assert again.macs == entries[static_key(CPU)]["macs"]
    assert again.peak_activation_bytes == entries[static_key(CPU)]["peak_activation_bytes"]


def test_latency_is_cached_per_threads_and_batch(tmp_path):
    cache = CostCache(tmp_path)
    model, calls = counting(tiny(8))
    measure_full_cost(model, image(8), batch=2, cache=cache, warmup=1, repeats=3)
    calls.clear()
    cost = measure_full_cost(model, image(8), batch=3, cache=cache, threads=2, warmup=1, repeats=3)
    assert sorted(set(calls)) == [1, 3]  # new timings for the new threads and batch; static cached
    assert (cost.batch, cost.threads, cost.device) == (3, 2, CPU)
    keys = set(stored_entries(cache, structural_signature(model, image(8))))
    assert {latency_key(CPU, 1, 1), latency_key(CPU, 1, 2), latency_key(CPU, 2, 1),
            latency_key(CPU, 2, 3), static_key(CPU)} == keys


@pytest.mark.parametrize("shared", [True, False], ids=["one-instance", "instance-per-thread"])
def test_concurrent_writers_lose_nothing(tmp_path, shared):
    caches = [CostCache(tmp_path)] * 2 if shared else [CostCache(tmp_path), CostCache(tmp_path)]
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            start.wait()
            for k in range(30):
                caches[i].put("sig", f"writer{i}-{k}", {"value": k})
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert set(caches[0].entries("sig")) == {f"writer{i}-{k}" for i in range(2) for k in range(30)}
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".lock")) == ["sig.json"]


@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe\x00", b"[1, 2]",
                                     b'{"signature": "other", "entries": {}}'])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(tmp_path, garbage):
    cache = CostCache(tmp_path)
    signature = structural_signature(tiny(8), image(8))
    cache.path(signature).write_bytes(garbage)
    assert cache.get(signature, static_key(CPU)) is None
    cost = measure_full_cost(tiny(8), image(8), latency=False, cache=cache)
    assert stored_entries(cache, signature)[static_key(CPU)]["macs"] == cost.macs


def test_an_incomplete_entry_is_measured_again(tmp_path):
    cache = CostCache(tmp_path)
    signature = structural_signature(tiny(8), image(8))
    cache.put(signature, static_key(CPU), {"macs": 1})
    cost = measure_full_cost(tiny(8), image(8), latency=False, cache=cache)
    assert cost.macs == measure_cost(tiny(8), in_channels=1, resolution=8).macs
    assert cost.peak_activation_bytes == 1280


@pytest.mark.parametrize("signature", ["", "../escape", "a b"])
def test_cache_rejects_signatures_that_are_not_file_names(tmp_path, signature):
    with pytest.raises(ValueError, match="signature"):
        CostCache(tmp_path).get(signature, "k")


def test_full_cost_wants_one_sample_and_a_positive_batch():
    with pytest.raises(ValueError, match="one sample"):
        measure_full_cost(tiny(8), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="batch"):
        measure_full_cost(tiny(8), image(8), batch=0)
