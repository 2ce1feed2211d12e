"""What runs hold in a store: refs (what a run of a given name used) and leases (what a live
run is using right now). ``mid cache gc`` keeps everything either names.

* ``refs/<ref>.json`` is written when a run starts and rewritten as each stage claims its
  key, so an interrupted run keeps its outputs and resume state until the user removes the
  ref (``mid cache gc --ref REF``). ``status``: ``running``, ``finished``, ``interrupted``
  or ``failed``. One ref per run: ``<ref>`` is the run's name and a digest of its config
  (``digits-3f9a2c1b``), so a second run of a config with other settings never replaces
  (and so releases to gc) the first one's ref. Refs written before were ``<name>.json``;
  they read the same, their id being their name.
* ``leases/<run id>.json`` names the keys of one live run; the run renews it every
  ``LEASE_RENEW_SECONDS``. A lease whose ``expires`` has passed, or whose process is gone
  from this machine, no longer protects anything. On a local store a lease also holds the
  store's shared lock (``storage/locks.py``) for its lifetime, which gc needs exclusively.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
import uuid
from typing import Any, Callable

from storage import fs, locks
from storage.keys import canonical_json

LEASE_SECONDS = 120.0
LEASE_RENEW_SECONDS = 20.0
REF_DIGEST_LENGTH = 8
# A ref id or a run name as the command line may give it: never a path.
SAFE_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def ref_id(name: str, config: dict[str, Any]) -> str:
    """``<name>-<8 hex>``: the run's name and a digest of its resolved config."""
    digest = hashlib.sha256(canonical_json(config).encode()).hexdigest()[:REF_DIGEST_LENGTH]
    return f"{name}-{digest}"


def ref_url(root: str, ref: str) -> str:
    return fs.join(root, "refs", f"{ref}.json")


def write_ref(root: str, ref: str, keys: dict[str, Any], status: str, run_id: str | None = None,
              name: str | None = None) -> None:
    """``name``: the run's name (default ``ref``), what a bare name on the command line matches."""
    fs.write_json_atomic(ref_url(root, ref), {"id": ref, "name": name or ref, "keys": keys, "status": status,
                                              "run_id": run_id, "updated": time.time()})


def read_refs(root: str) -> dict[str, dict[str, Any]]:
    """{ref id: ref}; a ref of an older mid (``refs/<name>.json``, no ``id``) has its name as its id."""
    refs = {}
    for file in fs.children(root, "refs"):
        if not file.endswith(".json"):
            continue
        try:
            ref = fs.read_json(fs.join(root, "refs", file))
        except ValueError:  # half a file from a foreign writer: not a ref
            continue
        if isinstance(ref, dict):
            ident = file.removesuffix(".json")
            refs[ident] = {**ref, "id": ident, "name": ref.get("name") or ident}
    return refs


def find_refs(refs: dict[str, dict[str, Any]], wanted: str) -> list[str]:
    """The ids ``wanted`` names, newest first: the ref with that id and every ref of that run
    name (a ref of an older mid, ``refs/digits.json``, is both: it ranks among the newer
    ``digits-<digest>`` refs by time)."""
    named = [ident for ident, ref in refs.items() if wanted in (ident, ref["name"])]
    return sorted(named, key=lambda ident: refs[ident].get("updated") or 0, reverse=True)


def remove_ref(root: str, ref: str) -> None:
    fs.remove(ref_url(root, ref))


def strings_in(value: Any) -> set[str]:
    """Every string inside nested dicts and lists: the keys a ref or lease names."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(strings_in(v) for v in value.values()))
    if isinstance(value, (list, tuple)):
        return set().union(*(strings_in(v) for v in value))
    return set()


def lease_url(root: str, run_id: str) -> str:
    return fs.join(root, "leases", f"{run_id}.json")


def lease_is_live(lease: dict[str, Any], now: float | None = None) -> bool:
    if lease.get("expires", 0) < (now or time.time()):
        return False
    if lease.get("host") == socket.gethostname():
        try:
            os.kill(int(lease["pid"]), 0)  # a process of this machine: alive right now?
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError, TypeError):
            pass
    return True


def read_leases(root: str) -> dict[str, dict[str, Any]]:
    return {name.removesuffix(".json"): lease for name in fs.children(root, "leases")
            if name.endswith(".json") and (lease := fs.read_json(fs.join(root, "leases", name)))}


def live_leases(root: str) -> dict[str, dict[str, Any]]:
    now = time.time()
    return {run_id: lease for run_id, lease in read_leases(root).items() if lease_is_live(lease, now)}


class Lease:
    """A live run's claim on keys, renewed by a daemon thread until released.

    ``name`` is the run's ref id. On a local store the lease first takes the store's shared
    lock (``on_wait`` is called if gc holds it), so gc can tell that a run is live before
    the run has claimed anything."""

    def __init__(self, root: str, name: str, on_wait: Callable[[], None] | None = None):
        self.root, self.name, self.on_wait = root, name, on_wait
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.keys: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store_hold: locks.StoreHold | None = None

    def _write(self) -> None:
        now = time.time()
        with self._lock:
            record = {"run_id": self.run_id, "name": self.name, "host": socket.gethostname(),
                      "pid": os.getpid(), "keys": dict(self.keys), "renewed": now,
                      "expires": now + LEASE_SECONDS}
        fs.write_json_atomic(lease_url(self.root, self.run_id), record)

    def start(self) -> "Lease":
        self._store_hold = locks.hold_store(self.root, self.on_wait)
        self._write()
        self._thread = threading.Thread(target=self._renew, name="mid-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_SECONDS):
            try:
                self._write()
            except Exception:  # a store that is briefly unreachable: try again next time
                pass

    def claim(self, label: str, key: Any) -> None:
        with self._lock:
            self.keys[label] = key
        self._write()

    def release(self) -> None:
        self._stop.set()
        try:
            fs.remove(lease_url(self.root, self.run_id))
        except Exception:  # the lease expires on its own
            pass
        if self._store_hold is not None:
            self._store_hold.release()
            self._store_hold = None
