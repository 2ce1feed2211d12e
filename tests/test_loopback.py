"""A laptop run's Ray instance is reachable from this machine only: every TCP socket its
processes listen on (GCS, raylet, core workers, dashboard and runtime env agents, metrics
servers) is bound to the loopback interface.

Training stages (Ray Train workers and torch.distributed's rendezvous store) are checked on
a real `mid pool` run: `tests/test_training_resume.py::test_training_stages_listen_on_loopback_only`."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from clihelpers import is_loopback

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter, so the instance is started exactly as `mid run` starts it and
# does not meet the test session's own Ray instance.
CHILD = r'''
import json, os, subprocess, sys, time

import ray
import psutil  # vendored with Ray: importable once ray is imported

from pipeline.ray_runtime import start_local_ray


def listeners():
    """Every listening TCP socket of this driver and the processes it started (GCS, raylet,
    agents, workers: all descendants)."""
    me = psutil.Process()
    found = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            name, cmdline = proc.name(), " ".join(" ".join(proc.cmdline()).split())[:100]
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN:
                found.append({"pid": proc.pid, "name": name, "cmd": cmdline,
                              "ip": conn.laddr.ip, "port": conn.laddr.port})
    return found


start_local_ray(1)
try:
    @ray.remote
    def square(x):
        return x * x

    @ray.remote
    def look_up_ray():
        """What a worker finds without an address (Ray Train's helpers do this): RAY_ADDRESS."""
        code = "import ray; ray.init(); print(ray.get_runtime_context().gcs_address); ray.shutdown()"
        found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        return os.environ.get("RAY_ADDRESS"), found.returncode, found.stdout.strip(), found.stderr[-2000:]

    @ray.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self):
            self.n += 1
            return self.n

    assert ray.get(square.remote(3)) == 9
    counter = Counter.remote()
    assert ray.get(counter.add.remote()) == 1
    exported, rc, found, err = ray.get(look_up_ray.remote())
    gcs = ray.get_runtime_context().gcs_address
    assert exported == gcs, (exported, gcs)
    assert rc == 0 and found.splitlines()[-1] == gcs, (rc, found, err)
    seen = {}
    for attempt in range(2):  # agents may open a listener a moment after start
        for item in listeners():
            seen[(item["pid"], item["ip"], item["port"])] = item
        time.sleep(1)
    print("LISTENERS " + json.dumps({"gcs": gcs, "listeners": list(seen.values())}), flush=True)
finally:
    ray.shutdown()
'''


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only():
    """Also: a laptop run starts its own instance even where a killed one left its address
    behind in Ray's temp folder (`ray_current_cluster`); before, `ray.init()` joined that
    address and retried the dead GCS for ever. Reproduce: SIGKILL a `mid run`, then `mid run`."""
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # A short folder of its own (Ray's socket paths must stay short), with a dead instance's address.
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    Path(env["RAY_TMPDIR"], "ray").mkdir()
    Path(env["RAY_TMPDIR"], "ray", "ray_current_cluster").write_text("127.0.0.1:9")
    try:
        result = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=240)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    line = next(line for line in result.stdout.splitlines() if line.startswith("LISTENERS "))
    report = json.loads(line[len("LISTENERS "):])
    listeners = report["listeners"]
    table = "\n".join(f"  {item['ip']}:{item['port']}  pid {item['pid']} {item['name']}  ({item['cmd']})"
                      for item in sorted(listeners, key=lambda item: (item["name"], item["port"])))
    print(f"GCS at {report['gcs']}; listening sockets of the Ray session:\n{table}")

    # The scan sees the processes that matter (a scan that sees nothing proves nothing).
    names = {item["name"] for item in listeners}
    assert {"gcs_server", "raylet", "ray::Counter"} <= names, f"expected listeners missing:\n{table}"
    offenders = [item for item in listeners if not is_loopback(item["ip"])]
    assert not offenders, "Ray processes listening beyond loopback:\n" + "\n".join(
        f"  {item['ip']}:{item['port']}  pid {item['pid']} {item['name']}  ({item['cmd']})" for item in offenders)
    # ...and the address every worker is given in RAY_ADDRESS is the loopback one.
    assert report["gcs"].startswith("127.0.0.1:"), report["gcs"]
