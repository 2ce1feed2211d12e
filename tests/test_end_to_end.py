"""The whole pipeline through the CLI on a real local Ray instance, small sizes:
ingest → baseline, teacher (Ray Train) → pool (Ray actors, advertorch, Zarr) → MID (Ray
Train + Ray Data) → eval (Ray actors) → report; then a second run that reuses everything."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import zarr

from storage import pools

SMALL = [
    "data.train_limit=512", "data.test_limit=96",
    "models.baseline.epochs=10", "models.teacher.epochs=10", "mid.epochs=2",
    "models.at.epochs=2", "models.at.attack.nb_iter=3",
    "attacks.PGD.nb_iter=3", "attacks.MIM.nb_iter=3", "attacks.BIM.nb_iter=3",
    # Strong attacks whatever the demo's ε, so that "the attack worked" is a real check.
    "attacks.PGD.eps=0.3", "attacks.MIM.eps=0.3", "attacks.BIM.eps=0.3", "attacks.FGSM.eps=0.3",
    "attacks.PGD.eps_iter=0.1", "attacks.MIM.eps_iter=0.1", "attacks.BIM.eps_iter=0.1",
    "pool.shard_size=128", "pool.variants=2", "eval.batch_size=48",
]


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

    # The table: both rows, benign + every attack + average, in percent.
    attacks = ["PGD_N", "PGD_T", "MIM_N", "MIM_T", "FGSM_N", "FGSM_T", "BIM_N", "BIM_T"]
    assert list(results["defenses"]) == ["None", "AT", "MID"]
    for row in results["defenses"].values():
        assert list(row["attacks"]) == attacks
        values = [row["benign"], *row["attacks"].values()]
        assert all(0 <= v <= 100 for v in values)
        assert abs(row["avg"] - sum(values) / len(values)) < 0.02
    assert results["defenses"]["None"]["benign"] > 30  # two epochs already learn something
    report = (tmp_path / "run1" / "report.md").read_text()
    assert "| None |" in report and "| AT |" in report and "| MID |" in report and "Avg" in report
    assert "| None |" in first.stdout

    stages = results["stages"]
    assert list(stages) == ["ingest", "baseline", "teacher", "pool", "at", "mid", "eval"]
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
    assert again["defenses"] == results["defenses"]
    assert "starting a local Ray instance" in first.stderr
    assert "not regenerating" in second.stderr
    assert "starting a local Ray instance" not in second.stderr  # a fully cached run needs no Ray
    heavy = ["ingest", "baseline", "teacher", "pool"]
    before = sum(stages[s]["seconds"] for s in heavy)
    after = sum(again["stages"][s]["seconds"] for s in heavy)
    assert after < 0.05 * before, (before, after)
