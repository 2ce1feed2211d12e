"""Raw readers on small IDX files written in the real format, gzipped and raw."""

import gzip
import struct

import numpy as np
import pytest

from storage.readers import reader
from storage.readers.base import DataFileError, resize_images, take_subset
from storage.readers.digits import load_digits
from storage.readers.idx import IDX_FILES, load_idx_dataset, read_idx


def write_idx(path, array, gz):
    header = struct.pack(">i", (0x08 << 8) | array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_idx_folder(folder, gz, n_train=20, n_test=8):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)), "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)), "test_labels": rng.integers(0, 10, n_test),
    }
    for part, array in arrays.items():
        write_idx(folder / IDX_FILES[part], array, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_round_trip(tmp_path, gz):
    arrays = make_idx_folder(tmp_path, gz)
    raw = load_idx_dataset(str(tmp_path), tuple("0123456789"))
    assert raw.train_images.shape == (20, 1, 28, 28) and raw.train_images.dtype == np.uint8
    np.testing.assert_array_equal(raw.train_images[:, 0], arrays["train_images"])
    np.testing.assert_array_equal(raw.test_labels, arrays["test_labels"])
    assert len(reader("mnist").digest(str(tmp_path))) == 64


def test_idx_wrong_magic_and_truncation_are_named(tmp_path):
    arrays = make_idx_folder(tmp_path, gz=False)
    with pytest.raises(ValueError, match="magic 2049, expected 2051"):
        read_idx(str(tmp_path / IDX_FILES["train_labels"]), 2051)
    path = tmp_path / IDX_FILES["train_images"]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="header promises"):
        read_idx(str(path), 2051)
    with pytest.raises(DataFileError, match="IDX file not found"):
        read_idx(str(tmp_path / "missing"), 2051)
    assert arrays


def test_digits_split_is_seeded_and_disjoint():
    a, b = load_digits(0.2, seed=0), load_digits(0.2, seed=0)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert a.train_images.shape[1:] == (1, 8, 8) and a.train_images.max() == 255
    assert len(a.train_labels) + len(a.test_labels) == 1797
    assert abs(len(a.test_labels) - 359) <= 1


def test_resize_and_subset():
    images = np.random.default_rng(0).integers(0, 256, (10, 1, 8, 8), dtype=np.uint8)
    assert resize_images(images, 16).shape == (10, 1, 16, 16)
    x, y = take_subset(images, np.arange(10), 4, seed=0)
    assert len(x) == 4 and list(y) == sorted(y)
