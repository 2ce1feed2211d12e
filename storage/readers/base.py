"""What every dataset reader shares: the in-memory dataset it returns, the one-line error
for a file it cannot read, and the small base class a reader implements.

A reader is one file in this package and one line in ``storage.readers.READERS``.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


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


class DataFileError(ValueError):
    """A raw data file that cannot be read; the message is one line naming the file."""


class Reader(ABC):
    """One dataset format. ``problems`` is cheap (run by ``mid validate`` before Ray starts);
    ``digest`` keys the ingested dataset."""

    streaming = False

    def problems(self, path: str | None) -> list[str]:
        return []

    def train_samples(self, path: str | None, test_fraction: float) -> int | None:
        """Samples of the train split when headers tell it (called once ``problems`` found
        none); None when only reading the whole set would."""
        return None

    @abstractmethod
    def digest(self, path: str | None) -> str: ...


class InMemoryReader(Reader):
    """A format whose sets fit in memory: ``load`` returns both splits. A format whose sets
    do not (``streaming``) is decoded into the dataset store instead
    (``storage.readers.image_folder``)."""

    @abstractmethod
    def load(self, path: str | None, test_fraction: float, seed: int) -> RawDataset: ...


def files_digest(paths: list[str]) -> str:
    """sha256 over the names and bytes of ``paths``, in order."""
    h = hashlib.sha256()
    for path in paths:
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def hwc_to_chw(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


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
    keep = subset_positions(len(labels), limit, seed)
    return (images, labels) if keep is None else (images[keep], labels[keep])


def subset_positions(count: int, limit: int | None, seed: int) -> np.ndarray | None:
    if limit is None or limit >= count:
        return None
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))
