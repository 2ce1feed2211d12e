"""One place for keys (issue 23, docs/keys.md): every stage's key payload is a pure
function in ``pipeline/keys.py`` and the stage functions call it.

- Recorded keys: the keys below were computed through the stage functions as they were
  before the payloads moved to ``pipeline/keys.py`` (with the store's digests faked); the
  payloads of ``pipeline/keys.py`` and the stage functions must still give every one.
- Completeness: every leaf field of ``RunConfig``, changed to another valid value, must
  change some entry's payload, or be declared in ``KEY_NEUTRAL`` / ``KEY_BY_CONTENT``; and
  a declared field must change none.
"""

from __future__ import annotations

import copy
import hashlib
import typing
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace, UnionType
from typing import Any, Literal
from unittest import mock

import pytest
from pydantic import BaseModel, ValidationError

from pipeline import driver, keys, run_plan
from pipeline.config import RunConfig
from pipeline.config_loader import load_config, set_path
from pipeline.context import RunContext
from pipeline.errors import PipelineError
from storage.keys import content_key
from workers.defenses import STUDENT_ROW, defense_class, refreshed_rows

CONFIG = "configs/digits.yaml"

# Fake upstream digests: what the store would hold after ingest and training.
RAW_SHA256 = "r" * 64  # the reader's digest of the raw files
FINGERPRINT = "d" * 64  # the dataset's fingerprint
PRETRAINED_SHA256 = "p" * 64
SHA256 = {"baseline": "b" * 64, "teacher": "t" * 64, "at": "a" * 64, "trades": "e" * 64, "substitute": "s" * 64,
          "mid": "m" * 64}
SAMPLES = {"train": 1437, "test": 360}  # digits at test_fraction 0.2


def fake_dataset():
    return SimpleNamespace(key="dataset-fake", fingerprint=FINGERPRINT, num_classes=10,
                           image_shape=lambda: (1, 16, 16), num_samples=lambda split: SAMPLES[split])


def source_kinds(cfg: RunConfig) -> dict[str, str]:
    """The model each stored-attack protocol attacks (pipeline/driver.py)."""
    return {"source": cfg.pool.source_model if cfg.eval.source_model == "pool" else cfg.eval.source_model,
            "transfer": "substitute"}


def stage_keys(cfg: RunConfig) -> dict[str, str]:
    """Every key a ``mid run`` of ``cfg`` makes, through the stage functions themselves (the
    driver's wiring, pipeline/driver.py), with the store's digests faked."""
    from pipeline.stages import evaluate, ingest, mid, models, pool

    ctx = RunContext(cfg, Path("unused"))
    dataset = fake_dataset()
    with ExitStack() as patches:
        patches.enter_context(mock.patch.object(
            ingest, "reader", lambda source: SimpleNamespace(digest=lambda path: RAW_SHA256)))
        patches.enter_context(mock.patch.object(models, "check_pretrained", lambda ctx, spec, kind: PRETRAINED_SHA256))
        found = {"dataset": ingest.dataset_key(ctx)}
        spec = models.model_spec(ctx, dataset)
        trained = {}
        for kind in run_plan.trained_classifiers(cfg):
            found[f"model/{kind}"] = models.model_job(ctx, dataset, spec, kind).checkpoint_key
            trained[kind] = {"key": found[f"model/{kind}"], "sha256": SHA256[kind]}
        source = trained[cfg.pool.source_model]
        pool_keys = {a: pool.pool_key(ctx, dataset, source, pool.training_pool_spec(ctx, a)) for a in cfg.pool.attacks}
        found.update({f"pool/train/{a}": k for a, k in pool_keys.items()})
        defenses = {}
        for row in cfg.eval.defenses:
            if row == STUDENT_ROW:
                def reuse(label, key, find, build):  # the student "is in the store"
                    return {"key": key, "sha256": SHA256["mid"], "history": [{}]}, True
                patches.enter_context(mock.patch.object(ctx, "reuse_or_build", reuse))
                trained["mid"] = mid.run(ctx, dataset, trained["teacher"], pool_keys)
                found["mid"] = trained["mid"]["key"]
            defenses[row] = driver.row_models(row, trained)
        stored = {}
        for protocol, kind in source_kinds(cfg).items():
            if protocol in cfg.eval.protocols:
                stored[protocol] = {a: pool.pool_key(ctx, dataset, trained[kind], pool.eval_pool_spec(ctx, dataset, a))
                                    for a in cfg.eval.attacks}
                found.update({f"pool/{protocol}/{a}": k for a, k in stored[protocol].items()})
        crafted_on = {p: trained[kind]["key"] for p, kind in source_kinds(cfg).items() if p in stored}
        for p in cfg.eval.protocols:
            for d, row in defenses.items():
                feed = stored[p] if p in stored else evaluate.adaptive_from_stored(
                    evaluate.adaptive_attacks(ctx), row, stored, crafted_on)
                found[f"eval/{p}/{d}"] = evaluate.cell_key(ctx, dataset, p, row, feed)
    return found


