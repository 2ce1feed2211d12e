"""`mid plan`: per-sample MACs counted on the real models match published figures and the
real attacks and trainers they stand for, and the plan multiplies them out by the config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import run_plan
from pipeline.config_loader import load_config
from pipeline.plan import DataShape, render, stage_costs
from workers.flops import attack_step_macs, counted_macs, forward_macs, train_step_macs
from workers.models import ModelSpec, build_classifier_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch,published", [("vit_b16", 17.6e9), ("resnet50", 4.1e9), ("resnet18", 1.8e9)])
def test_forward_at_224_matches_the_published_count(arch, published):
    """timm / torchvision list ViT-B/16 at 17.6 G, ResNet-50 at 4.1 G, ResNet-18 at 1.8 G
    multiply-adds ("FLOPs") per 224-pixel image."""
    spec = ModelSpec(arch=arch, in_channels=3, image_size=224, num_classes=1000)
    assert forward_macs(spec, batch=1) == pytest.approx(published, rel=0.05)


LENET = ModelSpec(arch="lenet", in_channels=1, image_size=16, num_classes=10)


def test_an_attack_costs_its_steps_times_one_counted_step():
    """The plan's pool cost (steps × attack step) against the MACs of advertorch's real PGD-k."""
    from workers.attacks import make_attack
    from pipeline.config import AttackSettings

    torch.manual_seed(0)
    model = build_classifier_model(LENET).eval().requires_grad_(False)  # as the pool and eval actors hold it
    x, y = torch.rand(4, 1, 16, 16), torch.randint(10, (4,))
    for k in (1, 7):
        settings = AttackSettings(PGD={"eps": 0.1, "nb_iter": k, "eps_iter": 0.02}).family_settings()
        real = counted_macs(lambda: make_attack("PGD_N", settings).perturb(model, x, y)) / 4
        probe = forward_macs(LENET, batch=4) / 4  # perturb's one-image forward that reads the class count, per sample
        assert real == pytest.approx(k * attack_step_macs(LENET, batch=4) + probe, rel=0.02)


def test_adversarial_training_costs_k_attack_steps_and_one_training_step():
    from workers.train_classifier import objective

    torch.manual_seed(0)
    model = build_classifier_model(LENET).train()
    x, y = torch.rand(4, 1, 16, 16), torch.randint(10, (4,))
    attack = {"eps": 0.1, "nb_iter": 5, "eps_iter": 0.02, "rand_init": True}

    def step() -> None:
        loss, _ = objective("at", {"attack": attack}, model, x, y)
        loss.backward()

    real = counted_macs(step) / 4
    assert real == pytest.approx(5 * attack_step_macs(LENET, batch=4) + train_step_macs(LENET, batch=4), rel=0.02)


def test_second_order_mid_is_counted_through_the_double_backward():
    from pipeline.plan import unit_costs

    shape = DataShape(100, 20, 1, 16, 10, "test")
    first = unit_costs(load_config(REPO / "configs/digits.yaml", ["mid.second_order=false"]), shape)
    second = unit_costs(load_config(REPO / "configs/digits.yaml"), shape)
    assert second["forward"] == first["forward"]
    # The double backward: the second-order step costs clearly more than the first-order one.
    assert second["mid_step"] > 1.3 * first["mid_step"]
    # And both are many passes: 5 views, the teacher's clean pass, backward and meta-test.
    assert first["mid_step"] > 10 * first["forward"]


def test_a_trainable_classifier_and_the_robustness_term_are_counted_in_mids_step():
    """mid.classifier: trainable adds the classifier's weight gradients (and their second
    order); RC adds the meta-test phase's clean pass of the fast weights."""
    from pipeline.plan import unit_costs

    shape = DataShape(100, 20, 1, 16, 10, "test")
    base = unit_costs(load_config(REPO / "configs/digits.yaml"), shape)["mid_step"]
    trainable = unit_costs(load_config(REPO / "configs/digits.yaml", ["mid.classifier=trainable"]), shape)["mid_step"]
    with_rc = unit_costs(load_config(REPO / "configs/digits.yaml", ["mid.meta_test_weights.rc=1"]), shape)
    assert trainable > base
    assert with_rc["mid_step"] > base + 0.9 * with_rc["forward"]


