"""SVHN's cropped digits: ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB files with
``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1), where the digit 0 is labelled 10)."""

from __future__ import annotations

import os

import numpy as np

from storage.readers.base import DataFileError, InMemoryReader, RawDataset, files_digest

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
CLASSES = tuple(str(i) for i in range(10))


def read_mat(file: str) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        content = loadmat(file)
        images, labels = content["X"], content["y"].reshape(-1).astype(np.int64)
    except Exception as e:  # noqa: BLE001 - scipy raises anything from IndexError to ValueError on damage
        raise DataFileError(f"{file}: not a readable SVHN .mat file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); download it again") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise DataFileError(f"{file}: X must be uint8 (32, 32, 3, N), got {images.dtype} {images.shape}")
    if images.shape[3] != len(labels):
        raise DataFileError(f"{file}: {images.shape[3]} images but {len(labels)} labels")
    labels[labels == 10] = 0
    if labels.min() < 0 or labels.max() > 9:
        raise DataFileError(f"{file}: labels outside 1..10")
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels


class SVHN(InMemoryReader):
    def _files(self, path: str) -> dict[str, str]:
        return {split: os.path.join(path, name) for split, name in FILES.items()}

    def problems(self, path):
        if not os.path.isdir(path):
            return [f"{path}: no such folder (data.path should hold {' and '.join(FILES.values())})"]
        return [f"{file}: no such file" for file in self._files(path).values() if not os.path.isfile(file)]

    def digest(self, path):
        return files_digest(list(self._files(path).values()))

    def load(self, path, test_fraction, seed):
        splits = {split: read_mat(file) for split, file in self._files(path).items()}
        return RawDataset(*splits["train"], *splits["test"], CLASSES)
