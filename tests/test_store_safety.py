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

from storage import catalog, checkpoints, locks, pools, runs
from storage import store as store_location
from storage.keys import content_key


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
        assert "note: a run is in progress (live-run" in dry.stdout
        # A live run's ref cannot be dropped.
        assert mid("cache", "gc", "--store", root, "--ref", "live-run", "--yes").returncode == 2
    finally:
        lease.release()
    # No terminal to ask on and no --yes: nothing is removed.
    refused = mid("cache", "gc", "--store", root)
    assert refused.returncode == 2
    assert "confirm with --yes" in refused.stderr and (tmp_path / "store/pools/pool-orphan").exists()
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
    assert summary.startswith(f"{root}: 4 entries (1 checkpoint, 3 pools)")
    assert summary.endswith("1 incomplete, 0 with problems, 1 ref")
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


def test_gc_removes_nothing_while_a_run_is_live_even_before_it_claims_anything(tmp_path):
    """`mid run configs/digits.yaml --store S` starting while `mid cache gc --yes --store S` runs:
    the run's lease names nothing yet, and gc used to delete the cached entries the run was about
    to reuse (issue 22). Now a live run holds the store, and gc removes nothing, naming it."""
    root = small_store(tmp_path)
    lease = runs.Lease(root, "digits-3f9a2c1b").start()  # what RunContext.open does: no claim yet
    try:
        busy = mid("cache", "gc", "--store", root, "--yes")
        assert busy.returncode == 0, busy.stderr
        line = busy.stdout.strip()
        assert line.startswith(f"nothing removed: a run is in progress on {root}: digits-3f9a2c1b (pid {os.getpid()}")
        assert (tmp_path / "store/pools/pool-orphan").exists() and (tmp_path / "store/pools/pool-leftover").exists()
    finally:
        lease.release()
    assert "removed 2 items" in mid("cache", "gc", "--store", root, "--yes").stdout


def test_gc_on_an_object_store_removes_nothing_while_a_lease_is_live(tmp_path):
    """The same on a store without file locks (`mid cache gc --yes --store s3://…` while a run
    starts): a live lease, even one naming nothing yet, keeps gc from removing anything.
    (fsspec's in-process memory:// store stands in for S3 here: both are object stores to mid.)"""
    from pipeline.cli import main

    root = store_location.open_or_create(f"memory://{tmp_path.name}")
    clean = np.full((4, 1, 2, 2), 100, np.uint8)
    pools.create_pool(root, "pool-orphan", num_samples=4, image_shape=(1, 2, 2), variants=1, shard_size=4,
                      compressor="zstd", encoding="uint8", attrs={"attack": "PGD_N"})
    pools.write_shard(root, "pool-orphan", shard=0, start=0, stop=4, eps=0.1, adv_u8=clean[None] + 1,
                      clean_u8=clean, targets=np.full((1, 4), -1), stats={})
    pools.finalize_pool(root, "pool-orphan", 1, {})
    lease = runs.Lease(root, "digits-3f9a2c1b").start()
    try:
        busy = run_main(main, ["cache", "gc", "--yes", "--store", root])
        assert busy.returncode == 0 and busy.stdout.startswith(f"nothing removed: a run is in progress on {root}")
        assert [e.key for e in catalog.list_entries(root)] == ["pool-orphan"]
    finally:
        lease.release()
    assert "removed 1 item" in run_main(main, ["cache", "gc", "--yes", "--store", root]).stdout
    assert catalog.list_entries(root) == []


def test_a_run_waits_for_a_gc_and_two_gcs_take_turns(tmp_path):
    """Two `mid cache gc --yes --store S` at once, and a run starting meanwhile: the second gc
    waits for the first (it used to crash on a shard record the first had removed) and a run
    waits until gc has finished removing."""
    import threading

    root = small_store(tmp_path)
    waited = threading.Event()
    with locks.store_exclusive(root, no_live_run=lambda: True) as free:  # what a removing gc holds
        assert free
        starting = threading.Thread(target=lambda: runs.Lease(root, "r", on_wait=waited.set).start().release())
        starting.start()
        assert waited.wait(30)
        time.sleep(0.5)
        assert starting.is_alive()  # the run waits while gc removes
    starting.join(30)
    assert not starting.is_alive()
    log = tmp_path / "second-gc.txt"
    with locks.gc_lock(root):  # another gc is running
        with open(log, "w") as stderr:
            second = subprocess.Popen([sys.executable, "-m", "pipeline", "cache", "gc", "--yes", "--store", root],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True)
        deadline = time.time() + 60
        while "waiting:" not in log.read_text() and second.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert second.poll() is None and (tmp_path / "store/pools/pool-orphan").exists()
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 0, log.read_text()
    assert log.read_text() == f"waiting: another mid cache gc is running on {root}\n" and "removed 2 items" in out