def key_payloads(cfg: RunConfig, raw_sha256: str = RAW_SHA256) -> dict[str, tuple[str, dict[str, Any]]]:
    """{entry: (kind, payload)} of every entry a ``mid run`` of ``cfg`` makes, through
    ``pipeline/keys.py`` alone (the pool and model specs from the stages' own helpers),
    wired as the driver wires the stages; upstream keys are computed, digests faked."""
    from pipeline.stages import models, pool, refresh
    from pipeline.stages.evaluate import adaptive_from_stored

    ctx = RunContext(cfg, Path("unused"))  # the spec helpers read ctx.cfg only
    dataset = fake_dataset()
    out = {"dataset": ("dataset", keys.dataset_payload(cfg, raw_sha256))}
    spec = models.model_spec(ctx, dataset).as_dict()
    trained = {}
    for kind in run_plan.trained_classifiers(cfg):
        out[f"model/{kind}"] = (kind, keys.model_payload(cfg, FINGERPRINT, spec, kind, PRETRAINED_SHA256))
        trained[kind] = {"key": content_key(*out[f"model/{kind}"]), "sha256": SHA256[kind]}
    source = trained[cfg.pool.source_model]["sha256"]
    pool_keys = {}
    for attack in cfg.pool.attacks:
        out[f"pool/train/{attack}"] = ("pool", keys.pool_payload(cfg, FINGERPRINT, source,
                                                                 pool.training_pool_spec(ctx, attack)))
        pool_keys[attack] = content_key(*out[f"pool/train/{attack}"])
    defenses = {}
    for row in cfg.eval.defenses:
        if row == STUDENT_ROW:
            out["mid"] = ("mid", keys.mid_payload(cfg, FINGERPRINT, trained["teacher"]["sha256"], pool_keys))
            trained["mid"] = {"key": content_key(*out["mid"]), "sha256": SHA256["mid"]}
        elif row in refreshed_rows():  # its run, its first round, and its first refreshed pool version
            defense = defense_class(row)
            mid = defense.objective == "mid"
            start = trained[defense.init_from]["sha256"]
            first_pools = dict(pool_keys)
            if cfg.pool.refresh.start == "random":  # version 0: random starts against the starting model
                for attack in run_plan.refreshed_attacks(cfg):
                    out[f"{defense.kind}/pool-0/{attack}"] = ("pool", keys.pool_payload(
                        cfg, FINGERPRINT, start, refresh.random_start_spec(ctx, attack)))
                    first_pools[attack] = content_key(*out[f"{defense.kind}/pool-0/{attack}"])
            out[f"{defense.kind}/run"] = (f"{defense.kind}-run", keys.refreshed_run_payload(
                cfg, row, FINGERPRINT, start, trained["teacher"]["sha256"] if mid else None, first_pools))
            run_key = content_key(*out[f"{defense.kind}/run"])
            out[f"{defense.kind}/round-0"] = (defense.kind, keys.refreshed_round_payload(run_key, 0, first_pools))
            reset = cfg.pool.refresh.reset_every == 1
            for attack in run_plan.refreshed_attacks(cfg):
                out[f"{defense.kind}/pool-1/{attack}"] = ("pool", keys.refreshed_pool_payload(
                    cfg, first_pools[attack], "r" * 63 + "0", attack, reset))
            trained[defense.kind] = {"key": content_key(*out[f"{defense.kind}/round-0"]), "sha256": "r" * 64}
        defenses[row] = driver.row_models(row, trained)
    stored = {}
    for protocol, kind in source_kinds(cfg).items():
        if protocol in cfg.eval.protocols:
            stored[protocol] = {}
            for attack in cfg.eval.attacks:
                label = f"pool/{protocol}/{attack}"
                out[label] = ("pool", keys.pool_payload(cfg, FINGERPRINT, trained[kind]["sha256"],
                                                        pool.eval_pool_spec(ctx, dataset, attack)))
                stored[protocol][attack] = content_key(*out[label])
    # The row the source attacks were crafted on reads them as its adaptive ones.
    crafted_on = {p: trained[kind]["key"] for p, kind in source_kinds(cfg).items() if p in stored}
    for p in cfg.eval.protocols:
        for d, row in defenses.items():
            feed = stored[p] if p in stored else adaptive_from_stored(keys.adaptive_attacks(cfg), row, stored, crafted_on)
            out[f"eval/{p}/{d}"] = ("eval", keys.eval_cell_payload(cfg, FINGERPRINT, p, row, feed))
    return out


