"""The pipeline against an S3 store: a real S3 API (moto's server on loopback), the real
CLI in a subprocess, Ray workers that reach the bucket only through the environment.

s3fs takes its endpoint from ``FSSPEC_S3_ENDPOINT_URL`` (fsspec turns every
``FSSPEC_<PROTOCOL>_<KWARG>`` variable into a default keyword of that protocol's file
system) and its credentials from the usual ``AWS_*`` variables; a local Ray instance
started by the CLI passes the driver's environment on to its workers and actors.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.end_to_end  # `make test-fast` leaves this file out

REPO = Path(__file__).resolve().parents[1]
BUCKET = "mid-test"
PREFIX = f"s3://{BUCKET}/mid"

TINY = [
    "eval.defenses=[None, MID]",
    "data.train_limit=256", "data.test_limit=48",
    "models.baseline.epochs=2", "models.teacher.epochs=2", "mid.epochs=1",
    "attacks.PGD.nb_iter=2", "attacks.MIM.nb_iter=2", "attacks.BIM.nb_iter=2",
    "attacks.PGD.eps_iter=0.05", "attacks.MIM.eps_iter=0.05", "attacks.BIM.eps_iter=0.05",
    "pool.attacks=[PGD_N, MIM_N]", "pool.shard_size=64", "pool.variants=2",
    "eval.known=[PGD_N, MIM_N]", "eval.unknown=[FGSM_N]", "eval.batch_size=48",
    "eval.protocols=[source, adaptive]",  # the stored test attacks on S3 too; transfer adds nothing here
]

moto_server = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    assert os.path.exists(moto_server), "moto_server is missing: pip install -e '.[test]' installs moto[server]"
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    server = subprocess.Popen([moto_server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}")
                time.sleep(0.2)
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        env.pop("RAY_ADDRESS", None)  # a local Ray instance that inherits this environment
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def mid(env, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    return result


def with_overrides(*args: str) -> list[str]:
    out = list(args)
    for override in TINY:
        out += ["--set", override]
    return out


def list_bucket(env) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def test_pool_on_s3_then_cache_ls_and_verify(s3_env, tmp_path):
    result = mid(s3_env, *with_overrides("pool", "configs/digits.yaml", "--store", PREFIX,
                                         "--out", str(tmp_path / "pool")))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "starting a local Ray instance" in result.stderr

    keys = list_bucket(s3_env)
    assert not any(k.startswith("store/") or k.startswith("/") for k in keys)
    for folder in ("datasets", "checkpoints", "pools", "refs"):
        assert any(k.startswith(f"mid/{folder}/") for k in keys), (folder, keys[:20])
    assert any(k.endswith("/commits/shard-00003.json") for k in keys)  # 256 samples / 64 per shard

    listed = mid(s3_env, "cache", "ls", "--store", PREFIX, "--json", timeout=120)
    assert listed.returncode == 0, listed.stderr[-4000:]
    entries = json.loads(listed.stdout)
    by_kind: dict[str, list[dict]] = {}
    for e in entries:
        by_kind.setdefault(e["kind"], []).append(e)
    assert len(by_kind.get("dataset", [])) == 1
    assert len(by_kind.get("checkpoint", [])) == 2  # baseline and teacher
    assert sorted(e["attack"] for e in by_kind.get("pool", [])) == ["MIM_N", "PGD_N"]
    for e in entries:
        assert e["complete"] and e["bytes"] > 0, e
    for e in by_kind["pool"]:
        assert e["samples"] == 256

    verified = mid(s3_env, "cache", "verify", "--store", PREFIX, timeout=300)
    assert verified.returncode == 0, verified.stdout[-2000:] + verified.stderr[-4000:]
    assert verified.stdout.count(": ok") == len(entries)

    # The same store again: every stage is a cache hit, no Ray needed.
    again = mid(s3_env, *with_overrides("pool", "configs/digits.yaml", "--store", PREFIX,
                                        "--out", str(tmp_path / "pool2")))
    assert again.returncode == 0, again.stderr[-4000:]
    assert "not regenerating" in again.stderr
    assert "starting a local Ray instance" not in again.stderr


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def runs_a_train_worker(node) -> bool:
    """Whether a Ray Train worker process runs under this node's raylet."""
    found = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout.splitlines()
    rows = [line.split(None, 2) for line in found if len(line.split(None, 2)) == 3]
    children: dict[int, list[tuple[int, str]]] = {}
    for pid, ppid, args in rows:
        children.setdefault(int(ppid), []).append((int(pid), args))
    todo = [raylet_pid(node)]
    while todo:
        for pid, args in children.get(todo.pop(), []):
            if "RayTrainWorker" in args:
                return True
            todo.append(pid)
    return False


