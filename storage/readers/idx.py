"""Readers for raw datasets: scikit-learn's bundled digits and MNIST-style IDX files.

Every reader returns a :class:`RawDataset` of uint8 NCHW images, so the ingest stage and
everything after it never care where the pixels came from.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
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


class DataFileError(ValueError):
    """A raw data file that cannot be read; the message is one line naming the file."""


GZIP_MAGIC = b"\x1f\x8b"
# What a reader sees from a damaged gzip stream: a short stream, a bad header, bad deflate data.
GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, OSError)


def _find_idx(path: str) -> str:
    for candidate in (path, path + ".gz"):
        if os.path.exists(candidate):
            return candidate
    raise DataFileError(f"IDX file not found: {path} (or {path}.gz)")


def _open_idx(path: str):
    name = _find_idx(path)
    if os.path.getsize(name) == 0:
        raise DataFileError(f"{name}: empty file; download it again")
    if not name.endswith(".gz"):
        return name, open(name, "rb")
    with open(name, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            raise DataFileError(f"{name}: not a gzip file (ends in .gz but lacks the gzip signature); "
                                f"download it again")
    return name, gzip.open(name, "rb")


def _read_header(f, name: str, expected_magic: int) -> tuple[int, ...]:
    header = f.read(4)
    if len(header) < 4:
        raise DataFileError(f"{name}: {'empty file' if not header else 'truncated IDX header'}; download it again")
    (magic,) = struct.unpack(">i", header)
    if magic != expected_magic:
        raise DataFileError(f"{name}: IDX magic {magic}, expected {expected_magic} "
                            f"({'images' if expected_magic == IDX_IMAGES_MAGIC else 'labels'}); is it the right file?")
    ndim = magic & 0xFF
    raw_dims = f.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataFileError(f"{name}: truncated IDX header; download it again")
    return struct.unpack(f">{ndim}i", raw_dims)


def idx_header(path: str, expected_magic: int) -> tuple[int, ...]:
    """The dimensions of one IDX file, checked without reading its data: the header parses,
    and the file's length (a gzip file's recorded uncompressed length) is what it promises."""
    name, f = _open_idx(path)
    try:
        with f:
            dims = _read_header(f, name, expected_magic)
    except GZIP_ERRORS as e:
        raise DataFileError(f"{name}: damaged gzip data ({type(e).__name__}: {e}); download it again") from None
    expected = 4 + 4 * len(dims) + int(np.prod(dims))
    if name.endswith(".gz"):
        with open(name, "rb") as raw:
            raw.seek(-4, os.SEEK_END)
            (recorded,) = struct.unpack("<I", raw.read(4))  # ISIZE: uncompressed length mod 2^32
        if recorded != expected % (1 << 32):
            raise DataFileError(f"{name}: truncated or damaged (the gzip trailer records {recorded} bytes, "
                                f"the IDX header promises {expected}); download it again")
    elif os.path.getsize(name) != expected:
        raise DataFileError(f"{name}: {os.path.getsize(name)} bytes, the IDX header promises {expected}; "
                            f"download it again")
    return dims


def read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Read one IDX file (big-endian magic, dimension sizes, then uint8 data)."""
    name, f = _open_idx(path)
    try:
        with f:
            dims = _read_header(f, name, expected_magic)
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except GZIP_ERRORS as e:
        raise DataFileError(f"{name}: damaged gzip data ({type(e).__name__}: {e}); download it again") from None
    expected = int(np.prod(dims))
    if data.size != expected:
        raise DataFileError(f"{name}: {data.size} data bytes, header promises {expected}; download it again")
    return data.reshape(dims)


def idx_folder_problems(directory: str) -> list[str]:
    """Everything wrong with an IDX folder that can be seen without reading the data."""
    if not os.path.isdir(directory):
        return [f"{directory}: no such folder (data.path should hold the four IDX files)"]
    problems, counts = [], {}
    files = idx_files(directory)
    for part, path in files.items():
        try:
            counts[part] = idx_header(path, IDX_IMAGES_MAGIC if part.endswith("images") else IDX_LABELS_MAGIC)[0]
        except DataFileError as e:
            problems.append(str(e))
    for split in ("train", "test"):
        images, labels = counts.get(f"{split}_images"), counts.get(f"{split}_labels")
        if images is not None and labels is not None and images != labels:
            problems.append(f"{_find_idx(files[f'{split}_images'])}: {images} images but "
                            f"{_find_idx(files[f'{split}_labels'])} has {labels} labels; the files do not belong together")
    return problems


def idx_files(directory: str) -> dict[str, str]:
    return {part: os.path.join(directory, base) for part, base in IDX_FILES.items()}


def load_idx_dataset(directory: str, class_names: tuple[str, ...]) -> RawDataset:
    """MNIST and Fashion-MNIST: the four IDX files (gzipped or raw) in one folder."""
    files = idx_files(directory)
    images = {s: read_idx(files[f"{s}_images"], IDX_IMAGES_MAGIC)[:, None] for s in ("train", "test")}
    labels = {s: read_idx(files[f"{s}_labels"], IDX_LABELS_MAGIC).astype(np.int64) for s in ("train", "test")}
    for s in ("train", "test"):
        if len(images[s]) != len(labels[s]):
            raise DataFileError(f"{directory}: {len(images[s])} {s} images but {len(labels[s])} labels")
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
        try:
            with f:
                h.update(part.encode())
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except GZIP_ERRORS as e:
            raise DataFileError(f"{name}: damaged gzip data ({type(e).__name__}: {e}); download it again") from None
    return h.hexdigest()


def load_raw(source: str, path: str | None, test_fraction: float, seed: int) -> RawDataset:
    if source == "digits":
        return load_digits(test_fraction, seed)
    names = FASHION_MNIST_CLASSES if source == "fashion-mnist" else MNIST_CLASSES
    return load_idx_dataset(path, names)