def keys_of(payloads: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, str]:
    return {label: content_key(kind, payload) for label, (kind, payload) in payloads.items()}


def digest(found: dict[str, str]) -> str:
    return hashlib.sha256(repr(sorted(found.items())).encode()).hexdigest()


# Recorded through the stage functions before the payloads moved to pipeline/keys.py
# (`stage_keys(load_config(CONFIG, overrides))`, with the digests above).
BASE_KEYS = {
    'dataset': 'dataset-933d949b0f1715c36407',
    'model/baseline': 'baseline-6bd3892bc28450486e3d',
    'model/teacher': 'teacher-4dd3d9f392589b905e68',
    'model/at': 'at-94587777c259b734131c',
    'model/substitute': 'substitute-15b7634db6d552c2c618',
    'pool/train/PGD_N': 'pool-984a5f14813094f64026',
    'pool/train/PGD_T': 'pool-d67ce18ff16637e859f3',
    'pool/train/MIM_N': 'pool-4de8adbc1878a196a7d2',
    'pool/train/MIM_T': 'pool-d8d9445c1d00028f6068',
    'mid': 'mid-2f5b6b5d867234c0fa2d',
    'pool/source/PGD_N': 'pool-dd26f2cc1bd4cb2f9bfc',
    'pool/source/PGD_T': 'pool-1b31ef491ad682ad312b',
    'pool/source/MIM_N': 'pool-89d05b07a9816acd9c47',
    'pool/source/MIM_T': 'pool-57380e5ff8c34bd1e060',
    'pool/source/FGSM_N': 'pool-a0b5eaf08cc588377a70',
    'pool/source/FGSM_T': 'pool-ff913b70e3dd4afb146a',
    'pool/source/BIM_N': 'pool-d49fab7558fbdecd32d8',
    'pool/source/BIM_T': 'pool-47c0c37176e02de42bb3',
    'pool/source/CW_N': 'pool-c3600d57ca8fcf4ac754',
    'pool/source/CW_T': 'pool-977fdeef15adcbfcc558',
    'pool/source/AA_N': 'pool-0682759e267958d3ba82',
    'pool/source/JSMA_T': 'pool-f2685c70efaac57903dc',
    'pool/transfer/PGD_N': 'pool-e908fce5cfcf59a263b4',
    'pool/transfer/PGD_T': 'pool-9b5ef1444d64c00f6b88',
    'pool/transfer/MIM_N': 'pool-43b7e91159dc2959777f',
    'pool/transfer/MIM_T': 'pool-cc1e70aec8c42ebf2fcd',
    'pool/transfer/FGSM_N': 'pool-0d8a7553b4f5d7b46c3c',
    'pool/transfer/FGSM_T': 'pool-4b85af0924daff0870c6',
    'pool/transfer/BIM_N': 'pool-b6b76bc1eccc2df52c53',
    'pool/transfer/BIM_T': 'pool-6fa80f76d6726b415276',
    'pool/transfer/CW_N': 'pool-8468ba6b25a6f1919d1d',
    'pool/transfer/CW_T': 'pool-1d452d272f93343f94c4',
    'pool/transfer/AA_N': 'pool-57cf15d24f3a3255b0e5',
    'pool/transfer/JSMA_T': 'pool-8deb852534edf8b5d695',
    'eval/source/None': 'eval-06cbded20e83089e5b57',
    'eval/source/AT': 'eval-a9c861b696a7b8ad99e9',
    'eval/source/MID': 'eval-8cc7ef1b6751b7ff985c',
    'eval/transfer/None': 'eval-9c0b10e23097d327a344',
    'eval/transfer/AT': 'eval-0766c9817bee04116097',
    'eval/transfer/MID': 'eval-2860f5e85d70baebde73',
    'eval/adaptive/None': 'eval-72d4381489c781b4a685',
    'eval/adaptive/AT': 'eval-1180f3771bbb2821b108',
    'eval/adaptive/MID': 'eval-c1ad62b2fcd002ca0d6d',
}
BASE_DIGEST = '978153aea1ac02069bd9915c9ad6f14c96b1626dcc59b0f1550751a2373ebbb9'
# name: (overrides, digest of every key of the run, the keys of the entries the variant is about)
VARIANTS = {
    'meta off': (
        ['mid.meta=false'],
        '3da8efc3e95cdb68752d03f7e9a3cff1993710bcc23319d70b5f199c2d860acb',
        {
            'mid': 'mid-b6591ef9a34194cbaa6b',
        }),
    'distill off': (
        ['mid.distill=false', 'mid.init_student=random'],
        '5f4a2c5cb319e961aa4db2470a42f47b184af940609ff9618906fcb08bc54dba',
        {
            'mid': 'mid-24d618685f888a74d457',
        }),
    'AT warm-up': (
        ['models.at.eps_warmup_epochs=3'],
        '0750cdf8ab1a79e827f6475618b952e968e9a5110548447b6a8717d8b11f2ab6',
        {
            'model/at': 'at-246b4e83657e349ce19f',
        }),
    'AT warm-up of 1': (
        ['models.at.eps_warmup_epochs=1'],
        '1a7fc8187332aea4d8de34d5582d8d883aab7c88b88271269cda10c95b02e0ec',
        {
            'model/at': 'at-c8d63cf5f2f23f5df1cb',
        }),
    'TRADES': (
        ['eval.defenses=[None, AT, TRADES, MID]', 'models.trades.eps_warmup_epochs=2'],
        '9eafd6ebc6b0c85eae730b93478103fa96fc35ef64855e5ce61e5840fa318482',
        {
            'model/trades': 'trades-810580e6042f316ef3c3',
        }),
    'pretrained': (
        ['models.pretrained=/weights/lenet.pth'],
        'd1d85e015dee4a30dccca6e85cdebdac6294398f6d6e4b062a922260a309d4ba',
        {
            'model/baseline': 'baseline-2332f89b6c22c94cc483',
            'model/teacher': 'teacher-85ced92a4edb752a0d4d',
        }),
    'subsets': (
        ['eval.subset={PGD_N: 50, CW_N: 100}', 'eval.adaptive_attacks=[PGD_N, CW_N, FGSM_T]'],
        '5d86c9dcadc198b4c0f8c684f42f2539e18a77ec2e59250955cb05dba682f5ef',
        {
        }),
    'augmentation': (
        ['data.augment=crop', 'data.crop_padding=2'],
        'a998038e024aabe8c77e156ec0ce2d0dd8a877527833eed91d23bb90e526ecd2',
        {
            'mid': 'mid-5458b685063e13129d2f',
            'model/at': 'at-c273a99cc3cd87775f4d',
            'model/baseline': 'baseline-0f71293aa5df4e550d0b',
            'model/substitute': 'substitute-6f117f64608db9eecb70',
            'model/teacher': 'teacher-9fa9b88d1cb16aa7ab60',
        }),
    'bf16 pool': (
        ['pool.bf16=true'],
        '190b192d4690fe2887be9d76d72cf276ac1eb7d41896eda6c90a492028e2ba79',
        {
            'mid': 'mid-0ce822099e18d5c03140',
            'pool/train/MIM_N': 'pool-2d0ee3f6123660722ff2',
            'pool/train/MIM_T': 'pool-05efe4b8a552c575e1ab',
            'pool/train/PGD_N': 'pool-313870d3ef7b4fe85c86',
            'pool/train/PGD_T': 'pool-4e6f95e26ac0d48de74a',
        }),
    'normalised': (
        ['models.mean=[0.5]', 'models.std=[0.25]'],
        '591140e0a733d5d64a41663b857f1f30ca871d65467e2ed4a79a70061f1d0a42',
        {
            'model/at': 'at-a8890627617771d088aa',
            'model/baseline': 'baseline-010a02d89820940effe1',
            'model/substitute': 'substitute-6e6a9c2fb5512ce0c2a3',
            'model/teacher': 'teacher-d11995652c1e67258f04',
        }),
    'fixed target': (
        ['attacks.target=0'],
        '2dfd489df588db970b1477bc521b4dc83ecfb9a753ea214d218f3a7a6444809d',
        {
            'mid': 'mid-219569e316ef2a5bc9d8',
            'pool/train/MIM_T': 'pool-7ffec99ed14310675b1d',
            'pool/train/PGD_T': 'pool-92bd3c20022f83f2d4a2',
        }),
    'limits': (
        ['seed=3', 'data.train_limit=500', 'data.test_limit=200'],
        '6496aefe2fdc95695d235d43cbb9d07ea181f4cd50ad7a4fde5660fc1061e609',
        {
            'dataset': 'dataset-0dffb7e2a36ac1ee6e8e',
            'mid': 'mid-faa21c445e9380b010c9',
            'model/at': 'at-85c88cc769ecb0a875f5',
            'model/baseline': 'baseline-300d28fce7c6508ea1ce',
            'model/substitute': 'substitute-443acf5ecf6a1bb97a22',
            'model/teacher': 'teacher-4a8f5a28e6e4c52ec299',
            'pool/train/MIM_N': 'pool-cbc7964708c19041f61b',
            'pool/train/MIM_T': 'pool-60ab022969d216e496a5',
            'pool/train/PGD_N': 'pool-67eb65d8f99fa10f8482',
            'pool/train/PGD_T': 'pool-6f6f24c636cbefc36c57',
        }),
    'sources': (
        ['pool.source_model=teacher', 'eval.source_model=baseline'],
        '5c961db4304e9fa8ab90f4ee288bf15fef70221c4290f31baafdb53badd02559',
        {
            'mid': 'mid-4d38def11b0b157159af',
            'pool/train/MIM_N': 'pool-d4b40dd4c3bb0c94325f',
            'pool/train/MIM_T': 'pool-64b138bc7e2fef035884',
            'pool/train/PGD_N': 'pool-22a745a6969431ddedb5',
            'pool/train/PGD_T': 'pool-a70548689dc159cc955d',
        }),
    'training attack': (
        ['models.at.attack={nb_iter: 5}'],
        'd84dd97ebf50d148d39c2d44701f1fcc67d19f62562752bee18b8faa59bf3914',
        {
            'model/at': 'at-17855277a07cc5b5a6ca',
        }),
    'bf16 mid': (
        ['mid.bf16=true', 'mid.batch_views=true'],
        'c7d6d43091e28c4a7d7f45c3a334e24c866f2bb6487c1da43a1a98f6e463a90c',
        {
            'mid': 'mid-92783ce45c5d424575c8',
        }),
    'robustness term': (
        ['mid.meta_train_weights.rc=1', 'mid.meta_test_weights.rc=1'],
        '7205965c941c5d9c7afc8fcecd7e489a72ad57cd3048cd7e55bb740e53a95fff',
        {
            'mid': 'mid-3cfaea1cc29b408d6b83',
        }),
}


