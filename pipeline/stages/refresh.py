"""Rows trained on a refreshed pool (MID-R, ATTA: workers/defenses; docs/design.md §4.3).

The row trains in rounds of ``pool.refresh.every`` epochs. Round r trains on pool version r
(version 0: the stored training pool); then version r+1 is made: every refreshed attack's
pool r continued by ``pool.refresh.steps`` attack steps against round r's model (the row's
own model: C_t ∘ E_s for MID-R, the classifier for ATTA), by the pool actors. Each round's
checkpoint and each pool version is a content-keyed entry of the store, claimed by the run,
so a rerun reuses them and an interrupted run resumes at the round (and the shard) it
reached. Rounds alternate: this is the deterministic mode, and a pool is at most ``every``
epochs stale.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline import keys as key_rules
from pipeline.context import RunContext
from pipeline.ray_runtime import read_views, train_with_ray
from pipeline.stages import pool
from pipeline.stages.models import model_spec, worker_augmentation
from storage import checkpoints, pools
from storage.datasets import DatasetReader
from storage.keys import content_key
from workers.defenses import defense_class
from workers.jobs import MIDJob


def training(ctx: RunContext, objective: str) -> tuple[int, int, float, int]:
    """(epochs, batch size, learning rate, workers): MID's section for MID's step, AT's
    section for cross-entropy (ATTA is AT at equal training steps)."""
    if objective == "mid":
        m = ctx.cfg.mid
        return m.epochs, m.batch_size, m.lr, m.num_workers
    at = ctx.cfg.models.at
    return at.epochs, at.batch_size, at.lr, ctx.cfg.models.num_workers


def rounds(ctx: RunContext, objective: str) -> list[tuple[int, int]]:
    """Each round's epochs [first, stop)."""
    epochs, every = training(ctx, objective)[0], ctx.cfg.pool.refresh.every
    return [(r * every, min(epochs, (r + 1) * every)) for r in range(math.ceil(epochs / every))]


def round_job(ctx: RunContext, dataset: DatasetReader, row: str, key: str, epochs: tuple[int, int],
              pool_keys: dict[str, str], variants: int, init: str | None, teacher_key: str) -> MIDJob:
    defense = defense_class(row)
    _, batch_size, lr, _ = training(ctx, defense.objective)
    m = ctx.cfg.mid
    mid = defense.objective == "mid"
    return MIDJob(root=ctx.root, checkpoint_key=key, teacher_key=teacher_key if mid else None,
                  spec=model_spec(ctx, dataset).as_dict(), seed=ctx.cfg.seed, attacks=tuple(pool_keys),
                  variants=variants, epochs=epochs[1], batch_size=batch_size, lr=lr, init_student=m.init_student,
                  bf16=m.bf16, step=m.step(on_gpu=ctx.cfg.ray.use_gpu), augmentation=worker_augmentation(ctx),
                  first_epoch=epochs[0], init_checkpoint=init, objective=defense.objective,
                  commit_kind="mid_student" if mid else defense.kind, row=row)


def train_round(ctx: RunContext, dataset: DatasetReader, job: MIDJob, pool_keys: dict[str, str],
                stage: str) -> dict[str, Any]:
    from storage.datasource import AlignedViewsDatasource
    from workers.train_mid import train_mid_loop, variant_dataset_name

    ctx.ensure_ray()
    variants = {variant_dataset_name(k): read_views(
                    AlignedViewsDatasource(ctx.root, dataset.key, "train", pools=pool_keys, variant=k))
                for k in range(job.variants)}
    workers = training(ctx, job.objective)[3]
    return train_with_ray(ctx, train_mid_loop, {"job": job}, variants, workers, stage, job.checkpoint_key)


def refreshed_spec(ctx: RunContext, attack: str, previous_key: str, reset: bool, round_index: int) -> pool.PoolSpec:
    p, how = ctx.cfg.pool, key_rules.refresh_settings(ctx.cfg, attack)
    return pool.PoolSpec(attack, "train", 1, p.encoding, p.delta_step, None, refresh_of=previous_key,
                         steps=how["steps"], step_size=how["step_size"], reset=reset,
                         seed=ctx.cfg.seed * 1_000_003 + round_index if reset else None)


