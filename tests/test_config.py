"""Bad configs fail with one clear line, before any Ray work starts."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import run_plan
from pipeline.config import RunConfig
from pipeline.config_loader import ConfigError, load_config

BAD_CONFIGS = {
    "unknown key": ("mid:\n  epochs: 2\n  epoch_count: 3\n", "mid: unknown key 'epoch_count'"),
    "negative eps": ("attacks:\n  PGD: {eps: -0.1}\n", "attacks.PGD.eps: -0.1: Input should be greater than 0"),
    "unknown attack": ("pool:\n  attacks: [PGD_N, CW_Q]\n", "pool.attacks: unknown attack 'CW_Q'"),
    "unknown eval attack": ("eval:\n  unknown: [JPEG_N]\n", "eval.unknown: unknown attack 'JPEG_N'"),
    "bad source": ("data: {source: cifar}\n", "data.source: 'cifar' is not allowed"),
    "unknown defense": ("eval: {defenses: [None, Distill]}\n", "eval.defenses.1: 'Distill' is not allowed"),
    "AT attack key": ("models: {at: {attack: {steps: 10}}}\n", "models.at.attack: unknown key 'steps'"),
    "AT attack value": ("models: {trades: {attack: {eps: 2}}}\n",
                        "models.trades.attack.eps: Input should be less than or equal to 1"),
    "untargeted JSMA": ("eval:\n  unknown: [JSMA_N]\n", "eval.unknown: unknown attack 'JSMA_N'"),
    "bad target": ("attacks: {target: first}\n", "attacks.target: 'first' is not allowed (allowed: random, or a"),
    "bad protocol": ("eval: {protocols: [source, whitebox]}\n", "eval.protocols.1: 'whitebox' is not allowed"),
    "subset of no attack": ("eval: {subset: {CW_Q: 10}}\n", "eval.subset: unknown attack 'CW_Q'"),
    "adaptive attack not in the table": ("eval: {unknown: [FGSM_N], adaptive_attacks: [CW_T]}\n",
                                         "eval.adaptive_attacks: 'CW_T' is not an attack of the table (eval.known"),
    "substitute seed": ("seed: 3\nmodels: {substitute: {seed: 3}}\n", "models.substitute.seed: 3 is the run's seed"),
    "unknown backbone": ("models: {arch: resnet34}\n", "models.arch: 'resnet34' is not allowed (allowed: 'lenet', "
                                                         "'mid_cnn', 'resnet18'"),
    "ViT with cyclic consistency": ("models: {arch: vit_b16}\n", "mid.meta_train_weights.cc: 0.8, but vit_b16 has no "
                                                                   "decoder"),
    "ViT teacher reconstruction": ("models: {arch: vit_s16, teacher: {lambda_rec: 1}}\nmid: {meta_train_weights: "
                                   "{cc: 0}, meta_test_weights: {cc: 0}}\n",
                                   "models.teacher.lambda_rec: 1.0, but vit_s16 has no decoder"),
    "mean without std": ("models: {mean: [0.5, 0.5, 0.5]}\n", "models: models.mean and models.std go together"),
    "image folder without a size": ("data: {source: image_folder, path: /data/tiny}\n",
                                    "data: data.image_size is required for source 'image_folder'"),
    "negative GPUs": ("ray: {gpus_per_actor: -0.5}\n", "ray.gpus_per_actor: -0.5: Input should be greater than"),
}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_nonzero_with_one_line_before_ray(tmp_path, case):
    text, expected = BAD_CONFIGS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run_cli("run", str(path), "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {expected}"), result.stderr
    assert "Ray" not in result.stderr and "ray" not in result.stdout
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()


def test_unknown_key_names_the_allowed_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pool: {variant: 2}\n")
    with pytest.raises(ConfigError, match=r"allowed: attacks, source_model, .*variants"):
        load_config(path)


def test_overrides_and_store(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nmid: {epochs: 3}\n")
    cfg = load_config(path, ["mid.epochs=7", "pool.attacks=[PGD_N, FGSM_T]", "attacks.PGD.eps=0.1"],
                      store="s3://bucket/prefix")
    assert cfg.mid.epochs == 7 and cfg.pool.attacks == ["PGD_N", "FGSM_T"]
    assert cfg.attacks.PGD.eps == 0.1 and cfg.store.url == "s3://bucket/prefix"
    with pytest.raises(ConfigError, match="mid: unknown key 'epoch'"):
        load_config(path, ["mid.epoch=7"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(path, ["mid.epochs"])


def test_files_need_a_path_and_configs_in_repo_are_valid():
    with pytest.raises(ValueError, match="data.path is required"):
        RunConfig.model_validate({"data": {"source": "mnist"}})
    assert load_config("configs/digits.yaml").data.source == "digits"
    with pytest.raises(ConfigError, match=r"data.path is required .* --set data.path="):
        load_config("configs/mnist.yaml")
    mnist = load_config("configs/mnist.yaml", ["data.path=/data/mnist"])
    assert (mnist.attacks.PGD.eps, mnist.attacks.PGD.nb_iter, mnist.mid.epochs, mnist.mid.batch_size) == (0.3, 40, 120, 256)


@pytest.mark.parametrize("path", sorted(str(p) for p in __import__("pathlib").Path("configs").glob("*.yaml")))
def test_every_shipped_config_and_profile_validates(path):
    from pipeline.config_loader import read_profiles, read_tree

    profiles = read_profiles(read_tree(__import__("pathlib").Path(path)), path)
    for profile in [None, *profiles]:
        cfg = load_config(path, ["data.path=/data/somewhere"], profile=profile)
        assert cfg.models.arch and cfg.data.source


def test_profiles_merge_before_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: full\nmid: {epochs: 120, lr: 1.0e-4}\n"
                    "profiles:\n  fast: {name: quick, mid: {epochs: 5}}\n")
    assert load_config(path).mid.epochs == 120  # a profile applies only when asked for
    fast = load_config(path, profile="fast")
    assert (fast.name, fast.mid.epochs, fast.mid.lr) == ("quick", 5, 1e-4)  # merged key by key
    assert load_config(path, ["mid.epochs=9"], profile="fast").mid.epochs == 9  # --set wins
    with pytest.raises(ConfigError, match=r"--profile 'slow': .* no such profile \(available: fast\)"):
        load_config(path, profile="slow")
    fast_mnist = load_config("configs/mnist.yaml", ["data.path=/data/mnist"], profile="fast")
    assert fast_mnist.data.train_limit and fast_mnist.attacks.PGD.nb_iter == 40


def test_training_attack_inherits_attacks_pgd(tmp_path):
    cfg = load_config("configs/digits.yaml", ["models.at.attack.nb_iter=10"])
    at = cfg.training_attack("at")
    assert (at.eps, at.nb_iter, at.eps_iter) == (cfg.attacks.PGD.eps, 10, cfg.attacks.PGD.eps_iter)
    assert cfg.training_attack("trades").nb_iter == cfg.attacks.PGD.nb_iter


def test_validate_command_and_help():
    assert run_cli("validate", "configs/digits.yaml").returncode == 0
    help_text = run_cli("run", "--help").stdout
    assert "--set" in help_text and "--store" in help_text and "--out" in help_text and "--profile" in help_text


def test_training_that_would_starve_ray_data_is_refused(tmp_path):
    """2 workers x 1 CPU on a 2-CPU Ray leave nothing for Ray Data: fail before Ray starts, don't hang."""
    result = run_cli("run", "configs/digits.yaml", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out"),
                     "--set", "ray.num_cpus=2", "--set", "ray.cpus_per_worker=1", "--set", "data.train_limit=64")
    assert result.returncode == 2
    assert ("error: ray.cpus_per_worker: models.num_workers=2 workers x 1 CPUs take all 2 CPUs of the local Ray "
            "instance") in result.stderr
    assert "starting a local Ray instance" not in result.stderr and "Traceback" not in result.stderr


