"""docs/extending.md's worked examples are true: an attack, and a defense row, are each one
file and one registry line.

The test copies the code into a fresh folder, writes the files and the lines exactly as the
document shows them, and runs the real CLI there: the config validates the new attack's and
row's settings, `mid plan` costs them, `mid pool` generates, stores and verifies a pool of
the attack, and `mid run` trains the row and puts it in the table, whose model `mid export`
writes and whose row `mid sweep` reports per variant.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.end_to_end  # `make test-fast` leaves this file out

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_limit=128", "data.test_limit=32", "models.baseline.epochs=1", "models.teacher.epochs=1",
        "pool.shard_size=64", "pool.attacks=[NOISE_N, FGSM_N]", "attacks.NOISE.eps=0.2"]


def example(marker: str) -> str:
    """The code block that follows ``<!-- example: MARKER -->`` in docs/extending.md."""
    text = (REPO / "docs" / "extending.md").read_text()
    found = re.search(rf"<!-- example: {re.escape(marker)} -->\n```python\n(.*?)```", text, re.S)
    assert found, f"docs/extending.md has no example {marker!r}"
    return found.group(1)


@pytest.fixture(scope="module")
def extended(tmp_path_factory) -> Path:
    """A copy of the code with the document's attack and row added: for each, one new file
    and one new line."""
    root = tmp_path_factory.mktemp("extended")
    for folder in ("pipeline", "workers", "storage", "configs"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "workers/attacks/noise.py").write_text(example("workers/attacks/noise.py"))
    registry = root / "workers/attacks/__init__.py"
    source = registry.read_text()
    anchor = "FAMILIES: dict[str, tuple[str, str]] = {\n"
    assert anchor in source
    registry.write_text(source.replace(anchor, anchor + example("registry line")))
    (root / "workers/defenses/gaussian.py").write_text(example("workers/defenses/gaussian.py"))
    registry = root / "workers/defenses/__init__.py"
    source = registry.read_text()
    anchor = '    "MID": "mid:MID",\n'
    assert anchor in source
    registry.write_text(source.replace(anchor, example("defense registry line") + anchor))
    return root


def mid(root: Path, *args: str) -> subprocess.CompletedProcess:
    # PYTHONPATH: Ray's workers import the copy too, not the installed checkout.
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=root, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=900, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def with_tiny(*args: str) -> list[str]:
    return [*args, *[part for override in TINY for part in ("--set", override)]]


def test_a_new_attack_is_validated_planned_and_pooled(extended, tmp_path):
    assert "NOISE_N" not in subprocess.run(  # the original code does not know it
        [sys.executable, "-c", "from workers.attacks import ATTACK_NAMES; print(ATTACK_NAMES)"],
        cwd=REPO, capture_output=True, text=True).stdout

    refused = subprocess.run([sys.executable, "-m", "pipeline", "validate", "configs/digits.yaml",
                              "--set", "attacks.NOISE.epz=0.2"], cwd=extended, capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown key 'epz' (allowed: eps)" in refused.stderr

    mid(extended, *with_tiny("validate", "configs/digits.yaml"))
    plan = json.loads(mid(extended, *with_tiny("plan", "configs/digits.yaml", "--json")).stdout)
    pool = next(stage for stage in plan["stages"] if stage["name"] == "pool")
    per_sample = plan["macs_per_sample"]
    # The plan asked each attack its steps: NOISE_N 0, FGSM_N 1; each view costs two forward
    # passes besides (its success is measured before and after rounding).
    assert pool["per_sample_macs"] == pytest.approx(4 * per_sample["forward"] + per_sample["attack_step"])

    store, out = tmp_path / "store", tmp_path / "out"
    pooled = mid(extended, *with_tiny("pool", "configs/digits.yaml", "--store", str(store), "--out", str(out)))
    assert "pool: generating 4 shards" in pooled.stderr, pooled.stderr
    listed = mid(extended, "cache", "ls", "--store", str(store))
    assert "NOISE_N" in listed.stdout
    mid(extended, "cache", "verify", "--store", str(store))  # every stored image inside its ε-ball


ROW = ["eval.defenses=[None, GAUSS]", "models.gauss.epochs=2", "models.gauss.sigma=0.2",
       "eval.protocols=[source, adaptive]", "eval.known=[FGSM_N]", "eval.unknown=[NOISE_N]"]


def test_a_new_defense_row_is_validated_planned_trained_and_exported(extended, tmp_path):
    refused = subprocess.run([sys.executable, "-m", "pipeline", "validate", "configs/digits.yaml",
                              "--set", "models.gauss.sigmaa=0.2"], cwd=extended, capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown key 'sigmaa' (allowed: epochs, batch_size, lr, sigma)" in refused.stderr
    original = subprocess.run([sys.executable, "-m", "pipeline", "validate", "configs/digits.yaml",
                               "--set", "eval.defenses=[None, GAUSS]"], cwd=REPO, capture_output=True, text=True)
    assert original.returncode == 2 and "'GAUSS' is not allowed" in original.stderr  # the original code does not know it

    row = [part for override in ROW for part in ("--set", override)]
    plan = json.loads(mid(extended, *with_tiny("plan", "configs/digits.yaml", "--json"), *row).stdout)
    stages = {stage["name"]: stage for stage in plan["stages"]}
    assert "gauss" in stages and "at" not in stages and "mid" not in stages  # the rows asked for, no more
    assert stages["gauss"]["per_sample_macs"] == pytest.approx(plan["macs_per_sample"]["train_step"])
    assert stages["gauss"]["note"] == "2 epochs"

    store, out = tmp_path / "store", tmp_path / "out"
    mid(extended, *with_tiny("run", "configs/digits.yaml", "--store", str(store), "--out", str(out)), *row)
    results = json.loads((out / "results.json").read_text())
    for protocol in ("source", "adaptive"):
        table = results["protocols"][protocol]["defenses"]
        assert list(table) == ["None", "GAUSS"]
        assert list(table["GAUSS"]["attacks"]) == ["FGSM_N", "NOISE_N"]
    assert list(results["stages"]) == ["ingest", "baseline", "teacher", "gauss", "pool", "attacks-source", "eval"]
    gauss = results["stages"]["gauss"]
    assert not gauss["cache_hit"] and gauss["key"].startswith("gauss-")
    assert "| GAUSS |" in (out / "report.md").read_text()

    exported = tmp_path / "exported"
    mid(extended, "export", "digits", str(exported), "--row", "GAUSS", "--format", "safetensors",
        "--store", str(store))
    card = json.loads((exported / "card.json").read_text())
    assert card["model"]["row"] == "GAUSS" and card["model"]["kind"] == "gauss"
    assert card["model"]["is"].startswith("Gaussian data augmentation")
    assert set(card["results"]) == {"source", "adaptive"}

    # A sweep of the row: one variant, the run's own config, so its trial reuses every entry.
    sweep = tmp_path / "gauss-sweep.yaml"
    settings = "".join(f"  {key}: {value}\n" for key, value in (o.split("=", 1) for o in [*TINY, *ROW]))
    sweep.write_text(f"name: gauss\nbase: {extended}/configs/digits.yaml\nrow: GAUSS\nset:\n{settings}"
                     "variants:\n  sigma-0.2: {}\n")
    mid(extended, "sweep", str(sweep), "--store", str(store), "--out", str(tmp_path / "sweep"))
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert summary["row"] == "GAUSS"
    adaptive = summary["protocols"]["adaptive"]
    assert list(adaptive) == ["None", "sigma-0.2"]  # the variant's row is its GAUSS row
    assert adaptive["sigma-0.2"]["benign"] == results["protocols"]["adaptive"]["defenses"]["GAUSS"]["benign"]