def variant_config(name: str) -> RunConfig:
    return load_config(CONFIG, VARIANTS[name][0])


def test_the_recorded_keys_come_out_of_pipeline_keys():
    found = keys_of(key_payloads(load_config(CONFIG)))
    assert found == BASE_KEYS
    assert digest(found) == BASE_DIGEST


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_recorded_keys_of_each_compatibility_rule_come_out_of_pipeline_keys(name):
    overrides, recorded_digest, recorded = VARIANTS[name]
    found = keys_of(key_payloads(load_config(CONFIG, overrides)))
    assert {label: found[label] for label in recorded} == recorded
    assert digest(found) == recorded_digest


@pytest.mark.parametrize("name", ["base", *VARIANTS])
def test_the_stage_functions_make_their_keys_with_pipeline_keys(name):
    cfg = load_config(CONFIG) if name == "base" else variant_config(name)
    assert stage_keys(cfg) == keys_of(key_payloads(cfg))


def test_the_demo_dataset_key():
    """configs/digits.yaml's dataset key with the bundled digits' real digest (`make demo`)."""
    from storage.readers import reader

    cfg = load_config(CONFIG)
    raw = reader("digits").digest(None)
    assert content_key("dataset", keys.dataset_payload(cfg, raw)) == "dataset-a4f18da1e9a55fc26cc6"


