"""Every script in benchmarks/ runs end to end at toy size, so none of them can rot between
the rare times someone measures with it (``benchmarks/gpu_check.py`` has its own test,
tests/test_gpu_check.py).

Each test runs the script as ``python benchmarks/NAME.py`` with no terminal, on its real
code path (the ones that start Ray start a real local instance of their own), and checks
the JSON it prints: the fields docs/benchmarks.md's table and the script's docstring
describe, and that they are figures of the right kind (positive, finite, consistent with
each other). The figures themselves say nothing at these sizes; no test asserts on speed.

``train_cost.py`` reads MNIST's IDX files: the test writes a folder of them from the bundled
scikit-learn digits, upsampled to MNIST's 28 pixels, so no real data is needed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVAL_ATTACKS = ["PGD_N", "PGD_T", "MIM_N", "MIM_T", "FGSM_N", "FGSM_T", "BIM_N", "BIM_T"]  # digits_sweep.EVAL

def run_script(name: str, *args: str, timeout: int = 600) -> str:
    """``python benchmarks/NAME ARGS`` from the repository root; its stdout, once it exited 0."""
    done = subprocess.run([sys.executable, f"benchmarks/{name}", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def run_json(name: str, *args: str, timeout: int = 600) -> dict:
    """The one JSON document the script printed (nothing else on stdout)."""
    out = run_script(name, *args, timeout=timeout)
    try:
        return json.loads(out)
    except json.JSONDecodeError as error:
        raise AssertionError(f"{name} did not print one JSON document ({error}):\n{out[-3000:]}") from None


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def non_negative(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def a_rate(value) -> bool:
    """A percentage (accuracy or success rate)."""
    return non_negative(value) and value <= 100


# Single process, no Ray ----------------------------------------------------------------------

@pytest.mark.parametrize("compile_", [pytest.param(False, id="eager"), pytest.param(True, marks=pytest.mark.slow, id="compile")])
def test_attack_step(compile_):
    report = run_json("attack_step.py", "--threads", "1", *(["--compile"] if compile_ else []))
    assert report["threads"] == 1
    by_batch = report["channels_last_us_per_sample"]
    assert sorted(by_batch, key=int) == ["64", "256", "1024"] and all(positive(v) for v in by_batch.values()), by_batch
    assert positive(report["contiguous_us_per_sample_256"])
    if compile_:
        assert positive(report["compile_seconds"]) and positive(report["compiled_us_per_sample_256"]), report
    else:
        assert "compile_seconds" not in report and "compiled_us_per_sample_256" not in report


def test_pool_storage():
    from storage.pools import COMPRESSORS

    report = run_json("pool_storage.py", "--samples", "64", "--train-samples", "256", "--epochs", "1",
                      "--nb-iter", "2", "--shard-size", "32", "--delta-steps", "1,2", "--bf16")
    assert report["benchmark"] == "pool_storage" and report["dataset"] == "digits"
    assert report["image_shape"] == [1, 16, 16] and report["samples"] == 64
    assert report["float32_bytes_per_view"] == 4 * 16 * 16
    assert report["source_model"]["train_samples"] == 256 and a_rate(
        report["source_model"]["clean_accuracy_on_attacked_samples"])
    rows = report["results"]
    grid = {(r["attack"], r["encoding"], r["compressor"], r["delta_step"]) for r in rows}
    expected = {(a, e, c, s) for a in ("PGD_N", "PGD_T") for e in ("uint8", "int8_delta") for c in COMPRESSORS
                for s in (1, 2)}
    assert grid == expected and len(rows) == len(expected)
    for r in rows:
        assert positive(r["bytes_per_view"]) and r["bytes_per_view_with_metadata"] >= r["bytes_per_view"], r
        assert r["ratio_to_float32"] == pytest.approx(1024 / r["bytes_per_view"], rel=0.01), r
        assert positive(r["ratio_to_float32_with_metadata"]) and \
            r["ratio_to_float32_with_metadata"] <= r["ratio_to_float32"], r
        assert a_rate(r["success_float"]) and a_rate(r["success_stored"]), r
        assert r["success_change_points"] == pytest.approx(r["success_stored"] - r["success_float"], abs=0.011), r
        assert 0 <= r["flipped_samples"] <= 64 and 0 < r["max_linf_float"] <= 0.3 + 1e-6, r
        if abs(r["ratio_to_float32"] - 10) > 0.05:  # the flags are of unrounded figures
            assert r["meets_10x"] == (r["ratio_to_float32"] >= 10), r
        if abs(abs(r["success_change_points"]) - 0.5) > 0.01:
            assert r["meets_0.5_points"] == (abs(r["success_change_points"]) <= 0.5), r
    # Every encoding and compressor stores the same views: one success rate per attack and grid.
    for attack in ("PGD_N", "PGD_T"):
        for step in (1, 2):
            assert len({r["success_stored"] for r in rows if r["attack"] == attack and r["delta_step"] == step}) == 1
    assert [b["attack"] for b in report["bf16"]] == ["PGD_N", "PGD_T"]
    assert all(a_rate(b["success_rate_stored_float32"]) and a_rate(b["success_rate_stored_bf16"]) for b in report["bf16"])
    assert report["all_meet_targets"] == all(r["meets_10x"] and r["meets_0.5_points"] for r in rows)


def check_sweep_row(row: dict) -> None:
    assert list(row) == ["benign", *EVAL_ATTACKS, "avg"], row
    assert all(a_rate(v) for v in row.values()), row
    assert row["avg"] == pytest.approx(sum(v for k, v in row.items() if k != "avg") / (len(row) - 1), abs=0.11), row


def test_digits_sweep():
    """One JSON line per run: MID with both protocols, then Madry AT with one."""
    runs = {"mid": ["--smoke", "--epochs", "1", "--steps", "2"],
            "madry": ["--smoke", "--epochs", "1", "--steps", "2", "--mode", "madry", "--init", "random",
                      "--source", "baseline", "--protocols", "adaptive"]}
    results = {}
    for mode, args in runs.items():
        lines = [line for line in run_script("digits_sweep.py", *args, timeout=300).splitlines() if line.strip()]
        assert len(lines) == 1, lines
        results[mode] = result = json.loads(lines[0])
        assert result["args"]["mode"] == mode and result["args"]["smoke"] is True
        protocols = ["source", "adaptive"] if mode == "mid" else ["adaptive"]
        assert [k for k in result if k in ("source", "adaptive")] == protocols
        for protocol in protocols:
            table = result[protocol]
            check_sweep_row(table["None"])
            check_sweep_row(table[mode])
            assert table["gap"] == pytest.approx(table[mode]["avg"] - table["None"]["avg"], abs=0.06), table
            assert non_negative(table["seconds"])
        if mode == "mid":
            assert result["source"]["against"] == "teacher"  # --source's default
        else:
            assert "source" not in result
        assert non_negative(result["train_seconds"])
    # The None row is the same seeded baseline in both runs: it depends on neither the mode nor the source.
    assert results["mid"]["adaptive"]["None"] == results["madry"]["adaptive"]["None"]


# Real local Ray instances ---------------------------------------------------------------------

@pytest.mark.slow
def test_actor_start():
    report = run_json("actor_start.py", "--smoke", "--preload", "torch", timeout=300)
    assert report["preload"] == ["torch"]
    assert len(report["seconds_per_round"]) == 3 and all(positive(s) for s in report["seconds_per_round"]), report


@pytest.mark.slow
def test_train_startup():
    report = run_json("train_startup.py", timeout=600)
    assert positive(report["ray_init_seconds"])
    assert [f["workers"] for f in report["fits"]] == [1, 2, 2]
    for fit in report["fits"]:
        first, last = fit["loop_started_seconds"]
        assert positive(fit["seconds"]) and 0 < first <= last <= fit["seconds"], fit


@pytest.mark.slow
def test_pool_throughput():
    report = run_json("pool_throughput.py", "--samples", "256", "--nb-iter", "5", "--epochs", "1",
                      "--shard-size", "64", "--batch-size", "64")
    assert report["benchmark"] == "pool_throughput" and report["dataset"] == "digits"
    assert report["images"] == 256 and report["attacks"] == ["PGD_N", "PGD_T"]
    assert report["adversarial_samples"] == 256 * 2 and report["attack_settings"]["nb_iter"] == 5
    for path in ("baseline", "pipeline_pool_stage"):
        row = report[path]
        assert positive(row["seconds"]) and positive(row["samples_per_second"]), row
        assert positive(row["gflops_per_second"]) and non_negative(row["share_of_matmul_peak"]), row
        assert row["share_of_matmul_peak"] <= 1, row  # counted FLOPs cannot beat the measured peak
        assert set(row["success_rate"]) == {"PGD_N", "PGD_T"} and all(a_rate(v) for v in row["success_rate"].values())
    stage = report["pipeline_pool_stage"]
    assert non_negative(stage["actor_busy_seconds"]) and stage["seconds_around_stage"] >= stage["seconds"] - 0.01
    assert report["ratio_pipeline_to_baseline"] == pytest.approx(
        report["baseline"]["seconds"] / stage["seconds"], rel=0.1, abs=0.002)
    assert positive(report["matmul_peak_gflops"]) and set(report["matmul_peak_by_size"]) == {"1024", "2048"}
    flops = report["flops_counted_per_sample"]
    assert positive(flops["baseline"]) and flops["pipeline"] > flops["baseline"]  # one more success check
    assert non_negative(report["untimed"]["ingest_and_training_seconds"]) and positive(
        report["untimed"]["ray_start_seconds"])


STAGE_OVERHEAD_TOY = ["data.train_limit=128", "data.test_limit=32", "models.baseline.epochs=1",
                      "models.teacher.epochs=1", "models.at.epochs=1", "models.substitute.epochs=1", "mid.epochs=1",
                      "pool.variants=1", "pool.shard_size=128", "attacks.PGD.nb_iter=2", "attacks.MIM.nb_iter=2"]


@pytest.mark.slow
def test_stage_overhead():
    report = run_json("stage_overhead.py", *(a for o in STAGE_OVERHEAD_TOY for a in ("--set", o)))
    assert report["benchmark"] == "stage_overhead" and report["config"] == "configs/digits.yaml"
    assert report["overrides"] == STAGE_OVERHEAD_TOY and positive(report["ray_start_seconds"])
    stages = report["stages"]
    assert list(stages) == ["classifiers (one worker group)", "mid"]
    kinds = ["baseline", "teacher", "at", "substitute"]  # the digits demo's: None, AT and MID rows, transfer protocol
    assert stages["classifiers (one worker group)"]["models"] == kinds
    for name, stage in stages.items():
        assert positive(stage["pipeline_seconds"]) and non_negative(stage["single_process_seconds"]), (name, stage)
        assert positive(stage["ratio"]), (name, stage)
        if stage["single_process_seconds"] >= 0.1:  # the ratio is of the unrounded seconds
            assert stage["ratio"] == pytest.approx(stage["pipeline_seconds"] / stage["single_process_seconds"],
                                                   rel=0.1), (name, stage)
        split = stage["split"]
        assert list(split) == ["startup", "teardown", "epoch_checkpoints", "data_wait",
                               "worker_steps_minus_single_process", "worker_setup_and_commit"], split
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in split.values()), split
        assert positive(split["startup"]) and split["startup"] < stage["pipeline_seconds"], (name, split)
        assert non_negative(split["teardown"]) and non_negative(split["epoch_checkpoints"]), (name, split)
        assert non_negative(split["data_wait"]), (name, split)
    inside = report["classifiers_inside_the_group"]
    assert list(inside) == kinds
    # One toy epoch of a few steps: a model's seconds may round to 0.00.
    assert all(non_negative(m[k]) for m in inside.values()
               for k in ("worker_seconds", "single_process_seconds", "ratio")), inside
    assert report["max_stage_ratio"] == max(s["ratio"] for s in stages.values())
    assert report["meets_2x"] == (report["max_stage_ratio"] <= 2.0)
    assert report["train_workers"] == {"classifiers": 2, "mid": 2, "cpus_per_worker": 0.5}


def write_digits_as_mnist(folder: Path, train: int, test: int) -> None:
    """The bundled digits, upsampled to 28 pixels, as the four MNIST IDX files."""
    from test_raw import write_idx

    from storage.readers.base import resize_images
    from storage.readers.digits import load_digits
    from storage.readers.idx import IDX_FILES

    raw = load_digits(0.2, seed=0)
    arrays = {"train_images": resize_images(raw.train_images[:train], 28)[:, 0], "train_labels": raw.train_labels[:train],
              "test_images": resize_images(raw.test_images[:test], 28)[:, 0], "test_labels": raw.test_labels[:test]}
    for part, array in arrays.items():
        write_idx(folder / IDX_FILES[part], array, gz=False)


@pytest.mark.slow
def test_train_cost(tmp_path):
    # 256 images: 4 steps of 32 per worker and epoch; the baseline and teacher take one batch of 128 per worker.
    write_digits_as_mnist(tmp_path, train=256, test=32)
    report = run_json("train_cost.py", "--mnist", str(tmp_path), "--samples", "256", "--epochs", "2",
                      "--batch-size", "32")
    setting = report["setting"]
    assert setting["dataset"] == "MNIST" and setting["train_samples"] == 256 and setting["epochs"] == 2
    assert setting["batch_size"] == 32 and setting["workers"] == 2
    assert setting["pool"] == ["PGD_N", "PGD_T", "MIM_N", "MIM_T"] and setting["pool_attack_steps"] == 40
    assert positive(report["prepare_seconds"])
    trainers = report["trainers"]
    assert list(trainers) == ["mid_second_order", "mid_first_order", "at_pgd40", "at_pgd10"]
    for name, row in trainers.items():
        assert positive(row["seconds_per_1k_samples"]), (name, row)
        assert len(row["epoch_seconds"]) == 2 and all(positive(s) for s in row["epoch_seconds"]), (name, row)
        if name.startswith("mid"):  # MID reads its cached pool through Ray Data
            assert len(row["data_wait_fraction"]) == 2 and all(0 <= f <= 1 for f in row["data_wait_fraction"]), row
    per_1k = {name: row["seconds_per_1k_samples"] for name, row in trainers.items()}
    ratios = report["ratios"]
    for key in ("mid_second_order / at_pgd40", "mid_second_order / at_pgd10", "mid_first_order / at_pgd40",
                "mid_second_order / mid_first_order"):
        top, bottom = key.split(" / ")
        assert ratios[key] == pytest.approx(per_1k[top] / per_1k[bottom], rel=0.02, abs=0.002), (key, report)
    assert report["targets"] == {"mid_second_order / at_pgd40": 0.25, "mid_second_order / at_pgd10": 1.0}
    assert report["targets_met"] == all(ratios[k] <= v for k, v in report["targets"].items())
