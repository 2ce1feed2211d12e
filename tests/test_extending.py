"""docs/extending.md's worked examples are true: an attack, a defense row, and a row trained
on a refreshed pool, are each one file and one registry line.

The test copies the code into a fresh folder, writes the files and the lines exactly as the
document shows them, and runs the real CLI there: the config validates the new attack's and
row's settings, `mid plan` costs them, `mid pool` generates, stores and verifies a pool of
the attack, and `mid run` trains each row (the refreshed one in rounds) and puts it in the
table, whose model `mid export` writes and whose row `mid sweep` reports per variant.
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
    source = source.replace(anchor, example("defense registry line") + anchor)
    anchor = '    "ATTA": "atta:ATTA",\n'
    assert anchor in source
    registry.write_text(source.replace(anchor, anchor + example("refreshed row registry line")))
    (root / "workers/defenses/atta_smooth.py").write_text(example("workers/defenses/atta_smooth.py"))
    return root


def mid(root: Path, *args: str) -> subprocess.CompletedProcess:
    # PYTHONPATH: Ray's workers import the copy too, not the installed checkout.
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=root, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=900, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def with_tiny(*args: str) -> list[str]:
    return [*args, *[part for override in TINY for part in ("--set", override)]]


def assert_unknown_to_the_original(row: str) -> None:
    original = subprocess.run([sys.executable, "-m", "pipeline", "validate", "configs/digits.yaml",
                               "--set", f"eval.defenses=[None, {row}]"], cwd=REPO, capture_output=True, text=True)
    assert original.returncode == 2 and f"'{row}' is not allowed" in original.stderr


def planned(extended: Path, overrides: list[str]) -> tuple[dict, dict]:
    """(the plan's stages by name, its measured units) in the extended copy."""
    row = [part for override in overrides for part in ("--set", override)]
    plan = json.loads(mid(extended, *with_tiny("plan", "configs/digits.yaml", "--json"), *row).stdout)
    return {stage["name"]: stage for stage in plan["stages"]}, plan["macs_per_sample"]


def exported_card(extended: Path, tmp_path: Path, store: Path, row: str) -> dict:
    """card.json of ``mid export digits --row ROW`` (safetensors) from the run on ``store``."""
    folder = tmp_path / "exported"
    mid(extended, "export", "digits", str(folder), "--row", row, "--format", "safetensors", "--store", str(store))
    return json.loads((folder / "card.json").read_text())


def swept(extended: Path, tmp_path: Path, store: Path, row: str, overrides: list[str], variant: str) -> dict:
    """sweep.json of a one-variant sweep of ``row`` on the run's own config (its trial reuses every entry)."""
    sweep = tmp_path / f"{row}-sweep.yaml"
    chosen = dict(o.split("=", 1) for o in [*TINY, *overrides])  # as on the command line, a later one wins
    settings = "".join(f"  {key}: {value}\n" for key, value in chosen.items())
    sweep.write_text(f"name: {row.lower()}\nbase: {extended}/configs/digits.yaml\nrow: {row}\nset:\n{settings}"
                     f"variants:\n  {variant}: {{}}\n")
    mid(extended, "sweep", str(sweep), "--store", str(store), "--out", str(tmp_path / "sweep"))
    return json.loads((tmp_path / "sweep" / "sweep.json").read_text())


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
    assert_unknown_to_the_original("GAUSS")

    row = [part for override in ROW for part in ("--set", override)]
    stages, units = planned(extended, ROW)
    assert "gauss" in stages and "at" not in stages and "mid" not in stages  # the rows asked for, no more
    assert stages["gauss"]["per_sample_macs"] == pytest.approx(units["train_step"])
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

    card = exported_card(extended, tmp_path, store, "GAUSS")
    assert card["model"]["row"] == "GAUSS" and card["model"]["kind"] == "gauss"
    assert card["model"]["is"].startswith("Gaussian data augmentation")
    assert set(card["results"]) == {"source", "adaptive"}

    summary = swept(extended, tmp_path, store, "GAUSS", ROW, "sigma-0.2")
    assert summary["row"] == "GAUSS"
    adaptive = summary["protocols"]["adaptive"]
    assert list(adaptive) == ["None", "sigma-0.2"]  # the variant's row is its GAUSS row
    assert adaptive["sigma-0.2"]["benign"] == results["protocols"]["adaptive"]["defenses"]["GAUSS"]["benign"]


REFRESHED = ["eval.defenses=[None, ATTA-LS]", "models.at.epochs=2", "pool.attacks=[PGD_N, PGD_T]",
             "attacks.PGD.nb_iter=2", "pool.refresh.every=1", "pool.refresh.steps=2", "pool.refresh.start=pool",
             "eval.protocols=[adaptive]", "eval.known=[PGD_N]", "eval.unknown=[FGSM_N]"]


def test_a_new_refreshed_row_is_planned_trained_in_rounds_exported_and_swept(extended, tmp_path):
    assert_unknown_to_the_original("ATTA-LS")

    row = [part for override in REFRESHED for part in ("--set", override)]
    stages, units = planned(extended, REFRESHED)
    assert "atta-ls" in stages and "atta" not in stages and "mid" not in stages  # the rows asked for, no more
    assert stages["atta-ls"]["note"].startswith("2 epochs in 2 rounds, 1 refreshes of 2 attacks × 2 steps")
    # Cross-entropy on both views, two epochs, and one refresh of both attacks between the rounds.
    assert stages["atta-ls"]["per_sample_macs"] == pytest.approx(
        2 * 2 * units["train_step"] + 2 * (2 * units["attack_step"] + 2 * units["forward"]))

    store, out = tmp_path / "store", tmp_path / "out"
    mid(extended, *with_tiny("run", "configs/digits.yaml", "--store", str(store), "--out", str(out)), *row)
    results = json.loads((out / "results.json").read_text())
    assert list(results["protocols"]["adaptive"]["defenses"]) == ["None", "ATTA-LS"]
    assert list(results["stages"]) == ["ingest", "baseline", "teacher", "pool", "atta-ls", "eval"]
    trained = results["stages"]["atta-ls"]
    assert trained["key"].startswith("atta-ls-") and [r["epochs"] for r in trained["rounds"]] == [[0, 1], [1, 2]]
    assert results["costs"]["ATTA-LS"]["stages"] == ["baseline", "pool", "atta-ls"]
    assert "| ATTA-LS |" in (out / "report.md").read_text()

    card = exported_card(extended, tmp_path, store, "ATTA-LS")
    assert card["model"]["row"] == "ATTA-LS" and card["model"]["kind"] == "atta-ls"
    assert card["model"]["is"].startswith("ATTA with label smoothing") and card["check"]["largest_logit_difference"] < 1e-4

    summary = swept(extended, tmp_path, store, "ATTA-LS", REFRESHED, "two-steps")
    assert summary["row"] == "ATTA-LS"
    adaptive = summary["protocols"]["adaptive"]
    assert list(adaptive) == ["None", "two-steps"]  # the variant's row is its ATTA-LS row, reused from the run
    assert adaptive["two-steps"]["benign"] == results["protocols"]["adaptive"]["defenses"]["ATTA-LS"]["benign"]
