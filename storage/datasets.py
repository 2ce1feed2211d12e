"""The Zarr dataset store: uint8 NCHW images and int64 labels per split, plus class names.

Layout under ``<store>/datasets/<key>/``::

    train/images  uint8 (N, C, H, W), chunked along N
    train/labels  int64 (N,)
    test/...      the same
    manifest.json written last: fingerprint, shapes, class names (its presence = committed)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from storage import fs
from storage.raw import RawDataset

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


def write_dataset(root: str, key: str, raw: RawDataset) -> dict[str, Any]:
    url = dataset_url(root, key)
    fs.remove(url)  # a leftover from a killed ingest is never committed; start clean
    group = zarr.open_group(fs.zarr_store(url), mode="w")
    shapes = {}
    for split in SPLITS:
        images, labels = raw.split(split)
        rows = chunk_rows(int(np.prod(images.shape[1:])))
        group.create_array(f"{split}/images", data=np.ascontiguousarray(images), chunks=(rows, *images.shape[1:]))
        group.create_array(f"{split}/labels", data=labels.astype(np.int64), chunks=(rows,))
        shapes[split] = list(images.shape)
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "fingerprint": fingerprint(raw),
        "shapes": shapes,
        "class_names": list(raw.class_names),
    }
    fs.write_json_atomic(fs.join(url, "manifest.json"), manifest)
    return manifest


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
