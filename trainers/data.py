"""Datasets and seeded train/val/test splits for one trial.

Small datasets (digits, Fashion-MNIST, CIFAR) are loaded once into normalised float tensors
so many short trials train without decoding images again. Validation data is always carved
from the training data with a seed, so the official test split stays untouched until the end.

Example:
    >>> cfg = DataConfig(name="digits", image_size=16)
    >>> splits = load_splits(cfg, seed=0, cache_dir=Path(".prunetune/cache"))
    >>> x, y = next(iter(make_loader(splits.train, batch_size=32, shuffle=True, seed=0)))
    >>> x.shape
    torch.Size([32, 1, 16, 16])
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataConfig(BaseModel):
    """Which dataset to load and how to split it; validated before anything is loaded.

    ``download`` comes before ``root`` so the root check can see it.

    Example:
        >>> DataConfig(name="fashion-mnist", root="../shared/data/fashion-mnist", limit_train=2000)
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a registered dataset: digits, fashion-mnist, cifar10, cifar100, imagefolder")
    download: bool = Field(default=False, description="let torchvision download cifar10/cifar100/fashion-mnist into root")
    root: Path | None = Field(default=None, validate_default=True,
                              description="dataset folder (torchvision layout; imagefolder: root/train[, root/test]); not needed for digits")
    image_size: int | None = Field(default=None, ge=1, validate_default=True,
                                   description="resize images to this square size once at load; the parent's native resolution")
    val_fraction: float = Field(default=0.1, gt=0, le=0.5, description="validation share carved from the training data (seeded)")
    test_fraction: float = Field(default=0.2, gt=0, le=0.5, description="test share, only for data without an official test split")
    limit_train: int | None = Field(default=None, ge=10, description="seeded subset of the training pool (before validation is carved)")
    batch_size: int = Field(default=128, ge=1, description="evaluation batch size")

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in _DATASETS:
            raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(sorted(_DATASETS))}")
        return name

    @field_validator("root")
    @classmethod
    def _check_root(cls, root: Path | None, info: ValidationInfo) -> Path | None:
        name = info.data.get("name")
        if name is None or name in _ROOTLESS:
            return root
        if root is None:
            raise ValueError(f"root is required for dataset {name!r}")
        root = root.expanduser()
        if name == "imagefolder" and not (root / "train").is_dir():
            raise ValueError(f"root {str(root)!r} has no train/ folder of class subfolders")
        if not root.exists() and not info.data.get("download"):
            raise ValueError(f"root {str(root)!r} does not exist (set download: true to fetch it)")
        return root

    @field_validator("image_size")
    @classmethod
    def _check_image_size(cls, size: int | None, info: ValidationInfo) -> int | None:
        if size is None and info.data.get("name") == "imagefolder":
            raise ValueError("image_size is required for dataset 'imagefolder'")
        return size


