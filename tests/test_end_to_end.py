"""The whole pipeline through the CLI on a real local Ray instance, small sizes:
ingest → baseline, teacher (Ray Train) → pool (Ray actors, advertorch, Zarr) → MID (Ray
Train + Ray Data) → stored test attacks (source, substitute → transfer) → eval under the
three protocols (Ray actors) → report; then a second run that reuses everything."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import run_plan
from pipeline.config_loader import load_config
from storage import pools

pytestmark = pytest.mark.end_to_end  # `make test-fast` leaves this file out

SMALL = [
    "data.train_limit=512", "data.test_limit=96",
    "models.baseline.epochs=10", "models.teacher.epochs=10", "mid.epochs=2",
    "models.at.epochs=2", "models.at.attack.nb_iter=3",
    "attacks.PGD.nb_iter=3", "attacks.MIM.nb_iter=3", "attacks.BIM.nb_iter=3",
    # Strong attacks whatever the demo's ε, so that "the attack worked" is a real check.
    "attacks.PGD.eps=0.3", "attacks.MIM.eps=0.3", "attacks.BIM.eps=0.3", "attacks.FGSM.eps=0.3",
    "attacks.PGD.eps_iter=0.1", "attacks.MIM.eps_iter=0.1", "attacks.BIM.eps_iter=0.1",
    "pool.shard_size=128", "pool.variants=2", "eval.batch_size=48",
    "models.substitute.epochs=10",
    # Every unknown attack of the paper, small: CW with a learning rate that moves pixels,
    # the fast AutoAttack, and the slow ones on seeded subsets.
    "attacks.CW.max_iterations=30", "attacks.CW.learning_rate=0.1", "attacks.CW.binary_search_steps=2",
    "attacks.AA.eps=0.3", "attacks.AA.version=fast",
    "eval.subset={JSMA_T: 16, AA_N: 32, CW_N: 48, CW_T: 48}",
]
ATTACKS = ["PGD_N", "PGD_T", "MIM_N", "MIM_T", "FGSM_N", "FGSM_T", "BIM_N", "BIM_T", "CW_N", "CW_T", "AA_N", "JSMA_T"]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] read back from TensorBoard event files (TFRecord framing:
    length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def mid_run(store, out):
    args = [sys.executable, "-m", "pipeline", "run", "configs/digits.yaml", "--store", str(store), "--out", str(out)]
    for override in SMALL:
        args += ["--set", override]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result, json.loads((out / "results.json").read_text())


def test_pipeline_end_to_end_and_cached_rerun(tmp_path):
    store = tmp_path / "store"
    first, results = mid_run(store, tmp_path / "run1")

    # One table per protocol: every row, benign + every attack + the three averages, in percent.
    assert list(results["protocols"]) == ["source", "transfer", "adaptive"]
    for protocol, table in results["protocols"].items():
        assert list(table["defenses"]) == ["None", "AT", "MID"]
        for row in table["defenses"].values():
            assert list(row["attacks"]) == ATTACKS
            values = [row["benign"], *row["attacks"].values()]
            assert all(0 <= v <= 100 for v in values)
            assert abs(row["avg"] - sum(values) / len(values)) < 0.02
            assert abs(row["avg_known"] - sum(values[1:5]) / 4) < 0.02
            assert abs(row["avg_unknown"] - sum(values[5:]) / 8) < 0.02
            assert row["samples"]["JSMA_T"] == 16 and row["samples"]["PGD_N"] == 96
    source, transfer = results["protocols"]["source"], results["protocols"]["transfer"]
    assert source["source_model"]["kind"] == "baseline"  # the model the training pool came from
    substitute = transfer["source_model"]
    assert substitute["kind"] == "substitute" and substitute["sha256"] != source["source_model"]["sha256"]
    none = results["protocols"]["adaptive"]["defenses"]["None"]
    assert none["benign"] > 30  # a few epochs already learn something
    # Crafted against None itself, the source attacks break it as the adaptive ones do: they
    # are its adaptive attacks (read from the store, not crafted again), so the rows agree.
    assert source["defenses"]["None"]["attacks"]["PGD_N"] < none["benign"] - 10
    assert {k: none[k] for k in ("benign", "attacks", "samples")} == \
        {k: source["defenses"]["None"][k] for k in ("benign", "attacks", "samples")}
    report = (tmp_path / "run1" / "report.md").read_text()
    for title in ("Source protocol", "Transfer protocol", "Adaptive protocol"):
        assert title in report and title in first.stdout
    assert "| None |" in report and "| AT |" in report and "| MID |" in report and "Avg unknown" in report
    assert "grey-box, not white-box" in report and "JSMA_T on 16" in report
    page = (tmp_path / "run1" / "report.html").read_text()
    # A chart per protocol and the cost chart, inline: no file or server needed.
    assert page.count("data:image/png;base64,") == 4 and "<table>" in page
    assert (tmp_path / "run1" / "cost.png").read_bytes().startswith(b"\x89PNG") and "## Training cost" in report
    # Each row's cost: its own stages' seconds in this run and its counted MACs. AT attacks
    # online, the plain classifier not at all; MID pays for its pool and its meta steps.
    costs = results["costs"]
    assert list(costs) == ["None", "AT", "MID"]
    assert costs["None"]["attack_macs"] == 0 and costs["AT"]["attack_macs"] > 0 and costs["MID"]["attack_macs"] > 0
    assert costs["MID"]["stages"] == ["teacher", "pool", "mid"] and costs["MID"]["cached"] == []
    assert costs["MID"]["training_macs"] > costs["None"]["training_macs"] > 0
    assert costs["MID"]["seconds"] > 0
    assert all((tmp_path / "run1" / f"{p}.png").read_bytes().startswith(b"\x89PNG") for p in results["protocols"])
    assert "Reporting training result" not in first.stdout + first.stderr  # Ray's chatter: OUT/logs/ray.log
    # Not a terminal: a worker's bar is one line per epoch, never tqdm's redraws.
    bar_lines = [line for line in first.stderr.splitlines() if line.startswith("  MID training")]
    assert bar_lines and bar_lines[-1].endswith(": 2/2 epoch"), bar_lines  # mid.epochs=2
    assert len(set(bar_lines)) == len(bar_lines) and "\r" not in first.stderr, bar_lines
    assert (tmp_path / "run1" / "logs" / "ray.log").stat().st_size > 0

    stages = results["stages"]
    assert list(stages) == ["ingest", "baseline", "teacher", "at", "substitute", "pool", "mid", "attacks-source",
                            "attacks-transfer", "eval"]
    assert list(stages) == run_plan.run_stages(load_config(Path("configs/digits.yaml"), SMALL))  # what `mid plan` costs
    # The four classifiers trained in one Ray Train worker group, one after another.
    assert stages["baseline"]["worker_group"]["models"] == ["baseline", "teacher", "at", "substitute"]
    assert not any(s["cache_hit"] for s in stages.values())

    # Every stored adversarial example lies in the ε-ball of its clean image, and the
    # attacks worked against the source model.
    dataset_key = stages["ingest"]["key"]
    clean = zarr.open_group(str(store / "datasets" / dataset_key), mode="r")["train/images"][:]
    for attack, info in stages["pool"]["attacks"].items():
        manifest = pools.read_manifest(str(store), info["key"])
        assert manifest["complete"] and manifest["num_shards"] == 4
        reader = pools.PoolReader.open(str(store), info["key"])
        assert reader.encoding == "int8_delta"  # the default: compact deltas against the clean image
        adv = np.stack([reader.adv(k, 0, len(clean)) for k in range(reader.variants)])
        assert adv.dtype == np.uint8
        assert np.abs(adv.astype(int) - clean[None].astype(int)).max() <= int(0.3 * 255)
        if attack == "MIM_N":  # deterministic: one variant serves every epoch
            assert adv.shape == (1, *clean.shape)
        else:  # random start or random targets: K variants that differ
            assert adv.shape == (2, *clean.shape) and (adv[0] != adv[1]).any()
        assert info["success_rate_stored"] > 20, (attack, info)
    # The stored test attacks: pools of the test split, one variant, every attack of the
    # table; L∞ ones inside their ε-ball, CW and JSMA exact uint8 images (no ball to check).
    test_clean = zarr.open_group(str(store / "datasets" / dataset_key), mode="r")["test/images"][:]
    for stage in ("attacks-source", "attacks-transfer"):
        assert list(stages[stage]["attacks"]) == ATTACKS
        for attack, info in stages[stage]["attacks"].items():
            reader = pools.PoolReader.open(str(store), info["key"])
            assert reader.attrs["split"] == "test" and reader.variants == 1
            indices = reader.sample_indices(0, reader.attrs["num_samples"])
            adv, clean = reader.adv(0, 0, len(indices)), test_clean[indices]
            change = np.abs(adv.astype(int) - clean.astype(int))
            if attack.startswith(("CW", "JSMA")):
                assert reader.attrs["threat_model"] in ("l2", "l0") and reader.encoding == "uint8"
            else:
                assert reader.attrs["threat_model"] == "linf" and change.max() <= int(0.3 * 255)
            assert change.max() > 0, attack
            assert info["success_rate_stored"] > (20 if attack != "CW_T" else 0), (stage, attack, info)
    assert stages["attacks-source"]["attacks"]["JSMA_T"]["samples"] == 16
    # `mid cache` lists the stored test attacks with their split, and verify re-hashes them.
    listing = subprocess.run([sys.executable, "-m", "pipeline", "cache", "ls", "--store", str(store)],
                             capture_output=True, text=True, timeout=120)
    test_pools = [line for line in listing.stdout.splitlines() if line.startswith("pool") and " test " in line]
    assert len(test_pools) == 2 * len(ATTACKS), listing.stdout
    checked = subprocess.run([sys.executable, "-m", "pipeline", "cache", "verify", "--store", str(store)],
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0 and ", 0 corrupt," in checked.stdout, checked.stdout[-2000:]
    epochs = [json.loads(line) for line in (tmp_path / "run1" / "metrics" / "mid.jsonl").read_text().splitlines()]
    assert [e["variant"] for e in epochs] == [0, 1]  # epoch e reads variant e mod K
    curves = tensorboard_scalars(tmp_path / "run1" / "tensorboard" / "mid")
    for tag in ("ac", "cc", "lc", "meta_train", "meta_test", "lr", "samples_per_second", "data_wait_fraction"):
        assert [step for step, _ in curves[tag]] == [0, 1], tag
    assert abs(curves["meta_test"][1][1] - epochs[1]["meta_test"]) < 1e-4 * max(1.0, epochs[1]["meta_test"])
    for stage in ("baseline", "teacher", "at"):
        assert (tmp_path / "run1" / "metrics" / f"{stage}.jsonl").read_text().count("\n") == (10 if stage != "at" else 2)
        assert "train_accuracy" in tensorboard_scalars(tmp_path / "run1" / "tensorboard" / stage)

    # Second run: every stage is reused, and the cached stages are nearly free.
    second, again = mid_run(store, tmp_path / "run2")
    assert all(s["cache_hit"] for s in again["stages"].values())
    assert again["protocols"] == results["protocols"]
    assert "starting a local Ray instance" in first.stderr
    assert "not regenerating" in second.stderr
    assert "starting a local Ray instance" not in second.stderr  # a fully cached run needs no Ray
    heavy = ["ingest", "baseline", "teacher", "pool", "attacks-source", "attacks-transfer"]
    before = sum(stages[s]["seconds"] for s in heavy)
    after = sum(again["stages"][s]["seconds"] for s in heavy)
    assert after < 0.05 * before, (before, after)
