"""Bad input gets one clear line and loses nothing.

* `mid validate` (and every run's preflight, before Ray starts) checks what a config points
  to: the data files (real IDX files, gzipped, damaged in the ways downloads get damaged)
  and the store (a file, a read-only folder, an unknown protocol, S3 without credentials
  or with an endpoint that does not answer).
* Configs that plain YAML and pydantic would accept silently are refused.
* Faults that only show at run time print one `error:` line naming the file; the
  traceback goes to OUT/logs/.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from clihelpers import mid, the_error_line
from test_raw import make_idx_folder

from storage.readers.idx import IDX_FILES

TRAIN_IMAGES = IDX_FILES["train_images"] + ".gz"


def damage(folder: Path, case: str) -> Path:
    """The file of ``folder`` that ``case`` damages (the folder holds four valid gzipped IDX files)."""
    images = folder / TRAIN_IMAGES
    if case == "missing":
        (folder / (IDX_FILES["train_labels"] + ".gz")).unlink()
        return folder / IDX_FILES["train_labels"]
    if case == "empty":
        images.write_bytes(b"")
    elif case == "truncated":
        data = images.read_bytes()
        images.write_bytes(data[: len(data) // 2])
    elif case == "wrong magic":
        shutil.copy(folder / (IDX_FILES["train_labels"] + ".gz"), images)
    elif case == "not gzip":
        images.write_bytes(b"<html>Service Unavailable</html>")
    elif case == "mismatched counts":
        labels = folder / (IDX_FILES["test_labels"] + ".gz")
        other = folder.parent / "other"
        other.mkdir()
        make_idx_folder(other, gz=True, n_test=5)
        shutil.copy(other / labels.name, labels)
        return labels
    return images


DATA_CASES = ["missing", "empty", "truncated", "wrong magic", "not gzip", "mismatched counts", "no folder"]


# `mid run` runs the same checks as `mid validate` before it starts anything: each case
# through validate, a few through run as well.
DATA_RUNS = [(case, "validate") for case in DATA_CASES] + [("truncated", "run"), ("missing", "run")]


@pytest.mark.parametrize("case,command", DATA_RUNS)
def test_data_files_are_checked_before_anything_runs(tmp_path, case, command):
    folder = tmp_path / "mnist"
    folder.mkdir()
    make_idx_folder(folder, gz=True)
    if case == "no folder":
        shutil.rmtree(folder)
        named = folder
    else:
        named = damage(folder, case)
    args = [command, "configs/digits.yaml", "--set", "data.source=mnist", "--set", f"data.path={folder}",
            "--store", str(tmp_path / "store")]
    result = mid(*args, *(["--out", str(tmp_path / "out")] if command == "run" else []))
    assert result.returncode == 2
    line = the_error_line(result, "data.path", named)
    assert "valid" not in result.stdout
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists(), line  # nothing started


def test_a_good_folder_validates(tmp_path):
    make_idx_folder(tmp_path, gz=True, n_train=128)  # a batch of 64 for each of the 2 workers
    result = mid("validate", "configs/digits.yaml", "--set", "data.source=mnist", "--set", f"data.path={tmp_path}",
                 "--store", str(tmp_path / "store"))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and not (tmp_path / "store").exists()  # validating creates nothing


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connections to it are refused


def s3_env(**extra: str) -> dict[str, str]:
    """An environment with no AWS credentials anywhere botocore looks (and no metadata service)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_S3"))}
    return {**env, "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_CONFIG_FILE": "/nonexistent", **extra}


STORE_CASES = {
    "regular file": (lambda tmp: str(tmp / "a-file"), None, "not a MID store"),
    "read-only folder": (lambda tmp: str(tmp / "read-only"), None, "not writable"),
    "inside a read-only folder": (lambda tmp: str(tmp / "read-only" / "store"), None, "cannot be created"),
    "unknown protocol": (lambda tmp: "s4://bucket/mid", None, "unknown protocol 's4'"),
    "S3 without credentials": (lambda tmp: "s3://bucket/mid", {}, "no S3 credentials found"),
    "S3 endpoint that does not answer": (
        lambda tmp: "s3://bucket/mid",
        {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "FSSPEC_S3_ENDPOINT_URL": "http://127.0.0.1:{port}"},
        "cannot reach it"),
}


