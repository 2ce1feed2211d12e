"""Kill a node of a multi-node Ray cluster while the source protocol's test attacks are
being crafted: the run stops having lost at most the shards in flight, a rerun writes only
the missing shards, and the finished test attacks are bit-identical to an uninterrupted
run's. (The training pool is made by the same actors and the same shard commits,
``pipeline/stages/pool.py``; the S3 test kills a node during MID.)"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster

from storage import pools
from storage import store as store_location

pytestmark = pytest.mark.end_to_end  # `make test-fast` leaves this file out

# The training pool is cheap here (FGSM); the stored test attacks are the work: PGD-1000 on
# 352 test images in shards of 32, two attacks, 22 shards. So many steps keep shards in flight
# for seconds after the fourth commit: at PGD-40 a 2-core machine (2026-12-07) committed all 22
# in 1.5 s, and the node died only once the run was evaluating.
SETTINGS = ["data.train_limit=256", "data.test_limit=352", "models.baseline.epochs=2", "models.teacher.epochs=2",
            "pool.attacks=[FGSM_N, FGSM_T]", "pool.variants=1", "pool.shard_size=32",
            "attacks.PGD.nb_iter=1000", "attacks.PGD.eps_iter=0.01",
            "eval.defenses=[None]", "eval.protocols=[source]", "eval.known=[PGD_N]", "eval.unknown=[PGD_T]",
            "eval.batch_size=64"]
TEST_SHARDS = 2 * 11


def mid_run(store, *extra):
    args = [sys.executable, "-m", "pipeline", "run", "configs/digits.yaml", "--store", str(store),
            "--out", str(Path(store).parent / "out")]
    for override in [*SETTINGS, *extra]:
        args += ["--set", override]
    return args


def source_attack_keys(out: Path) -> list[str]:
    results = json.loads((out / "results.json").read_text())
    return sorted(a["key"] for a in results["stages"]["attacks-source"]["attacks"].values())


def committed(store, keys) -> int:
    return sum(1 for key in keys for _ in Path(store, "pools", key, "commits").glob("shard-*.json"))


def shard_hashes(store, keys) -> dict[str, list]:
    return {key: [shard["sha256"] for shard in (pools.read_manifest(str(store), key) or {"shards": []})["shards"]]
            for key in keys}


def test_killed_node_during_source_test_attacks_then_resume_is_bit_identical(tmp_path):
    reference, resumed = tmp_path / "reference" / "store", tmp_path / "resumed" / "store"

    # The uninterrupted reference, on a local single-node Ray.
    run = subprocess.run(mid_run(reference), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    keys = source_attack_keys(reference.parent / "out")
    expected = shard_hashes(reference, keys)
    assert len(keys) == 2 and all(len(h) == TEST_SHARDS // 2 for h in expected.values())

    # Everything before the test attacks (dataset, models, training pool) for the interrupted run.
    for folder in ("datasets", "checkpoints", "pools"):
        shutil.copytree(reference / folder, resumed / folder)
    for key in keys:
        shutil.rmtree(resumed / "pools" / key)
    shutil.copy(reference / store_location.MARKER_FILE, resumed)  # a copy of a store is a store

    # One attack actor (1 CPU) per worker node, none on the head.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        doomed = cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        address = f"ray.address={cluster.address}"
        crafting = subprocess.Popen(mid_run(resumed, address), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env={**os.environ, "RAY_ADDRESS": ""})
        deadline = time.time() + 600
        while committed(resumed, keys) < 4 and time.time() < deadline and crafting.poll() is None:
            time.sleep(0.05)
        assert crafting.poll() is None, "the test attacks finished before the node could be killed"
        cluster.remove_node(doomed, allow_graceful=False)
        _, stderr = crafting.communicate(timeout=600)
        assert crafting.returncode != 0, "the run should stop when an attack actor's node dies"
        assert "(test split)" in stderr and "error: pool generation stopped" in stderr, stderr[-3000:]
        assert "rerun the same command" in stderr
        kept = committed(resumed, keys)
        assert 4 <= kept < TEST_SHARDS
        assert not any(pools.read_manifest(str(resumed), key) for key in keys)  # none complete yet

        # A replacement node joins; the same command crafts only the missing shards and evaluates.
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        rerun = subprocess.run(mid_run(resumed, address), capture_output=True, text=True, timeout=900,
                               env={**os.environ, "RAY_ADDRESS": ""})
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert f"pool: generating {TEST_SHARDS - kept} shards (test split)" in rerun.stderr
        assert "resuming" in rerun.stderr
    finally:
        cluster.shutdown()

    assert shard_hashes(resumed, keys) == expected
    assert source_attack_keys(resumed.parent / "out") == keys
