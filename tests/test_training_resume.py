"""Fault tolerance of training, with the real CLI on a real local Ray instance: a run whose
driver and Ray head die together (the whole process group killed) resumes MID at its last
checkpoint when the same command is run again, finishes with every epoch once and cleans
its resume state away. And `mid cache gc` takes nothing from it: not while the run is in
progress (its lease), not once it was interrupted (its ref, written when it started).

A Ray Train worker lost during MID (its node killed) is `tests/test_s3_store.py`'s: the
worker group restarts and resumes from the epoch checkpoint on the store."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clihelpers import is_loopback, run_watching_listeners, signal_session, the_error_line

pytestmark = pytest.mark.end_to_end  # `make test-fast` leaves this file out

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
def preparing(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A store with the dataset, baseline, teacher and pool of TINY, built once: the resume
    tests are about MID's training, and each starts from a copy. Also every listening socket
    the run's processes opened meanwhile (its classifiers train on Ray Train workers)."""
    store = tmp_path_factory.mktemp("prepared") / "store"
    args = cli_args(store, store.parent / "out")
    args[args.index("run")] = "pool"
    result, listeners = run_watching_listeners(args)
    assert result.returncode == 0, result.stderr[-4000:]
    return store, listeners


@pytest.fixture(scope="module")
def prepared(preparing) -> Path:
    return preparing[0]


def test_training_stages_listen_on_loopback_only(preparing):
    """A local run's training keeps every listening socket on 127.0.0.1, torch.distributed's
    rendezvous store and gloo's connections included (before: the store listened on all
    interfaces). Reproduce: `mid pool configs/digits.yaml` and `ss -ltnp` while it trains."""
    _, listeners = preparing
    table = "\n".join(f"  {item['ip']}:{item['port']}  pid {item['pid']}  ({item['cmd']})" for item in listeners)
    # The scan saw the training workers listen (a scan that sees nothing proves nothing).
    assert any("RayTrainWorker" in item["cmd"] for item in listeners), table
    offenders = [item for item in listeners if not is_loopback(item["ip"])]
    assert not offenders, "listening beyond loopback:\n" + table


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
    assert collected.stdout.startswith(f"nothing removed: a run is in progress on {store}: digits-"), collected.stdout


def test_rerun_after_driver_and_head_died_resumes_mid(tmp_path, prepared):
    store, out = copy_of(prepared, tmp_path), tmp_path / "run"
    log = open(tmp_path / "log1.txt", "w")
    # Its own session: signalling the session reaches the driver, the Ray head it started and its workers.
    proc = subprocess.Popen(cli_args(store, out), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not mid_checkpoint_registered(store):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before MID checkpointed an epoch"
    # Frozen mid-MID (driver, head and workers alive, the lease held), gc takes nothing of it.
    assert signal_session(proc.pid, signal.SIGSTOP) > 1  # the driver, the head and the Ray workers
    collect_during_the_run(store)
    signal_session(proc.pid, signal.SIGKILL)
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


def test_a_diverging_stage_stops_and_commits_nothing(tmp_path, prepared):
    """A training stage whose loss becomes non-finite stops at that epoch with one line and
    commits nothing (before: a checkpoint of NaN weights was committed, the pool and tables
    built on it, exit 0). Reproduce: `mid pool configs/digits.yaml --set models.baseline.lr=1e30`
    (finite, so the config takes it; Adam's first steps overflow the weights)."""
    store = copy_of(prepared, tmp_path)
    committed = sorted(p.name for p in (store / "checkpoints").iterdir())
    args = cli_args(store, tmp_path / "out") + ["--set", "models.baseline.lr=1e30"]
    args[args.index("run")] = "pool"
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stderr[-4000:]
    line = the_error_line(result, "baseline training", "epoch 0", "nothing was committed")
    assert "non-finite" in line or "loss became nan" in line, line
    assert sorted(p.name for p in (store / "checkpoints").iterdir()) == committed  # no new model
    assert not list((store / "train").iterdir())  # and no resume state to resume a broken model from