def refresh_pools(ctx: RunContext, dataset: DatasetReader, row: str, round_index: int, previous: dict[str, str],
                  model: dict[str, Any]) -> tuple[dict[str, str], bool]:
    """Pool version ``round_index``: the refreshed attacks of version ``previous`` made against
    ``model`` (the last round's checkpoint manifest); the other attacks carried as they are.
    Returns ({attack: pool key}, whether every refreshed pool was already in the store)."""
    r = ctx.cfg.pool.refresh
    reset = r.reset_every is not None and round_index % r.reset_every == 0
    specs = [refreshed_spec(ctx, attack, previous[attack], reset, round_index) for attack in ctx.cfg.refreshed_attacks()]
    keys = {s.attack: content_key("pool", key_rules.refreshed_pool_payload(
        ctx.cfg, previous[s.attack], model["sha256"], s.attack, reset)) for s in specs}
    kind = defense_class(row).kind

    def build(attacks: list[str]) -> dict[str, bool]:
        ctx.say(f"{kind}: round {round_index}: {'regenerating' if reset else 'refreshing'} "
                f"{', '.join(attacks)} against round {round_index - 1}'s model")
        pool.build(ctx, dataset, kind, model, [(s, keys[s.attack]) for s in specs if s.attack in attacks])
        return {attack: True for attack in attacks}

    _, built = ctx.reuse_or_build_many({f"{kind}-pools-{round_index}": keys}, keys,
                                       lambda key: True if pool.is_complete(ctx, key) else None, build)
    return {**previous, **keys}, not built


def run(ctx: RunContext, dataset: DatasetReader, row: str, trained: dict[str, dict[str, Any]],
        first_pools: dict[str, str]) -> dict[str, Any]:
    """Train (or reuse) the row ``row`` round by round; returns its last round's manifest."""
    defense = defense_class(row)
    kind, mid = defense.kind, defense.objective == "mid"
    teacher = trained["teacher"]
    start = teacher if defense.init_from == "teacher" else trained["baseline"]
    run_key = content_key(f"{kind}-run", key_rules.refreshed_run_payload(
        ctx.cfg, row, dataset.fingerprint, start["sha256"], teacher["sha256"] if mid else None, first_pools))
    with ctx.stage(kind) as record:
        plan = rounds(ctx, defense.objective)
        ctx.say(f"{kind}: {len(plan)} rounds of {ctx.cfg.pool.refresh.every} epochs, the pool refreshed against "
                f"the {row} model between rounds ({ctx.cfg.pool.refresh.steps} steps per refresh)")
        pool_keys, model, summary, hits = dict(first_pools), None, [], []
        for r, epochs in enumerate(plan):
            pools_hit = True
            if r > 0:
                pool_keys, pools_hit = refresh_pools(ctx, dataset, row, r, pool_keys, model)
            key = content_key(kind, key_rules.refreshed_round_payload(run_key, r, pool_keys))
            init = model["key"] if model is not None else (None if mid else start["key"])
            variants = max(pools.read_manifest(ctx.root, k)["attrs"]["variants"] for k in pool_keys.values())
            job = round_job(ctx, dataset, row, key, epochs, pool_keys, variants, init, teacher["key"])
            model, hit = ctx.reuse_or_build(f"{kind}-round-{r}", key,
                                            lambda: checkpoints.verify_checkpoint(ctx.root, key),
                                            lambda: train_round(ctx, dataset, job, pool_keys, kind))
            hits.append(hit and pools_hit)
            summary.append({"round": r, "epochs": list(epochs), "checkpoint": key, "pools": dict(pool_keys),
                            "cache_hit": hit and pools_hit,
                            "pool_success": {a: pool.success_summary(ctx.root, k)["success_rate_stored"]
                                             for a, k in pool_keys.items()}})
        record["key"], record["cache_hit"] = model["key"], all(hits)
        record["details"] = {"sha256": model["sha256"], "rounds": summary, "final_epoch": model["history"][-1]}
    return model