def test_mid_r_keys_the_schedule_it_trains_whichever_section_sets_it():
    """models.mid_r.batch_size=128 and mid.batch_size=128 train MID-R alike, so they key it
    alike; MID's own row is keyed by mid alone, so MID-R's section leaves MID's key as it is."""
    rows = ["eval.defenses=[None, MID, MID-R]", "models.mid_r={}"]  # digits.yaml sets MID-R's schedule
    plain = key_payloads(load_config(CONFIG, rows))
    own = key_payloads(load_config(CONFIG, [*rows, "models.mid_r.batch_size=128"]))
    shared = key_payloads(load_config(CONFIG, [*rows, "mid.batch_size=128"]))
    assert own["mid"] == plain["mid"] != shared["mid"]
    assert own["mid-r/run"] == shared["mid-r/run"] != plain["mid-r/run"]
    unset = key_payloads(load_config(CONFIG, [*rows, f"models.mid_r.batch_size={load_config(CONFIG).mid.batch_size}"]))
    assert unset["mid-r/run"] == plain["mid-r/run"]  # set to mid's own value: the same training, the same key


def test_a_pretrained_model_cannot_be_keyed_without_its_digest():
    cfg = variant_config("pretrained")
    spec = {"arch": "lenet", "in_channels": 1, "image_size": 16, "num_classes": 10, "feature_dim": 84}
    with pytest.raises(ValueError, match="sha256"):
        keys.model_payload(cfg, FINGERPRINT, spec, "baseline")
    assert "pretrained_sha256" not in keys.model_payload(cfg, FINGERPRINT, spec, "at")["train"]


