"""MNIST and Fashion-MNIST: the four IDX files (gzipped or raw) in one folder."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
import numpy as np

from storage.readers.base import DataFileError, InMemoryReader, RawDataset

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


def idx_digest(directory: str) -> str:
    """sha256 of the four files' uncompressed bytes (gzipped or not, the same dataset)."""
    import hashlib

    h = hashlib.sha256()
    for part, file in sorted(idx_files(directory).items()):
        name, f = _open_idx(file)
        try:
            with f:
                h.update(part.encode())
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except GZIP_ERRORS as e:
            raise DataFileError(f"{name}: damaged gzip data ({type(e).__name__}: {e}); download it again") from None
    return h.hexdigest()


class IdxFolder(InMemoryReader):
    def __init__(self, class_names: tuple[str, ...]):
        self.class_names = class_names

    def problems(self, path):
        return idx_folder_problems(path)

    def train_samples(self, path, test_fraction):
        return idx_header(idx_files(path)["train_labels"], IDX_LABELS_MAGIC)[0]

    def digest(self, path):
        return idx_digest(path)

    def load(self, path, test_fraction, seed):
        return load_idx_dataset(path, self.class_names)


def MNIST() -> IdxFolder:  # noqa: N802 - registry factories are named after their datasets
    return IdxFolder(MNIST_CLASSES)


def FashionMNIST() -> IdxFolder:  # noqa: N802
    return IdxFolder(FASHION_MNIST_CLASSES)
