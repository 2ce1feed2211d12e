"""The same config submitted to a running Ray cluster with `ray job submit`.

A head node on loopback stands in for a cluster; the job joins it through RAY_ADDRESS
(set by the job runtime) instead of starting its own instance.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.end_to_end  # `make test-fast` leaves this file out

TINY = ["data.train_limit=256", "data.test_limit=48", "models.baseline.epochs=1", "models.teacher.epochs=1",
        "mid.epochs=1", "pool.attacks=[PGD_N,FGSM_T]", "eval.known=[PGD_N]", "eval.unknown=[FGSM_T]", "eval.protocols=[adaptive]",
        "attacks.PGD.nb_iter=2", "attacks.PGD.eps_iter=0.15", "pool.shard_size=128",
        "eval.defenses=[None, MID]"]  # the rows and protocols are test_end_to_end's subject


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    bin_dir = str(Path(sys.executable).parent)
    # The job's `python` is the one on the PATH of whoever ran `ray start`.
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # Ray 2.60 protects the job API with a token; head and client share this one.
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")
    token = os.path.join(temp_dir, "auth_token")
    with open(token, "w") as f:
        f.write(uuid.uuid4().hex * 2)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token)
    port, dashboard, agent = free_port(), free_port(), free_port()
    ray = os.path.join(bin_dir, "ray")
    # The short temp dir also matters: Ray's Unix socket paths must stay under ~107 characters.
    # Every Ray instance's job agent listens on 52365 unless told otherwise: with another
    # instance on the machine (the other pytest worker's, a user's) this head's agent could
    # not bind it and every submit answered "No available agent" (CI, 2026-12-06).
    # --block keeps the head in this process, so stopping it stops only this cluster
    # (`ray stop` would stop every Ray instance on the machine).
    head = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             f"--dashboard-agent-listen-port={agent}", "--num-cpus=2",
                             "--include-dashboard=true", f"--temp-dir={temp_dir}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield ray, f"http://127.0.0.1:{dashboard}", env
    finally:
        head.terminate()
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            # A graceful stop after a job took 31 s; its processes are all in the head's group.
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_same_config(tmp_path, ray_head):
    ray, address, env = ray_head
    store, out = tmp_path / "store", tmp_path / "out"
    command = [ray, "job", "submit", "--address", address, "--working-dir", ".", "--",
               "python", "-m", "pipeline", "run", "configs/digits.yaml", "--store", str(store), "--out", str(out)]
    for override in TINY:
        command += ["--set", override]
    for _ in range(30):  # the dashboard's job API comes up a few seconds after `ray start`
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        output = result.stderr + result.stdout
        # The dashboard's job agent registers a little after the dashboard itself answers.
        if not any(m in output for m in ("Failed to connect", "Connection refused", "No available agent")):
            break
        time.sleep(2)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "joining Ray at" in result.stdout + result.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["protocols"]["adaptive"]["defenses"]) == ["None", "MID"]
    assert set(results["stages"]) == {"ingest", "baseline", "teacher", "pool", "mid", "eval"}
