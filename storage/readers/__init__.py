"""The dataset reader registry (``data.source``): adding a format is one file in this
package and one line here. Every reader gives the ingest stage uint8 NCHW images and int64
labels per split, so nothing after ingest cares where the pixels came from.

Readers are imported on use: validating a config needs the names alone.
"""

from __future__ import annotations

from functools import cache
from importlib import import_module
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from storage.readers.base import Reader


class Source(NamedTuple):
    factory: str  # "module:factory" in this package
    description: str  # what it reads, for data.source's help
    path: str  # what data.path must be
    channels: int  # of its images as stored, for checks of a config that must not read the files
    side: int | None  # of its images as stored; None: data.image_size gives it
    augment: str = "none"  # what data.augment: auto means for it (none, crop or crop_flip)


IDX = "the folder of the four IDX files"
CIFAR = "the python tarball, its extracted folder, or a folder with train.npz and test.npz"
READERS: dict[str, Source] = {
    "digits": Source("digits:Digits", "bundled", "nothing (bundled with scikit-learn)", 1, 8),
    "mnist": Source("idx:MNIST", "IDX files", IDX, 1, 28),
    "fashion-mnist": Source("idx:FashionMNIST", "IDX files", IDX, 1, 28),
    "cifar10": Source("cifar:CIFAR10", "python tarball, its folder, or train.npz + test.npz", CIFAR, 3, 32, "crop_flip"),
    "cifar100": Source("cifar:CIFAR100", "python tarball, its folder, or train.npz + test.npz", CIFAR, 3, 32,
                       "crop_flip"),
    # a flipped digit is another digit: crops only
    "svhn": Source("svhn:SVHN", "train_32x32.mat, test_32x32.mat", "the folder holding train_32x32.mat and "
                                                                    "test_32x32.mat", 3, 32, "crop"),
    "image_folder": Source("image_folder:ImageFolder", "train/<class>/… and val/<class>/… trees of JPEG / PNG files",
                           "a folder with train/<class>/… and val/<class>/… image trees", 3, None, "crop_flip"),
}


@cache
def reader(source: str) -> "Reader":
    if source not in READERS:
        raise ValueError(f"unknown data source {source!r} (allowed: {', '.join(READERS)})")
    module, _, factory = READERS[source].factory.partition(":")
    return getattr(import_module(f"{__name__}.{module}"), factory)()
