"""One run, stage after stage: ingest → baseline, teacher → pool → mid, AT, TRADES → eval → report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import metrics, report
from pipeline.config import RunConfig
from pipeline.context import RunContext
from pipeline.stages import evaluate, ingest, mid, models, pool


def prepare_pool(ctx: RunContext):
    dataset = ingest.run(ctx)
    baseline = models.run(ctx, dataset, "baseline")
    teacher = models.run(ctx, dataset, "teacher")
    source = baseline if ctx.cfg.pool.source_model == "baseline" else teacher
    pool_keys = pool.run(ctx, dataset, source)
    return dataset, baseline, teacher, pool_keys


def run_pool(cfg: RunConfig, out_dir: Path) -> dict[str, str]:
    """The stages up to the pool; the store keeps them under the ref ``<name>-pool``."""
    with RunContext(cfg, out_dir, ref_name=f"{cfg.name}-pool") as ctx:
        _, _, _, pool_keys = prepare_pool(ctx)
    for name, rec in ctx.stages.items():
        print(f"{name:<9} {rec.key:<34} {'cached' if rec.cache_hit else 'built':<7} {rec.seconds:8.1f} s")
    return pool_keys


def classifier_row(manifest: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "classifier", "key": manifest["key"], "sha256": manifest["sha256"]}


def run(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Every stage; the store keeps what the run used under the ref ``<name>``, from its start
    (so an interrupted run keeps its outputs and resume state) until a later run replaces it."""
    with RunContext(cfg, out_dir) as ctx:
        return run_stages(ctx)


def run_stages(ctx: RunContext) -> dict[str, Any]:
    cfg, out_dir = ctx.cfg, ctx.out_dir
    dataset, baseline, teacher, pool_keys = prepare_pool(ctx)
    trained = {"baseline": baseline, "teacher": teacher}
    defenses = {}
    for row in cfg.eval.defenses:  # the table's rows, in the config's order
        if row == "None":
            defenses[row] = classifier_row(baseline)
        elif row == "MID":
            student = trained["mid"] = mid.run(ctx, dataset, teacher, pool_keys)
            defenses[row] = {"kind": "defended", "student_key": student["key"], "teacher_key": teacher["key"],
                             "sha256": [student["sha256"], teacher["sha256"]]}
        else:
            kind = row.lower()
            trained[kind] = models.run(ctx, dataset, kind)
            defenses[row] = classifier_row(trained[kind])
    for stage, manifest in trained.items():
        metrics.write_history(out_dir, stage, manifest["history"])
    results = evaluate.run(ctx, dataset, defenses)
    table = {name: results[name] for name in defenses}  # the table's row order, not the JSON's
    stages = {name: rec.as_dict() for name, rec in ctx.stages.items()}
    printed = report.write(out_dir, cfg.name, table, stages, cfg.eval.known, cfg.eval.unknown)
    print(printed, flush=True)
    ctx.say(f"wrote {out_dir / 'report.md'} and {out_dir / 'results.json'}")
    return {"defenses": table, "stages": stages}