def test_stages_multiply_out_by_epochs_samples_variants_and_steps():
    units = {"forward": 1.0, "attack_step": 2.0, "train_step": 3.0, "teacher_step": 4.0, "mid_step": 50.0}
    shape = DataShape(1000, 100, 1, 16, 10, "test")
    base = ["eval.protocols=[source, adaptive]", "eval.subset={}", "pool.variants=2",
            "pool.attacks=[PGD_N, FGSM_N]", "attacks.PGD.nb_iter=10", "attacks.PGD.rand_init=true",
            "mid.epochs=4", "models.at.epochs=3", "models.at.attack={nb_iter: 5}",
            "eval.known=[PGD_N, FGSM_N]", "eval.unknown=[AA_N]"]
    stages, uncounted = stage_costs(load_config(REPO / "configs/digits.yaml", base), shape, units)
    by_name = {s.name: s for s in stages}
    assert by_name["mid"].total_macs == 4 * 1000 * 50
    # PGD_N: 2 random-start variants × (10 steps + 2 success checks); FGSM_N is deterministic: 1 × (1 + 2).
    assert by_name["pool"].total_macs == 1000 * (2 * (10 * 2 + 2) + (1 * 2 + 2))
    assert by_name["at"].total_macs == 3 * 1000 * (5 * 2 + 3)
    assert by_name["test attacks"].total_macs == pytest.approx(100 * ((10 * 2 + 2) + (1 * 2 + 2)))
    assert "substitute" not in by_name  # no transfer protocol, no substitute
    assert uncounted == ["AA_N (evaluation)"]


def test_the_row_that_is_the_source_model_crafts_no_adaptive_attacks():
    """With the source protocol stored, None's adaptive attacks are the stored source attacks
    (pipeline/stages/evaluate.py:adaptive_from_stored): eval crafts for the other rows only."""
    units = {"forward": 1.0, "attack_step": 2.0, "train_step": 3.0, "teacher_step": 4.0, "mid_step": 50.0}
    shape = DataShape(1000, 100, 1, 16, 10, "test")
    base = ["eval.subset={}", "eval.known=[PGD_N]", "eval.unknown=[FGSM_N]", "attacks.PGD.nb_iter=10"]
    per_row = 100 * ((10 * 2 + 1) + (1 * 2 + 1))  # each attack's steps and one forward, per test image

    def adaptive(*overrides: str) -> float | None:
        stages, _ = stage_costs(load_config(REPO / "configs/digits.yaml", [*base, *overrides]), shape, units)
        return next((s.total_macs for s in stages if s.name == "adaptive eval"), None)

    both = ["eval.protocols=[source, adaptive]"]
    assert adaptive(*both, "eval.defenses=[None, AT, MID]") == pytest.approx(2 * per_row)
    assert adaptive("eval.protocols=[adaptive]", "eval.defenses=[None, AT, MID]") == pytest.approx(3 * per_row)
    assert adaptive(*both, "eval.defenses=[None]") is None  # nothing left to craft
    # Attacks from the teacher are not None's own: its adaptive row is crafted.
    assert adaptive(*both, "eval.defenses=[None, AT]", "eval.source_model=teacher") == pytest.approx(2 * per_row)


