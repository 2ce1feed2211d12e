"""Kill a node of a multi-node Ray cluster during pool generation: the run stops having
lost at most the shards in flight, a rerun writes only the missing shards, and the
finished pool is bit-identical to an uninterrupted run."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ray.cluster_utils import Cluster

from storage import pools
from storage import store as store_location

SETTINGS = ["data.train_limit=512", "data.test_limit=32", "models.baseline.epochs=2", "models.teacher.epochs=2",
            "pool.attacks=[PGD_N, PGD_T]", "pool.variants=2", "pool.shard_size=32",
            "attacks.PGD.nb_iter=40", "attacks.PGD.eps_iter=0.01"]
SHARDS_PER_POOL = 16


def mid_pool(store, *extra):
    args = [sys.executable, "-m", "pipeline", "pool", "configs/digits.yaml", "--store", str(store),
            "--out", str(Path(store).parent / "out")]
    for override in [*SETTINGS, *extra]:
        args += ["--set", override]
    return args


def committed(store) -> int:
    return sum(1 for _ in Path(store).glob("pools/*/commits/shard-*.json"))


def pool_hashes(store) -> dict[str, list]:
    out = {}
    for manifest_path in sorted(Path(store).glob("pools/*/manifest.json")):
        key = manifest_path.parent.name
        manifest = pools.read_manifest(str(store), key)
        out[key] = [shard["sha256"] for shard in manifest["shards"]]
    return out


def test_killed_node_then_resume_is_bit_identical(tmp_path):
    reference, resumed = tmp_path / "reference" / "store", tmp_path / "resumed" / "store"

    # The uninterrupted reference, on a local single-node Ray.
    run = subprocess.run(mid_pool(reference), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = pool_hashes(reference)
    assert len(expected) == 2

    # Same dataset and models (same keys, same weights) for the interrupted run.
    for folder in ("datasets", "checkpoints"):
        shutil.copytree(reference / folder, resumed / folder)
    shutil.copy(reference / store_location.MARKER_FILE, resumed)  # a copy of a store is a store

    # Only the pool stage runs on the cluster (dataset and models are cached): one
    # pool actor (1 CPU) per worker node, none on the head.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        doomed = cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        address = f"ray.address={cluster.address}"
        generating = subprocess.Popen(mid_pool(resumed, address), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env={**os.environ, "RAY_ADDRESS": ""})
        deadline = time.time() + 600
        while committed(resumed) < 4 and time.time() < deadline and generating.poll() is None:
            time.sleep(0.05)
        assert generating.poll() is None, "generation finished before the node could be killed"
        cluster.remove_node(doomed, allow_graceful=False)
        _, stderr = generating.communicate(timeout=600)
        assert generating.returncode != 0, "the run should stop when a pool actor's node dies"
        assert "error: pool generation stopped" in stderr and "rerun the same command" in stderr
        kept = committed(resumed)
        assert 4 <= kept < 2 * SHARDS_PER_POOL
        assert pool_hashes(resumed) == {}  # no pool is complete yet

        # A replacement node joins; the same command finishes the pools.
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        rerun = subprocess.run(mid_pool(resumed, address), capture_output=True, text=True, timeout=900,
                               env={**os.environ, "RAY_ADDRESS": ""})
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert f"pool: generating {2 * SHARDS_PER_POOL - kept} shards" in rerun.stderr
        assert "resuming" in rerun.stderr
    finally:
        cluster.shutdown()

    assert pool_hashes(resumed) == expected
