"""Runs that share a machine or a store, and runs stopped with Ctrl-C, on the real CLI.

* Two runs of one config on one empty store at once: each stage is built by one run while
  the other waits on its build lock and then reuses it; both report the same table.
* Meanwhile a third run on a store of its own starts its own local Ray instance and works
  (Ray code inside its workers finds its own instance, not "multiple active Ray instances"),
  and, on a machine as busy as that, reproduces the first store bit for bit: the same
  checkpoints (sha256), the same pool and stored-test-attack bytes, the same table.
* Ctrl-C (SIGINT to the run's process group, as a terminal sends it) stops a run within
  10 s, leaving only committed or resumable state, and the run's ref says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clihelpers import REPO, mid

from storage import runs

pytestmark = pytest.mark.end_to_end  # `make test-fast` leaves this file out

TINY = [
    "data.train_limit=256", "data.test_limit=32", "eval.defenses=[None, MID]",
    "models.baseline.epochs=1", "models.teacher.epochs=1", "mid.epochs=1",
    "attacks.PGD.nb_iter=2", "attacks.MIM.nb_iter=2", "attacks.BIM.nb_iter=2",
    "pool.attacks=[PGD_N, MIM_N]", "eval.known=[PGD_N, MIM_N]", "eval.unknown=[FGSM_N]", "eval.protocols=[adaptive]",
    "pool.variants=1", "pool.shard_size=128", "eval.batch_size=32",
]


def command(verb: str, store: Path, out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "pipeline", verb, "configs/digits.yaml", "--store", str(store), "--out", str(out)]
    for override in [*TINY, *extra]:
        args += ["--set", override]
    return args


def interruptible() -> None:
    # A terminal delivers Ctrl-C; a CI job started in the background of a non-interactive
    # shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args: list[str], log: Path) -> subprocess.Popen:
    # Its own session: the run and the Ray instance it starts form one process group, as in a terminal.
    return subprocess.Popen(args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=interruptible)


def stored_bytes(store: Path) -> dict[str, str]:
    """sha256 of every weights file and every pool chunk in a store, by path."""
    return {str(path.relative_to(store)): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in ("checkpoints", "pools") for path in sorted((store / folder).rglob("*"))
            if path.is_file() and (path.suffix == ".safetensors" or "/c/" in str(path.relative_to(store)))}


def test_runs_at_once_share_a_store_and_a_machine_and_reproduce_bit_for_bit(tmp_path):
    """Two runs of one config on one empty store, and a third on an empty store of its own, all at once."""
    store, other = tmp_path / "store", tmp_path / "other-store"
    runs = [start(command("run", store, tmp_path / f"out{i}"), tmp_path / f"log{i}.txt") for i in (0, 1)]
    runs.append(start(command("run", other, tmp_path / "out2"), tmp_path / "log2.txt"))
    for i, proc in enumerate(runs):
        assert proc.wait(timeout=900) == 0, (tmp_path / f"log{i}.txt").read_text()[-4000:]
    results = [json.loads((tmp_path / f"out{i}" / "results.json").read_text()) for i in (0, 1, 2)]
    assert results[0]["protocols"] == results[1]["protocols"] == results[2]["protocols"]  # the same table
    # Two fresh stores, one config: every stage's key and checkpoint sha256 and every stored
    # byte agree (training was not bit-reproducible before: Ray Data's unseeded local
    # shuffle and its block order by completion).
    for stage, record in results[0]["stages"].items():
        assert record["key"] == results[2]["stages"][stage]["key"], stage
        assert record.get("sha256") == results[2]["stages"][stage].get("sha256"), stage
    first, second = stored_bytes(store), stored_bytes(other)
    assert sum(path.endswith(".safetensors") for path in first) == 3  # baseline, teacher, MID
    assert len(first) > 3 and first == second  # and every pool chunk
    for stage in results[0]["stages"]:  # the two runs on one store
        keys = {r["stages"][stage]["key"] for r in results[:2]}
        assert len(keys) == 1, stage
        built = [r["stages"][stage]["cache_hit"] is False for r in results[:2]]
        assert built.count(True) == 1, (stage, built)  # built by one run, reused by the other
    logs = [(tmp_path / f"log{i}.txt").read_text() for i in (0, 1, 2)]
    assert "waiting: another run is building" in logs[0] + logs[1]
    assert mid("cache", "verify", "--store", str(store)).returncode == 0
    assert not list((store / "leases").iterdir())  # both runs released their leases
    # The third run started a Ray instance of its own while another was up; Ray code inside
    # its workers found its own instance.
    assert "starting a local Ray instance" in logs[2]
    assert not [log for log in logs if "multiple active Ray instances" in log]


def session_processes(pgid: int) -> list[str]:
    rows = subprocess.run(["ps", "-eo", "pgid=,args="], capture_output=True, text=True).stdout.splitlines()
    return [row for row in rows if row.split(None, 1)[0] == str(pgid)]


@pytest.mark.serial  # a 10 s limit: measured with nothing beside it
def test_ctrl_c_stops_a_run_within_ten_seconds_and_keeps_resumable_state(tmp_path):
    store, out = tmp_path / "store", tmp_path / "out"
    log = tmp_path / "log.txt"
    proc = start(command("run", store, out, "models.baseline.epochs=50", "ray.checkpoint_interval_s=0"), log)
    deadline = time.time() + 300
    while not list(store.glob("train/models-*/checkpoint_*")) and time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    sent = time.time()
    code = proc.wait(timeout=60)
    elapsed = time.time() - sent
    print(f"Ctrl-C during baseline training: exit {code} after {elapsed:.1f} s")  # pytest -s shows it
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert code == 130
    lines = log.read_text().splitlines()
    # One line of ours (Ray's workers may still flush a progress bar around it), no traceback.
    assert "interrupted: committed stages are kept; run the same command again to resume" in lines
    assert not [line for line in lines if line.startswith("error:") or "Traceback" in line]
    time.sleep(1)
    assert session_processes(proc.pid) == []  # the run's Ray instance went with it

    (ref,) = [ref for ref in runs.read_refs(str(store)).values() if ref["name"] == "digits"]  # one ref per run
    assert ref["status"] == "interrupted" and ref["keys"]["baseline"].startswith("baseline-")
    assert list((store / "train").glob("models-*/checkpoint_*")), "resume state kept"
    assert mid("cache", "verify", "--store", str(store)).returncode == 0  # nothing half-written is visible
    dry = mid("cache", "gc", "--store", str(store), "--dry-run")
    assert "would remove 0 items" in dry.stdout, dry.stdout  # the interrupted run keeps everything


@pytest.mark.serial  # a 10 s limit: measured with nothing beside it
def test_ctrl_c_stops_a_sweep_and_its_trials_refs_say_interrupted(tmp_path):
    """Ctrl-C of a sweep while a trial trains: the sweep exits 130 within 10 s, none of its
    processes (Ray's agents included) outlives it by more than 10 s, and the trial's ref says
    ``interrupted`` (before: ``running`` for ever, since Tune kills the trial's actor).
    Reproduce: `mid sweep SWEEP.yaml`, Ctrl-C during a trial's baseline training."""
    store, out, log = tmp_path / "store", tmp_path / "out", tmp_path / "log.txt"
    overrides = dict(item.split("=", 1) for item in [*TINY, "models.baseline.epochs=50", "ray.checkpoint_interval_s=0"])
    settings = "".join(f"  {key}: {value}\n" for key, value in overrides.items())
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"name: stop\nbase: {REPO}/configs/digits.yaml\nset:\n{settings}variants:\n  only: {{}}\n")
    proc = start([sys.executable, "-m", "pipeline", "sweep", str(sweep_file), "--store", str(store),
                  "--out", str(out)], log)
    deadline = time.time() + 300
    while not list(store.glob("train/models-*/checkpoint_*")) and time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.time()
    code = proc.wait(timeout=60)
    exited = time.time()
    assert code == 130 and exited - sent < 10, (code, exited - sent, log.read_text()[-3000:])
    while session_processes(proc.pid) and time.time() - exited < 10:
        time.sleep(0.5)
    assert session_processes(proc.pid) == [], "outlived the sweep by 10 s or more"
    (ref,) = [ref for ref in runs.read_refs(str(store)).values() if ref["name"] == "stop-only"]
    assert ref["status"] == "interrupted", ref
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
