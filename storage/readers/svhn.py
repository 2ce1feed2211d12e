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


def mat_header(file: str) -> tuple[int, ...]:
    """X's shape, from the variables' headers, checked without reading the pixels: every
    variable's recorded length must fit the file (scipy's whosmat lists a truncated file's
    variables without a word)."""
    from scipy.io.matlab._mio5 import MatFile5Reader  # whosmat's reader, for the lengths it skips

    size = os.path.getsize(file)
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with open(file, "rb") as f:
            mat = MatFile5Reader(f)
            mat.initialize_read()
            mat.read_file_header()
            while not mat.end_of_stream():
                header, next_position = mat.read_var_header()
                name = header.name.decode("latin1") if header.name else ""
                if next_position > size:
                    raise DataFileError(f"{file}: truncated: variable {name!r} needs {next_position:,} bytes, the "
                                        f"file has {size:,}; download it again")
                shapes[name] = tuple(mat._matrix_reader.shape_from_header(header))
                f.seek(next_position)
    except DataFileError:
        raise
    except Exception as e:  # noqa: BLE001 - as read_mat: scipy raises anything on damage
        raise DataFileError(f"{file}: not a readable SVHN .mat file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); download it again") from None
    if "X" not in shapes or "y" not in shapes:
        raise DataFileError(f"{file}: no {'X' if 'X' not in shapes else 'y'} variable (it holds "
                            f"{', '.join(shapes) or 'nothing'}); is it an SVHN cropped-digits file?")
    images, labels = shapes["X"], shapes["y"]
    if len(images) != 4 or images[:3] != (32, 32, 3):
        raise DataFileError(f"{file}: X must be (32, 32, 3, N), got {images}")
    if labels and labels[0] != images[3]:
        raise DataFileError(f"{file}: {images[3]} images but {labels[0]} labels")
    return images


class SVHN(InMemoryReader):
    def _files(self, path: str) -> dict[str, str]:
        return {split: os.path.join(path, name) for split, name in FILES.items()}

    def problems(self, path):
        if not os.path.isdir(path):
            return [f"{path}: no such folder (data.path should hold {' and '.join(FILES.values())})"]
        found = []
        for file in self._files(path).values():
            if not os.path.isfile(file):
                found.append(f"{file}: no such file")
                continue
            try:
                mat_header(file)
            except DataFileError as e:
                found.append(str(e))
        return found

    def train_samples(self, path, test_fraction):
        return mat_header(self._files(path)["train"])[3]

    def digest(self, path):
        return files_digest(list(self._files(path).values()))

    def load(self, path, test_fraction, seed):
        splits = {split: read_mat(file) for split, file in self._files(path).items()}
        return RawDataset(*splits["train"], *splits["test"], CLASSES)
