"""Every store entry's content key, in one place (docs/keys.md).

A key is ``storage.keys.content_key(kind, payload)``: a hash of the canonical JSON of the
payload. The payloads are built here, by pure functions of the run's config and of the
digests and keys of the stage's inputs, passed in as plain arguments (no I/O, no run
context). The stage functions (``pipeline/stages/*.py``) only gather those inputs and call
these. ``tests/test_keys.py`` holds recorded keys, so a change here that moves an existing
key fails, and checks that every config field either enters a payload here or is listed in
``KEY_NEUTRAL`` / ``KEY_BY_CONTENT`` below.

docs/keys.md has the tables: what enters each key, every compatibility exception (a
setting left out of a key while it has the value older entries were made with) with its
reason, and the settings in no key. Keep them in step with the functions below.

Adding a setting: if it can change what any entry holds, add it to that entry's payload
here, and, if entries already exist, only while it differs from the value they were made
with (a compatibility exception, added to docs/keys.md's table); else add it
to ``KEY_NEUTRAL`` with the reason. ``tests/test_keys.py`` fails until one is done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline import run_plan
from storage import datasets, pools
from workers.attacks import parse_attack_name
from workers.models import ARCHITECTURES

if TYPE_CHECKING:
    from pipeline.config import RunConfig

# The order in which batches reach a training step (workers.reproducible.WorkerRows): part
# of every trained model's key, so a store never mixes models trained under an earlier order.
BATCH_ORDER = 2
PRETRAINED_KINDS = ("baseline", "teacher")  # models.pretrained initialises these two
# The batch sizes every pool and adaptive cell made before they were keyed used.
UNKEYED_POOL_BATCH_SIZE = 256
UNKEYED_EVAL_BATCH_SIZE = 256

# Config fields in no key, each with why it cannot change what any store entry holds.
KEY_NEUTRAL: dict[str, str] = {
    "name": "names the run's ref in the store and its folder under runs/; no stage reads it",
    "store.url": "where the entries are kept; a key names the same entry in any store",
    "ray.address": "which Ray cluster runs the work, not what it computes",
    "ray.num_cpus": "the local Ray instance's CPUs: scheduling only",
    "ray.cpus_per_worker": "CPUs reserved per Ray Train worker: scheduling only",
    "ray.cpus_per_actor": "CPUs reserved per pool or evaluation actor: scheduling only",
    "ray.use_gpu": "the Ray Train workers' device: results agree up to floating-point rounding, which no key "
                   "tells apart (mid.bf16, which changes the arithmetic, is keyed; docs/keys.md: known gaps)",
    "ray.gpus_per_actor": "the pool and evaluation actors' device: results agree up to floating-point rounding "
                          "and the device's random stream, which no key tells apart (docs/keys.md: known gaps)",
    "ray.max_failures": "how often a failed training run restarts from its last epoch checkpoint; every epoch's "
                        "random streams are seeded by (seed, worker, epoch) (workers/reproducible.py), so a "
                        "resumed run continues as an uninterrupted one would",
    "ray.checkpoint_interval_s": "which epochs are checkpointed, the points a restart resumes from; resuming is "
                                 "seeded per epoch as above",
    "pool.num_actors": "how many actors share the shards; each shard is seeded by its own index",
    "eval.num_actors": "how many actors share the batches; each batch is seeded by its own first index",
    "eval.defenses": "which rows (cells, and the AT / TRADES / MID models) exist, not what one holds",
    "plan.train_samples": "read by `mid plan` only",
    "plan.test_samples": "read by `mid plan` only",
    "plan.num_classes": "read by `mid plan` only",
    "plan.channels": "read by `mid plan` only",
}

# Config fields that enter a key only through the digest of what they point at.
KEY_BY_CONTENT: dict[str, str] = {
    "data.path": "enters as raw_sha256, the reader's digest of the files there: the same files elsewhere keep "
                 "the dataset's key, other files give a new one",
}


def spec_payload(spec: dict[str, Any]) -> dict[str, Any]:
    """A model spec (``ModelSpec.as_dict()``) as it enters keys: mean and std only when set."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()
            if not (k in ("mean", "std") and v is None)}


def dataset_payload(cfg: RunConfig, raw_sha256: str) -> dict[str, Any]:
    """The ingested dataset; ``raw_sha256``: the reader's digest of the files at data.path."""
    d = cfg.data
    return {"source": d.source, "raw_sha256": raw_sha256, "image_size": d.image_size,
            "test_fraction": d.test_fraction if d.source == "digits" else None,
            "train_limit": d.train_limit, "test_limit": d.test_limit, "seed": cfg.seed,
            "format_version": datasets.FORMAT_VERSION}


def augmentation_settings(cfg: RunConfig) -> dict[str, Any]:
    """The workers' training augmentation; in every trained model's key when on."""
    mode = cfg.data.augmentation()
    return {} if mode == "none" else {"augment": mode, "crop_padding": cfg.data.crop_padding}


