"""Dataset readers on tiny files written in each format's real layout: the CIFAR python
tarball (and its folder, and the npz layout), CIFAR-100, SVHN's .mat files, and image
folders of real JPEG and PNG files decoded by Ray Data into the dataset store."""

import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from clihelpers import mid, the_error_line
from storage.readers import reader
from storage.readers.base import DataFileError

RNG = np.random.default_rng(0)


# ---- CIFAR -----------------------------------------------------------------------------

def cifar_batches(classes=10):
    """The official batches: pickled dicts with bytes keys, data (N, 3072) uint8 row-major RGB planes."""
    if classes == 10:
        names = {"batches.meta": {b"label_names": [f"class{i}".encode() for i in range(10)]}}
        splits = {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 3}
        label_key = b"labels"
    else:
        names = {"meta": {b"fine_label_names": [f"fine{i}".encode() for i in range(100)]}}
        splits = {"train": 4, "test": 3}
        label_key = b"fine_labels"
    files = {name: pickle.dumps(content) for name, content in names.items()}
    arrays = {}
    for name, n in splits.items():
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in RNG.integers(0, classes, n)]
        arrays[name] = (data, labels)
        files[name] = pickle.dumps({b"batch_label": name.encode(), b"data": data, label_key: labels})
    return files, arrays


def write_tarball(path, folder, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("layout", ["tarball", "folder", "parent"])
def test_cifar10_official_layouts(tmp_path, layout):
    files, arrays = cifar_batches()
    if layout == "tarball":
        path = tmp_path / "cifar-10-python.tar.gz"
        write_tarball(path, "cifar-10-batches-py", files)
    else:
        (tmp_path / "cifar-10-batches-py").mkdir()
        for name, data in files.items():
            (tmp_path / "cifar-10-batches-py" / name).write_bytes(data)
        path = tmp_path / "cifar-10-batches-py" if layout == "folder" else tmp_path
    cifar = reader("cifar10")
    assert cifar.problems(str(path)) == []
    raw = cifar.load(str(path), 0.2, 0)
    assert raw.train_images.shape == (10, 3, 32, 32) and raw.test_images.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(raw.train_images[2].reshape(-1), arrays["data_batch_2"][0][0])
    assert list(raw.test_labels) == arrays["test_batch"][1]
    assert raw.class_names[3] == "class3"
    assert len(cifar.digest(str(path))) == 64


def test_cifar100_tarball_reads_the_fine_labels(tmp_path):
    files, arrays = cifar_batches(100)
    write_tarball(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", files)
    raw = reader("cifar100").load(str(tmp_path / "cifar-100-python.tar.gz"), 0.2, 0)
    assert raw.train_images.shape == (4, 3, 32, 32) and len(raw.class_names) == 100
    assert list(raw.train_labels) == arrays["train"][1]


def test_cifar_npz_layout(tmp_path):
    for split, n in (("train", 6), ("test", 4)):
        np.savez(tmp_path / f"{split}.npz", images=RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=RNG.integers(0, 10, n).astype(np.uint8), class_names=np.array([f"c{i}" for i in range(10)]))
    raw = reader("cifar10").load(str(tmp_path), 0.2, 0)
    hwc = np.load(tmp_path / "train.npz")["images"]
    np.testing.assert_array_equal(raw.train_images, hwc.transpose(0, 3, 1, 2))
    assert raw.class_names[0] == "c0" and raw.test_labels.dtype == np.int64


def test_cifar_damage_is_named(tmp_path):
    files, _ = cifar_batches()
    path = tmp_path / "cifar-10-python.tar.gz"
    write_tarball(path, "cifar-10-batches-py", files)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataFileError, match=f"{path}: damaged tar archive"):
        reader("cifar10").load(str(path), 0.2, 0)
    # A pickle that would run code when loaded is refused, and named.
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "test_batch").write_bytes(pickle.dumps(os.system))
    with pytest.raises(DataFileError, match="test_batch: not a readable CIFAR batch"):
        reader("cifar10").load(str(folder), 0.2, 0)
    assert "neither the CIFAR-10 tarball" in reader("cifar10").problems(str(tmp_path / "nothing-here"))[0] or \
        "no such file" in reader("cifar10").problems(str(tmp_path / "nothing-here"))[0]


# ---- SVHN ------------------------------------------------------------------------------

def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat

    truth = {}
    for split, n in (("train", 5), ("test", 3)):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [3], [4]][:n], dtype=np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        truth[split] = (x, y)
    svhn = reader("svhn")
    assert svhn.problems(str(tmp_path)) == []
    raw = svhn.load(str(tmp_path), 0.2, 0)
    assert raw.train_images.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(raw.train_images[1], truth["train"][0][:, :, :, 1].transpose(2, 0, 1))
    assert list(raw.train_labels) == [0, 1, 2, 3, 4]  # SVHN labels the digit 0 as 10
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage")
    with pytest.raises(DataFileError, match="test_32x32.mat: not a readable SVHN .mat file"):
        svhn.load(str(tmp_path), 0.2, 0)


