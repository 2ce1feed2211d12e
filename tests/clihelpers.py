"""Running the real ``mid`` CLI from tests, and reading what it printed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROGRESS_BAR = re.compile(r"^[^|]*: +\d+%\|.*\]$")  # a tqdm line, e.g. "decoding train images:  40%|██  | 4/10 [...]"


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
