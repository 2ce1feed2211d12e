"""CIFAR-10 and CIFAR-100 in any of the layouts users have on disk:

- the official python tarball (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``),
  read without extracting;
- its extracted folder (``cifar-10-batches-py/``, ``cifar-100-python/``) or the folder
  above it;
- ``train.npz`` and ``test.npz`` with ``images`` (N, 32, 32, 3) uint8, ``labels`` and
  ``class_names`` (the layout of ``../shared/data/cifar10``).

The batches are Python pickles. They are read with an unpickler that admits only the
numpy types a CIFAR batch holds, so a file from elsewhere cannot run code when loaded.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile

import numpy as np

from storage.readers.base import DataFileError, InMemoryReader, RawDataset, files_digest, hwc_to_chw

LAYOUTS = {
    10: {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
         "meta": "batches.meta", "names": b"label_names", "labels": b"labels"},
    100: {"folder": "cifar-100-python", "train": ["train"], "test": ["test"],
          "meta": "meta", "names": b"fine_label_names", "labels": b"fine_labels"},
}
SAFE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("builtins", "bytes")}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(data: bytes, name: str) -> dict:
    try:
        return _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - truncated, damaged or foreign pickles alike
        raise DataFileError(f"{name}: not a readable CIFAR batch ({type(e).__name__}: {e}); download it again") from None


NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npy_header(archive: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    with archive.open(name) as f:
        read_header = NPY_HEADERS.get(np.lib.format.read_magic(f))
        if read_header is None:
            return (), np.dtype(np.uint8)  # a later .npy format: np.load decides
        shape, _, dtype = read_header(f)
    return shape, dtype


def npz_images(file: str) -> tuple[int, ...]:
    """The images' shape in a CIFAR npz, checked from the zip directory and the two arrays'
    headers, without reading the pixels: a truncated download loses the directory at the
    file's end, so it fails here."""
    names: set[str] = set()
    try:
        with zipfile.ZipFile(file) as archive:
            names = set(archive.namelist())
            if {"images.npy", "labels.npy"} <= names:
                images, dtype = _npy_header(archive, "images.npy")
                labels, _ = _npy_header(archive, "labels.npy")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataFileError(f"{file}: not a readable npz ({type(e).__name__}: {e}); truncated or damaged? "
                            f"write or download it again") from None
    missing = [n for n in ("images", "labels") if f"{n}.npy" not in names]
    if missing:
        raise DataFileError(f"{file}: no {' or '.join(missing)} array (it holds "
                            f"{', '.join(sorted(n.removesuffix('.npy') for n in names)) or 'nothing'}); "
                            f"expected images (N, 32, 32, 3) uint8, labels and class_names")
    if not images:
        return images
    if dtype != np.uint8 or len(images) != 4 or images[-1] != 3:
        raise DataFileError(f"{file}: images must be uint8 (N, 32, 32, 3), got {dtype} {images}")
    if labels and labels[0] != images[0]:
        raise DataFileError(f"{file}: {images[0]} images but {labels[0]} labels")
    return images


