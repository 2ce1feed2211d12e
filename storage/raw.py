"""Readers for raw datasets: scikit-learn's bundled digits and MNIST-style IDX files.

Every reader returns a :class:`RawDataset` of uint8 NCHW images, so the ingest stage and
everything after it never care where the pixels came from.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np

MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


@dataclass(frozen=True)
class RawDataset:
    train_images: np.ndarray  # uint8 (N, C, H, W)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in ("train", "test"):
            raise ValueError(f"unknown split {name!r} (allowed: train, test)")
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")


def load_digits(test_fraction: float, seed: int) -> RawDataset:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16), rescaled to 0..255."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return RawDataset(
        images[np.sort(train)], labels[np.sort(train)],
        images[np.sort(test)], labels[np.sort(test)],
        MNIST_CLASSES,
    )


def _open_idx(path: str):
    for candidate in (path, path + ".gz"):
        if os.path.exists(candidate):
            opener = gzip.open if candidate.endswith(".gz") else open
            return candidate, opener(candidate, "rb")
    raise FileNotFoundError(f"IDX file not found: {path} (or {path}.gz)")


def read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Read one IDX file (big-endian magic, dimension sizes, then uint8 data)."""
    name, f = _open_idx(path)
    with f:
        header = f.read(4)
        if len(header) < 4:
            raise ValueError(f"{name}: truncated IDX header")
        (magic,) = struct.unpack(">i", header)
        if magic != expected_magic:
            raise ValueError(f"{name}: IDX magic {magic}, expected {expected_magic}")
        ndim = magic & 0xFF
        dims = struct.unpack(f">{ndim}i", f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    expected = int(np.prod(dims))
    if data.size != expected:
        raise ValueError(f"{name}: {data.size} data bytes, header promises {expected}")
    return data.reshape(dims)


def idx_files(directory: str) -> dict[str, str]:
    return {part: os.path.join(directory, base) for part, base in IDX_FILES.items()}


def load_idx_dataset(directory: str, class_names: tuple[str, ...]) -> RawDataset:
    """MNIST and Fashion-MNIST: the four IDX files (gzipped or raw) in one folder."""
    files = idx_files(directory)
    images = {s: read_idx(files[f"{s}_images"], IDX_IMAGES_MAGIC)[:, None] for s in ("train", "test")}
    labels = {s: read_idx(files[f"{s}_labels"], IDX_LABELS_MAGIC).astype(np.int64) for s in ("train", "test")}
    for s in ("train", "test"):
        if len(images[s]) != len(labels[s]):
            raise ValueError(f"{directory}: {len(images[s])} {s} images but {len(labels[s])} labels")
    return RawDataset(images["train"], labels["train"], images["test"], labels["test"], class_names)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 NCHW images to size x size (digits are 8x8; LeNet wants more)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images.astype(np.float32))
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).numpy()


def take_subset(images: np.ndarray, labels: np.ndarray, limit: int | None, seed: int):
    """A seeded random subset, kept in index order (the stored order stays meaningful)."""
    if limit is None or limit >= len(labels):
        return images, labels
    keep = np.sort(np.random.default_rng(seed).choice(len(labels), size=limit, replace=False))
    return images[keep], labels[keep]


def source_digest(source: str, path: str | None) -> str:
    """sha256 of the raw files a dataset is read from: the cheap half of its cache key."""
    import hashlib
    import importlib.util

    h = hashlib.sha256()
    if source == "digits":
        # Located without importing scikit-learn (a second of start-up on every cached run).
        sklearn_dir = importlib.util.find_spec("sklearn").submodule_search_locations[0]
        with open(os.path.join(sklearn_dir, "datasets", "data", "digits.csv.gz"), "rb") as f:
            h.update(f.read())
        return h.hexdigest()
    for part, file in sorted(idx_files(path).items()):
        name, f = _open_idx(file)
        with f:
            h.update(part.encode())
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def load_raw(source: str, path: str | None, test_fraction: float, seed: int) -> RawDataset:
    if source == "digits":
        return load_digits(test_fraction, seed)
    names = FASHION_MNIST_CLASSES if source == "fashion-mnist" else MNIST_CLASSES
    return load_idx_dataset(path, names)