@dataclass(frozen=True)
class DataSplits:
    """Disjoint train/val/test datasets plus the shape facts a model needs.

    Memoised by ``load_splits``: treat the tensors inside as read-only.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    in_channels: int
    num_classes: int
    image_size: int


DatasetLoader = Callable[..., DataSplits]

_DATASETS: dict[str, DatasetLoader] = {}
_ROOTLESS: set[str] = set()  # datasets that ship with a package and need no root


def register_dataset(name: str, *, needs_root: bool = True) -> Callable[[DatasetLoader], DatasetLoader]:
    """Register ``loader(cfg, *, seed, cache_dir) -> DataSplits`` under ``name``.

    ``load_splits`` dispatches on ``cfg.name`` and ``DataConfig`` accepts any registered
    name; ``needs_root=False`` for data a package ships (no ``root`` key required).
    """

    def decorator(loader: DatasetLoader) -> DatasetLoader:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = loader
        if not needs_root:
            _ROOTLESS.add(name)
        return loader

    return decorator


def load_splits(cfg: DataConfig, *, seed: int, cache_dir: Path) -> DataSplits:
    """Load ``cfg``'s dataset and split it; the same seed always gives the same indices.

    Memoised per process (trials in one worker share the tensors). ``limit_train`` caps the
    training pool before validation is carved, so ``len(train) + len(val) == limit_train``.
    """
    key = cfg.model_dump_json(exclude={"batch_size"})
    return _load_cached(key, seed, str(Path(cache_dir).expanduser().resolve()))


@functools.lru_cache(maxsize=4)
def _load_cached(cfg_json: str, seed: int, cache_dir: str) -> DataSplits:
    cfg = DataConfig.model_validate_json(cfg_json)
    return _DATASETS[cfg.name](cfg, seed=seed, cache_dir=Path(cache_dir))


def make_loader(
    ds: Dataset, *, batch_size: int, shuffle: bool, seed: int | None = None
) -> DataLoader:
    """A single-process loader; shuffling is reproducible when ``seed`` is given."""
    generator = torch.Generator().manual_seed(seed) if shuffle and seed is not None else None
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0
    )


def probe_indices(n_val: int, n_probes: int, seed: int) -> torch.Tensor:
    """Sorted seeded sample (no replacement) of ``min(n_val, n_probes)`` validation indices.

    Example:
        >>> probe_indices(1000, 4, seed=0).tolist()  # the same four every time
    """
    if n_val < 0 or n_probes < 0:
        raise ValueError("n_val and n_probes must be >= 0")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_val, generator=generator)[: min(n_val, n_probes)].sort().values


def _carve(
    indices: np.ndarray, labels: np.ndarray, size: float | int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (rest, carved) with ``size`` (fraction or count) carved.

    Stratified by label when every class can be represented, plain otherwise.
    """
    try:
        rest, carved = train_test_split(
            indices, test_size=size, random_state=seed, stratify=labels[indices]
        )
    except ValueError:
        rest, carved = train_test_split(indices, test_size=size, random_state=seed)
    return np.sort(rest), np.sort(carved)


