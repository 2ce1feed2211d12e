"""Fault tolerance of training, with the real CLI on a real local Ray instance: a run whose
driver and Ray head die together (the whole process group killed) resumes MID at its last
checkpoint when the same command is run again, finishes with every epoch once and cleans
its resume state away. And `mid cache gc` takes nothing from it: not while the run is in
progress (its lease), not once it was interrupted (its ref, written when it started).

A Ray Train worker lost during MID (its node killed) is `tests/test_s3_store.py`'s: the
worker group restarts and resumes from the epoch checkpoint on the store."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = [
    "data.train_limit=1024", "data.test_limit=32", "eval.defenses=[None, MID]",
    "models.baseline.epochs=1", "models.teacher.epochs=1", "mid.epochs=8",
    "attacks.PGD.nb_iter=2", "attacks.MIM.nb_iter=2", "attacks.BIM.nb_iter=2",
    "pool.variants=1", "pool.shard_size=512", "eval.batch_size=32", "ray.checkpoint_interval_s=0",
    "eval.protocols=[adaptive]", "eval.unknown=[FGSM_N]",  # evaluation is test_end_to_end's subject
]


def mid_checkpoint_registered(store: Path) -> bool:
    """Whether Ray Train has registered a MID epoch checkpoint: a checkpoint folder alone can
    still be waiting for the other workers' reports, and a kill then restarts at epoch 0."""
    return any((store / "train").glob("mid-*/checkpoint_manager_snapshot.json"))


def cli_args(store: Path, out: Path) -> list[str]:
    args = [sys.executable, "-m", "pipeline", "run", "configs/digits.yaml", "--store", str(store), "--out", str(out)]
    for override in TINY:
        args += ["--set", override]
    return args


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A store with the dataset, baseline, teacher and pool of TINY, built once: both tests
    are about MID's training, and each starts from a copy."""
    store = tmp_path_factory.mktemp("prepared") / "store"
    args = cli_args(store, store.parent / "out")
    args[args.index("run")] = "pool"
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return store


def copy_of(prepared: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(prepared, store)
    return store


def check_finished_run(store: Path, out: Path) -> list[dict]:
    history = [json.loads(line) for line in (out / "metrics" / "mid.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(8))  # every epoch once, none repeated
    resumed = [h["epoch"] for h in history if h["resumed"]]
    assert len(resumed) == 1 and resumed[0] > 0, history  # picked up after a checkpoint, not at epoch 0
    assert not list((store / "train").iterdir())  # resume state is gone once the stage committed
    report = json.loads((out / "results.json").read_text())
    assert list(report["protocols"]["adaptive"]["defenses"]) == ["None", "MID"]
    return history


def mid_cache(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "cache", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def collect_during_the_run(store: Path) -> None:
    """gc while the run is alive: its ref cannot be dropped, and nothing of it is removed."""
    refused = mid_cache("gc", "--store", str(store), "--ref", "digits", "--yes")
    assert refused.returncode == 2 and "in progress" in refused.stderr, refused.stderr
    collected = mid_cache("gc", "--store", str(store), "--yes")
    assert collected.returncode == 0, collected.stderr
    assert "removed 0 items" in collected.stdout or "nothing to remove" in collected.stdout, collected.stdout


def test_rerun_after_driver_and_head_died_resumes_mid(tmp_path, prepared):
    store, out = copy_of(prepared, tmp_path), tmp_path / "run"
    log = open(tmp_path / "log1.txt", "w")
    # Its own session: killing the group takes the driver and the Ray head it started.
    proc = subprocess.Popen(cli_args(store, out), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not mid_checkpoint_registered(store):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before MID checkpointed an epoch"
    # Frozen mid-MID (driver, head and workers alive, the lease held), gc takes nothing of it.
    os.killpg(proc.pid, signal.SIGSTOP)
    collect_during_the_run(store)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert mid_checkpoint_registered(store)  # the resume state survived in the store
    # The driver is gone (its lease with it); the ref it wrote when it started keeps its
    # outputs and resume state from gc until the user drops the ref.
    dry = mid_cache("gc", "--store", str(store), "--dry-run")
    listed = [line for line in dry.stdout.splitlines() if line.startswith("would remove:")]
    # Only the dead driver's lease (and a temporary file its kill may have cut short) may go.
    assert all("/leases/" in line or ".tmp-" in line for line in listed), dry.stdout
    assert mid_cache("gc", "--store", str(store), "--yes").returncode == 0
    assert mid_checkpoint_registered(store)

    rerun = subprocess.run(cli_args(store, out), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    check_finished_run(store, out)