def training_settings(cfg: RunConfig, kind: str) -> dict[str, Any]:
    """Everything a classifier's training depends on besides the data, the architecture and
    the augmentation: the section models.<kind>, with the training attack resolved."""
    settings = getattr(cfg.models, kind).model_dump(exclude={"attack"})
    if "eps_warmup_epochs" in settings and not settings["eps_warmup_epochs"]:
        settings.pop("eps_warmup_epochs")  # 0, as every model made before the warm-up existed
    if kind in cfg.adversarial_kinds():
        settings["attack"] = cfg.training_attack(kind).model_dump()
    return settings


def uses_pretrained(cfg: RunConfig, kind: str) -> bool:
    """Whether models.pretrained initialises ``kind`` (its sha256 then enters the key)."""
    return kind in PRETRAINED_KINDS and bool(cfg.models.pretrained)


def model_settings(cfg: RunConfig, kind: str, pretrained_sha256: str | None = None) -> dict[str, Any]:
    """The ``train`` part of a classifier's key (the worker gets the same settings)."""
    settings = {**training_settings(cfg, kind), **augmentation_settings(cfg)}
    revision = ARCHITECTURES[cfg.models.arch].decoder_revision
    if kind == "teacher" and revision:  # the teacher is the one model its decoder trains
        settings["decoder_revision"] = revision
    if uses_pretrained(cfg, kind):
        if not pretrained_sha256:
            raise ValueError(f"{kind}: models.pretrained is set, its sha256 must enter the key")
        settings["pretrained_sha256"] = pretrained_sha256
    return settings


def model_payload(cfg: RunConfig, dataset_fingerprint: str, spec: dict[str, Any], kind: str,
                  pretrained_sha256: str | None = None) -> dict[str, Any]:
    """A classifier (``kind``: one of ``RunConfig.classifier_kinds``); ``spec``:
    ``ModelSpec.as_dict()``; ``pretrained_sha256``: the digest of models.pretrained, needed
    when ``uses_pretrained``."""
    return {"dataset": dataset_fingerprint, "spec": spec_payload(spec),
            "train": model_settings(cfg, kind, pretrained_sha256), "seed": cfg.seed,
            "num_workers": cfg.models.num_workers, "batch_order": BATCH_ORDER}


def pool_payload(cfg: RunConfig, dataset_fingerprint: str, source_sha256: str, spec: Any) -> dict[str, Any]:
    """One attack's pool against the model whose weights hash to ``source_sha256``; ``spec``:
    a ``pipeline.stages.pool.PoolSpec`` (attack, split, variants, encoding, delta_step,
    indices)."""
    family, targeted = parse_attack_name(spec.attack)
    p = cfg.pool
    return {
        "dataset": dataset_fingerprint, "split": spec.split, "source_sha256": source_sha256,
        "attack": spec.attack, "settings": getattr(cfg.attacks, family).model_dump(),
        "target": cfg.attacks.target if targeted else None, "subset": spec.indices and len(spec.indices),
        "seed": cfg.seed, "variants": spec.variants, "encoding": spec.encoding, "delta_step": spec.delta_step,
        "compressor": p.compressor, "shard_size": p.shard_size, "format_version": pools.FORMAT_VERSION,
        **({"bf16": True} if p.bf16 and spec.split == "train" else {}),
        **({"batch_size": p.batch_size} if p.batch_size != UNKEYED_POOL_BATCH_SIZE else {}),
        **({"random_start": True} if spec.random_start else {}),
    }


def pool_set_payload(pool_keys: dict[str, str]) -> dict[str, Any]:
    """A pool stage's display key (results.json): its pools' keys."""
    return {"pools": pool_keys}


def mid_settings(cfg: RunConfig, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The mid section as it enters the student's key (``overrides``: MID-R's own schedule,
    resolved): the ablation switches only when off."""
    settings = {**cfg.mid.model_dump(), **(overrides or {})}
    for switch in ("meta", "distill"):
        if settings[switch]:
            settings.pop(switch)  # on, as every student made before the switches existed
    if settings["classifier"] == "teacher":
        settings.pop("classifier")  # the frozen C_t, as every student made before the option existed
    for phase in ("meta_train_weights", "meta_test_weights"):
        if settings[phase]["rc"] == 0:
            settings[phase].pop("rc")  # off, as in every student made before the term existed
    return settings


def mid_payload(cfg: RunConfig, dataset_fingerprint: str, teacher_sha256: str,
                pool_keys: dict[str, str]) -> dict[str, Any]:
    """The MID student, distilled from the teacher whose weights hash to ``teacher_sha256``,
    on the training pools ``pool_keys`` ({attack: pool key})."""
    return {"dataset": dataset_fingerprint, "teacher_sha256": teacher_sha256, "pools": pool_keys,
            "mid": mid_settings(cfg), "seed": cfg.seed, "batch_order": BATCH_ORDER, **augmentation_settings(cfg)}


def adaptive_attacks(cfg: RunConfig) -> list[str]:
    """The attacks of the adaptive table."""
    return cfg.eval.adaptive_attacks or cfg.eval.attacks


def eval_cell_payload(cfg: RunConfig, dataset_fingerprint: str, protocol: str, defense: dict[str, Any],
                      stored: dict[str, str] | None) -> dict[str, Any]:
    """One (protocol, row) cell; ``defense``: the row's models (keys and sha256); ``stored``:
    the protocol's stored test attacks ({attack: pool key}), None for the adaptive protocol."""
    e, a = cfg.eval, cfg.attacks
    if stored is not None:  # the stored images say everything about the attacks
        attacks: dict[str, Any] = {"pools": stored}
    else:
        names = adaptive_attacks(cfg)
        attacks = {"attacks": names, "settings": a.family_settings(), "target": a.target,
                   "subset": {n: e.subset[n] for n in names if n in e.subset}, "seed": cfg.seed}
        if e.batch_size != UNKEYED_EVAL_BATCH_SIZE:
            attacks["batch_size"] = e.batch_size
    return {"protocol": protocol, "dataset": dataset_fingerprint, "defense": defense, **attacks}