def test_the_adaptive_attacks_of_the_key_are_those_evaluated():
    from pipeline.stages import evaluate

    for cfg in (load_config(CONFIG), variant_config("subsets")):
        assert evaluate.adaptive_attacks(RunContext(cfg, Path("unused"))) == keys.adaptive_attacks(cfg)


# --- batch sizes that change results (issue 23): keyed when not 256, the size every
# --- entry made before had

def changed_entries(overrides: list[str]) -> set[str]:
    base, other = keys_of(key_payloads(load_config(CONFIG))), keys_of(key_payloads(load_config(CONFIG, overrides)))
    assert base.keys() == other.keys()
    return {label for label in base if base[label] != other[label]}


def test_only_the_model_the_stored_attacks_were_crafted_on_reads_them_as_its_adaptive_ones():
    from pipeline.stages.evaluate import adaptive_from_stored

    stored = {"source": {"PGD_N": "pool-s1", "FGSM_N": "pool-s2"}, "transfer": {"PGD_N": "pool-t1"}}
    crafted_on = {"source": "baseline-k", "transfer": "substitute-k"}
    none = {"kind": "classifier", "key": "baseline-k", "sha256": "b"}
    at = {"kind": "classifier", "key": "at-k", "sha256": "a"}
    mid = {"kind": "defended", "student_key": "baseline-k", "teacher_key": "teacher-k"}
    assert adaptive_from_stored(["PGD_N", "FGSM_N"], none, stored, crafted_on) == stored["source"]
    assert adaptive_from_stored(["PGD_N"], none, stored, crafted_on) == {"PGD_N": "pool-s1"}
    assert adaptive_from_stored(["PGD_N", "CW_N"], none, stored, crafted_on) is None  # CW_N is not stored
    assert adaptive_from_stored(["PGD_N"], at, stored, crafted_on) is None
    assert adaptive_from_stored(["PGD_N"], mid, stored, crafted_on) is None
    assert adaptive_from_stored(["PGD_N"], none, {"transfer": stored["transfer"]}, crafted_on) is None


def test_eval_batch_size_enters_the_adaptive_cells_when_not_256():
    assert changed_entries(["eval.batch_size=256"]) == set()
    # None's adaptive cell reads the stored source attacks, made in the pool's batches.
    assert changed_entries(["eval.batch_size=128"]) == {label for label in BASE_KEYS
                                                        if label.startswith("eval/adaptive/")} - {"eval/adaptive/None"}


def test_pool_batch_size_enters_every_pool_when_not_256():
    assert changed_entries(["pool.batch_size=256"]) == set()
    changed = changed_entries(["pool.batch_size=64"])
    assert {label for label in BASE_KEYS if label.startswith("pool/")} <= changed
    assert not any(label.startswith(("dataset", "model/")) for label in changed)