def test_gc_survives_an_entry_vanishing_while_it_works(tmp_path):
    """Two `mid cache gc --yes --store S` at once: the second crashed with `file not found:
    .../commits/shard-00001.json` when the first removed a pool it was measuring. A dangling link
    is that moment frozen: listed, then gone when gc reads it."""
    root = small_store(tmp_path)
    (tmp_path / "store/pools/pool-orphan/commits/shard-00001.json").symlink_to(tmp_path / "removed-meanwhile")
    (tmp_path / "store/results").mkdir()
    (tmp_path / "store/results/x.json.tmp-0123").symlink_to(tmp_path / "renamed-meanwhile")
    result = mid("cache", "gc", "--store", root, "--yes")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "removed 2 items" in result.stdout and not (tmp_path / "store/pools/pool-orphan").exists()


def test_verify_and_ls_fail_a_complete_pool_with_a_shard_record_missing(tmp_path):
    """`rm STORE/pools/KEY/commits/shard-00000.json`, corrupt its chunk, `mid cache verify`: it said
    ok (the record it would hash against was gone) and `mid cache ls` said complete. Now the
    shard is "not committed" in a pool marked complete: verify and ls exit 1."""
    root = small_store(tmp_path)
    (tmp_path / "store/pools/pool-kept/commits/shard-00000.json").unlink()
    chunk = tmp_path / "store/pools/pool-kept/adv/c/0/0/0/0/0"
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"xyz")
    problem = ("pool pool-kept: shard 0 not committed (no commits/shard-00000.json), though its manifest marks "
               "the pool complete")
    verified = mid("cache", "verify", "--store", root)
    assert verified.returncode == 1
    assert "pool pool-kept: FAILED" in verified.stdout and problem in verified.stderr
    assert "pool pool-kept shard 0 array adv" in verified.stderr  # the chunks are checked all the same
    listed = mid("cache", "ls", "--store", root)
    assert listed.returncode == 1 and f"error: {problem}" in listed.stderr
    assert [line.split()[7] for line in listed.stdout.splitlines() if "pool-kept" in line] == ["false"]


def old_store(folder: Path) -> str:
    """A real store as an older mid left it: every kind of entry, a ref, a temporary file, no marker."""
    root = store_location.open_or_create(str(folder))
    pool = content_key("pool", {"x": 1})
    pools.create_pool(root, pool, num_samples=4, image_shape=(1, 2, 2), variants=1, shard_size=2,
                      compressor="zstd", encoding="uint8", attrs={"attack": "PGD_N"})
    clean = np.full((2, 1, 2, 2), 100, np.uint8)
    for shard in (0, 1):
        pools.write_shard(root, pool, shard=shard, start=2 * shard, stop=2 * shard + 2, eps=0.1,
                          adv_u8=clean[None] + 1, clean_u8=clean, targets=np.full((1, 2), 3), stats={})
    pools.finalize_pool(root, pool, 2, {})
    checkpoints.save_checkpoint(root, content_key("teacher", {"x": 1}), {"w": torch.ones(3)}, {"kind": "teacher"})
    runs.write_ref(root, "digits", {"pools": {"PGD_N": pool}}, "finished")
    (folder / "results").mkdir()
    (folder / "results" / f"{content_key('eval', {})}.json").write_text("{}")
    (folder / "results" / f"{content_key('eval', {'y': 1})}.json.tmp-{'0' * 32}").write_text("{")
    (folder / store_location.MARKER_FILE).unlink()
    return root


def test_init_refuses_a_folder_with_a_file_no_store_writes(tmp_path):
    """`mkdir -p F/results F/datasets/mnist && touch F/results/summary.csv F/datasets/mnist/train.csv;
    mid cache init --store F`: it marked F (its top-level names are a store's), and gc then
    deleted the user's files. Now init names one such file, exit 2, and changes nothing."""
    user = tmp_path / "thesis"
    (user / "datasets" / "mnist").mkdir(parents=True)
    (user / "results").mkdir()
    (user / "datasets" / "mnist" / "train.csv").write_text("1,2,3")
    (user / "results" / "summary.csv").write_text("a,b")
    before = snapshot(user)
    refused = mid("cache", "init", "--store", str(user))
    assert refused.returncode == 2
    line = the_error_line(refused, str(user), "datasets/mnist/train.csv", "refusing to mark it")
    assert line == (f"error: not a MID store: {user} (it holds datasets/mnist/train.csv, which a store would not "
                    f"have written); refusing to mark it")
    assert snapshot(user) == before
    assert "mid cache init" not in mid("cache", "ls", "--store", str(user)).stderr  # never suggested for it
    # A store an older mid wrote is still adopted, a stray file in it refused.
    old = tmp_path / "old-store"
    root = old_store(old)
    (old / "pools" / "notes.txt").write_text("mine")
    assert "it holds pools/notes.txt" in mid("cache", "init", "--store", root).stderr
    (old / "pools" / "notes.txt").unlink()
    adopted = mid("cache", "init", "--store", root)
    assert adopted.returncode == 0, adopted.stderr
    assert mid("cache", "verify", "--store", root).returncode == 0