def eval_set_payload(cell_keys: list[str]) -> dict[str, Any]:
    """The eval stage's display key (results.json): its cells' keys."""
    return {"cells": sorted(cell_keys)}


def refresh_settings(cfg: RunConfig, attack: str) -> dict[str, Any]:
    """How ``attack``'s pool is refreshed: the steps and the step size, resolved (ε / 4 by default)."""
    r = cfg.pool.refresh
    return {"steps": r.steps, "step_size": r.step_size or cfg.attacks.linf_eps(attack) / 4}


def refreshed_run_payload(cfg: RunConfig, row: str, dataset_fingerprint: str, init_sha256: str,
                          teacher_sha256: str | None, first_pools: dict[str, str]) -> dict[str, Any]:
    """A row trained on a refreshed pool (workers/defenses: MID-R, ATTA), as a whole: what
    its first round starts from (``init_sha256``: the teacher's or the baseline's weights),
    the pool it starts on, its training settings and how the pool is refreshed. Each
    round's checkpoint is keyed by this and its round's pools (``refreshed_round_payload``)."""
    r = cfg.pool.refresh
    schedule = run_plan.refreshed_training(cfg, row)
    epochs = schedule.epochs
    if teacher_sha256 is not None:  # MID's step: the mid section as the row's schedule resolves it
        own = {"batch_size": schedule.batch_size, "lr": schedule.lr, "num_workers": schedule.num_workers,
               "classifier": "trainable" if schedule.trainable_classifier else "teacher"}
        train: dict[str, Any] = {"mid": mid_settings(cfg, own), "teacher_sha256": teacher_sha256,
                                 "num_workers": schedule.num_workers}
        if epochs != cfg.mid.epochs:  # models.mid_r.epochs or pool.refresh.epochs
            train["epochs"] = epochs
    else:  # cross-entropy with its schedule (AT's epochs, batch size and learning rate unless set)
        train = {"epochs": epochs, "batch_size": schedule.batch_size, "lr": schedule.lr,
                 "num_workers": schedule.num_workers}
    warmup = run_plan.refreshed_eps_warmup(cfg)
    if warmup:  # at staleness zero only
        train["eps_warmup_epochs"] = warmup
    return {"row": row, "dataset": dataset_fingerprint, "init_sha256": init_sha256, "pools": first_pools,
            "train": train, "every": r.every, "reset_every": r.reset_every, **({"overlap": True} if r.overlap else {}),
            "refreshed": {a: refresh_settings(cfg, a) for a in run_plan.refreshed_attacks(cfg)},
            "seed": cfg.seed, "batch_order": BATCH_ORDER, **augmentation_settings(cfg)}


def refreshed_round_payload(run_key: str, round_index: int, pool_keys: dict[str, str]) -> dict[str, Any]:
    """Round ``round_index`` of the refreshed run ``run_key``, trained on ``pool_keys``."""
    return {"run": run_key, "round": round_index, "pools": pool_keys}


def refreshed_pool_payload(cfg: RunConfig, previous_key: str, source_sha256: str, attack: str,
                           reset: bool) -> dict[str, Any]:
    """Pool ``previous_key`` refreshed against the model whose weights hash to ``source_sha256``:
    continued (``refresh_settings``), or, on a reset round, ``attack`` made afresh."""
    family, _ = parse_attack_name(attack)
    p = cfg.pool
    how = ({"reset": True, "settings": getattr(cfg.attacks, family).model_dump(), "seed": cfg.seed} if reset
           else refresh_settings(cfg, attack))
    if cfg.pool.refresh.every == 0 and not reset:  # the views the workers carried in the step
        how = {**how, "in_step": True}
        if cfg.pool.refresh.success_samples is not None:  # the same views; their success on a sample
            how["success_samples"] = cfg.pool.refresh.success_samples
    return {"refresh_of": previous_key, "source_sha256": source_sha256, "attack": attack, **how,
            "encoding": p.encoding, "delta_step": p.delta_step, "compressor": p.compressor,
            "shard_size": p.shard_size, "batch_size": p.batch_size, "format_version": pools.FORMAT_VERSION,
            **({"bf16": True} if p.bf16 else {})}
