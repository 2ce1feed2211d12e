"""Store URLs through fsspec: the same code reads and writes local folders, ``file://``,
``memory://``, ``s3://`` and ``gs://``."""

from __future__ import annotations

import json
import uuid
from typing import Any

import fsspec
import zarr
import zarr.storage


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def children(root: str, folder: str) -> list[str]:
    """Names directly inside ``root/folder``, sorted; [] when it does not exist."""
    filesystem, path = fsspec.core.url_to_fs(join(root, folder))
    if not filesystem.exists(path):
        return []
    return sorted(name.rstrip("/").rsplit("/", 1)[-1] for name in filesystem.ls(path, detail=False))


def read_json(url: str) -> dict[str, Any] | None:
    fs, path = filesystem(url)
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write_json_atomic(url: str, payload: dict[str, Any]) -> None:
    write_bytes_atomic(url, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a file so that a reader sees either nothing or the whole of it.

    Object stores replace a key atomically on PUT; a local file system needs a temporary
    name and a rename, otherwise a killed writer leaves a truncated file behind.
    """
    fs, path = filesystem(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if is_local(url):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def remove(url: str) -> None:
    """Remove a file or folder; one that is gone already, or goes while it is removed, is fine."""
    fs, path = filesystem(url)
    for _ in range(3):
        if not fs.exists(path):
            return
        try:
            fs.rm(path, recursive=True)
            return
        except FileNotFoundError:  # part of it removed by someone else meanwhile: look again
            continue


def zarr_store(url: str, read_only: bool = False) -> zarr.abc.store.Store:
    """A zarr store for any URL; plain paths use zarr's LocalStore (no fsspec round trip)."""
    if "://" not in url:
        return zarr.storage.LocalStore(url, read_only=read_only)
    storage_options = {"auto_mkdir": True} if url.startswith("file://") else {}
    return zarr.storage.FsspecStore.from_url(
        url, storage_options=storage_options, read_only=read_only
    )
