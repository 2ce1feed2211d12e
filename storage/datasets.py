"""The Zarr dataset store: uint8 NCHW images and int64 labels per split, plus class names.

Layout under ``<store>/datasets/<key>/``::

    train/images  uint8 (N, C, H, W), chunked along N
    train/labels  int64 (N,)
    test/...      the same
    manifest.json written last: fingerprint, shapes, class names (its presence = committed)

In-memory datasets and streamed ones (image folders, one chunk at a time) go through the
same writer and get the same fingerprint for the same pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import zarr

from storage import fs
from storage.readers.base import RawDataset

SPLITS = ("train", "test")
FORMAT_VERSION = 1
TARGET_CHUNK_BYTES = 4 << 20


def dataset_url(root: str, key: str) -> str:
    return fs.join(root, "datasets", key)


def chunk_rows(sample_bytes: int, target_bytes: int = TARGET_CHUNK_BYTES) -> int:
    return max(1, target_bytes // max(1, sample_bytes))


def fingerprint(raw: RawDataset) -> str:
    return fingerprint_arrays({split: raw.split(split) for split in SPLITS}, raw.class_names)


def fingerprint_arrays(splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names) -> str:
    """sha256 over every split's pixels, labels and the class names."""
    h = hashlib.sha256()
    for split in SPLITS:
        images, labels = splits[split]
        h.update(f"{split}:{tuple(images.shape)}:{tuple(labels.shape)}".encode())
        h.update(np.ascontiguousarray(images).tobytes())
        h.update(np.ascontiguousarray(labels.astype(np.int64)).tobytes())
    h.update("\n".join(class_names).encode())
    return h.hexdigest()


def read_manifest(root: str, key: str) -> dict[str, Any] | None:
    return fs.read_json(fs.join(dataset_url(root, key), "manifest.json"))


class DatasetWriter:
    """Writes one dataset split by split, in order, from batches of any size: rows are
    buffered to whole chunks, and the fingerprint is hashed as they pass. Nothing is
    visible as committed until ``commit`` writes the manifest; ``abort`` removes the rest."""

    def __init__(self, root: str, key: str):
        self.root, self.key = root, key
        self.url = dataset_url(root, key)
        fs.remove(self.url)  # a leftover from a killed ingest is never committed; start clean
        self.group = zarr.open_group(fs.zarr_store(self.url), mode="w")
        self.hash = hashlib.sha256()
        self.shapes: dict[str, list[int]] = {}

    def write_split(self, split: str, labels: np.ndarray, image_shape: tuple[int, ...],
                    batches: Iterable[np.ndarray]) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        shape = (len(labels), *image_shape)
        rows = chunk_rows(int(np.prod(image_shape)))
        images = self.group.create_array(f"{split}/images", shape=shape, dtype=np.uint8, chunks=(rows, *image_shape))
        self.hash.update(f"{split}:{shape}:{labels.shape}".encode())
        pending, written = [], 0
        for batch in batches:
            pending.append(np.ascontiguousarray(batch, dtype=np.uint8))
            buffered = sum(len(b) for b in pending)
            if buffered >= rows:
                block = np.concatenate(pending)
                whole = (len(block) // rows) * rows
                written = self._write_rows(images, block[:whole], written)
                pending = [block[whole:]]
        if pending:
            written = self._write_rows(images, np.concatenate(pending), written)
        if written != len(labels):
            raise RuntimeError(f"dataset {split}: {written} images written for {len(labels)} labels")
        self.hash.update(labels.tobytes())
        self.group.create_array(f"{split}/labels", data=labels, chunks=(rows,))
        self.shapes[split] = list(shape)

    def _write_rows(self, images: zarr.Array, block: np.ndarray, start: int) -> int:
        if len(block):
            images[start:start + len(block)] = block
            self.hash.update(block.tobytes())
        return start + len(block)

    def commit(self, class_names: Iterable[str]) -> dict[str, Any]:
        class_names = list(class_names)
        self.hash.update("\n".join(class_names).encode())
        manifest = {"format_version": FORMAT_VERSION, "key": self.key, "fingerprint": self.hash.hexdigest(),
                    "shapes": self.shapes, "class_names": class_names}
        fs.write_json_atomic(fs.join(self.url, "manifest.json"), manifest)
        return manifest

    def abort(self) -> None:
        fs.remove(self.url)


def write_dataset(root: str, key: str, raw: RawDataset) -> dict[str, Any]:
    writer = DatasetWriter(root, key)
    for split in SPLITS:
        images, labels = raw.split(split)
        writer.write_split(split, labels, images.shape[1:], [images])
    return writer.commit(raw.class_names)


@dataclass
class DatasetReader:
    """Read access to one committed dataset."""

    root: str
    key: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: str, key: str) -> "DatasetReader":
        manifest = read_manifest(root, key)
        if manifest is None:
            raise FileNotFoundError(f"dataset {key} is not in store {root} (run the ingest stage)")
        return cls(root, key, manifest)

    @property
    def group(self) -> zarr.Group:
        return zarr.open_group(fs.zarr_store(dataset_url(self.root, self.key), read_only=True), mode="r")

    def images(self, split: str) -> zarr.Array:
        return self.group[f"{split}/images"]

    def labels(self, split: str) -> zarr.Array:
        return self.group[f"{split}/labels"]

    def num_samples(self, split: str) -> int:
        return self.manifest["shapes"][split][0]

    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["shapes"]["train"][1:])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_names"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def load(self, split: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        stop = self.num_samples(split) if stop is None else stop
        return self.images(split)[start:stop], self.labels(split)[start:stop]

    def load_indices(self, split: str, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of the samples ``indices`` (sorted reads stay chunk-local)."""
        selection = (np.asarray(indices, dtype=np.int64),)
        return (self.images(split).get_orthogonal_selection(selection),
                self.labels(split).get_orthogonal_selection(selection))


def subset_indices(num_samples: int, size: int | None, seed: int) -> list[int] | None:
    """A seeded subset of ``size`` samples of a split, sorted; None means the whole split."""
    if size is None or size >= num_samples:
        return None
    chosen = np.random.default_rng(seed).choice(num_samples, size=size, replace=False)
    return sorted(int(i) for i in chosen)
