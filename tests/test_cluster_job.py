"""The README's cluster commands, run as written: a token, a one-machine Ray cluster started
with the README's `ray start`, the README's `ray job submit` of the digits config to it,
`ray stop`.

The commands are read from the README's "On a cluster" block, so the test fails when the
README changes into something that does not work (its first version lacked the token a new
user's `ray start` needs, which this test found). Two things differ from a user's shell,
neither a change to a command: the run's `--store` and `--out` are the test's own folders
and tiny `--set` overrides follow them (the README's full run takes minutes), and HOME is a
folder of the test's, so the token `ray start` keeps in `~/.ray/auth_token` is not the user's.

The README's head takes Ray's default ports (6379, 8265, its job agent's 52365) and
`ray stop` stops every Ray instance on the machine, so this test is `serial`: `make test`
runs it after the parallel part, alone; it is skipped if some other Ray instance is running
(a user's own cluster), which `ray stop` would take down.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.end_to_end, pytest.mark.serial]  # `make test-fast` leaves this file out

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_limit=256", "data.test_limit=48", "models.baseline.epochs=1", "models.teacher.epochs=1",
        "mid.epochs=1", "pool.attacks=[PGD_N,FGSM_T]", "eval.known=[PGD_N]", "eval.unknown=[FGSM_T]",
        "eval.protocols=[adaptive]", "attacks.PGD.nb_iter=2", "attacks.PGD.eps_iter=0.15", "pool.shard_size=128",
        "eval.defenses=[None, MID]"]  # the rows and protocols are test_end_to_end's subject


def readme_cluster_commands() -> list[str]:
    """The shell lines of the README's one-machine cluster block, continuations joined."""
    text = (REPO / "README.md").read_text()
    section = text.split("## On a cluster", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md's 'On a cluster' section has no bash block"
    return [line.strip() for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]


def ray_running() -> bool:
    return subprocess.run(["pgrep", "-u", str(os.getuid()), "-f", "gcs_server"], capture_output=True).returncode == 0


def test_the_readme_cluster_commands_submit_a_job_that_finishes(tmp_path):
    commands = readme_cluster_commands()
    exports = [c for c in commands if c.startswith("export ")]
    submit = next(c for c in commands if c.startswith("ray job submit"))
    before = commands[len(exports):commands.index(submit)]  # the token, `ray start`
    after = commands[commands.index(submit) + 1:]  # `ray stop`
    assert commands[:len(exports)] == exports and any(c.startswith("ray start") for c in before), commands
    assert after == ["ray stop"], commands
    if ray_running():
        pytest.skip("another Ray instance is running on this machine; the README's `ray stop` would stop it")

    store, out = tmp_path / "store", tmp_path / "out"
    submit = re.sub(r"--store \S+", f"--store {store}", submit)
    submit = re.sub(r"--out \S+", f"--out {out}", submit)
    submit += "".join(f" --set '{override}'" for override in TINY)
    home = tmp_path / "home"
    home.mkdir()
    # The README's `ray` is the venv's; a job's `python` is the one on the PATH of `ray start`.
    env = {**os.environ, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR"):
        env.pop(name, None)
    prelude = "set -e; " + "; ".join(exports) + "; " if exports else "set -e; "

    def shell(command: str, timeout: int) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", prelude + command], cwd=REPO, env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    started = shell("; ".join(before), 180)
    try:
        assert started.returncode == 0, (started.stdout + started.stderr)[-4000:]
        for _ in range(30):  # a script is faster than a user: the job API answers a few seconds after `ray start`
            result = shell(submit, 900)
            output = result.stdout + result.stderr
            if not any(m in output for m in ("Failed to connect", "Connection refused", "No available agent")):
                break
            time.sleep(2)
        assert result.returncode == 0, output[-4000:]
        assert "succeeded" in output and "joining Ray at" in output
    finally:
        stopped = shell("; ".join(after), 120)
        shutil.rmtree(home, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["protocols"]["adaptive"]["defenses"]) == ["None", "MID"]
    assert set(results["stages"]) == {"ingest", "baseline", "teacher", "pool", "mid", "eval"}
    assert not ray_running()  # `ray stop` took the head and its workers down