# Issue 22: numbers YAML reads that no run can use.

NON_FINITE = {
    "mid.beta=.inf": "mid.beta: inf: Input should be a finite number",
    "models.baseline.lr=.nan": "models.baseline.lr: nan: Input should be a finite number",
    "attacks.CW.confidence=.inf": "attacks.CW.confidence: inf: Input should be a finite number",
    "models.trades.beta=-.inf": "models.trades.beta: -inf: Input should be a finite number",
    "models.mean=[.nan]": "models.mean.0: nan: Input should be a finite number",
    "models.at.attack={eps_iter: .inf}": "models.at.attack.eps_iter: Input should be a finite number",
}


@pytest.mark.parametrize("override", sorted(NON_FINITE))
def test_non_finite_numbers_are_refused(override):
    """`mid validate configs/digits.yaml --set mid.beta=.inf` said valid, and the run
    committed a MID checkpoint of NaN weights (issue 22); now one line naming the field."""
    with pytest.raises(ConfigError) as refused:
        load_config("configs/digits.yaml", [override])
    assert str(refused.value) == f"config error: {NON_FINITE[override]}"


def test_a_non_finite_number_is_one_line_and_exit_2():
    """`mid validate configs/digits.yaml --set mid.lr=.nan`: exit 2, one line, nothing started."""
    result = run_cli("validate", "configs/digits.yaml", "--set", "mid.lr=.nan")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["config error: mid.lr: nan: Input should be a finite number"]