def test_node_lost_during_mid_resumes_from_the_epoch_checkpoint_on_s3(s3_env, tmp_path, monkeypatch):
    """`mid run` on a three-node cluster, the store the first test filled on S3: a worker
    node dies during MID, Ray Train restarts the worker group on the nodes left, and it
    resumes from the last epoch checkpoint, which lives on S3 like everything else; then
    the stored test attacks and the evaluation read the bucket too."""
    from ray.cluster_utils import Cluster

    # The nodes reach the bucket through their environment, as on a real cluster.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.setenv(name, s3_env[name])
    out = tmp_path / "run"
    epochs = 6
    pools_before = any(k.startswith("mid/pools/") for k in list_bucket(s3_env))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's node trains nothing
    try:
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        args = with_overrides("run", "configs/digits.yaml", "--store", PREFIX, "--out", str(out))
        args += ["--set", f"mid.epochs={epochs}", "--set", f"ray.address={cluster.address}",
                 "--set", "ray.checkpoint_interval_s=0"]
        run = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env={**s3_env, "RAY_ADDRESS": ""},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline, killed = time.time() + 600, None
        while run.poll() is None and time.time() < deadline and killed is None:
            checkpointed = any(k.startswith("mid/train/mid-") and k.endswith("checkpoint_manager_snapshot.json")
                               for k in list_bucket(s3_env))
            doomed = [node for node in workers if runs_a_train_worker(node)] if checkpointed else []
            if doomed:
                cluster.remove_node(doomed[0], allow_graceful=False)
                killed = doomed[0]
                cluster.add_node(num_cpus=2)  # the replacement a cluster's autoscaler would start
            time.sleep(0.2)
        assert killed is not None, "MID finished (or the run failed) before a node could be killed"
        _, stderr = run.communicate(timeout=600)
    finally:
        cluster.shutdown()
    assert run.returncode == 0, stderr[-4000:]

    history = [json.loads(line) for line in (out / "metrics" / "mid.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(epochs))  # every epoch once, none repeated
    resumed = [h["epoch"] for h in history if h["resumed"]]
    assert len(resumed) == 1 and resumed[0] > 0, history  # from the checkpoint on S3, not from scratch
    results = json.loads((out / "results.json").read_text())
    stages = results["stages"]
    assert list(stages) == ["ingest", "baseline", "teacher", "pool", "mid", "attacks-source", "eval"]
    if pools_before:  # after the first test: the cached stages are read back from S3
        assert all(stages[s]["cache_hit"] for s in ("ingest", "baseline", "teacher", "pool"))
    assert not stages["mid"]["cache_hit"]
    assert list(results["protocols"]) == ["source", "adaptive"]
    assert list(results["protocols"]["source"]["defenses"]) == ["None", "MID"]
    keys = list_bucket(s3_env)
    for key in stages["attacks-source"]["attacks"].values():  # the stored test attacks live on S3
        assert any(k.startswith(f"mid/pools/{key['key']}/commits/") for k in keys)
    student = [k for k in keys if k.startswith(f"mid/checkpoints/{stages['mid']['key']}/")]
    assert any(k.endswith("model.safetensors") for k in student), stages["mid"]["key"]
    assert not [k for k in keys if k.startswith("mid/train/")]  # the resume state is gone once committed
    assert any(k.startswith("mid/results/") for k in keys)


def test_build_locks_on_s3_let_one_holder_in_at_a_time(s3_env, monkeypatch):
    """The object-store lock (a renewed lease object): two contenders never overlap, and the
    second is told it waits."""
    import threading

    import fsspec.config

    from storage import locks

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, s3_env[name])
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_env["FSSPEC_S3_ENDPOINT_URL"]})
    root = f"s3://{BUCKET}/locks-test"
    inside, most, waited = [0], [0], []
    guard = threading.Lock()

    def contender() -> None:
        with locks.build_lock(root, "pool-k", on_wait=lambda: waited.append(1)):
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(1.5)
            with guard:
                inside[0] -= 1

    threads = [threading.Thread(target=contender) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert most[0] == 1 and waited == [1]
    assert not [k for k in list_bucket(s3_env) if k.startswith("locks-test/locks/")]  # released