def test_adaptive_batches_are_seeded_by_their_start_so_eval_batch_size_changes_them():
    """Why eval.batch_size is keyed: ``workers.evaluation.Evaluator.adaptive`` seeds each
    batch's random targets (and random starts) by the batch's first index."""
    import torch

    from workers.attacks import make_targets
    from workers.evaluation import batch_seed

    labels = torch.arange(256) % 10

    def targets(batch_size: int) -> torch.Tensor:
        return torch.cat([make_targets(labels[lo:lo + batch_size], 10,
                                       torch.Generator().manual_seed(batch_seed(0, "PGD_T/targets", lo)))
                          for lo in range(0, 256, batch_size)])

    assert torch.equal(targets(256), targets(256))
    assert not torch.equal(targets(256), targets(128))


def test_cw_images_depend_on_the_batch_so_pool_batch_size_changes_pools():
    """Why pool.batch_size is keyed: CW stops early on the loss of its whole batch, so the
    same samples attacked in one batch or in four are different images."""
    import torch
    from torch import nn

    from workers.attacks import make_attack

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    cw = make_attack("CW_N", {"CW": {"max_iterations": 20, "binary_search_steps": 1, "confidence": 1.0,
                                     "initial_const": 1.0, "learning_rate": 0.1}})
    whole = cw.perturb(model, x, y)
    quarters = torch.cat([cw.perturb(model, x[lo:lo + 4], y[lo:lo + 4]) for lo in range(0, 16, 4)])
    assert not torch.equal((whole * 255).round(), (quarters * 255).round())


# --- completeness: every config field is in a key or declared

# A second starting point with every optional behaviour on, so that fields that only matter
# then (data.crop_padding, models.trades.*, models.mean, ...) are exercised too.
SWITCHED_ON = ["eval.defenses=[None, AT, TRADES, MID, MID-R, ATTA]", "data.augment=crop", "models.mean=[0.5]", "models.std=[0.25]",
               "models.pretrained=/weights/lenet.pth", "pool.bf16=true", "eval.adaptive_attacks=[PGD_N, CW_N]",
               "models.at.eps_warmup_epochs=2", "models.trades.eps_warmup_epochs=2", "mid.meta=false",
               "attacks.target=0", "pool.batch_size=128", "eval.batch_size=64"]
# Values no generic change gives: (value, other fields it needs to be valid). The change is
# measured against the config with those other fields set alone.
PERTURBATIONS: dict[str, list[tuple[Any, dict[str, Any]]]] = {
    "data.source": [("mnist", {"data.path": "/data/mnist"})],
    "data.path": [("/data/elsewhere", {})],
    "mid.distill": [(False, {"mid.init_student": "random"})],
    "models.at.attack": [({"nb_iter": 7}, {})],
    "models.trades.attack": [({"nb_iter": 7}, {})],
    "eval.adaptive_attacks": [(["PGD_N"], {}), (None, {})],
    "attacks.target": [(0, {}), (1, {}), ("random", {})],
    "pool.refresh.attacks": [(["PGD_N", "MIM_N"], {})],
    "pool.refresh.eps_warmup_epochs": [(3, {"pool.refresh.every": 0})],
    "pool.refresh.success_samples": [(100, {"pool.refresh.every": 0})],
    "pool.refresh.overlap": [(True, {"pool.refresh.every": 1})],  # between rounds of 1 epoch or more
}