class Cifar(InMemoryReader):
    def __init__(self, classes: int):
        self.classes = classes
        self.layout = LAYOUTS[classes]

    # ---- where the files are
    def _npz(self, path: str) -> list[str] | None:
        files = [os.path.join(path, f"{split}.npz") for split in ("train", "test")]
        return files if os.path.isdir(path) and all(os.path.isfile(f) for f in files) else None

    def _batch_folder(self, path: str) -> str | None:
        for folder in (path, os.path.join(path, self.layout["folder"])):
            if os.path.isdir(folder) and os.path.isfile(os.path.join(folder, self.layout["test"][0])):
                return folder
        return None

    def problems(self, path):
        if os.path.isfile(path):
            return [] if tarfile.is_tarfile(path) else [f"{path}: not a tar archive (expected the official "
                                                        f"{self.layout['folder']} tarball)"]
        npz = self._npz(path)
        if npz:  # what load reads first
            found = []
            for file in npz:
                try:
                    npz_images(file)
                except DataFileError as e:
                    found.append(str(e))
            return found
        if self._batch_folder(path):
            folder = self._batch_folder(path)
            missing = [f for f in self.layout["train"] + self.layout["test"] + [self.layout["meta"]]
                       if folder and not os.path.isfile(os.path.join(folder, f))]
            return [f"{folder}: missing {', '.join(missing)}"] if missing else []
        if not os.path.exists(path):
            return [f"{path}: no such file or folder"]
        return [f"{path}: neither the CIFAR-{self.classes} tarball, its {self.layout['folder']} folder, nor a folder "
                f"with train.npz and test.npz"]

    def train_samples(self, path, test_fraction):
        npz = None if os.path.isfile(path) else self._npz(path)
        shape = npz_images(npz[0]) if npz else ()  # a batch's count is inside its pickle
        return shape[0] if shape else None

    def _members(self, path: str) -> list[str]:
        names = [self.layout["meta"], *self.layout["train"], *self.layout["test"]]
        folder = self._batch_folder(path)
        return [os.path.join(folder, n) for n in names] if folder else []

    def digest(self, path):
        if os.path.isfile(path):
            return files_digest([path])
        return files_digest(self._npz(path) or self._members(path))

    # ---- reading
    def load(self, path, test_fraction, seed):
        if os.path.isfile(path):
            return self._load_batches(self._read_tar(path))
        npz = self._npz(path)
        if npz:
            return self._load_npz(*npz)
        folder = self._batch_folder(path)
        if folder is None:
            raise DataFileError(self.problems(path)[0])
        files = {}
        for name in (self.layout["meta"], *self.layout["train"], *self.layout["test"]):
            file = os.path.join(folder, name)
            if not os.path.isfile(file):
                raise DataFileError(f"{file}: no such file (the CIFAR-{self.classes} folder is incomplete)")
            with open(file, "rb") as f:
                files[name] = (file, f.read())
        return self._load_batches(files)

    def _read_tar(self, path: str) -> dict[str, tuple[str, bytes]]:
        wanted = {self.layout["meta"], *self.layout["train"], *self.layout["test"]}
        files = {}
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    base = os.path.basename(member.name)
                    if member.isfile() and base in wanted:
                        files[base] = (f"{path}:{member.name}", tar.extractfile(member).read())
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataFileError(f"{path}: damaged tar archive ({type(e).__name__}: {e}); download it again") from None
        missing = sorted(wanted - set(files))
        if missing:
            raise DataFileError(f"{path}: the archive lacks {', '.join(missing)}; is it CIFAR-{self.classes}?")
        return files

    def _load_batches(self, files: dict[str, tuple[str, bytes]]) -> RawDataset:
        meta_name, meta_bytes = files[self.layout["meta"]]
        names = tuple(n.decode() for n in _unpickle(meta_bytes, meta_name)[self.layout["names"]])
        splits = {}
        for split in ("train", "test"):
            images, labels = [], []
            for batch in self.layout[split]:
                name, data = files[batch]
                content = _unpickle(data, name)
                try:
                    images.append(np.asarray(content[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                    labels.append(np.asarray(content[self.layout["labels"]], dtype=np.int64))
                except (KeyError, ValueError) as e:
                    raise DataFileError(f"{name}: not a CIFAR-{self.classes} batch ({type(e).__name__}: {e})") from None
                if len(images[-1]) != len(labels[-1]):
                    raise DataFileError(f"{name}: {len(images[-1])} images but {len(labels[-1])} labels")
            splits[split] = (np.concatenate(images), np.concatenate(labels))
        return RawDataset(*splits["train"], *splits["test"], names)

    def _load_npz(self, train_file: str, test_file: str) -> RawDataset:
        splits, names = {}, None
        for split, file in (("train", train_file), ("test", test_file)):
            try:
                with np.load(file, allow_pickle=False) as data:
                    images, labels = data["images"], data["labels"].astype(np.int64)
                    names = tuple(str(n) for n in data["class_names"]) if "class_names" in data else names
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                raise DataFileError(f"{file}: not a readable npz with images and labels "
                                    f"({type(e).__name__}: {e})") from None
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise DataFileError(f"{file}: images must be uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
            if len(images) != len(labels):
                raise DataFileError(f"{file}: {len(images)} images but {len(labels)} labels")
            splits[split] = (hwc_to_chw(images), labels)
        names = names or tuple(str(i) for i in range(self.classes))
        return RawDataset(*splits["train"], *splits["test"], names)


def CIFAR10() -> Cifar:  # noqa: N802 - registry factories are named after their datasets
    return Cifar(10)


def CIFAR100() -> Cifar:  # noqa: N802
    return Cifar(100)
