"""The run plan: what a run of a config trains, in what order, and with what settings,
derived from the validated config (``pipeline.config``). The driver, the pre-run checks,
``mid plan``, the cost table and the keys all read it here, so what is planned, checked,
costed and keyed is what runs."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import RunConfig
from workers.defenses import classifier_rows, defense_class


def trained_classifiers(cfg: RunConfig, command: str = "run") -> list[str]:
    """The classifiers a ``run`` trains, in order (``pool`` trains the baseline and the
    teacher only). One list for the driver, the pre-run checks and ``mid plan``, so the
    plan counts what a run builds."""
    kinds = ["baseline", "teacher"]
    if command == "run":
        kinds += [kind for kind in (defense_class(row).kind for row in cfg.eval.defenses
                                    if row in classifier_rows()) if kind not in kinds]
        if "transfer" in cfg.eval.protocols:
            kinds.append("substitute")
    return kinds


def run_stages(cfg: RunConfig, command: str = "run") -> list[str]:
    """The stages ``command`` (run or pool) goes through, in order, named as a run records
    them (results.json's ``stages``). The driver decides by this list and ``mid plan``
    costs it, so the plan counts what a run builds."""
    stages = ["ingest", *trained_classifiers(cfg, command), "pool"]
    if command == "run":
        stages += [defense_class(row).kind for row in rows_after_pool(cfg)]
        stages += [f"attacks-{p}" for p in ("source", "transfer") if p in cfg.eval.protocols]
        stages.append("eval")
    return stages


def rows_after_pool(cfg: RunConfig) -> list[str]:
    """The table's rows trained by a stage of their own after the pool (every row but a
    classifier: pipeline/rows.py), in the table's order, as the driver trains them."""
    return [row for row in cfg.eval.defenses if row not in classifier_rows()]


@dataclass(frozen=True)
class RefreshedSchedule:
    """How a row on a refreshed pool trains: its section ``models.<section>``, each unset
    field resolved."""

    epochs: int
    batch_size: int
    lr: float
    num_workers: int
    workers_field: str  # the field num_workers came from, for messages
    batch_size_field: str  # the field batch_size came from
    trainable_classifier: bool  # MID's step only: the label term's classifier is trained with the student


def refreshed_training(cfg: RunConfig, row: str) -> RefreshedSchedule:
    """The schedule of ``row``, a row trained on a refreshed pool: its own section's fields
    where set, else ``pool.refresh.epochs`` (epochs), else the base section of its step:
    ``mid`` for MID's (MID-R), ``models.at`` for cross-entropy (ATTA is AT at equal training
    steps, with transferred instead of fresh attacks)."""
    defense = defense_class(row)
    own, section = getattr(cfg.models, defense.section()), f"models.{defense.section()}"
    if defense.objective == "mid":
        base, base_name, workers, workers_name = cfg.mid, "mid", cfg.mid.num_workers, "mid.num_workers"
        trainable = (getattr(own, "classifier", None) or cfg.mid.classifier) == "trainable"
    else:
        base, base_name = cfg.models.at, "models.at"
        workers, workers_name, trainable = cfg.models.num_workers, "models.num_workers", False
    return RefreshedSchedule(
        epochs=own.epochs or cfg.pool.refresh.epochs or base.epochs,
        batch_size=own.batch_size or base.batch_size, lr=own.lr or base.lr,
        num_workers=own.num_workers or workers,
        workers_field=f"{section}.num_workers" if own.num_workers else workers_name,
        batch_size_field=f"{section}.batch_size" if own.batch_size else f"{base_name}.batch_size",
        trainable_classifier=trainable)


def refreshed_eps_warmup(cfg: RunConfig) -> int:
    """The ε warm-up (epochs) of a row refreshed at staleness zero; none at a longer staleness,
    where the views are continued between rounds at full ε."""
    if cfg.pool.refresh.every != 0:
        return 0
    chosen = cfg.pool.refresh.eps_warmup_epochs
    if chosen is not None:
        return chosen
    return cfg.models.at.eps_warmup_epochs  # both rows ramp as AT does (MNIST fast: docs/results.md §1.7)


def refreshed_attacks(cfg: RunConfig) -> list[str]:
    """The pool attacks a refresh continues (``pool.refresh.attacks`` or every L∞ one)."""
    chosen = cfg.pool.refresh.attacks
    return list(chosen) if chosen is not None else [a for a in cfg.pool.attacks
                                                    if cfg.attacks.linf_eps(a) is not None]