def test_each_run_of_a_config_keeps_its_own_ref(tmp_path):
    """`mid run configs/digits.yaml`, then the same with `--set mid.epochs=5`: the second run's ref
    replaced the first's (both were refs/digits.json), so gc removed the first run's outputs.
    Now each run has a ref of its own, `<name>-<digest of its config>`, listed by `mid cache ls`;
    `gc --ref` takes a ref id, or a name that only one ref has. Refs of older mids still read."""
    from pipeline.config_loader import load_config
    from pipeline.context import RunContext

    store = str(tmp_path / "store")
    models = []
    for epochs in (1, 2, 1):  # the same config twice: the same ref
        cfg = load_config("configs/digits.yaml", [f"mid.epochs={epochs}"], store)
        with RunContext(cfg, tmp_path / "out") as ctx:
            key = content_key("mid", {"epochs": epochs})
            ctx.claim("mid", key)
            checkpoints.save_checkpoint(ctx.root, key, {"w": torch.ones(3)}, {"kind": "mid_student"})
        models.append(key)
    refs = runs.read_refs(store)
    ids = sorted(refs, key=lambda ident: refs[ident]["keys"]["mid"] != models[0])  # the first run's first
    assert [refs[i]["keys"]["mid"] for i in ids] == models[:2]
    assert all(i.startswith("digits-") and len(i) == len("digits-") + 8 and refs[i]["name"] == "digits" for i in ids)
    runs.write_ref(store, "old-run", {"mid": "mid-0123456789abcdef0123"}, "finished")  # refs/<name>.json
    (tmp_path / "store/refs/old-run.json").write_text(json.dumps(
        {k: v for k, v in json.loads((tmp_path / "store/refs/old-run.json").read_text()).items() if k != "id"}))
    assert sorted(runs.read_refs(store)) == sorted([*ids, "old-run"])
    listed = mid("cache", "ls", "--store", store)
    assert listed.returncode == 0 and all(i in listed.stdout for i in [*ids, "old-run"])
    dry = mid("cache", "gc", "--store", store, "--dry-run")
    assert "would remove 0 items" in dry.stdout, dry.stdout  # both runs keep their models
    ambiguous = mid("cache", "gc", "--store", store, "--ref", "digits", "--yes")
    assert ambiguous.returncode == 2
    the_error_line(ambiguous, "2 refs are named 'digits'", ids[0], ids[1], "name one of them")
    dropped = mid("cache", "gc", "--store", store, "--ref", ids[0], "--yes")
    assert dropped.returncode == 0, dropped.stderr
    assert not (tmp_path / "store/checkpoints" / models[0]).exists()
    assert (tmp_path / "store/checkpoints" / models[1]).exists()
    assert mid("cache", "gc", "--store", store, "--ref", "digits", "--yes").returncode == 0  # one left: by name
    assert not (tmp_path / "store/checkpoints" / models[1]).exists()
    assert mid("cache", "gc", "--store", store, "--ref", "old-run", "--yes").returncode == 0
    assert runs.read_refs(store) == {}


def test_an_error_log_without_a_run_folder_goes_to_a_private_folder(tmp_path):
    """An unexpected error of a command without OUT (e.g. `mid cache gc` before issue 22's fix)
    wrote its traceback to /tmp/mid-logs/error-<time>-<pid>.log: a shared, predictable path
    another user could plant a link at. Now it is a new folder only its owner can read."""
    from pipeline.errors import log_path

    path = log_path(None)
    assert path.is_file() and not str(path).startswith("/tmp/mid-logs/")
    assert path.parent.name.startswith("mid-logs-") and (path.parent.stat().st_mode & 0o777) == 0o700
    assert log_path(None).parent != path.parent
    out = tmp_path / "run"
    assert log_path(out).parent == out / "logs"
