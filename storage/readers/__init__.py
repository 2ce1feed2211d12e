"""The dataset reader registry (``data.source``): adding a format is one file in this
package and one line here. Every reader gives the ingest stage uint8 NCHW images and int64
labels per split, so nothing after ingest cares where the pixels came from.

Readers are imported on use: validating a config needs the names alone.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage.readers.base import Reader

# source -> ("module:factory" in this package, what data.path must be)
READERS: dict[str, tuple[str, str]] = {
    "digits": ("digits:Digits", "nothing (bundled with scikit-learn)"),
    "mnist": ("idx:MNIST", "the folder of the four IDX files"),
    "fashion-mnist": ("idx:FashionMNIST", "the folder of the four IDX files"),
    "cifar10": ("cifar:CIFAR10", "the python tarball, its extracted folder, or a folder with train.npz and test.npz"),
    "cifar100": ("cifar:CIFAR100", "the python tarball, its extracted folder, or a folder with train.npz and test.npz"),
    "svhn": ("svhn:SVHN", "the folder holding train_32x32.mat and test_32x32.mat"),
    "image_folder": ("image_folder:ImageFolder", "a folder with train/<class>/… and val/<class>/… image trees"),
}
SOURCES = {name: path for name, (_, path) in READERS.items()}
# source -> (channels, side of its images as stored; None: data.image_size gives it), for
# checks of a config that must not read the files
IMAGE_SHAPES: dict[str, tuple[int, int | None]] = {
    "digits": (1, 8), "mnist": (1, 28), "fashion-mnist": (1, 28), "cifar10": (3, 32), "cifar100": (3, 32),
    "svhn": (3, 32), "image_folder": (3, None),
}


@cache
def reader(source: str) -> "Reader":
    if source not in READERS:
        raise ValueError(f"unknown data source {source!r} (allowed: {', '.join(READERS)})")
    module, _, factory = READERS[source][0].partition(":")
    return getattr(import_module(f"{__name__}.{module}"), factory)()
