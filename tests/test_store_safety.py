"""A store knows it is a store, and gc never loses what someone needs.

Every `mid cache` action and every run refuses, with one line and exit 2, a location that is
not a MID store; nothing in such a location changes. gc lists, asks, and keeps what refs
and live runs name. (Interrupted and in-progress runs on a real pipeline:
tests/test_training_resume.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from clihelpers import mid, the_error_line

from storage import catalog, checkpoints, pools, runs
from storage import store as store_location


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def foreign(tmp_path) -> Path:
    """A user's folder that happens to hold names a store uses."""
    folder = tmp_path / "my-project"
    for sub in ("datasets", "checkpoints", "train/mid-x"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "important.txt").write_text("not yours")
    (folder / "notes.json.tmp-0123").write_text("draft")
    return folder


LOCATIONS = {
    "missing": (lambda tmp, foreign: str(tmp / "nowhere"), "does not exist"),
    "regular file": (lambda tmp, foreign: str(tmp / "a-file"), "not a MID store"),
    "foreign folder": (lambda tmp, foreign: str(foreign), "not a MID store"),
    "empty folder": (lambda tmp, foreign: str(tmp / "empty"), "not a MID store"),
    "empty string": (lambda tmp, foreign: "", "empty"),
    "file system root": (lambda tmp, foreign: "/", "file system root"),
    "unknown protocol": (lambda tmp, foreign: "s4://bucket/mid", "unknown protocol 's4'"),
}


@pytest.mark.parametrize("action", [["ls"], ["ls", "--json"], ["verify"], ["gc", "--yes"], ["gc", "--dry-run"]])
@pytest.mark.parametrize("location", sorted(LOCATIONS))
def test_cache_commands_refuse_what_is_not_a_store(tmp_path, foreign, action, location):
    (tmp_path / "a-file").write_text("hello")
    (tmp_path / "empty").mkdir()
    make_url, expected = LOCATIONS[location]
    url = make_url(tmp_path, foreign)
    before = snapshot(tmp_path)
    from pipeline.cli import main

    result = run_main(main, ["cache", *action, "--store", url])
    assert result.returncode == 2, result
    line = the_error_line(result, expected)
    if url not in ("", "/"):
        assert url.rstrip("/") in line
    assert result.stdout == ""
    assert snapshot(tmp_path) == before  # nothing created, nothing removed


