"""`benchmarks/gpu_check.py --smoke`: the GPU check's every part runs on CPU at toy sizes, so
the one command prepared for a GPU machine cannot rot between the rare times one is lent.
Its figures here say nothing about a GPU; that they are the right kind of figure, and that
the checks that compare (GPU with CPU, workers with one process, run with rerun) hold on
the CPU's own paths, is what is tested."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_every_part_at_smoke_sizes_and_records_them(tmp_path):
    out = tmp_path / "gpu-check.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    parts = record["parts"]
    assert list(parts) == ["pool", "bf16", "mid_stage", "determinism", "throughput", "mid_batch"]
    assert all(p["status"] == "ok" and p["seconds"] <= p["budget_s"] + 60 for p in parts.values()), parts
    for name in ("digits", "folder"):  # real shards, verified; the folder's PNGs went through the reader
        pool = parts["pool"][name]
        assert pool["verified"] and pool["agree_within_1_point"], pool
        assert all(s["chunks_verified"] > 0 and 0.5 < s["success_rate_stored"] <= 1 for s in pool["shards"].values())
    assert parts["pool"]["folder"]["side"] == 32 and parts["pool"]["folder"]["samples"] == 20
    assert abs(parts["bf16"]["success_difference"]) <= 4 / 64 and not parts["bf16"]["identical_views"]
    stage = parts["mid_stage"]
    assert stage["backend"] == "gloo" and stage["world_size"] == 2 and stage["relative_weight_error"] < 1e-4
    assert parts["determinism"]["identical"] and parts["determinism"]["entries"] >= 4  # 2 models, 2 pools
    throughput = parts["throughput"]
    assert throughput["matmul_peak_tflops"] > 0
    for unit in ("forward", "attack_step", "train_step", "mid_step"):
        assert throughput["units"][unit]["samples_per_s"] > 0 and throughput["units"][unit]["macs_per_sample"] > 0
    # MID's step does many passes: per sample it costs more than a training step.
    assert throughput["units"]["mid_step"]["macs_per_sample"] > throughput["units"]["train_step"]["macs_per_sample"]
    assert parts["mid_batch"]["largest_fitting_batch"] == 8 and parts["mid_batch"]["bounded_by"] == "the largest tried"
    assert "gpu-check on cpu" in done.stdout and "mid_stage    ok" in done.stdout


def test_without_a_gpu_the_full_check_refuses_and_points_to_smoke():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "--smoke" in done.stderr