STORE_RUNS = [(case, "validate") for case in sorted(STORE_CASES)] + [
    ("read-only folder", "run"), ("S3 without credentials", "run")]


@pytest.mark.parametrize("case,command", STORE_RUNS)
def test_the_store_is_checked_before_anything_runs(tmp_path, case, command):
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "read-only").mkdir()
    (tmp_path / "read-only").chmod(0o555)
    make_url, env_extra, expected = STORE_CASES[case]
    url = make_url(tmp_path)
    env = None if env_extra is None else s3_env(**{k: v.format(port=closed_port()) for k, v in env_extra.items()})
    args = [command, "configs/digits.yaml", "--store", url]
    result = mid(*args, *(["--out", str(tmp_path / "out")] if command == "run" else []), env=env,
                 without_root_override=True, timeout=120)
    assert result.returncode == 2
    the_error_line(result, "store", url, expected)
    assert (tmp_path / "a-file").read_text() == "mine" and os.listdir(tmp_path / "read-only") == []
    assert not (tmp_path / "out").exists()


CONFIG_CASES = {
    "empty file": ("", [], "the config is empty"),
    "only comments": ("# nothing here\n", [], "the config is empty"),
    "duplicate key": ("name: a\nmid:\n  epochs: 2\n  epochs: 3\n", [], "line 4: duplicate key 'epochs' (first given on line 3)"),
    "non-string key": ("mid:\n  1: 2\n", [], "line 2: key 1 is not a string"),
    "boolean for a number": ("name: a\n", ["mid.epochs=true"], "mid.epochs: true is a boolean; a number is expected"),
    "unsafe name": ("name: ../../x\n", [], "name: '../../x' is not a safe name"),
    "profiles of the wrong type": ("name: a\nprofiles: [fast]\n", [], "profiles: must be a mapping"),
    "a profile of the wrong type": ("name: a\nprofiles:\n  fast: 3\n", [], "profiles.fast: must be a mapping"),
    "unbalanced bracket in --set": ("name: a\n", ["pool.attacks=[PGD_N, MIM_N"], "--set pool.attacks=[PGD_N, MIM_N: the value is not valid YAML"),
    "invalid YAML": ("mid: {epochs: 2\n", [], "not valid YAML (line 2"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_configs_that_yaml_would_accept_silently_are_refused(tmp_path, case):
    text, overrides, expected = CONFIG_CASES[case]
    path = tmp_path / "c.yaml"
    path.write_text(text)
    args = ["run", str(path), "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out")]
    for override in overrides:
        args += ["--set", override]
    result = mid(*args)
    assert result.returncode == 2
    line = the_error_line(result, expected)
    assert line.startswith("config error: ")
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()


def test_a_config_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    result = mid("validate", str(path))
    assert result.returncode == 2
    the_error_line(result, str(path), "not UTF-8 text (byte 0xe9 at offset 9)")


def test_an_empty_store_location_is_refused(tmp_path):
    result = mid("run", "configs/digits.yaml", "--store", "", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    the_error_line(result, "store.url", "empty")
    path = tmp_path / "c.yaml"
    path.write_text("name: a\nstore: {url: ''}\n")
    result = mid("run", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    the_error_line(result, "store.url: the store location is empty")
    assert not (tmp_path / "out").exists()


# Faults that pass every check before the run and only show while it works.

def corrupt_gzip_body(path: Path) -> None:
    """Damage the compressed data but keep the gzip header and trailer: the preflight's
    header and length checks pass; decompressing the whole file fails."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))


def test_a_damaged_data_file_at_run_time_is_one_line_naming_it(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    make_idx_folder(folder, gz=True, n_train=200)
    corrupt_gzip_body(folder / TRAIN_IMAGES)
    out = tmp_path / "out"
    args = ["run", "configs/digits.yaml", "--set", "data.source=mnist", "--set", f"data.path={folder}",
            "--store", str(tmp_path / "store"), "--out", str(out)]
    assert mid("validate", *args[1:-2]).returncode == 0  # the damage is past what a header check sees
    result = mid(*args)
    assert result.returncode == 1
    line = the_error_line(result, folder / TRAIN_IMAGES, "damaged gzip data", str(out / "logs"))
    logs = list((out / "logs").glob("error-*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text() and "DataFileError" in logs[0].read_text()
    debug = mid(*args, "--debug")
    assert "Traceback" in debug.stderr and debug.stderr.strip().splitlines()[-1].startswith("error: ")
    assert line


def test_permission_denied_in_the_store_is_one_line_naming_the_folder(tmp_path):
    store = tmp_path / "store"
    assert mid("cache", "init", "--store", str(store)).returncode == 0
    (store / "datasets").mkdir()
    (store / "datasets").chmod(0o555)  # someone else's folder inside a shared store
    out = tmp_path / "out"
    result = mid("run", "configs/digits.yaml", "--store", str(store), "--out", str(out), without_root_override=True)
    assert result.returncode == 1
    the_error_line(result, "permission denied", store / "datasets")
    assert os.listdir(store / "datasets") == []


def test_a_full_disk_is_one_line_naming_the_store(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        store = mount / "store"
        result = mid("run", "configs/digits.yaml", "--store", str(store), "--out", str(tmp_path / "out"))
        assert result.returncode == 1
        the_error_line(result, "no space left on the device", str(store))
        # Nothing half-written is visible: the dataset never got its manifest.
        assert not list(store.glob("datasets/*/manifest.json"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# Issue 22: inputs that made models train on nothing, or the loader use unbounded memory.

def test_fewer_samples_per_worker_than_a_batch_is_refused_before_ray_starts(tmp_path):
    """`mid pool configs/digits.yaml --set data.train_limit=64 --store /tmp/x` trained the
    baseline on zero steps (32 samples per worker, batches of 64, full batches only),
    committed it with accuracy 0 % and made the pool against it, exit 0 (issue 22)."""
    store, out = tmp_path / "store", tmp_path / "out"
    result = mid("pool", "configs/digits.yaml", "--set", "data.train_limit=64", "--store", str(store),
                 "--out", str(out))
    assert result.returncode == 2
    line = the_error_line(result, "data.train_limit=64 gives 32 samples per worker", "models.baseline.batch_size=64",
                          "models.teacher.batch_size=64", "models.num_workers=2", "every epoch would run zero steps")
    assert "models.at" not in line  # `mid pool` trains the baseline and the teacher only
    assert not store.exists() and not out.exists()
    # validate checks a whole run's stages: MID's own worker group too.
    validate = mid("validate", "configs/digits.yaml", "--set", "data.train_limit=64")
    assert validate.returncode == 2
    assert ("error: mid.batch_size: data.train_limit=64 gives 32 samples per worker, below mid.batch_size=64 with "
            "mid.num_workers=2") in validate.stderr
    # A refreshed row's worker group on its own schedule too.
    refreshed = mid("validate", "configs/digits.yaml", "--set", "data.train_limit=256", "--set",
                    "eval.defenses=[None, MID-R]", "--set", "models.mid_r.batch_size=256")
    assert refreshed.returncode == 2
    assert ("error: models.mid_r.batch_size: data.train_limit=256 gives 128 samples per worker, below "
            "models.mid_r.batch_size=256 with mid.num_workers=2") in refreshed.stderr


def test_a_split_smaller_than_the_workers_batches_is_read_from_the_headers(tmp_path):
    """`mid validate configs/digits.yaml --set data.source=mnist --set data.path=DIR` with 20
    training images in DIR's IDX files: validate said valid (issue 22)."""
    make_idx_folder(tmp_path, gz=True, n_train=20)
    result = mid("validate", "configs/digits.yaml", "--set", "data.source=mnist", "--set", f"data.path={tmp_path}",
                 "--set", "eval.defenses=[None]", "--set", "eval.protocols=[source]")
    assert result.returncode == 2
    the_error_line(result, "models.baseline.batch_size: the train split's 20 samples give 10 samples per worker",
                   "models.num_workers=2")


BILLION_LAUGHS = "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 10 if previous else ['1'] * 10)}]\n"
    for previous, name in zip([None, *"abcdef"], "abcdefg"))

UNBOUNDED_YAML = {
    "billion laughs": (f"name: a\n{BILLION_LAUGHS}",
                       "12,345,687 values once its aliases (*name) are expanded, above the 100,000 a config or "
                       "sweep file may hold"),
    "an alias cycle": ("name: a\nmid: &m {epochs: [1, *m]}\n", "line 2: an alias refers to a node that contains it"),
    "nested too deeply": ("name: " + "[" * 5000 + "]" * 5000 + "\n", "collections nested too deeply"),
    "a 1.2 MB file": ("name: a\n" + "# padding\n" * 120_000, "1,200,008 bytes, above the 1,048,576 bytes (1 MiB)"),
}


@pytest.mark.parametrize("case", sorted(UNBOUNDED_YAML))
def test_config_files_that_would_take_unbounded_memory_are_refused(tmp_path, case):
    """A 570-byte sweep file of nested aliases took over 3 GB in 42 s, a 65 MB config 5.1 GB
    and 138 s (issue 22). Reproduce: `mid validate c.yaml` with c.yaml a billion-laughs file."""
    text, expected = UNBOUNDED_YAML[case]
    path = tmp_path / "c.yaml"
    path.write_text(text)
    result = mid("validate", str(path))
    assert result.returncode == 2
    the_error_line(result, f"config error: {path}: {expected}")


def test_a_truncated_npz_is_found_by_validate_and_named(tmp_path):
    """`mid validate configs/cifar10.yaml --set data.path=DIR` with DIR/train.npz cut in
    half said valid, and the run failed with "unexpected BadZipFile", no path (issue 22)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("test", 16)):
        np.savez(tmp_path / f"{split}.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=rng.integers(0, 10, n))
    good = mid("validate", "configs/digits.yaml", "--set", "data.source=cifar10", "--set", f"data.path={tmp_path}",
               "--set", "data.image_size=null")
    assert good.returncode == 0, good.stderr
    train = tmp_path / "train.npz"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
    result = mid("validate", "configs/digits.yaml", "--set", "data.source=cifar10", "--set", f"data.path={tmp_path}",
                 "--set", "data.image_size=null")
    assert result.returncode == 2
    the_error_line(result, f"error: data.path: {train}: not a readable npz (BadZipFile")


def test_a_truncated_mat_file_is_found_by_validate_and_named(tmp_path):
    """`mid validate configs/svhn.yaml --set data.path=DIR` with DIR/train_32x32.mat cut in
    half said valid (issue 22): scipy lists a truncated file's variables without a word."""
    import numpy as np
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("test", 16)):
        savemat(tmp_path / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                  "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})
    args = ["validate", "configs/svhn.yaml", "--set", f"data.path={tmp_path}", "--set", "models.arch=lenet",
            "--set", "models.mean=null", "--set", "models.std=null"]
    good = mid(*args)
    assert good.returncode == 0, good.stderr
    train = tmp_path / "train_32x32.mat"
    size = train.stat().st_size
    train.write_bytes(train.read_bytes()[: size // 2])
    result = mid(*args)
    assert result.returncode == 2
    the_error_line(result, f"error: data.path: {train}: truncated: variable 'X' needs", f"the file has {size // 2:,}")


def test_an_image_class_folder_without_images_is_refused(tmp_path):
    """`mid validate images.yaml` with train/empty/ holding no image was accepted, and the
    model had a class it never saw (issue 22)."""
    from PIL import Image

    for split in ("train", "val"):
        for name in ("apple", "sky"):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "images" / split / name / "a.png")
    empty = tmp_path / "images" / "train" / "grass"
    (empty / "images").mkdir(parents=True)
    (empty / "images" / "notes.txt").write_text("not an image")
    config = tmp_path / "images.yaml"
    config.write_text(f"name: images\ndata: {{source: image_folder, path: {tmp_path / 'images'}, image_size: 16, "
                      f"train_limit: 128}}\n")
    result = mid("validate", str(config), "--store", str(tmp_path / "store"))
    assert result.returncode == 2
    the_error_line(result, f"error: data.path: {empty}: a class folder with no images")
