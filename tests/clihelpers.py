"""Running the real ``mid`` CLI from tests, and reading what it printed."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# A bar's line: tqdm's, e.g. "decoding train images:  40%|####  | 4/10 [...]", or, off a
# terminal, a worker bar's one line per step, e.g. "  baseline training: 0/1 epoch".
PROGRESS_BAR = re.compile(r"^[^|]*: +\d+%\|.*\]$|^  [^:]+: \d+(/\d+)?( \w+)?$")


def signal_session(session: int, sig: int) -> int:
    """Send ``sig`` to every process of ``session`` (a run started with ``start_new_session``);
    returns how many. Not ``os.killpg``: Ray puts each worker it starts (Ray Train workers,
    pool actors) in a process group of its own, inside the driver's session, so a group
    signal stops the driver and the head but leaves the workers training on (a "frozen" MID
    run finished and committed while the test ran gc beside it)."""
    hit = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
            if int(fields[3]) == session:
                os.kill(int(stat.parent.name), sig)
                hit += 1
        except (OSError, IndexError, ValueError):  # a process that exited meanwhile
            continue
    return hit


def mid(*args: str, env: dict[str, str] | None = None, timeout: int = 600,
        without_root_override: bool = False) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` with no terminal on stdin, as CI and scripts run it.

    ``without_root_override``: when the tests run as root, run the command without the
    capabilities that let root ignore file permissions (``setpriv``), so a folder without
    write permission really refuses it (as it would for any user).
    """
    command = [sys.executable, "-m", "pipeline", *args]
    if without_root_override and os.geteuid() == 0:
        command = [shutil.which("setpriv") or "setpriv", "--bounding-set=-dac_override,-dac_read_search",
                   "--inh-caps=-dac_override,-dac_read_search", *command]
    return subprocess.run(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


def the_error_line(result: subprocess.CompletedProcess, *names: str) -> str:
    """The single line the command printed on stderr besides its stage lines ('[mid] ...'):
    it starts with 'error:' (or 'config error:') and names every one of ``names`` (a file,
    URL or field)."""
    lines = [line for line in result.stderr.strip().splitlines()
             if line.strip() and not line.startswith("[mid] ") and not PROGRESS_BAR.match(line)]
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr[-3000:]}"
    line = lines[0]
    assert line.startswith(("error: ", "config error: ")), line
    for name in names:
        assert str(name) in line, (name, line)
    assert "Traceback" not in result.stdout + result.stderr
    return line


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if address.version == 6 and address.ipv4_mapped is not None:  # [::ffff:127.0.0.1]
        address = address.ipv4_mapped
    return address.is_loopback


def listening_sockets(root: Any) -> list[dict]:
    """Every listening TCP socket of ``root`` and all its descendants (a run's driver, its
    GCS and raylet, and through the raylet every worker, Ray Train's included)."""
    import psutil

    found = []
    try:
        descendants = root.children(recursive=True)
    except psutil.NoSuchProcess:  # the run ended (and was reaped) since the caller last looked
        return found
    for proc in [root, *descendants]:
        try:
            cmd, conns = " ".join(" ".join(proc.cmdline()).split())[:100], proc.net_connections(kind="inet")
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
        found += [{"pid": proc.pid, "cmd": cmd, "ip": conn.laddr.ip, "port": conn.laddr.port}
                  for conn in conns if conn.status == psutil.CONN_LISTEN]
    return found


def run_watching_listeners(args: list[str], timeout: int = 600) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run ``args`` and scan its process tree's listening sockets every 0.2 s until it ends:
    (the finished process, every distinct listener seen)."""
    import ray  # noqa: F401  (psutil is vendored with Ray: importable once ray is imported)
    import psutil

    process = subprocess.Popen(args, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    root, seen, deadline = psutil.Process(process.pid), {}, time.monotonic() + timeout
    output: dict[str, str] = {}
    reader = threading.Thread(target=lambda: output.update(zip(("stdout", "stderr"), process.communicate())))
    reader.start()
    while reader.is_alive() and time.monotonic() < deadline:
        for item in listening_sockets(root):
            seen[(item["pid"], item["ip"], item["port"])] = item
        time.sleep(0.2)
    if reader.is_alive():
        process.kill()
    reader.join()
    return (subprocess.CompletedProcess(args, process.returncode, output.get("stdout", ""), output.get("stderr", "")),
            list(seen.values()))