def test_refreshed_rows_cost_their_rounds_and_the_refreshes_between_them():
    units = {"forward": 1.0, "attack_step": 2.0, "train_step": 3.0, "teacher_step": 4.0, "mid_step": 50.0}
    shape = DataShape(1000, 100, 1, 16, 10, "test")
    base = ["eval.defenses=[MID-R, ATTA]", "eval.protocols=[adaptive]", "pool.attacks=[PGD_N, PGD_T, CW_N]",
            "mid.epochs=6", "models.mid_r={}", "models.at.epochs=5", "pool.refresh.every=2", "pool.refresh.steps=3",
            "pool.refresh.start=pool",
            "eval.known=[PGD_N]", "eval.unknown=[PGD_T]"]
    cfg = load_config(REPO / "configs/digits.yaml", base)
    by_name = {s.name: s for s in stage_costs(cfg, shape, units)[0]}
    # MID-R: 6 epochs in 3 rounds, 2 refreshes of the 2 L∞ attacks (CW is not refreshed),
    # each 3 steps + 2 success checks per sample.
    refresh = 2 * 2 * (3 * 2 + 2)
    assert by_name["mid-r"].attack_macs == 1000 * refresh
    assert by_name["mid-r"].total_macs == 1000 * (6 * 50 + refresh)
    # ATTA: AT's 5 epochs in 3 rounds, cross-entropy on each of the 3 views.
    assert by_name["atta"].attack_macs == 1000 * refresh
    assert by_name["atta"].total_macs == 1000 * (5 * 3 * 3 + refresh)
    reset = load_config(REPO / "configs/digits.yaml", [*base, "pool.refresh.reset_every=1"])
    by_name = {s.name: s for s in stage_costs(reset, shape, units)[0]}
    # A reset round makes the attacks afresh: PGD's 20 steps instead of 3.
    assert by_name["mid-r"].attack_macs == 1000 * 2 * 2 * (20 * 2 + 2)
    in_step = load_config(REPO / "configs/digits.yaml", [*base, "pool.refresh.every=0"])
    by_name = {s.name: s for s in stage_costs(in_step, shape, units)[0]}
    # Staleness zero: 6 rounds of one epoch, each epoch's steps continue the 2 refreshed views
    # by 3 steps; each of the 5 stored versions checks its success once (a forward pass).
    assert by_name["mid-r"].attack_macs == 1000 * (6 * 2 * 3 * 2 + 5 * 2 * 1)
    assert by_name["mid-r"].total_macs == 1000 * (6 * 50 + 6 * 2 * 3 * 2 + 5 * 2 * 1)
    assert "2 attacks × 3 steps in every step" in by_name["mid-r"].note
    # Starting from random points of the ε-ball: no attack steps for version 0, its success
    # checked once, on the stored views.
    random = load_config(REPO / "configs/digits.yaml", [*base, "pool.refresh.every=0", "pool.refresh.start=random"])
    by_name = {s.name: s for s in stage_costs(random, shape, units)[0]}
    assert by_name["mid-r"].attack_macs == 1000 * (6 * 2 * 3 * 2 + 5 * 2 * 1 + 2 * 1)


def test_the_plan_counts_only_what_a_run_trains():
    """`mid plan configs/digits.yaml --set 'eval.defenses=[None]'` counted AT and MID, which
    such a run never trains; the plan now costs the driver's own list of stages, in its order."""
    units = {"forward": 1.0, "attack_step": 2.0, "train_step": 3.0, "teacher_step": 4.0, "mid_step": 50.0}
    shape = DataShape(1000, 100, 1, 16, 10, "test")
    for rows, protocols, expected in (
            ("[None]", "[source]", ["baseline", "teacher", "pool", "test attacks"]),
            ("[None, AT, TRADES]", "[adaptive]", ["baseline", "teacher", "at", "trades", "pool", "adaptive eval"]),
            ("[MID, None]", "[transfer, adaptive]", ["baseline", "teacher", "substitute", "pool", "mid",
                                                     "test attacks", "adaptive eval"]),
            ("[ATTA, None, MID-R]", "[adaptive]", ["baseline", "teacher", "pool", "atta", "mid-r",
                                                   "adaptive eval"])):
        cfg = load_config(REPO / "configs/digits.yaml", [f"eval.defenses={rows}", f"eval.protocols={protocols}"])
        stages, _ = stage_costs(cfg, shape, units)
        assert [s.name for s in stages] == expected, (rows, protocols)
        trained = [s for s in run_plan.run_stages(cfg) if s not in ("ingest", "eval") and not s.startswith("attacks-")]
        assert [s.name for s in stages][:len(trained)] == trained


