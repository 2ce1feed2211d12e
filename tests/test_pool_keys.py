"""Pool keys (DESIGN §4): one per attack; any setting that changes the pixels changes it."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import load_config
from pipeline.context import RunContext
from pipeline.stages.pool import pool_key, stored_variants

DATASET = SimpleNamespace(fingerprint="f" * 64)
SOURCE = {"key": "baseline-x", "sha256": "a" * 64}


def key(overrides=(), attack="PGD_N", source=SOURCE):
    cfg = load_config("configs/digits.yaml", list(overrides))
    return pool_key(RunContext(cfg, Path("unused")), DATASET, source, attack)


@pytest.mark.parametrize("override", ["attacks.PGD.eps=0.05", "attacks.PGD.nb_iter=7", "seed=1",
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


def test_deterministic_attacks_keep_one_variant():
    cfg = load_config("configs/digits.yaml", ["pool.variants=4"])
    ctx = RunContext(cfg, Path("unused"))
    assert [stored_variants(ctx, a) for a in ["PGD_N", "PGD_T", "MIM_N", "MIM_T", "FGSM_N", "BIM_N"]] == [4, 4, 1, 4, 1, 1]