def leaf_fields(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """{dotted path: annotation} of every leaf field of a config section, recursively."""
    found = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.update(leaf_fields(annotation, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = annotation
    return found


def admitted(annotation: Any) -> tuple[set[Any], list[Any]]:
    """(the plain types, the Literal values) an annotation admits."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return set(), list(typing.get_args(annotation))
    if origin is typing.Annotated:
        return admitted(typing.get_args(annotation)[0])
    if origin in (typing.Union, UnionType):
        types, values = set(), []
        for arg in typing.get_args(annotation):
            t, v = admitted(arg)
            types |= t
            values += v
        return types, values
    return {origin or annotation}, []


def generic_changes(value: Any, annotation: Any) -> list[Any]:
    types, literals = admitted(annotation)
    changes = [v for v in literals if v != value]
    if bool in types:
        changes += [True, False]
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        changes += [value + 1, value + 2]
    elif isinstance(value, float):
        changes += [value / 2, value + 0.5] if value else [0.5, 1.0]
    elif isinstance(value, str) and str in types:
        changes.append(value + "x")
    elif isinstance(value, list):
        if len(value) > 1:
            changes += [value[:-1], value[1:]]
        if value and all(isinstance(v, float) for v in value):
            changes.append([v / 2 for v in value])
    elif isinstance(value, dict):
        if all(isinstance(v, int) for v in value.values()):
            changes.append({k: v + 1 for k, v in value.items()})
        if value:
            changes.append(dict(list(value.items())[:-1]))
    elif value is None:
        changes += [c for t, c in ((int, 1), (int, 100), (float, 0.5), (str, "x")) if t in types]
    return [c for c in changes if c != value or type(c) is not type(value)]


def get_path(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def valid_config(tree: dict[str, Any]) -> RunConfig | None:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError:
        return None


def payloads_or_none(cfg: RunConfig) -> dict[str, Any] | None:
    try:
        return key_payloads(cfg)
    except PipelineError:  # a valid config the fake dataset cannot take (e.g. 3 mean values for 1 channel)
        return None


def field_effects(bases: dict[str, RunConfig]) -> tuple[dict[str, bool], dict[str, bool]]:
    """(field: whether some valid change was tried, field: whether some change changed the
    payload of an entry present both before and after)."""
    fields = leaf_fields(RunConfig)
    tried = dict.fromkeys(fields, False)
    keyed = dict.fromkeys(fields, False)
    for base in bases.values():
        base_tree = base.model_dump(mode="python")
        base_payloads = key_payloads(base)
        for path, annotation in fields.items():
            current = get_path(base_tree, path)
            changes = PERTURBATIONS.get(path, []) + [(c, {}) for c in generic_changes(current, annotation)]
            for value, needs in changes:
                reference_tree = copy.deepcopy(base_tree)
                for other, other_value in needs.items():
                    set_path(reference_tree, other, other_value)
                if get_path(reference_tree, path) == value:
                    continue
                changed_tree = copy.deepcopy(reference_tree)
                set_path(changed_tree, path, value)
                reference, changed = valid_config(reference_tree), valid_config(changed_tree)
                if reference is None or changed is None:
                    continue
                before = base_payloads if not needs else payloads_or_none(reference)
                after = payloads_or_none(changed)
                if before is None or after is None:
                    continue
                tried[path] = True
                if any(before[label] != after[label] for label in before.keys() & after.keys()):
                    keyed[path] = True
    return tried, keyed


def test_every_config_field_is_in_a_key_or_declared_neutral():
    """A new config field fails here until it enters a payload in pipeline/keys.py or is
    declared in KEY_NEUTRAL (with why it cannot change a stored entry); docs/keys.md."""
    bases = {"digits": load_config(CONFIG), "switched on": load_config(CONFIG, SWITCHED_ON)}
    tried, keyed = field_effects(bases)
    declared = {**keys.KEY_NEUTRAL, **keys.KEY_BY_CONTENT}
    assert [f for f in tried if not tried[f]] == [], "no valid change found: add one to PERTURBATIONS"
    assert [f for f in keyed if not keyed[f] and f not in declared] == [], \
        "these fields change no key: add them to a payload in pipeline/keys.py, or to KEY_NEUTRAL with the reason"
    assert [f for f in declared if keyed.get(f)] == [], "declared key-neutral, but they change a key"


def test_the_declared_fields_are_config_fields():
    fields = leaf_fields(RunConfig)
    assert [f for f in [*keys.KEY_NEUTRAL, *keys.KEY_BY_CONTENT] if f not in fields] == []
    assert not set(keys.KEY_NEUTRAL) & set(keys.KEY_BY_CONTENT)
    assert all(reason.strip() for reason in [*keys.KEY_NEUTRAL.values(), *keys.KEY_BY_CONTENT.values()])


def test_a_decoder_revision_retrains_that_family_s_teacher_alone():
    """mid_cnn's decoder changed (workers/models/mid_cnn.py): its teachers are keyed by the
    revision, so a store retrains them; its other models and every lenet model keep their keys."""
    spec = {"arch": "mid_cnn", "in_channels": 1, "image_size": 16, "num_classes": 10, "feature_dim": 84}
    cnn = load_config(CONFIG, ["models.arch=mid_cnn"])
    assert keys.model_payload(cnn, FINGERPRINT, spec, "teacher")["train"]["decoder_revision"] == 1
    assert "decoder_revision" not in keys.model_payload(cnn, FINGERPRINT, spec, "baseline")["train"]
    lenet = key_payloads(load_config(CONFIG))
    assert all("decoder_revision" not in payload.get("train", {}) for _, payload in lenet.values())