def run_main(main, argv: list[str]) -> subprocess.CompletedProcess:
    """The CLI's main() in this process (fast), captured like a subprocess."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def test_a_run_refuses_a_foreign_folder_before_ray_starts(tmp_path, foreign):
    before = snapshot(foreign)
    result = mid("run", "configs/digits.yaml", "--store", str(foreign), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    the_error_line(result, f"not a MID store: {foreign}")
    assert "Ray" not in result.stderr
    assert snapshot(foreign) == before and not (tmp_path / "out").exists()


def small_store(tmp_path: Path) -> str:
    """A real store: marker, one committed pool, one leftover pool, a checkpoint, refs."""
    root = store_location.open_or_create(str(tmp_path / "store"))
    for key, commit in (("pool-kept", True), ("pool-leftover", False), ("pool-orphan", True)):
        pools.create_pool(root, key, num_samples=4, image_shape=(1, 2, 2), variants=1, shard_size=4,
                          compressor="zstd", encoding="uint8", attrs={"attack": "PGD_N"})
        if commit:
            clean = np.full((4, 1, 2, 2), 100, np.uint8)
            pools.write_shard(root, key, shard=0, start=0, stop=4, eps=0.1, adv_u8=clean[None] + 1,
                              clean_u8=clean, targets=np.full((1, 4), -1), stats={})
            pools.finalize_pool(root, key, 1, {})
    checkpoints.save_checkpoint(root, "teacher-kept", {"w": torch.ones(3)}, {"kind": "teacher"})
    runs.write_ref(root, "finished-run", {"pools": {"PGD_N": "pool-kept"}, "teacher": "teacher-kept"}, "finished")
    return root


def test_gc_lists_asks_and_keeps_what_refs_and_live_runs_name(tmp_path):
    root = small_store(tmp_path)
    lease = runs.Lease(root, "live-run").start()
    try:
        lease.claim("pools", {"PGD_T": "pool-leftover"})  # a live run is generating this one
        dry = mid("cache", "gc", "--store", root, "--dry-run")
        assert dry.returncode == 0
        assert "pool-orphan (not referenced by any run" in dry.stdout and "would remove 1 item" in dry.stdout
        assert "pool-kept" not in dry.stdout and "teacher-kept" not in dry.stdout
        assert "pool-leftover" not in dry.stdout  # in progress: never collected
        # No terminal to ask on and no --yes: nothing is removed.
        refused = mid("cache", "gc", "--store", root)
        assert refused.returncode == 2
        assert "confirm with --yes" in refused.stderr and (tmp_path / "store/pools/pool-orphan").exists()
        # A live run's ref cannot be dropped.
        assert mid("cache", "gc", "--store", root, "--ref", "live-run", "--yes").returncode == 2
    finally:
        lease.release()
    # The run is gone and named nothing else: its uncommitted pool is a leftover now.
    removed = mid("cache", "gc", "--store", root, "--yes")
    assert removed.returncode == 0, removed.stderr
    assert "removed 2 items" in removed.stdout
    assert sorted(os.listdir(tmp_path / "store/pools")) == ["pool-kept"]
    # Dropping the last ref releases what only it named.
    dropped = mid("cache", "gc", "--store", root, "--ref", "finished-run", "--yes")
    assert dropped.returncode == 0, dropped.stderr
    assert not (tmp_path / "store/pools/pool-kept").exists()
    assert not (tmp_path / "store/checkpoints/teacher-kept").exists()
    assert (tmp_path / "store" / store_location.MARKER_FILE).exists()  # still a store, just empty
    unknown = mid("cache", "gc", "--store", root, "--ref", "no-such-run", "--yes")
    assert unknown.returncode == 2 and "no ref 'no-such-run'" in unknown.stderr


def test_gc_asks_on_a_terminal_and_removes_nothing_without_yes(tmp_path):
    import pty

    root = small_store(tmp_path)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "cache", "gc", "--store", root],
                            stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(terminal)
    os.write(controller, b"n\n")
    out, _ = proc.communicate(timeout=120)
    os.close(controller)
    assert proc.returncode == 1 and "nothing removed" in out
    assert (tmp_path / "store/pools/pool-orphan").exists()


def test_a_lease_of_a_dead_process_or_past_its_time_protects_nothing(tmp_path):
    root = small_store(tmp_path)
    lease = runs.Lease(root, "r").start()
    lease.claim("pools", {"X": "pool-orphan"})
    assert "pool-orphan" in catalog.protected_keys(root)[0]
    record = json.loads(Path(runs.lease_url(root, lease.run_id)).read_text())
    lease.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for changes in ({"pid": int(dead.stdout)}, {"expires": time.time() - 1}):
        Path(runs.lease_url(root, "old")).write_text(json.dumps({**record, **changes}))
        assert "pool-orphan" not in catalog.protected_keys(root)[0], changes
        assert any("lease of a run that is no longer alive" in reason for _, reason, _ in catalog.garbage(root))


def test_verify_and_ls_say_what_they_checked(tmp_path):
    root = small_store(tmp_path)
    listed = mid("cache", "ls", "--store", root)
    assert listed.returncode == 0
    summary = listed.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{root}: 4 entries (1 checkpoint, 3 pools)") and "1 incomplete, 0 unreadable" in summary
    verified = mid("cache", "verify", "--store", root)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip().splitlines()[-1] == \
        "4 entries, 3 pools, 4 chunks verified, 0 corrupt, 1 not committed yet"
    chunk = tmp_path / "store/pools/pool-kept/adv/c/0/0/0/0/0"  # variant 0, shard 0
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"xyz")
    broken = mid("cache", "verify", "--store", root)
    assert broken.returncode == 1
    assert "1 corrupt" in broken.stdout.strip().splitlines()[-1]
    assert "pool pool-kept shard 0 array adv" in broken.stderr
    (tmp_path / "store/pools/pool-orphan/manifest.json").write_text("{not json")
    unreadable = mid("cache", "ls", "--store", root)
    assert unreadable.returncode == 1 and "pool pool-orphan: unreadable metadata" in unreadable.stderr


def test_init_marks_an_old_store_but_never_a_user_folder(tmp_path, foreign):
    old = tmp_path / "old-store"
    (old / "datasets").mkdir(parents=True)
    (old / "refs").mkdir()
    refused = mid("cache", "ls", "--store", str(old))
    assert refused.returncode == 2 and "mid cache init" in refused.stderr
    assert mid("cache", "init", "--store", str(old)).returncode == 0
    assert mid("cache", "ls", "--store", str(old)).returncode == 0
    before = snapshot(foreign)
    result = mid("cache", "init", "--store", str(foreign))
    assert result.returncode == 2 and "refusing to mark it" in result.stderr
    assert snapshot(foreign) == before