TOO_LARGE = {
    "pool.shard_size=1000000000": "config error: pool.shard_size: 1,000,000,000 samples x 256 bytes (1x16x16 uint8) = "
                                  "238.4 GiB per shard, above the 1.0 GiB a shard may take (an actor holds it whole); "
                                  "use at most 4,194,304",
    "data.image_size=100000": "config error: data.image_size: 100000 is above the 256 pixels lenet is run at (one "
                              "1x100000x100000 image is 37.3 GiB as float32); use at most 256",
    "mid.batch_size=100000000": "config error: mid.batch_size: 100,000,000 samples x 1,024 bytes (1x16x16 float32) = "
                                "95.4 GiB per batch, above the 4.0 GiB a batch may take; use at most 4,194,304",
}


@pytest.mark.parametrize("override", sorted(TOO_LARGE))
def test_sizes_that_cannot_fit_in_memory_are_refused_with_the_arithmetic(override):
    """`mid validate configs/digits.yaml --set pool.shard_size=1000000000` (or
    data.image_size=100000) said valid and the run died in a Ray worker (issue 22)."""
    with pytest.raises(ConfigError) as refused:
        load_config("configs/digits.yaml", [override])
    assert str(refused.value) == TOO_LARGE[override]


def test_image_size_bound_is_per_backbone():
    """ResNets run at ImageNet sizes; LeNet does not."""
    assert load_config("configs/digits.yaml", ["models.arch=resnet18", "data.image_size=512"]).data.image_size == 512
    with pytest.raises(ConfigError, match="data.image_size: 512 is above the 256 pixels lenet is run at"):
        load_config("configs/digits.yaml", ["data.image_size=512"])


def test_the_zero_step_check_covers_the_stages_the_driver_trains():
    """The pre-run check sizes the batches of the classifiers the driver trains (one list,
    ``pipeline.run_plan.trained_classifiers``) and MID's when MID is a row."""
    from pipeline.preflight import training_stages

    for overrides in ([], ["eval.defenses=[None, TRADES]", "eval.protocols=[source]"]):
        cfg = load_config("configs/digits.yaml", overrides)
        groups = training_stages(cfg)
        assert [field for field, _ in groups["models.num_workers"]] == [f"models.{k}.batch_size"
                                                                       for k in run_plan.trained_classifiers(cfg)]
        assert ("mid.num_workers" in groups) == ("MID" in cfg.eval.defenses)


def test_the_default_mid_config_builds_the_step_the_step_defaults_to():
    """`inner_lr` was 1e-4 in workers/mid.py and 1e-3 in the config: a step built by a test or a
    benchmark was not the step a default run took. The config now takes the step's defaults."""
    from pipeline.config import MIDConfig
    from workers.mid import MetaSettings

    assert MIDConfig(batch_views=True).step(on_gpu=False) == MetaSettings()
    assert MIDConfig().step(on_gpu=True) == MetaSettings()  # auto: one pass for all views on GPU
    assert MIDConfig().step(on_gpu=False) == MetaSettings(batch_views=False)


