"""Datasets and splits on real data: sizes, disjointness, determinism, config errors."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from sklearn.datasets import load_digits

from prunetune.trainers.data import DataConfig, load_splits, make_loader, probe_indices


def rows(ds) -> set[bytes]:
    return {row.numpy().tobytes() for row in ds.tensors[0]}


def snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime)
        for p in folder.rglob("*")
    }


def test_digits_splits_add_up_and_are_disjoint(tmp_path):
    splits = load_splits(DataConfig(name="digits"), seed=0, cache_dir=tmp_path)
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sum(sizes) == 1797
    assert sizes[2] == pytest.approx(0.2 * 1797, abs=1)
    assert sizes[1] == pytest.approx(0.1 * (1797 - sizes[2]), abs=1)
    train, val, test = rows(splits.train), rows(splits.val), rows(splits.test)
    assert len(train | val | test) == 1797  # digits' images are all distinct
    assert (splits.in_channels, splits.num_classes, splits.image_size) == (1, 10, 8)


def test_digits_normalised_by_train_statistics(tmp_path):
    x = load_splits(DataConfig(name="digits"), seed=0, cache_dir=tmp_path).train.tensors[0]
    assert x.dtype == torch.float32
    assert abs(x.mean().item()) < 1e-4 and x.std().item() == pytest.approx(1, abs=1e-4)


def test_splits_are_deterministic_per_seed(tmp_path):
    cfg = DataConfig(name="digits")
    first = load_splits(cfg, seed=3, cache_dir=tmp_path / "a")
    again = load_splits(cfg, seed=3, cache_dir=tmp_path / "b")  # other key: not memoised
    other = load_splits(cfg, seed=4, cache_dir=tmp_path / "a")
    assert first is not again
    for split in ("train", "val", "test"):
        for a, b in zip(getattr(first, split).tensors, getattr(again, split).tensors):
            assert torch.equal(a, b)
    assert rows(first.test) != rows(other.test)
    assert load_splits(cfg, seed=3, cache_dir=tmp_path / "a") is first


def test_digits_resized_once_at_load(tmp_path):
    splits = load_splits(DataConfig(name="digits", image_size=16), seed=0, cache_dir=tmp_path)
    x, y = splits.val[0]
    assert x.shape == (1, 16, 16) and y.dtype == torch.int64
    assert splits.image_size == 16


def test_limit_train_caps_train_plus_val(tmp_path):
    cfg = DataConfig(name="digits", limit_train=100, val_fraction=0.2)
    splits = load_splits(cfg, seed=0, cache_dir=tmp_path)
    assert (len(splits.train), len(splits.val)) == (80, 20)
    assert len(splits.test) == pytest.approx(0.2 * 1797, abs=1)


def test_fashion_mnist_from_shared_copy(tmp_path, fashion_mnist_root):
    shared_before = snapshot(fashion_mnist_root)
    cfg = DataConfig(name="fashion-mnist", root=fashion_mnist_root, limit_train=2000)
    splits = load_splits(cfg, seed=0, cache_dir=tmp_path)

    assert (len(splits.train), len(splits.val), len(splits.test)) == (1800, 200, 10000)
    assert (splits.in_channels, splits.num_classes, splits.image_size) == (1, 10, 28)
    assert torch.bincount(splits.val.tensors[1]).tolist() == [20] * 10  # stratified
    assert splits.train.tensors[0].shape[1:] == (1, 28, 28)

    raw = tmp_path / "fashion-mnist" / "FashionMNIST" / "raw"
    copy = raw / "train-images-idx3-ubyte.gz"
    assert copy.stat().st_size == 26421880
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 47040016
    assert snapshot(fashion_mnist_root) == shared_before

    copied_at = copy.stat().st_mtime_ns
    load_splits(cfg, seed=1, cache_dir=tmp_path)
    assert copy.stat().st_mtime_ns == copied_at  # same size: not copied again


def test_imagefolder_without_test_dir_carves_one(tmp_path):
    digits = load_digits()
    for i in range(45):
        label = int(digits.target[i] % 3)
        folder = tmp_path / "train" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(folder / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=tmp_path, image_size=12, test_fraction=0.2)
    splits = load_splits(cfg, seed=0, cache_dir=tmp_path / "cache")
    assert len(splits.train) + len(splits.val) + len(splits.test) == 45
    assert (splits.in_channels, splits.num_classes, splits.image_size) == (3, 3, 12)
    x, y = splits.test[0]
    assert x.shape == (3, 12, 12) and 0 <= y < 3


def test_make_loader_seeded_shuffle(tmp_path):
    ds = load_splits(DataConfig(name="digits"), seed=0, cache_dir=tmp_path).train

    def labels(**kw):
        return torch.cat([y for _, y in make_loader(ds, batch_size=64, **kw)])

    assert torch.equal(labels(shuffle=True, seed=1), labels(shuffle=True, seed=1))
    assert not torch.equal(labels(shuffle=True, seed=1), labels(shuffle=True, seed=2))
    assert torch.equal(labels(shuffle=False), ds.tensors[1])


def test_probe_indices_fixed_sorted_sample():
    probes = probe_indices(500, 64, seed=0)
    assert torch.equal(probes, probe_indices(500, 64, seed=0))
    assert not torch.equal(probes, probe_indices(500, 64, seed=1))
    assert len(probes.unique()) == 64 and torch.equal(probes, probes.sort().values)
    assert 0 <= probes.min() and probes.max() < 500
    assert torch.equal(probe_indices(10, 64, seed=0), torch.arange(10))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "fashion-mnist"}, "root"),
        ({"name": "fashion-mnist", "root": "/nonexistent/prunetune"}, "root"),
        ({"name": "imagefolder", "root": "/nonexistent/prunetune", "image_size": 32}, "root"),
        ({"name": "digits", "val_fraction": 0}, "val_fraction"),
        ({"name": "digits", "val_fraction": 0.7}, "val_fraction"),
        ({"name": "digits", "test_fraction": 0.6}, "test_fraction"),
        ({"name": "digits", "limit_train": 5}, "limit_train"),
        ({"name": "digits", "batch_size": 0}, "batch_size"),
        ({"name": "mnist"}, "name"),
        ({"name": "digits", "shuffle": True}, "shuffle"),
    ],
)
def test_data_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as info:
        DataConfig(**kwargs)
    assert any(field in err["loc"] for err in info.value.errors())


def test_imagefolder_requires_image_size(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ValidationError) as info:
        DataConfig(name="imagefolder", root=tmp_path)
    assert [err["loc"] for err in info.value.errors()] == [("image_size",)]


def test_missing_root_is_fine_when_downloading(tmp_path):
    cfg = DataConfig(name="cifar10", root=tmp_path / "later", download=True)
    assert cfg.root == tmp_path / "later"
    assert not os.path.exists(cfg.root)
