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
    """The ingest stage in this process. An image folder streams through Ray Data, so the
    caller holds ``ray_local``: the stage then joins that instance instead of starting one
    of its own that would outlive the test (a driver ends Ray by exiting; pytest does not)."""
    from pipeline.config_loader import load_config
    from pipeline.context import RunContext
    from pipeline.stages import ingest as ingest_stage

    with RunContext(load_config(config), tmp_path / "out") as ctx:
        return ingest_stage.run(ctx)


@pytest.mark.parametrize("tiny_imagenet", [False, True])
def test_an_image_folder_streams_into_the_dataset_store(tmp_path, tiny_imagenet, ray_local):
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


@pytest.mark.slow
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


# ---- issue 22: damage and bombs, one line naming the file -------------------------------

def test_a_truncated_npz_is_one_line_naming_it_when_read(tmp_path):
    """A CIFAR train.npz cut in half failed the run with "unexpected BadZipFile" and no path
    (issue 22; `mid run configs/cifar10.yaml --set data.path=DIR`). Now the reader names it,
    and `problems` (what validate runs) finds it first."""
    for split, n in (("train", 6), ("test", 4)):
        np.savez(tmp_path / f"{split}.npz", images=RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=RNG.integers(0, 10, n).astype(np.uint8))
    cifar = reader("cifar10")
    assert cifar.problems(str(tmp_path)) == [] and cifar.train_samples(str(tmp_path), 0.2) == 6
    train = tmp_path / "train.npz"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
    with pytest.raises(DataFileError, match=f"^{train}: not a readable npz with images and labels \\(BadZipFile"):
        cifar.load(str(tmp_path), 0.2, 0)
    (problem,) = cifar.problems(str(tmp_path))
    assert problem.startswith(f"{train}: not a readable npz (BadZipFile")
    np.savez(train, pictures=np.zeros((2, 32, 32, 3), dtype=np.uint8), labels=np.zeros(2))
    assert cifar.problems(str(tmp_path)) == [f"{train}: no images array (it holds labels, pictures); expected images "
                                             f"(N, 32, 32, 3) uint8, labels and class_names"]


def test_a_truncated_svhn_mat_file_is_found_from_its_headers(tmp_path):
    """`mid validate configs/svhn.yaml --set data.path=DIR` said valid for a train_32x32.mat
    cut in half (issue 22)."""
    from scipy.io import savemat

    for split, n in (("train", 5), ("test", 3)):
        savemat(tmp_path / f"{split}_32x32.mat", {"X": RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                  "y": np.ones((n, 1), dtype=np.uint8)}, do_compression=split == "test")
    svhn = reader("svhn")
    assert svhn.problems(str(tmp_path)) == [] and svhn.train_samples(str(tmp_path), 0.2) == 5
    for name in ("train_32x32.mat", "test_32x32.mat"):  # uncompressed and compressed variables alike
        file = tmp_path / name
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
        (problem,) = svhn.problems(str(tmp_path))
        assert problem.startswith(f"{file}: truncated: variable 'X' needs"), problem
        file.write_bytes(data)


def bilevel_png(width, height):
    """A real PNG of one bit per pixel, all black: a 30000² image is about 100 KB."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then the row's bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 30_000])
def test_an_image_past_the_decompression_bomb_bound_is_one_line_naming_it(tmp_path, side):
    """A 30000² PNG in an image folder failed the ingest with RayTaskError fragments and ANSI
    codes (issue 22; `mid run images.yaml`). Pillow refuses past twice its bound while
    opening, and only warns between its bound and twice it: both are refused by the reader,
    naming the file and the bound, before any pixel is decoded."""
    from PIL import Image

    from storage.readers.image_folder import decode_image

    path = tmp_path / "huge.png"
    path.write_bytes(bilevel_png(side, side))
    with pytest.raises(DataFileError) as refused:
        decode_image(path.read_bytes(), str(path), 16)
    assert str(refused.value) == (f"{path}: {'10000x10000 = ' if side == 10_000 else ''}{side * side:,} pixels, above "
                                  f"the {Image.MAX_IMAGE_PIXELS:,} pixels an image may have (Pillow's "
                                  f"decompression-bomb bound); shrink or remove it")
    small = tmp_path / "small.png"
    small.write_bytes(bilevel_png(40, 24))
    assert decode_image(small.read_bytes(), str(small), 16).shape == (3, 16, 16)


def test_an_image_class_folder_without_images_is_refused_when_listed(tmp_path):
    """train/<class>/ with no image in it gave a class no sample, silently (issue 22)."""
    make_image_tree(tmp_path / "images")
    empty = tmp_path / "images" / "val" / "sky"
    for image in empty.iterdir():
        image.unlink()
    folder = reader("image_folder")
    expected = f"{empty}: a class folder with no images"
    assert folder.problems(str(tmp_path / "images"))[0].startswith(expected)
    with pytest.raises(DataFileError, match=f"^{empty}: a class folder with no images"):
        folder.listing(str(tmp_path / "images"), "train")