def mid(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_mid_plan_json_and_table_for_an_image_folder_config_without_data():
    """The ImageNet config's fast profile: no data.path, the sizes from its plan: section."""
    result = mid("plan", "configs/imagenet1k-vitb.yaml", "--profile", "fast", "--gpus", "32", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)
    assert plan["data"]["train"] == 128 and plan["data"]["side"] == 64  # the profile's limit and size
    # The run's stages in its order (pipeline.run_plan.run_stages), the stored test attacks and eval after.
    assert [s["name"] for s in plan["stages"]][:6] == ["baseline", "teacher", "at", "substitute", "pool", "mid"]
    assert all(s["hours"] > 0 and s["total_macs"] > 0 for s in plan["stages"])
    assert plan["per_epoch"]["mid_online_hours"] > plan["per_epoch"]["mid_cached_hours"]
    assert plan["storage"]["pool_bytes"] > 0 and plan["mid_reads"]["bytes_per_second"] > 0

    table = render(plan)  # what `mid plan` prints without --json, from the same numbers
    assert "stage" in table and "MID reads" in table and "the pool saves" in table
    assert "on 32 GPUs" in table and "not counted (cost depends on the data): AA_N (evaluation)" in table


def test_mid_plan_refuses_what_it_cannot_size_or_run_on():
    no_sizes = mid("plan", "configs/mnist.yaml")  # IDX files not given, no plan: section
    assert no_sizes.returncode == 2 and "plan.train_samples" in no_sizes.stderr
    assert "Traceback" not in no_sizes.stderr
    bad = mid("plan", "configs/digits.yaml", "--utilisation", "1.5")
    assert bad.returncode == 2 and "--utilisation" in bad.stderr


@pytest.mark.parametrize("option,value", [("--gpu-tflops", "nan"), ("--gpu-tflops", "inf"), ("--utilisation", "nan")])
def test_mid_plan_refuses_non_finite_numbers(option, value):
    """`mid plan configs/digits.yaml --gpu-tflops nan` printed "nan days" and exit 0 (issue 22):
    nan passes every range comparison. Now argparse's error naming the option, exit 2."""
    result = mid("plan", "configs/digits.yaml", option, value)
    assert result.returncode == 2
    assert f"mid plan: error: argument {option}: {value} is not a finite number" in result.stderr
    assert "days" not in result.stdout


def gpu_check_record(path, units: dict[str, float], status: str = "ok"):
    """A record in `benchmarks/gpu_check.py`'s format (tests/test_gpu_check.py runs the
    script itself), with chosen rates so the plan's arithmetic can be checked by hand."""
    path.write_text(json.dumps({"device": "Test GPU", "smoke": False, "parts": {"throughput": {
        "status": status, "arch": "vit_b16", "side": 224, "batch": 32, "matmul_peak_tflops": 800.0,
        "units": {u: {"tflops": t} for u, t in units.items()}}}}))
    return path


def test_mid_plan_calibrated_puts_each_stage_at_its_own_units_measured_rate(tmp_path):
    """--calibrate: the pool and evaluation at the attack step's measured rate, MID at MID's
    step's, the classifiers at a training step's; and the output says which rates it used."""
    from pipeline.plan import plan, read_calibration

    cfg = load_config(REPO / "configs/digits.yaml")
    rates = {"forward": 400.0, "attack_step": 300.0, "train_step": 200.0, "mid_step": 100.0}
    calibration = read_calibration(str(gpu_check_record(tmp_path / "gpu.json", rates)))
    result = plan(cfg, 4, 989.0, 0.35, "unused", calibration)
    unit_of = {"pool": "attack_step", "test attacks": "attack_step", "adaptive eval": "attack_step",
               "mid": "mid_step", "baseline": "train_step", "teacher": "train_step", "at": "train_step",
               "substitute": "train_step"}
    for stage in result["stages"]:
        expected = 2 * stage["total_macs"] / (4 * rates[unit_of[stage["name"]]] * 1e12) / 3600
        assert stage["hours"] == pytest.approx(expected, rel=1e-12), stage["name"]
    assert result["total_hours"] == pytest.approx(sum(s["hours"] for s in result["stages"]))
    table = render(result)
    assert "rates measured on Test GPU" in table and "gpu.json" in table
    assert "mid step 100" in table and "this config runs lenet" in table
    uncalibrated = plan(cfg, 4, 989.0, 0.35, "H100")
    assert "35% utilisation (assumed" in render(uncalibrated)


def test_mid_plan_calibrate_refuses_a_record_without_throughput(tmp_path):
    partial = gpu_check_record(tmp_path / "partial.json", {"forward": 1.0}, status="failed")
    result = mid("plan", "configs/digits.yaml", "--calibrate", str(partial))
    assert result.returncode == 2 and "no complete throughput measurement" in result.stderr, result.stderr
    both = mid("plan", "configs/digits.yaml", "--calibrate", str(partial), "--utilisation", "0.5")
    assert both.returncode == 2 and "leave out --gpu-tflops and --utilisation" in both.stderr
