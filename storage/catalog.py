"""What a store holds: list, verify and garbage-collect its entries.

Entries are the committed outputs of stages: ``datasets/``, ``checkpoints/``, ``pools/``
and ``results/``. A run records the keys it used in ``refs/<run name>.json`` (like a git
ref); garbage collection keeps every entry some ref names and removes the rest, together
with uncommitted leftovers (a pool, dataset or checkpoint without its manifest, and
temporary files of interrupted writes).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from storage import checkpoints, datasets, fs, pools

KINDS = ("datasets", "checkpoints", "pools", "results")


@dataclass
class Entry:
    kind: str
    key: str
    complete: bool
    bytes: int
    created: float | None
    attack: str | None = None
    samples: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _children(root: str, folder: str) -> list[str]:
    filesystem, path = fs.filesystem(fs.join(root, folder))
    if not filesystem.exists(path):
        return []
    return sorted(name.rstrip("/").rsplit("/", 1)[-1] for name in filesystem.ls(path, detail=False))


def _bytes(url: str) -> int:
    filesystem, path = fs.filesystem(url)
    return int(filesystem.du(path)) if filesystem.exists(path) else 0


def _created(url: str) -> float | None:
    filesystem, path = fs.filesystem(url)
    try:
        info = filesystem.info(path)
    except FileNotFoundError:
        return None
    stamp = info.get("mtime") or info.get("created") or info.get("LastModified")
    return stamp.timestamp() if hasattr(stamp, "timestamp") else (float(stamp) if stamp else None)


def list_entries(root: str) -> list[Entry]:
    entries = []
    for key in _children(root, "datasets"):
        manifest = datasets.read_manifest(root, key)
        url = datasets.dataset_url(root, key)
        entries.append(Entry("dataset", key, manifest is not None, _bytes(url), _created(fs.join(url, "manifest.json")),
                             samples=sum(s[0] for s in manifest["shapes"].values()) if manifest else None))
    for key in _children(root, "checkpoints"):
        manifest = checkpoints.read_manifest(root, key)
        url = checkpoints.checkpoint_url(root, key)
        entries.append(Entry("checkpoint", key, manifest is not None, _bytes(url),
                             _created(fs.join(url, checkpoints.MANIFEST_FILE))))
    for key in _children(root, "pools"):
        manifest = pools.read_manifest(root, key) or {}
        attrs = pools.read_attrs(root, key)
        entries.append(Entry("pool", key, bool(manifest.get("complete")), _bytes(pools.pool_url(root, key)),
                             attrs.get("created"),
                             attack=attrs.get("attack"), samples=attrs.get("num_samples")))
    for name in _children(root, "results"):
        if name.endswith(".json"):
            url = fs.join(root, "results", name)
            entries.append(Entry("results", name.removesuffix(".json"), True, _bytes(url), _created(url)))
    return entries


def verify_entry(root: str, entry: Entry) -> list[str]:
    """Problems with one entry, each naming what is wrong; [] when it verifies."""
    if not entry.complete:
        return [f"{entry.kind} {entry.key}: not committed (incomplete)"]
    if entry.kind == "pool":
        return pools.verify_pool(root, entry.key)
    if entry.kind == "checkpoint":
        ok = checkpoints.verify_checkpoint(root, entry.key) is not None
        return [] if ok else [f"checkpoint {entry.key}: weights do not match the sha256 of its manifest"]
    if entry.kind == "dataset":
        reader = datasets.DatasetReader.open(root, entry.key)
        digest = datasets.fingerprint_arrays(
            {split: reader.load(split) for split in datasets.SPLITS}, reader.manifest["class_names"])
        return [] if digest == reader.fingerprint else [f"dataset {entry.key}: contents do not match its fingerprint"]
    return []


def write_ref(root: str, name: str, keys: dict[str, Any]) -> None:
    fs.write_json_atomic(fs.join(root, "refs", f"{name}.json"), {"name": name, "keys": keys, "updated": time.time()})


def referenced_keys(root: str) -> set[str]:
    keys: set[str] = set()

    def collect(value: Any) -> None:
        if isinstance(value, str):
            keys.add(value)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v)

    for name in _children(root, "refs"):
        ref = fs.read_json(fs.join(root, "refs", name))
        if ref:
            collect(ref["keys"])
    return keys


def _entry_url(root: str, entry: Entry) -> str:
    if entry.kind == "results":
        return fs.join(root, "results", f"{entry.key}.json")
    return fs.join(root, {"dataset": "datasets", "checkpoint": "checkpoints", "pool": "pools"}[entry.kind], entry.key)


def garbage(root: str) -> list[tuple[str, str, int]]:
    """(url, reason, bytes) of everything gc would remove."""
    keep = referenced_keys(root)
    found = []
    for entry in list_entries(root):
        url = _entry_url(root, entry)
        if not entry.complete:
            found.append((url, "uncommitted leftover", entry.bytes))
        elif entry.key not in keep:
            found.append((url, "not referenced by any run", entry.bytes))
    runs = checkpoints.train_runs_url(root)
    for name in _children(root, "train"):
        url = fs.join(runs, name)
        found.append((url, "resume state of an unfinished training run", _bytes(url)))
    filesystem, base = fs.filesystem(root)
    if filesystem.exists(base):
        for path in filesystem.find(base):
            if ".tmp-" in path.rsplit("/", 1)[-1]:
                found.append((filesystem.unstrip_protocol(path), "temporary file of an interrupted write",
                              int(filesystem.size(path))))
    return found


def collect_garbage(root: str, dry_run: bool) -> list[tuple[str, str, int]]:
    found = garbage(root)
    if not dry_run:
        for url, _, _ in found:
            fs.remove(url)
    return found
