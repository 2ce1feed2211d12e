"""Pool keys (docs/design.md §5.3): one per attack; any setting that changes the pixels changes it."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config_loader import load_config
from pipeline.context import RunContext
from pipeline.stages.pool import pool_key, eval_pool_spec, training_pool_spec

DATASET = SimpleNamespace(fingerprint="f" * 64, num_samples=lambda split: 360)
SOURCE = {"key": "baseline-x", "sha256": "a" * 64}


def key(overrides=(), attack="PGD_N", source=SOURCE, split="train"):
    ctx = RunContext(load_config("configs/digits.yaml", list(overrides)), Path("unused"))
    spec = training_pool_spec(ctx, attack) if split == "train" else eval_pool_spec(ctx, DATASET, attack)
    return pool_key(ctx, DATASET, source, spec)


@pytest.mark.parametrize("override", ["attacks.PGD.eps=0.05", "attacks.PGD.nb_iter=7", "seed=2",
                                      "pool.variants=2", "pool.encoding=uint8", "pool.compressor=blosc"])
def test_a_changed_setting_gives_a_new_key(override):
    assert key([override]) != key()


def test_identical_settings_and_unrelated_changes_keep_the_key():
    assert key() == key()
    # Settings of other attack families, of MID or of evaluation do not touch a PGD pool.
    assert key(["attacks.MIM.eps=0.05", "mid.epochs=3", "eval.batch_size=7", "pool.num_actors=5"]) == key()


def test_the_source_model_and_the_attack_are_in_the_key():
    assert key(source={**SOURCE, "sha256": "b" * 64}) != key()
    assert key(attack="PGD_T") != key(attack="PGD_N")


def test_the_split_the_target_and_the_subset_are_in_the_key():
    assert key(split="test") != key()
    assert key(["attacks.target=0"], attack="PGD_T") != key(attack="PGD_T")
    assert key(["attacks.target=0"], attack="PGD_N") == key(attack="PGD_N")  # untargeted: no target
    assert key(["eval.subset={PGD_N: 100}"], split="test") != key(split="test")


def test_deterministic_attacks_keep_one_variant():
    cfg = load_config("configs/digits.yaml", ["pool.variants=4"])
    ctx = RunContext(cfg, Path("unused"))
    names = ["PGD_N", "PGD_T", "MIM_N", "MIM_T", "FGSM_N", "BIM_N"]
    assert [training_pool_spec(ctx, a).variants for a in names] == [4, 4, 1, 4, 1, 1]


def test_attacks_that_are_not_linf_bounded_are_stored_as_images():
    ctx = RunContext(load_config("configs/digits.yaml", ["eval.unknown=[CW_N, JSMA_T]"]), Path("unused"))
    assert [eval_pool_spec(ctx, DATASET, a).encoding for a in ["PGD_N", "CW_N", "JSMA_T"]] == \
        ["int8_delta", "uint8", "uint8"]
