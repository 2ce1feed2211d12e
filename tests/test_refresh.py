"""Rows trained on a refreshed pool (MID-R, ATTA; pipeline/stages/refresh.py), with the real
CLI on a real local Ray instance: each round's pool version is the last version continued
against the last round's model, stored as a verified, keyed pool; a rerun reuses every
round; and a run killed (driver and Ray head together) while its second pool version is
being made resumes there and ends with the same pools and checkpoint as an uninterrupted
run."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clihelpers import signal_session
from storage import pools
from storage.datasets import DatasetReader

pytestmark = pytest.mark.end_to_end  # `make test-fast` leaves this file out

# 512 samples in shards of 16: 32 shards per pool version and attack. A refresh of 200 small
# steps makes each shard take a noticeable moment, so the kill lands inside a version.
TINY = [
    "data.train_limit=512", "data.test_limit=32", "eval.defenses=[MID-R, ATTA]",
    "models.baseline.epochs=2", "models.teacher.epochs=2", "mid.epochs=3", "models.at.epochs=2",
    "attacks.PGD.nb_iter=3", "attacks.PGD.eps=0.3", "attacks.PGD.eps_iter=0.1",
    "pool.attacks=[PGD_N, PGD_T]", "pool.variants=1", "pool.shard_size=16",
    "pool.refresh.every=1", "pool.refresh.steps=200", "pool.refresh.step_size=0.002", "pool.refresh.start=pool",
    "models.mid_r={}",  # MID-R on mid's 3 epochs, not digits.yaml's own schedule
    "eval.protocols=[adaptive]", "eval.known=[PGD_N]", "eval.unknown=[PGD_T]", "eval.batch_size=32",
]


def cli_args(store: Path, command: str = "run", *extra: str) -> list[str]:
    args = [sys.executable, "-m", "pipeline", command, "configs/digits.yaml", "--store", str(store),
            "--out", str(store.parent / "out")]
    for override in [*TINY, *extra]:
        args += ["--set", override]
    return args


def results(store: Path) -> dict:
    return json.loads((store.parent / "out" / "results.json").read_text())


def shard_hashes(store: Path, key: str) -> list[str]:
    return [shard["sha256"] for shard in pools.read_manifest(str(store), key)["shards"]]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The dataset, baseline, teacher and pool version 0 of TINY, built once."""
    store = tmp_path_factory.mktemp("prepared") / "store"
    result = subprocess.run(cli_args(store, "pool"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return store


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("uninterrupted") / "store"
    shutil.copytree(prepared, store)
    result = subprocess.run(cli_args(store), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return store


def test_each_round_trains_on_the_last_version_refreshed_against_the_last_model(uninterrupted):
    store, report = uninterrupted, results(uninterrupted)
    assert report["stages"].keys() >= {"mid-r", "atta"}
    assert list(report["protocols"]["adaptive"]["defenses"]) == ["MID-R", "ATTA"]
    first = report["stages"]["pool"]["attacks"]
    for kind in ("mid-r", "atta"):
        rounds = report["stages"][kind]["rounds"]
        assert [r["epochs"] for r in rounds] == ([[0, 1], [1, 2], [2, 3]] if kind == "mid-r" else [[0, 1], [1, 2]])
        assert rounds[0]["pools"] == {a: info["key"] for a, info in first.items()}  # round 0: the stored pool
        for before, now in zip(rounds, rounds[1:]):
            for attack, key in now["pools"].items():
                manifest = pools.read_manifest(str(store), key)
                attrs = manifest["attrs"]
                assert manifest["complete"] and attrs["refresh"]["of"] == before["pools"][attack]
                assert attrs["refresh"]["steps"] == 200 and attrs["variants"] == 1
                # Made against the previous round's model, the row's own.
                assert attrs["source_model"]["key"] == before["checkpoint"]
                problems, checked = pools.verify_pool(str(store), key)
                assert problems == [] and checked == 2 * 32  # every shard's images and targets re-hashed
                # Continued, not regenerated: every image is a few steps away from the last version's.
                old = pools.PoolReader.open(str(store), before["pools"][attack]).adv(0, 0, 512)
                new = pools.PoolReader.open(str(store), key).adv(0, 0, 512)
                moved = np.abs(new.astype(int) - old.astype(int)).max()
                assert 0 < moved <= round(200 * 0.002 * 255) + 1
        assert report["stages"][kind]["key"] == rounds[-1]["checkpoint"]
    assert not list((store / "train").iterdir())  # the group's run folder is gone
    # The adaptive table attacks the refreshed rows' own final models.
    assert all(0 <= v <= 100 for row in report["protocols"]["adaptive"]["defenses"].values()
               for v in [row["benign"], *row["attacks"].values()])


def test_a_rerun_reuses_every_round(uninterrupted, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(uninterrupted, store)
    before = results(uninterrupted)
    rerun = subprocess.run(cli_args(store), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    after = results(store)
    for kind in ("mid-r", "atta"):
        assert after["stages"][kind]["cache_hit"] and after["stages"][kind]["key"] == before["stages"][kind]["key"]
    assert "starting a local Ray instance" not in rerun.stderr
    # Each row's final round exports as that row (MID-R: C_t ∘ E_s; ATTA: its classifier).
    for row in ("MID-R", "ATTA"):
        exported = subprocess.run([sys.executable, "-m", "pipeline", "export", "digits", str(tmp_path / row),
                                   "--row", row, "--format", "safetensors", "--store", str(store)],
                                  capture_output=True, text=True, timeout=300)
        assert exported.returncode == 0 and f"(row {row} of run digits-" in exported.stdout, exported.stderr
        card = json.loads((tmp_path / row / "card.json").read_text())
        assert card["model"]["row"] == row and card["check"]["largest_logit_difference"] < 1e-4


def test_killed_during_the_second_pool_version_resumes_to_the_same_pools_and_checkpoint(
        uninterrupted, prepared, tmp_path):
    reference = results(uninterrupted)["stages"]["mid-r"]["rounds"]
    second = list(reference[1]["pools"].values())  # pool version 1: the first refreshed one
    store = tmp_path / "store"
    shutil.copytree(prepared, store)
    log = open(tmp_path / "log.txt", "w")
    # Its own session: killing the session takes the driver, the Ray head it started and its workers.
    only = "eval.defenses=[MID-R]"  # ATTA's rounds are the same code; MID-R's keys do not depend on it
    proc = subprocess.Popen(cli_args(store, "run", only), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def committed() -> int:
        return sum(len(list(Path(store, "pools", key, "commits").glob("shard-*.json"))) for key in second)

    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and committed() == 0:
        time.sleep(0.02)
    assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
    signal_session(proc.pid, signal.SIGKILL)  # its Ray workers too, so no shard commits after the count
    proc.wait(timeout=60)
    done = committed()
    assert 0 < done < 64, f"the kill should land inside pool version 1 ({done} of 64 shards committed)"
    assert not any(pools.read_manifest(str(store), key) for key in second)  # neither pool is complete
    # The interrupted run's ref keeps its rounds, its pool versions, partial ones included, and
    # its worker group's folder: gc would take only the dead driver's lease.
    dry = subprocess.run([sys.executable, "-m", "pipeline", "cache", "gc", "--store", str(store), "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    listed = [line for line in dry.stdout.splitlines() if line.startswith("would remove:")]
    assert all("/leases/" in line or ".tmp-" in line for line in listed), dry.stdout

    rerun = subprocess.run(cli_args(store, "run", only), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "resuming" in rerun.stderr  # only the missing shards were made
    resumed = results(store)["stages"]["mid-r"]["rounds"]
    assert [r["checkpoint"] for r in resumed] == [r["checkpoint"] for r in reference]
    assert [r["pools"] for r in resumed] == [r["pools"] for r in reference]
    for r in reference[1:]:
        for key in r["pools"].values():
            assert shard_hashes(store, key) == shard_hashes(uninterrupted, key)
    final = reference[-1]["checkpoint"]
    manifest = json.loads(Path(store, "checkpoints", final, "manifest.json").read_text())
    expected = json.loads(Path(uninterrupted, "checkpoints", final, "manifest.json").read_text())
    assert manifest["sha256"] == expected["sha256"]


# MID-R here also trains its own classifier (mid.classifier: trainable), and both rows start
# from random points of the ε-ball instead of the stored pool (published ATTA's start), which
# this run checks too.
STALENESS_ZERO = ["pool.refresh.every=0", "pool.refresh.steps=2", "pool.refresh.step_size=0.05",
                  "mid.classifier=trainable", "pool.refresh.start=random"]


def test_at_staleness_zero_each_version_is_the_views_the_workers_carried(prepared, tmp_path):
    """pool.refresh.every 0: the workers continue each batch's views in the step and the next
    version is what they carried (every sample they trained on, moved at most steps ×
    step_size from the last version), committed with the round; a rerun reuses it all.
    MID-R's trainable classifier: trained away from C_t, and exported as C_s ∘ E_s."""
    store = tmp_path / "store"
    shutil.copytree(prepared, store)
    first = subprocess.run(cli_args(store, "run", *STALENESS_ZERO), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    report = results(store)
    assert "continued by 2 steps against the live MID-R model" in first.stderr + first.stdout
    reach = int(np.ceil(2 * 0.05 * 255))  # two steps of 0.05, rounded onto the uint8 grid
    first_version = pools.PoolReader.open(str(store), report["stages"]["atta"]["rounds"][0]["pools"]["PGD_N"])
    clean = DatasetReader.open(str(store), first_version.group.attrs["dataset_key"]).load("train", 0, 512)[0]
    clean = clean.astype(int)
    for kind in ("mid-r", "atta"):
        rounds = report["stages"][kind]["rounds"]
        for attack, key in rounds[0]["pools"].items():  # version 0: uniform in the ε-ball, no attack steps
            reader = pools.PoolReader.open(str(store), key)
            assert reader.group.attrs["random_start"] is True
            problems, _ = pools.verify_pool(str(store), key)
            assert problems == []  # ε-ball, range and hashes of every shard
            delta = reader.adv(0, 0, 512).astype(int) - clean
            assert np.abs(delta).max() <= round(0.3 * 255) and (delta != 0).mean() > 0.5
            assert (delta > 0).mean() > 0.2 and (delta < 0).mean() > 0.2  # both signs: not an attack's direction
        assert all(r["epochs"][1] - r["epochs"][0] == 1 for r in rounds)  # a round is one epoch
        for before, now in zip(rounds, rounds[1:]):
            for attack, key in now["pools"].items():
                previous = before["pools"][attack]
                manifest = pools.read_manifest(str(store), key)
                assert manifest["complete"]
                attrs = pools.PoolReader.open(str(store), key).group.attrs
                assert attrs["refresh"]["of"] == previous and attrs["refresh"]["carried_from"] == before["checkpoint"]
                assert sum(s["stats"]["carried_samples"] for s in manifest["shards"]) == 512  # 2 workers × 256
                was = pools.PoolReader.open(str(store), previous).adv(0, 0, 512).astype(int)
                moved = np.abs(pools.PoolReader.open(str(store), key).adv(0, 0, 512).astype(int) - was)
                assert 0 < moved.max() <= reach
                assert (moved.reshape(512, -1).max(1) > 0).mean() > 0.5  # the trained samples moved on
    for row in ("MID-R", "ATTA"):  # no stored pool in their cost: every pool attack is refreshed
        assert "pool" not in report["costs"][row]["stages"]
    rerun = subprocess.run(cli_args(store, "run", *STALENESS_ZERO), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    again = results(store)
    for kind in ("mid-r", "atta"):
        assert again["stages"][kind]["cache_hit"] and again["stages"][kind]["key"] == report["stages"][kind]["key"]
    from safetensors.numpy import load_file

    from storage import checkpoints
    student = report["stages"]["mid-r"]["key"]
    manifest = checkpoints.read_manifest(str(store), student)
    assert manifest["classifier"] == "trainable"
    weights = load_file(str(store / "checkpoints" / student / "model.safetensors"))
    teacher = load_file(str(store / "checkpoints" / manifest["teacher_key"] / "model.safetensors"))
    own = sorted(name for name in weights if name.startswith("classifier."))
    assert own and all(name in teacher for name in own)
    assert any(not np.array_equal(weights[name], teacher[name]) for name in own)  # C_s moved away from C_t
    exported = subprocess.run([sys.executable, "-m", "pipeline", "export", "digits", str(tmp_path / "export"),
                               "--row", "MID-R", "--format", "safetensors", "--store", str(store)],
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    card = json.loads((tmp_path / "export" / "card.json").read_text())
    assert card["check"]["largest_logit_difference"] < 1e-4
    # pool.refresh.success_samples: the same carried views, their success measured on a seeded
    # sample (a new version key, so the round after it retrains), and fewer attack MACs counted.
    sampled = subprocess.run(cli_args(store, "run", *STALENESS_ZERO, "eval.defenses=[ATTA]",
                                      "pool.refresh.success_samples=100"), capture_output=True, text=True, timeout=600)
    assert sampled.returncode == 0, sampled.stderr[-4000:]
    sampled_report = results(store)
    full_rounds, sampled_rounds = report["stages"]["atta"]["rounds"], sampled_report["stages"]["atta"]["rounds"]
    assert sampled_rounds[0]["checkpoint"] == full_rounds[0]["checkpoint"] and sampled_rounds[0]["cache_hit"]
    for attack, key in sampled_rounds[1]["pools"].items():
        full_key = full_rounds[1]["pools"][attack]
        assert key != full_key
        assert np.array_equal(pools.PoolReader.open(str(store), key).adv(0, 0, 512),
                              pools.PoolReader.open(str(store), full_key).adv(0, 0, 512))
        assert pools.PoolReader.open(str(store), key).group.attrs["refresh"]["success_samples"] == 100
        shards = pools.read_manifest(str(store), key)["shards"]
        assert sum(s["stats"]["measured_samples"] for s in shards) == 100
        rate = sampled_rounds[1]["pool_success"][attack]
        assert 0 <= rate <= 100 and round(rate) == rate  # a count of the 100, in percent
    assert (sampled_report["costs"]["ATTA"]["attack_macs"] < report["costs"]["ATTA"]["attack_macs"])


def test_overlapped_refreshes_are_made_one_round_staler_while_the_rounds_train(prepared, tmp_path):
    """pool.refresh.overlap: version r+1 is made against round r-1's model (version 1 against
    the start model, the baseline for ATTA) while round r trains; every version is still a
    keyed pool, the rounds train on them in order, and a rerun reuses it all."""
    store = tmp_path / "store"
    shutil.copytree(prepared, store)
    overlap = ["eval.defenses=[ATTA]", "models.at.epochs=3", "pool.refresh.steps=3", "pool.refresh.overlap=true"]
    first = subprocess.run(cli_args(store, "run", *overlap), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    report = results(store)
    rounds = report["stages"]["atta"]["rounds"]
    assert [r["epochs"] for r in rounds] == [[0, 1], [1, 2], [2, 3]]
    baseline = report["stages"]["baseline"]["key"]
    for index, now in enumerate(rounds[1:], start=1):
        made_on = rounds[index - 2]["checkpoint"] if index >= 2 else baseline
        for attack, key in now["pools"].items():
            manifest = pools.read_manifest(str(store), key)
            assert manifest["complete"] and manifest["attrs"]["refresh"]["of"] == rounds[index - 1]["pools"][attack]
            assert manifest["attrs"]["source_model"]["key"] == made_on
    assert "pool version 2: refreshing PGD_N, PGD_T against round 0's model" in first.stdout + first.stderr
    rerun = subprocess.run(cli_args(store, "run", *overlap), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    again = results(store)["stages"]["atta"]
    assert again["cache_hit"] and again["key"] == report["stages"]["atta"]["key"]
    assert [r["pools"] for r in again["rounds"]] == [r["pools"] for r in rounds]
