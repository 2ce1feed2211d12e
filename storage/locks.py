"""Per-key build locks: two runs sharing a store never build the same entry at once; the
second waits, then finds the entry committed and reuses it.

* Local stores: ``fcntl.flock`` on ``STORE/locks/<key>.lock``. The kernel releases the lock
  when its process dies, so a killed run never leaves a stale lock behind.
* Remote stores: object stores have no locks and fsspec exposes no conditional writes, so
  the lock is a lease object ``STORE/locks/<key>.json`` (owner, expiry) that its holder
  renews; a waiter takes over a lease that expired. Writing then reading back is enough
  on stores with read-after-write consistency (S3, GCS), which is what this relies on.

Lock files are a few bytes and stay in place: deleting one that another process is about
to open would let two processes lock different files.

The store as a whole has two more (``STORE/locks/store.lock`` and ``store-gc.lock``; keys
always have a ``<kind>-<hex>`` form, so no key's lock can collide with them):

* every live run holds ``store.lock`` shared for its whole life (``hold_store``); gc takes
  it exclusively without waiting (``store_exclusive``) and removes nothing when it cannot,
  because a run's lease names only what it has claimed so far, not what it will reuse; a
  run that starts while gc removes waits for it;
* ``store-gc.lock`` makes two gcs take turns (``gc_lock``).

On object stores there is no shared lock: gc removes nothing while any live lease exists,
looks again before each removal, and two gcs take turns through a lease object.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from contextlib import contextmanager
from typing import IO, Callable, Iterator

from storage import fs

POLL_SECONDS = 0.5
REMOTE_LOCK_SECONDS = 60.0
STORE_LOCK = "store"
GC_LOCK = "store-gc"


def lock_url(root: str, key: str, suffix: str) -> str:
    return fs.join(root, "locks", f"{key}{suffix}")


@contextmanager
def build_lock(root: str, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the build lock of ``key``; ``on_wait`` is called once if another run holds it."""
    if fs.is_local(root):
        with _local_lock(lock_url(root, key, ".lock").removeprefix("file://"), on_wait):
            yield
    else:
        with _remote_lock(lock_url(root, key, ".json"), on_wait):
            yield


def _flock_waiting(handle, mode: int, on_wait) -> None:
    """``flock(handle, mode)``; if another process holds it, call ``on_wait`` once, then block."""
    import fcntl

    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        if on_wait:
            on_wait()
        fcntl.flock(handle, mode)  # blocks; Ctrl-C interrupts it


@contextmanager
def _local_lock(path: str, on_wait) -> Iterator[None]:
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+b") as handle:
        _flock_waiting(handle, fcntl.LOCK_EX, on_wait)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _remote_lock(url: str, on_wait) -> Iterator[None]:
    owner = uuid.uuid4().hex
    waited = False
    while True:
        current = fs.read_json(url)
        if current is None or current.get("expires", 0) < time.time():
            fs.write_json_atomic(url, {"owner": owner, "expires": time.time() + REMOTE_LOCK_SECONDS})
            time.sleep(POLL_SECONDS)  # let a racing writer's PUT land, then see who won
            if (fs.read_json(url) or {}).get("owner") == owner:
                break
        if not waited and on_wait:
            on_wait()
        waited = True
        time.sleep(POLL_SECONDS)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(REMOTE_LOCK_SECONDS / 3):
            fs.write_json_atomic(url, {"owner": owner, "expires": time.time() + REMOTE_LOCK_SECONDS})

    renewer = threading.Thread(target=renew, name="mid-build-lock", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        if (fs.read_json(url) or {}).get("owner") == owner:
            fs.remove(url)


class StoreHold:
    """A live run's shared hold on a local store (released by the kernel if the run dies)."""

    def __init__(self, handle: IO[bytes]):
        self._handle = handle

    def release(self) -> None:
        self._handle.close()  # closing the file drops its flock


def _store_lock_path(root: str) -> str:
    path = lock_url(root, STORE_LOCK, ".lock").removeprefix("file://")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def hold_store(root: str, on_wait: Callable[[], None] | None = None) -> StoreHold | None:
    """Hold the store shared for a run's life; waits while gc holds it. None on object stores."""
    if not fs.is_local(root):
        return None
    import fcntl

    handle = open(_store_lock_path(root), "a+b")
    try:
        _flock_waiting(handle, fcntl.LOCK_SH, on_wait)
    except BaseException:
        handle.close()
        raise
    return StoreHold(handle)


@contextmanager
def store_exclusive(root: str, no_live_run: Callable[[], bool]) -> Iterator[bool]:
    """Yields whether no run is live, holding the store exclusively while it is so (local
    stores); ``no_live_run`` answers for object stores, which have no such lock."""
    if not fs.is_local(root):
        yield no_live_run()
        return
    import fcntl

    with open(_store_lock_path(root), "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def gc_lock(root: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """One gc at a time on a store; a second one waits (``on_wait`` says so once)."""
    with build_lock(root, GC_LOCK, on_wait):
        yield
