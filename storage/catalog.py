"""What a store holds: list, verify and garbage-collect its entries.

Entries are the committed outputs of stages: ``datasets/``, ``checkpoints/``, ``pools/``
and ``results/``. Runs name the keys they use in refs and, while alive, in leases
(``storage/runs.py``); garbage collection keeps everything either names, committed or not
(an interrupted run's uncommitted pool and its training resume state are how it resumes),
and removes the rest: unreferenced entries, their leftovers, and temporary files of
interrupted writes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from storage import checkpoints, datasets, fs, pools, runs

TEMPORARY_GRACE_SECONDS = 600.0

KINDS = ("datasets", "checkpoints", "pools", "results")


@dataclass
class Entry:
    kind: str
    key: str
    complete: bool
    bytes: int
    created: float | None
    attack: str | None = None
    split: str | None = None  # a pool's split: train (a training pool) or test (a stored test attack)
    samples: int | None = None
    problem: str | None = None  # metadata that cannot be read: the entry cannot be trusted

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bytes(url: str) -> int:
    filesystem, path = fs.filesystem(url)
    try:
        return int(filesystem.du(path)) if filesystem.exists(path) else 0
    except FileNotFoundError:  # a file removed while it was counted (a run or another gc)
        return 0


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
    for kind, folder in (("dataset", "datasets"), ("checkpoint", "checkpoints"), ("pool", "pools")):
        for key in fs.children(root, folder):
            url = _entry_url(root, kind, key)
            try:
                entries.append(_describe(root, kind, key))
            except FileNotFoundError:
                if fs.exists(url):
                    raise
                continue  # removed while it was read: nothing to list
            except (ValueError, KeyError, TypeError) as e:  # JSON that does not parse or lacks fields
                entries.append(Entry(kind, key, False, _bytes(url), None,
                                     problem=f"{kind} {key}: unreadable metadata ({type(e).__name__}: {e})"))
    for name in fs.children(root, "results"):
        if name.endswith(".json"):
            url = fs.join(root, "results", name)
            entries.append(Entry("results", name.removesuffix(".json"), True, _bytes(url), _created(url)))
    return entries


def _describe(root: str, kind: str, key: str) -> Entry:
    url = _entry_url(root, kind, key)
    if kind == "dataset":
        manifest = datasets.read_manifest(root, key)
        return Entry(kind, key, manifest is not None, _bytes(url), _created(fs.join(url, "manifest.json")),
                     samples=sum(s[0] for s in manifest["shapes"].values()) if manifest else None)
    if kind == "checkpoint":
        manifest = checkpoints.read_manifest(root, key)
        return Entry(kind, key, manifest is not None, _bytes(url), _created(fs.join(url, checkpoints.MANIFEST_FILE)))
    manifest = pools.read_manifest(root, key) or {}
    attrs = pools.read_attrs(root, key)
    complete = bool(manifest.get("complete"))
    uncommitted = pools.uncommitted_shards(root, key, manifest) if complete else []
    return Entry(kind, key, complete and not uncommitted, _bytes(url), attrs.get("created"),
                 attack=attrs.get("attack"), split=attrs.get("split"), samples=attrs.get("num_samples"),
                 problem=pools.uncommitted_problem(key, uncommitted) if uncommitted else None)


@dataclass
class Verified:
    """What verifying one entry checked: problems (one line each) and how much was re-hashed."""

    problems: list[str]
    chunks: int = 0
    skipped: str | None = None  # why nothing was checked (an entry not committed yet)


def verify_entry(root: str, entry: Entry) -> Verified:
    if entry.kind == "pool" and (entry.complete or entry.problem):
        try:  # a pool marked complete with a shard not committed: every chunk is re-hashed all the same
            problems, chunks = pools.verify_pool(root, entry.key)
        except Exception as e:  # metadata zarr or json cannot read: the entry's own problem says which
            return Verified([entry.problem or f"pool {entry.key}: unreadable metadata ({type(e).__name__}: {e})"])
        return Verified(problems, chunks)
    if entry.problem:
        return Verified([entry.problem])
    if not entry.complete:
        return Verified([], skipped="not committed yet")
    if entry.kind == "checkpoint":
        ok = checkpoints.verify_checkpoint(root, entry.key) is not None
        return Verified([] if ok else [f"checkpoint {entry.key}: weights do not match the sha256 of its manifest"], 1)
    if entry.kind == "dataset":
        reader = datasets.DatasetReader.open(root, entry.key)
        try:
            digest = datasets.fingerprint_arrays(
                {split: reader.load(split) for split in datasets.SPLITS}, reader.manifest["class_names"])
        except Exception as e:  # a chunk that no longer decompresses
            return Verified([f"dataset {entry.key}: unreadable ({type(e).__name__}: {e})"])
        ok = digest == reader.fingerprint
        return Verified([] if ok else [f"dataset {entry.key}: contents do not match its fingerprint"], 1)
    try:
        fs.read_json(_entry_url(root, entry.kind, entry.key))
    except ValueError as e:
        return Verified([f"results {entry.key}: not valid JSON ({e})"])
    return Verified([], 1)


def protected_keys(root: str, without_refs: tuple[str, ...] = ()) -> tuple[set[str], dict[str, str]]:
    """(keys gc must keep, {key: who keeps it}) from every ref but ``without_refs`` and every live lease."""
    owners: dict[str, str] = {}
    for name, ref in runs.read_refs(root).items():
        if name not in without_refs:
            for key in runs.strings_in(ref.get("keys", {})):
                owners.setdefault(key, f"ref {name}")
    for run_id, lease in runs.live_leases(root).items():
        for key in runs.strings_in(lease.get("keys", {})):
            owners[key] = f"run {lease.get('name')} in progress ({run_id})"
    return set(owners), owners


def _entry_url(root: str, kind: str, key: str) -> str:
    if kind == "results":
        return fs.join(root, "results", f"{key}.json")
    return fs.join(root, {"dataset": "datasets", "checkpoint": "checkpoints", "pool": "pools"}[kind], key)


def garbage(root: str, without_refs: tuple[str, ...] = ()) -> list[tuple[str, str, int]]:
    """(url, reason, bytes) of everything gc would remove once ``without_refs`` are dropped."""
    keep, _ = protected_keys(root, without_refs)
    found = []
    for entry in list_entries(root):
        if entry.key in keep:
            continue
        url = _entry_url(root, entry.kind, entry.key)
        reason = "not referenced by any run" if entry.complete else "uncommitted leftover no run will resume"
        found.append((url, reason, entry.bytes))
    for name in fs.children(root, "train"):
        # Ray Train's run folder of a stage is "<stage>-<key>"; the key is what refs name.
        if name.split("-", 1)[-1] not in keep:
            url = fs.join(checkpoints.train_runs_url(root), name)
            found.append((url, "resume state of a training run no ref names", _bytes(url)))
    live = runs.live_leases(root)
    for run_id in runs.read_leases(root):
        if run_id not in live:
            url = runs.lease_url(root, run_id)
            found.append((url, "lease of a run that is no longer alive", _bytes(url)))
    filesystem, base = fs.filesystem(root)
    now = time.time()
    for path in filesystem.find(base):
        if ".tmp-" in path.rsplit("/", 1)[-1]:
            url = filesystem.unstrip_protocol(path)
            # A live run may be between writing a temporary file and renaming it.
            if live and now - (_created(url) or now) < TEMPORARY_GRACE_SECONDS:
                continue
            try:
                size = int(filesystem.size(path))
            except FileNotFoundError:  # renamed into place or removed since it was listed
                continue
            found.append((url, "temporary file of an interrupted write", size))
    return found


def remove(found: list[tuple[str, str, int]], still_free: Callable[[], bool] = lambda: True) -> int:
    """Remove ``found`` while ``still_free()`` (no run became live); returns how many were removed."""
    removed = 0
    for url, _, _ in found:
        if not still_free():
            break
        fs.remove(url)
        removed += 1
    return removed
