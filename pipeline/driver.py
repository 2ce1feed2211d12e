"""One run, stage after stage: ingest → the classifiers (the baseline, the teacher, the
classifier rows of eval.defenses, the substitute: one Ray Train worker group) → pool → mid and the
rows trained on a refreshed pool (MID-R, ATTA) →
stored test attacks (source, transfer) → eval → report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import costs, metrics, report, run_plan
from pipeline.config import RunConfig
from pipeline.context import RunContext
from pipeline.rows import AfterPoolStage, row_stage
from pipeline.stages import evaluate, ingest, models, pool
from workers.defenses import defense_class, reads_teacher_classifier


def prepare_pool(ctx: RunContext, kinds: tuple[str, ...] | list[str] = ("baseline", "teacher")):
    """The dataset, the classifiers ``kinds`` (by kind) and the training pool's keys."""
    dataset = ingest.run(ctx)
    trained = models.run_many(ctx, dataset, list(kinds))
    pool_keys = pool.run(ctx, dataset, trained[ctx.cfg.pool.source_model])
    return dataset, trained, pool_keys


def run_pool(cfg: RunConfig, out_dir: Path, verbose: bool = False) -> dict[str, str]:
    """The stages up to the pool; the store keeps them under the run's ref ``<name>-pool-<digest>``."""
    with RunContext(cfg, out_dir, ref_name=f"{cfg.name}-pool", verbose=verbose) as ctx:
        _, _, pool_keys = prepare_pool(ctx)
    for name, rec in ctx.stages.items():
        print(f"{name:<9} {rec.key:<34} {'cached' if rec.cache_hit else 'built':<7} {rec.seconds:8.1f} s")
    return pool_keys


def row_models(row: str, trained: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A row's models as the eval stage keys and loads them: MID's student with the teacher
    whose classifier reads it, or the row's classifier. ``trained``: manifests by kind."""
    model = trained[defense_class(row).kind]
    if reads_teacher_classifier(row):
        teacher = trained["teacher"]
        return {"kind": "defended", "student_key": model["key"], "teacher_key": teacher["key"],
                "sha256": [model["sha256"], teacher["sha256"]]}
    return {"kind": "classifier", "key": model["key"], "sha256": model["sha256"]}


def run(cfg: RunConfig, out_dir: Path, verbose: bool = False) -> dict[str, Any]:
    """Every stage; the store keeps what the run used under its ref ``<name>-<digest of its
    config>``, from its start (so an interrupted run keeps its outputs and resume state) until
    the user drops it (``mid cache gc --ref``)."""
    with RunContext(cfg, out_dir, verbose=verbose) as ctx:
        return run_stages(ctx)


def model_summary(manifest: dict[str, Any], kind: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "key": manifest["key"], "sha256": manifest["sha256"], **extra}


def crafted(ctx: RunContext, stage: str) -> dict[str, Any]:
    """Per stored test attack: its pool key, samples and success rate against its model."""
    return {attack: {k: v for k, v in info.items() if k != "cache_hit"}
            for attack, info in ctx.stages[stage].details["attacks"].items()}


def stored_test_attacks(ctx: RunContext, dataset, trained: dict[str, Any]) -> tuple[dict, dict]:
    """The test pools of the source and transfer protocols ({protocol: {attack: key}}) and,
    per protocol, what its attacks were crafted against."""
    e, stages = ctx.cfg.eval, run_plan.run_stages(ctx.cfg)
    stored, meta = {}, {}
    if "attacks-source" in stages:
        kind = ctx.cfg.pool.source_model if e.source_model == "pool" else e.source_model
        stored["source"] = pool.run_test_attacks(ctx, dataset, "source", kind, trained[kind])
        meta["source"] = {"source_model": model_summary(trained[kind], kind),
                          "attacks": crafted(ctx, "attacks-source")}
    if "attacks-transfer" in stages:
        substitute = trained["substitute"]
        stored["transfer"] = pool.run_test_attacks(ctx, dataset, "transfer", "substitute", substitute)
        meta["transfer"] = {"source_model": model_summary(substitute, "substitute", seed=ctx.cfg.models.substitute.seed),
                            "attacks": crafted(ctx, "attacks-transfer")}
    if "adaptive" in e.protocols:
        meta["adaptive"] = {"attacks": {}}
    if "AA_N" in e.attacks:
        from workers.attacks.autoattack import VERSIONS

        for p in meta:
            meta[p]["autoattack"] = f"{ctx.cfg.attacks.AA.version}: {VERSIONS[ctx.cfg.attacks.AA.version]}"
    return stored, meta


def run_stages(ctx: RunContext) -> dict[str, Any]:
    """The stages of ``pipeline.run_plan.run_stages``, in its order (``mid plan`` costs the same list)."""
    cfg, out_dir = ctx.cfg, ctx.out_dir
    # They all read the clean dataset, so they train together before the pool (models.run_many).
    dataset, trained, pool_keys = prepare_pool(ctx, run_plan.trained_classifiers(cfg))
    for row in run_plan.rows_after_pool(cfg):  # the classifier rows trained before the pool
        defense, stage = defense_class(row), row_stage(row)
        assert isinstance(stage, AfterPoolStage), (row, stage)  # run_plan and rows agree on what trains after the pool
        trained[defense.kind] = stage.train(ctx, dataset, defense, trained, pool_keys)
    defenses = {row: row_models(row, trained) for row in cfg.eval.defenses}  # the table's rows, in the config's order
    stored, meta = stored_test_attacks(ctx, dataset, trained)
    for stage, manifest in trained.items():
        metrics.write_history(out_dir, stage, manifest["history"])
    crafted_on = {p: m["source_model"]["key"] for p, m in meta.items() if "source_model" in m}
    tables = evaluate.run(ctx, dataset, defenses, stored, crafted_on)
    stages = {name: rec.as_dict() for name, rec in ctx.stages.items()}
    row_costs = costs.row_costs(cfg, dataset, stages)
    printed = report.write(out_dir, cfg.name, tables, meta, stages, cfg.eval.known, cfg.eval.unknown, row_costs)
    print(printed, flush=True)
    ctx.say(f"wrote {out_dir / 'report.md'}, report.html, results.json and the charts")
    return {"protocols": tables, "stages": stages, "costs": row_costs}
