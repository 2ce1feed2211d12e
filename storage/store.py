"""A store knows it is a store: ``STORE/mid-store.json`` marks a location as this project's.

Every command that writes or deletes in a store first checks that marker, so a mistyped
``--store`` can never turn a user's own folder into cache space (or garbage). A run creates
the marker in a location that does not exist yet or is an empty folder; ``mid cache``
commands only open locations that already carry it.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from typing import Any

import fsspec

from storage import fs

MARKER_FILE = "mid-store.json"
STORE_FORMAT = 1
# What a store made before markers existed holds at its top level (`mid cache init` adopts those).
LAYOUT = {"datasets", "checkpoints", "pools", "results", "refs", "train", "leases", "locks"}


class StoreError(ValueError):
    """A store location that cannot be used; the message is one line naming it."""


def check_url(url: str) -> str:
    """The store's canonical root (local: an absolute path), or a StoreError naming the problem.

    Only the text is checked here, so a config can be validated without touching anything.
    """
    if url is None or not str(url).strip():
        raise StoreError("store: the store location is empty; name a folder or a URL (e.g. --store store)")
    url = str(url).strip()
    if "://" not in url or url.startswith("file://"):
        path = os.path.abspath(os.path.expanduser(url.removeprefix("file://") or "/"))
        if os.path.dirname(path) == path:
            raise StoreError(f"store: {url!r} is a file system root; name a folder of its own "
                             f"(e.g. {os.path.join(path, 'mid-store')})")
        return path if "://" not in url else f"file://{path}"
    protocol, _, rest = url.partition("://")
    known = set(fsspec.available_protocols())
    if protocol not in known:
        common = ", ".join(p for p in ("file", "s3", "gs", "gcs", "az", "abfs", "memory") if p in known)
        raise StoreError(f"store: {url}: unknown protocol {protocol!r} (common ones: {common})")
    if not rest.strip("/"):
        raise StoreError(f"store: {url}: names no bucket or folder")
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        raise StoreError(f"store: {url}: {e}") from None
    return url.rstrip("/")


def marker_url(root: str) -> str:
    return fs.join(root, MARKER_FILE)


def read_marker(root: str) -> dict[str, Any] | None:
    return fs.read_json(marker_url(root))


def describe_location(root: str) -> str:
    """``missing``, ``file``, ``empty``, ``store`` or ``foreign`` (a non-empty folder that is not a store)."""
    filesystem, path = fs.filesystem(root)
    if not filesystem.exists(path):
        return "missing"
    if not filesystem.isdir(path):
        return "file"
    if filesystem.exists(fs.join(path, MARKER_FILE)):
        return "store"
    return "empty" if not filesystem.ls(path, detail=False) else "foreign"


def _check_marker(root: str) -> None:
    marker = read_marker(root)
    if not isinstance(marker, dict) or marker.get("format") != "mid-store":
        raise StoreError(f"not a MID store: {root} ({MARKER_FILE} is not a store marker)")
    if int(marker.get("version", 0)) > STORE_FORMAT:
        raise StoreError(f"store {root} has format version {marker['version']}; this version of mid reads "
                         f"up to {STORE_FORMAT}: upgrade mid")


def open_existing(url: str) -> str:
    """The root of an existing store (``mid cache``): refuses anything else, changing nothing."""
    root = check_url(url)
    if not fs.is_local(root):
        problems = _remote_problems(root)  # credentials and endpoint first: "missing" would mislead
        if problems:
            raise StoreError(problems[0])
    where = describe_location(root)
    if where == "missing":
        raise StoreError(f"no store at {root}: the location does not exist (a run creates it; check --store)")
    if where == "file":
        raise StoreError(f"not a MID store: {root} (a file, not a folder)")
    if where == "empty":
        raise StoreError(f"not a MID store: {root} (an empty folder; a run creates a store there)")
    if where == "foreign":
        raise StoreError(f"not a MID store: {root} ({_foreign_hint(root)})")
    _check_marker(root)
    return root


def _foreign_hint(root: str) -> str:
    if looks_like_unmarked_store(root):
        return f"no {MARKER_FILE}; it looks like a store of an older mid: `mid cache init --store {root}` marks it"
    return f"no {MARKER_FILE}; mid never writes into or deletes from a folder it did not create"


_KEY = r"[a-z][a-z0-9_-]*-[0-9a-f]{20}"
_CHUNK = r"c(/[0-9]+)+"
# Every file a store's writers (this package, zarr, Ray Train under train/) put in a store, by
# path relative to its root. `mid cache init` marks a folder only if all its files are such:
# gc deletes what no ref names, so a user's own file in a marked folder would be lost.
STORE_FILES = re.compile("|".join([
    rf"datasets/{_KEY}/((train|test)/((images|labels)/)?)?zarr\.json",
    rf"datasets/{_KEY}/manifest\.json",
    rf"datasets/{_KEY}/(train|test)/(images|labels)/{_CHUNK}",
    rf"checkpoints/{_KEY}/(model\.safetensors|manifest\.json)",
    rf"pools/{_KEY}/((adv|delta|target)/)?zarr\.json",
    rf"pools/{_KEY}/(manifest\.json|commits/shard-[0-9]{{5}}\.json)",
    rf"pools/{_KEY}/(adv|delta|target)/{_CHUNK}",
    rf"results/{_KEY}\.json",
    r"refs/[A-Za-z0-9][A-Za-z0-9._-]*\.json",
    r"leases/[A-Za-z0-9][A-Za-z0-9._-]*\.json",
    r"locks/[A-Za-z0-9][A-Za-z0-9._-]*\.(lock|json)",
    rf"train/{_KEY}/.+",  # Ray Train's resume state of a stage: its files are Ray's own
    re.escape(MARKER_FILE),
]))
TEMPORARY_FILE = re.compile(r".+\.tmp-[0-9a-f]{32}")  # fs.write_bytes_atomic's, before its rename


def foreign_file(root: str) -> str | None:
    """One file under ``root`` that a store would not have written (a path relative to it), or None."""
    filesystem, path = fs.filesystem(root)
    base = path.rstrip("/")
    for found in sorted(filesystem.find(base)):
        relative = found[len(base):].lstrip("/")
        if not STORE_FILES.fullmatch(relative) and not TEMPORARY_FILE.fullmatch(relative.rsplit("/", 1)[-1]):
            return relative
    return None


def looks_like_unmarked_store(root: str) -> bool:
    """Every file is one a store writes: a store written before markers existed."""
    filesystem, path = fs.filesystem(root)
    names = {name.rstrip("/").rsplit("/", 1)[-1] for name in filesystem.ls(path, detail=False)}
    return bool(names) and names <= LAYOUT and foreign_file(root) is None


def adopt(url: str) -> str:
    """``mid cache init``: create a store, or mark a store written before markers existed."""
    root = check_url(url)
    where = describe_location(root)
    if where == "file":
        raise StoreError(f"not a MID store: {root} (a file, not a folder)")
    if where == "foreign":
        stray = foreign_file(root)
        if stray is not None:
            raise StoreError(f"not a MID store: {root} (it holds {stray}, which a store would not have written); "
                             f"refusing to mark it")
    return open_or_create(root) if where != "foreign" else _write_marker(root)


def _check_run_location(root: str, where: str) -> None:
    """A run may use a store, or a missing location or empty folder (it marks it); nothing else."""
    if where == "store":
        _check_marker(root)
    elif where == "file":
        raise StoreError(f"not a MID store: {root} (a file, not a folder)")
    elif where == "foreign":
        raise StoreError(f"not a MID store: {root} ({_foreign_hint(root)}); "
                         f"choose a new or empty location for --store")


def open_or_create(url: str) -> str:
    """The root of the store at ``url``, marking a new one (a missing location or an empty folder)."""
    root = check_url(url)
    where = describe_location(root)
    _check_run_location(root, where)
    return root if where == "store" else _write_marker(root)


def _write_marker(root: str) -> str:
    fs.write_json_atomic(marker_url(root), {"format": "mid-store", "version": STORE_FORMAT, "created": time.time()})
    return root


def probe_problems(url: str) -> list[str]:
    """What would stop a run from using the store at ``url``, one line each; writes at most a
    probe file that it removes again (named like a temporary file, so gc knows it)."""
    try:
        root = check_url(url)
    except StoreError as e:
        return [str(e)]
    if fs.is_local(root):
        return _local_problems(root)
    return _remote_problems(root)


def _local_problems(root: str) -> list[str]:
    path = root.removeprefix("file://")
    if os.path.exists(path):
        try:
            _check_run_location(root, describe_location(root))
        except StoreError as e:
            return [str(e)]
        probe = os.path.join(path, f".write-probe.tmp-{uuid.uuid4().hex}")
        try:
            with open(probe, "wb") as f:
                f.write(b"probe")
            os.remove(probe)
        except OSError as e:
            return [f"store {path} is not writable ({e.strerror}); choose another --store or fix its permissions"]
        return []
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return [f"store {path} cannot be created: {parent} is a file, not a folder"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"store {path} cannot be created: {parent} is not writable; choose another --store"]
    return []


def _remote_problems(root: str) -> list[str]:
    protocol = root.split("://", 1)[0]
    if protocol in ("s3", "s3a"):
        missing = _missing_s3_credentials()
        if missing:
            return [f"store {root}: {missing}"]
    try:
        filesystem, path = _probe_filesystem(root)
        bucket = path.split("/", 1)[0]
        filesystem.info(bucket)  # unlike exists(), raises when the endpoint does not answer
        _check_run_location(root, describe_location(root))
    except StoreError as e:
        return [str(e)]
    except FileNotFoundError:
        return [f"store {root}: bucket {bucket!r} does not exist or is not visible with these credentials"]
    except Exception as e:  # every client library has its own errors; the one line names the store
        return [f"store {root}: cannot reach it ({one_line(e)})"]
    return []


def _probe_filesystem(root: str):
    """A fresh client with short time-outs and no retries: a probe must answer in seconds."""
    protocol = root.split("://", 1)[0]
    if protocol in ("s3", "s3a"):
        import s3fs

        filesystem = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={
            "connect_timeout": 5, "read_timeout": 10, "retries": {"max_attempts": 1, "mode": "standard"}})
        return filesystem, filesystem._strip_protocol(root)
    filesystem, path = fs.filesystem(root)
    return filesystem, path


def _missing_s3_credentials() -> str | None:
    """None when botocore finds credentials (environment, profile files, or the instance's role)."""
    if os.environ.get("FSSPEC_S3_ANON", "").lower() in ("1", "true"):
        return None
    try:
        import botocore.session

        if botocore.session.get_session().get_credentials() is not None:
            return None
    except Exception as e:  # a broken profile file, for instance
        return f"S3 credentials could not be read ({one_line(e)})"
    return ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
            "(and FSSPEC_S3_ENDPOINT_URL for a non-AWS endpoint)")


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
