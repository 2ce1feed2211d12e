"""scikit-learn's bundled 1,797 8×8 digits: the embedded default, no files needed."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os

import numpy as np

from storage.readers.base import InMemoryReader, RawDataset
from storage.readers.idx import MNIST_CLASSES


def load_digits(test_fraction: float, seed: int) -> RawDataset:
    """The digits (pixel values 0..16) rescaled to 0..255, split by a seeded permutation."""
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


def _digits_file() -> str:
    # Located without importing scikit-learn (a second of start-up on every cached run).
    sklearn_dir = importlib.util.find_spec("sklearn").submodule_search_locations[0]
    return os.path.join(sklearn_dir, "datasets", "data", "digits.csv.gz")


class Digits(InMemoryReader):
    def digest(self, path):
        with open(_digits_file(), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def train_samples(self, path, test_fraction):
        with gzip.open(_digits_file(), "rt") as f:  # one sample a line
            count = sum(1 for line in f if line.strip())
        return count - int(round(count * test_fraction))  # as load_digits splits

    def load(self, path, test_fraction, seed):
        return load_digits(test_fraction, seed)
