"""What runs hold in a store: refs (what a run of a given name used) and leases (what a live
run is using right now). ``mid cache gc`` keeps everything either names.

* ``refs/<name>.json`` is written when a run starts and rewritten as each stage claims its
  key, so an interrupted run keeps its outputs and resume state until the user removes the
  ref (``mid cache gc --ref NAME``). ``status``: ``running``, ``finished``, ``interrupted``
  or ``failed``.
* ``leases/<run id>.json`` names the keys of one live run; the run renews it every
  ``LEASE_RENEW_SECONDS``. A lease whose ``expires`` has passed, or whose process is gone
  from this machine, no longer protects anything.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

from storage import fs

LEASE_SECONDS = 120.0
LEASE_RENEW_SECONDS = 20.0


def ref_url(root: str, name: str) -> str:
    return fs.join(root, "refs", f"{name}.json")


def write_ref(root: str, name: str, keys: dict[str, Any], status: str, run_id: str | None = None) -> None:
    fs.write_json_atomic(ref_url(root, name), {"name": name, "keys": keys, "status": status,
                                               "run_id": run_id, "updated": time.time()})


def read_refs(root: str) -> dict[str, dict[str, Any]]:
    return {name.removesuffix(".json"): ref for name in fs.children(root, "refs")
            if name.endswith(".json") and (ref := fs.read_json(fs.join(root, "refs", name)))}


def remove_ref(root: str, name: str) -> None:
    fs.remove(ref_url(root, name))


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
    """A live run's claim on keys, renewed by a daemon thread until released."""

    def __init__(self, root: str, name: str):
        self.root, self.name = root, name
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.keys: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        now = time.time()
        with self._lock:
            record = {"run_id": self.run_id, "name": self.name, "host": socket.gethostname(),
                      "pid": os.getpid(), "keys": dict(self.keys), "renewed": now,
                      "expires": now + LEASE_SECONDS}
        fs.write_json_atomic(lease_url(self.root, self.run_id), record)

    def start(self) -> "Lease":
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