# ---- image folders ---------------------------------------------------------------------

COLOURS = {"apple": (200, 30, 30), "sky": (30, 60, 220), "grass": (20, 180, 40)}


def write_image(path, colour, size, fmt):
    from PIL import Image

    width, height = size
    image = Image.new("RGB", size, colour)
    if width != height:  # a white band at the start of the long axis, inside what the centre crop drops
        edge = Image.new("RGB", (width // 6, height) if width > height else (width, height // 6), (255, 255, 255))
        image.paste(edge, (0, 0))
    image.save(path, format=fmt)


def make_image_tree(root, tiny_imagenet=False):
    """train/<class>/ (Tiny-ImageNet: train/<class>/images/) and val/, JPEG and PNG of several sizes."""
    sizes = [(48, 24), (20, 40), (33, 33)]
    for i, (name, colour) in enumerate(COLOURS.items()):
        folder = root / "train" / name / ("images" if tiny_imagenet else "")
        folder.mkdir(parents=True)
        for j, size in enumerate(sizes):
            fmt = "PNG" if j % 2 else "JPEG"
            write_image(folder / f"{name}_{j}.{'png' if fmt == 'PNG' else 'JPEG'}", colour, size, fmt)
    if tiny_imagenet:
        (root / "val" / "images").mkdir(parents=True)
        lines = []
        for k, (name, colour) in enumerate(COLOURS.items()):
            write_image(root / "val" / "images" / f"val_{k}.JPEG", colour, (30, 30), "JPEG")
            lines.append(f"val_{k}.JPEG\t{name}\t0\t0\t30\t30\n")
        (root / "val" / "val_annotations.txt").write_text("".join(lines))
    else:
        for name, colour in COLOURS.items():
            (root / "val" / name).mkdir(parents=True)
            write_image(root / "val" / name / "a.png", colour, (24, 36), "PNG")


def image_folder_config(tmp_path, data_path, **data):
    config = tmp_path / "images.yaml"
    extra = "".join(f"  {k}: {v}\n" for k, v in data.items())
    config.write_text(f"name: images\ndata:\n  source: image_folder\n  path: {data_path}\n  image_size: 16\n{extra}"
                      f"store:\n  url: {tmp_path / 'store'}\n")
    return config


def ingest(config, tmp_path):
    from pipeline.config import load_config
    from pipeline.context import RunContext
    from pipeline.stages import ingest as ingest_stage

    with RunContext(load_config(config), tmp_path / "out") as ctx:
        return ingest_stage.run(ctx)


@pytest.mark.parametrize("tiny_imagenet", [False, True])
def test_an_image_folder_streams_into_the_dataset_store(tmp_path, tiny_imagenet):
    make_image_tree(tmp_path / "images", tiny_imagenet)
    dataset = ingest(image_folder_config(tmp_path, tmp_path / "images"), tmp_path)
    assert dataset.manifest["class_names"] == sorted(COLOURS)
    images, labels = dataset.load("train")
    assert images.shape == (9, 3, 16, 16) and images.dtype == np.uint8
    assert list(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for image, label in zip(images, labels):
        expected = np.array(COLOURS[sorted(COLOURS)[label]])[:, None, None]
        # The centre crop removed the white edge; JPEG and bilinear resizing move pixels a little.
        assert np.abs(image.astype(int) - expected).mean() < 12
    test_images, test_labels = dataset.load("test")
    assert test_images.shape == (3, 3, 16, 16) and sorted(test_labels) == [0, 1, 2]
    from storage.datasets import fingerprint_arrays
    assert dataset.fingerprint == fingerprint_arrays({"train": (images, labels), "test": (test_images, test_labels)},
                                                     dataset.manifest["class_names"])


def test_a_corrupt_image_is_one_line_naming_it_and_nothing_is_committed(tmp_path):
    make_image_tree(tmp_path / "images")
    broken = tmp_path / "images" / "train" / "sky" / "sky_1.png"
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated PNG: the header parses, the data does not
    config = image_folder_config(tmp_path, tmp_path / "images")
    result = mid("run", str(config), "--out", str(tmp_path / "out"), timeout=300)
    assert result.returncode == 1
    assert "not a readable image" in the_error_line(result, broken)
    datasets = tmp_path / "store" / "datasets"
    assert not datasets.exists() or not os.listdir(datasets)  # the half-written dataset was removed


def test_image_folder_problems_are_found_before_ray_starts(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    result = mid("validate", str(image_folder_config(tmp_path, tmp_path / "images")))
    assert result.returncode != 0
    assert "no class folders" in result.stdout + result.stderr