def _train_val(
    pool: np.ndarray, labels: np.ndarray, cfg: DataConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    if cfg.limit_train is not None and cfg.limit_train < len(pool):
        _, pool = _carve(pool, labels, cfg.limit_train, seed)
    return _carve(pool, labels, cfg.val_fraction, seed)


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear resize to ``size`` x ``size`` (antialiased when shrinking), in chunks."""
    if size is None or tuple(x.shape[-2:]) == (size, size) or len(x) == 0:
        return x
    antialias = size < max(x.shape[-2:])
    return torch.cat(
        [
            F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=antialias)
            for chunk in x.split(4096)
        ]
    )


def _tensor_splits(
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_classes: int,
) -> DataSplits:
    """TensorDatasets from already resized [0, 1] images, normalised per channel."""
    mean_t = torch.tensor(mean).view(-1, 1, 1)
    std_t = torch.tensor(std).view(-1, 1, 1)
    datasets = {
        split: TensorDataset(((x - mean_t) / std_t).contiguous(), y.long())
        for split, (x, y) in parts.items()
    }
    x_train = parts["train"][0]
    return DataSplits(
        **datasets,
        in_channels=x_train.shape[1],
        num_classes=num_classes,
        image_size=x_train.shape[-1],
    )


def _official_test_splits(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    cfg: DataConfig,
    *,
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_classes: int,
) -> DataSplits:
    (x, y), (x_test, y_test) = train, test
    tr, va = _train_val(np.arange(len(y)), y.numpy(), cfg, seed)
    parts = {
        "train": (_resize(x[tr], cfg.image_size), y[tr]),
        "val": (_resize(x[va], cfg.image_size), y[va]),
        "test": (_resize(x_test, cfg.image_size), y_test),
    }
    return _tensor_splits(parts, mean=mean, std=std, num_classes=num_classes)


@register_dataset("digits", needs_root=False)
def _digits(cfg: DataConfig, *, seed: int, cache_dir: Path) -> DataSplits:
    """scikit-learn's bundled 8x8 digits (offline); normalised by the train split's stats."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().div(16).unsqueeze(1)
    y = torch.from_numpy(bunch.target).long()
    labels = y.numpy()
    pool, te = _carve(np.arange(len(y)), labels, cfg.test_fraction, seed)
    tr, va = _train_val(pool, labels, cfg, seed)
    parts = {
        split: (_resize(x[idx], cfg.image_size), y[idx])
        for split, idx in (("train", tr), ("val", va), ("test", te))
    }
    x_train = parts["train"][0]
    return _tensor_splits(
        parts, mean=(x_train.mean().item(),), std=(x_train.std().item(),), num_classes=10
    )


@register_dataset("fashion-mnist")
def _fashion_mnist(cfg: DataConfig, *, seed: int, cache_dir: Path) -> DataSplits:
    """Fashion-MNIST, read from a writable copy of ``root`` under ``cache_dir``."""
    from torchvision.datasets import FashionMNIST

    root = _cache_fashion_mnist(cfg.root, cache_dir / "fashion-mnist")
    train, test = (
        FashionMNIST(str(root), train=flag, download=cfg.download) for flag in (True, False)
    )
    return _official_test_splits(
        (train.data.float().div(255).unsqueeze(1), train.targets),
        (test.data.float().div(255).unsqueeze(1), test.targets),
        cfg,
        seed=seed,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        num_classes=10,
    )


def _cache_fashion_mnist(root: Path | None, dest: Path) -> Path:
    """Copy ``root/FashionMNIST/raw`` into ``dest`` and decompress it there.

    torchvision decompresses next to the .gz files, so it must never see the (read-only,
    shared) source. Files are compared by size, and written atomically because several
    worker processes may prepare the same cache at once.
    """
    raw = dest / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    src = root / "FashionMNIST" / "raw" if root is not None else None
    if src is not None and src.is_dir():
        for f in sorted(p for p in src.iterdir() if p.is_file()):
            target = raw / f.name
            if not target.exists() or target.stat().st_size != f.stat().st_size:
                _write_atomically(target, lambda tmp, f=f: shutil.copyfile(f, tmp))
    for gz in sorted(raw.glob("*.gz")):
        out = raw / gz.stem
        if not out.exists() or out.stat().st_mtime < gz.stat().st_mtime:
            _write_atomically(out, lambda tmp, gz=gz: _gunzip(gz, tmp))
    return dest


def _gunzip(src: Path, dst: Path) -> None:
    with gzip.open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def _write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _cifar(cfg: DataConfig, *, seed: int, num_classes: int) -> DataSplits:
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset_cls, mean, std = (
        (CIFAR10, CIFAR10_MEAN, CIFAR10_STD)
        if num_classes == 10
        else (CIFAR100, CIFAR100_MEAN, CIFAR100_STD)
    )

    def tensors(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = dataset_cls(str(cfg.root), train=train, download=cfg.download)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div(255)
        return x, torch.tensor(ds.targets, dtype=torch.long)

    return _official_test_splits(
        tensors(True), tensors(False), cfg, seed=seed, mean=mean, std=std,
        num_classes=num_classes,
    )


@register_dataset("cifar10")
def _cifar10(cfg: DataConfig, *, seed: int, cache_dir: Path) -> DataSplits:
    """CIFAR-10 from a torchvision root (downloaded there when ``download`` is set)."""
    return _cifar(cfg, seed=seed, num_classes=10)


@register_dataset("cifar100")
def _cifar100(cfg: DataConfig, *, seed: int, cache_dir: Path) -> DataSplits:
    """CIFAR-100 from a torchvision root (downloaded there when ``download`` is set)."""
    return _cifar(cfg, seed=seed, num_classes=100)


@register_dataset("imagefolder")
def _imagefolder(cfg: DataConfig, *, seed: int, cache_dir: Path) -> DataSplits:
    """``root/train/<class>/*`` (+ ``root/test/<class>/*`` if present), decoded lazily as RGB."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    assert cfg.root is not None and cfg.image_size is not None
    transform = transforms.Compose(
        [
            transforms.Resize((cfg.image_size, cfg.image_size)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    train = ImageFolder(str(cfg.root / "train"), transform=transform)
    labels = np.asarray(train.targets)
    pool = np.arange(len(labels))
    if (cfg.root / "test").is_dir():
        test: Dataset = ImageFolder(str(cfg.root / "test"), transform=transform)
        if test.class_to_idx != train.class_to_idx:
            raise ValueError(f"{cfg.root}/test must have the same class folders as train/")
    else:
        pool, te = _carve(pool, labels, cfg.test_fraction, seed)
        test = Subset(train, te.tolist())
    tr, va = _train_val(pool, labels, cfg, seed)
    return DataSplits(
        train=Subset(train, tr.tolist()),
        val=Subset(train, va.tolist()),
        test=test,
        in_channels=3,
        num_classes=len(train.classes),
        image_size=cfg.image_size,
    )