def test_validating_a_config_does_not_load_torch():
    """The config reads every attack family's Settings and MID's step defaults; their files
    load torch only when used, so `mid validate` stays under a second (torch alone takes two)."""
    probe = subprocess.run([sys.executable, "-c", "import sys; from pipeline.config_loader import load_config; "
                            "load_config('configs/digits.yaml'); print(sorted({m.split('.')[0] for m in sys.modules} "
                            "& {'torch', 'advertorch', 'art', 'ray'}))"],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"


DIGITS = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


def test_refreshed_attacks_must_be_linf_attacks_of_the_pool():
    cfg = load_config(DIGITS, ["pool.attacks=[PGD_N, MIM_T, CW_N]"])
    assert run_plan.refreshed_attacks(cfg) == ["PGD_N", "MIM_T"]  # by default every L∞ pool attack
    with pytest.raises(ConfigError, match=r"pool.refresh.attacks: FGSM_N is not a pool attack \(allowed: PGD_N"):
        load_config(DIGITS, ["pool.refresh.attacks=[FGSM_N]"])
    with pytest.raises(ConfigError, match=r"pool.refresh.attacks: CW_N is not an L∞ attack.*allowed: PGD_N, MIM_T\)"):
        load_config(DIGITS, ["pool.attacks=[PGD_N, MIM_T, CW_N]", "pool.refresh.attacks=[CW_N]"])
    with pytest.raises(ConfigError, match="pool.refresh: unknown key 'evry'"):
        load_config(DIGITS, ["pool.refresh.evry=2"])
    assert load_config(DIGITS, ["pool.refresh.every=0"]).pool.refresh.every == 0  # staleness zero
    with pytest.raises(ConfigError, match=r"pool.refresh.eps_warmup_epochs: .* at staleness zero only"):
        load_config(DIGITS, ["pool.refresh.every=2", "pool.refresh.eps_warmup_epochs=3"])
    in_step = load_config(DIGITS, ["pool.refresh.every=0", "models.at.eps_warmup_epochs=4"])
    assert run_plan.refreshed_eps_warmup(in_step) == 4  # AT's, for both rows
    chosen = load_config(DIGITS, ["pool.refresh.every=0", "pool.refresh.eps_warmup_epochs=2"])
    assert run_plan.refreshed_eps_warmup(chosen) == 2
    longer = load_config(DIGITS, ["pool.refresh.epochs=33", "models.mid_r={}"])  # digits.yaml sets MID-R's own
    assert run_plan.refreshed_training(longer, "MID-R").epochs == run_plan.refreshed_training(longer, "ATTA").epochs == 33
    assert longer.mid.epochs != 33  # MID itself keeps its epochs
    with pytest.raises(ConfigError, match=r"pool.refresh.overlap: at staleness zero .* set every ≥ 1"):
        load_config(DIGITS, ["pool.refresh.every=0", "pool.refresh.overlap=true"])
    with pytest.raises(ConfigError, match=r"pool.refresh.start.*'pool' or 'random'"):
        load_config(DIGITS, ["pool.refresh.start=noise"])
    with pytest.raises(ConfigError, match="pool.refresh.every"):
        load_config(DIGITS, ["pool.refresh.every=-1"])
    rows = load_config(DIGITS, ["eval.defenses=[MID-R, None, ATTA]"])
    assert run_plan.run_stages(rows)[-6:] == ["pool", "mid-r", "atta", "attacks-source", "attacks-transfer", "eval"]
    assert "at" not in run_plan.trained_classifiers(rows)  # ATTA takes AT's settings, not its model


def test_every_unknown_key_is_named_with_the_keys_its_section_allows():
    from pydantic import ValidationError

    from pipeline.config_loader import format_validation_error

    with pytest.raises(ValidationError) as caught:
        RunConfig.model_validate({"mid": {"epoch": 2, "lrr": 0.1}, "pool": {"refresh": {"evry": 1}}})
    lines = format_validation_error(caught.value).splitlines()
    allowed_mid = ", ".join(RunConfig.model_fields["mid"].annotation.model_fields)
    assert lines == ["config error: pool.refresh: unknown key 'evry' (allowed: every, steps, step_size, attacks, "
                     "reset_every, start, epochs, eps_warmup_epochs, success_samples, overlap)",  # the sections' order: pool first
                     f"config error: mid: unknown key 'epoch' (allowed: {allowed_mid})",
                     f"config error: mid: unknown key 'lrr' (allowed: {allowed_mid})"]


def test_a_refreshed_row_trains_on_its_own_schedule_and_takes_every_unset_field_from_its_base_section():
    """models.mid_r and models.atta: MID-R's unset fields are mid's, ATTA's models.at's;
    MID's own section (and so MID's row) is untouched by MID-R's."""
    plain = load_config(DIGITS, ["models.mid_r={}"])  # digits.yaml sets MID-R's schedule; here none
    for row, base_batch, base_lr, base_workers in (("MID-R", plain.mid.batch_size, plain.mid.lr, plain.mid.num_workers),
                                                   ("ATTA", plain.models.at.batch_size, plain.models.at.lr,
                                                    plain.models.num_workers)):
        schedule = run_plan.refreshed_training(plain, row)
        assert (schedule.batch_size, schedule.lr, schedule.num_workers) == (base_batch, base_lr, base_workers)
    assert run_plan.refreshed_training(plain, "MID-R").epochs == plain.mid.epochs
    assert run_plan.refreshed_training(plain, "ATTA").epochs == plain.models.at.epochs
    own = load_config(DIGITS, ["models.mid_r.batch_size=32", "models.mid_r.epochs=7", "models.mid_r.lr=0.002",
                               "models.mid_r.classifier=trainable", "models.atta.batch_size=16",
                               "pool.refresh.epochs=33"])
    mid_r, atta = run_plan.refreshed_training(own, "MID-R"), run_plan.refreshed_training(own, "ATTA")
    assert (mid_r.batch_size, mid_r.epochs, mid_r.lr, mid_r.trainable_classifier) == (32, 7, 0.002, True)
    assert mid_r.batch_size_field == "models.mid_r.batch_size" and mid_r.workers_field == "mid.num_workers"
    assert (atta.batch_size, atta.epochs, atta.lr) == (16, 33, plain.models.at.lr)  # its epochs: pool.refresh's
    assert own.mid == plain.mid
    assert not run_plan.refreshed_training(plain, "MID-R").trainable_classifier
    assert run_plan.refreshed_training(load_config(DIGITS, ["mid.classifier=trainable"]), "MID-R").trainable_classifier
    with pytest.raises(ConfigError, match=r"models.mid_r.classifier"):
        load_config(DIGITS, ["models.mid_r.classifier=both"])
    with pytest.raises(ConfigError, match=r"models.atta: unknown key 'classifier'"):
        load_config(DIGITS, ["models.atta.classifier=trainable"])


def test_a_pool_of_one_attack_is_refused_only_where_a_row_holds_one_out():
    with pytest.raises(ConfigError, match=r"pool.attacks: MID holds one attack out per step \(mid.meta\): the pool "
                                          r"needs at least 2 attacks, not 1"):
        load_config(DIGITS, ["pool.attacks=[PGD_N]"])
    with pytest.raises(ConfigError, match=r"pool.attacks: MID-R holds"):
        load_config(DIGITS, ["pool.attacks=[PGD_N]", "eval.defenses=[None, MID-R]"])
    with pytest.raises(ConfigError, match=r"pool.attacks: .*at least one attack"):
        load_config(DIGITS, ["pool.attacks=[]", "eval.defenses=[ATTA]"])
    alone = load_config(DIGITS, ["pool.attacks=[PGD_N]", "eval.defenses=[AT, ATTA]"])  # ATTA holds none out
    assert run_plan.refreshed_attacks(alone) == ["PGD_N"]
    assert load_config(DIGITS, ["pool.attacks=[PGD_N]", "mid.meta=false"]).pool.attacks == ["PGD_N"]
