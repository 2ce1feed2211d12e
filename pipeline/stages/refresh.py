"""Rows trained on a refreshed pool (MID-R, ATTA: workers/defenses; docs/design.md §4.1).

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
import threading
import time
from typing import Any

from pipeline import keys as key_rules
from pipeline.context import RunContext
from pipeline.ray_runtime import train_with_ray
from pipeline.stages import pool
from pipeline.stages.models import model_spec, worker_augmentation
from storage import checkpoints, fs, pools
from storage.datasets import DatasetReader
from storage.keys import content_key
from workers.defenses import defense_class
from workers.jobs import MIDJob


def rounds(ctx: RunContext, objective: str) -> list[tuple[int, int]]:
    """Each round's epochs [first, stop)."""
    epochs, every = ctx.cfg.refreshed_training(objective)[0], ctx.cfg.pool.refresh.every
    return [(r * every, min(epochs, (r + 1) * every)) for r in range(math.ceil(epochs / every))]


def group_job(ctx: RunContext, dataset: DatasetReader, row: str, first_round: int, plan: list[tuple[int, int]],
              first_key: str, variants: int, init: str | None, teacher_key: str, rounds_url: str,
              in_memory: bool) -> MIDJob:
    """The job of one worker group training rounds ``first_round``, ... of ``plan``."""
    from workers.jobs import RefreshedRounds

    defense = defense_class(row)
    epochs, batch_size, lr, _ = ctx.cfg.refreshed_training(defense.objective)
    m = ctx.cfg.mid
    mid = defense.objective == "mid"
    return MIDJob(root=ctx.root, checkpoint_key=first_key, teacher_key=teacher_key if mid else None,
                  spec=model_spec(ctx, dataset).as_dict(), seed=ctx.cfg.seed, attacks=tuple(ctx.cfg.pool.attacks),
                  variants=variants, epochs=epochs, batch_size=batch_size, lr=lr, init_student=m.init_student,
                  bf16=m.bf16, step=m.step(on_gpu=ctx.cfg.ray.use_gpu), augmentation=worker_augmentation(ctx),
                  first_epoch=plan[first_round][0], init_checkpoint=init, objective=defense.objective,
                  commit_kind="mid_student" if mid else defense.kind, row=row,
                  refreshed=RefreshedRounds(dataset.key, first_round, tuple(plan[first_round:]), rounds_url,
                                            in_memory))


def rows_fit(ctx: RunContext, dataset: DatasetReader, pool_keys: dict[str, str], workers: int) -> bool:
    """Whether a worker may keep its rows of a round in memory (as ``read_views`` decides for MID)."""
    from pipeline.ray_runtime import WORKER_ROWS_BYTES
    from storage.datasource import AlignedViewsDatasource

    size = AlignedViewsDatasource(ctx.root, dataset.key, "train", pools=pool_keys).estimate_inmemory_data_size()
    return size / workers <= WORKER_ROWS_BYTES


def variants_of(ctx: RunContext, pool_keys: dict[str, str]) -> int:
    return max(pools.read_manifest(ctx.root, k)["attrs"]["variants"] for k in pool_keys.values())


def write_round(ctx: RunContext, dataset: DatasetReader, rounds_url: str, index: int, pool_keys: dict[str, str],
                key: str) -> None:
    """Tell the workers round ``index`` may start: its pool version is complete."""
    from workers.jobs import round_file

    fs.write_json_atomic(round_file(rounds_url, index), {
        "round": index, "pools": pool_keys, "checkpoint": key, "variants": variants_of(ctx, pool_keys),
        "samples": dataset.num_samples("train")})


def refreshed_spec(ctx: RunContext, attack: str, previous_key: str, reset: bool, round_index: int) -> pool.PoolSpec:
    p, how = ctx.cfg.pool, key_rules.refresh_settings(ctx.cfg, attack)
    return pool.PoolSpec(attack, "train", 1, p.encoding, p.delta_step, None, refresh_of=previous_key,
                         steps=how["steps"], step_size=how["step_size"], reset=reset,
                         seed=ctx.cfg.seed * 1_000_003 + round_index if reset else None)


def refresh_pools(ctx: RunContext, dataset: DatasetReader, row: str, round_index: int, previous: dict[str, str],
                  model: dict[str, Any], actors: list | None = None) -> tuple[dict[str, str], bool]:
    """Pool version ``round_index``: the refreshed attacks of version ``previous`` made against
    ``model`` (the last round's checkpoint manifest), on ``actors`` if given; the other attacks
    carried as they are. Returns ({attack: pool key}, whether every refreshed pool was already in the store)."""
    r = ctx.cfg.pool.refresh
    reset = r.reset_every is not None and round_index % r.reset_every == 0
    specs = [refreshed_spec(ctx, attack, previous[attack], reset, round_index) for attack in ctx.cfg.refreshed_attacks()]
    keys = {s.attack: content_key("pool", key_rules.refreshed_pool_payload(
        ctx.cfg, previous[s.attack], model["sha256"], s.attack, reset)) for s in specs}
    kind = defense_class(row).kind

    def build(attacks: list[str]) -> dict[str, bool]:
        ctx.say(f"{kind}: round {round_index}: {'regenerating' if reset else 'refreshing'} "
                f"{', '.join(attacks)} against round {round_index - 1}'s model")
        pool.build(ctx, dataset, kind, model, [(s, keys[s.attack]) for s in specs if s.attack in attacks],
                   actors)
        return {attack: True for attack in attacks}

    _, built = ctx.reuse_or_build_many({f"{kind}-pools-{round_index}": keys}, keys,
                                       lambda key: True if pool.is_complete(ctx, key) else None, build)
    return {**previous, **keys}, not built


def run(ctx: RunContext, dataset: DatasetReader, row: str, trained: dict[str, dict[str, Any]],
        first_pools: dict[str, str]) -> dict[str, Any]:
    """Train (or reuse) the row ``row`` round by round; returns its last round's manifest.

    The committed rounds are walked first (each round's key needs the last one's weights);
    the rest train in one Ray Train worker group, which the driver feeds: once round r's
    checkpoint is committed, it makes pool version r+1 with the pool actors and writes the
    round's file, which the waiting workers read on (docs/design.md §4.1)."""
    defense = defense_class(row)
    kind, mid = defense.kind, defense.objective == "mid"
    teacher = trained["teacher"]
    start = teacher if defense.init_from == "teacher" else trained["baseline"]
    run_key = content_key(f"{kind}-run", key_rules.refreshed_run_payload(
        ctx.cfg, row, dataset.fingerprint, start["sha256"], teacher["sha256"] if mid else None, first_pools))
    plan = rounds(ctx, defense.objective)
    with ctx.stage(kind) as record:
        ctx.say(f"{kind}: {len(plan)} rounds of {ctx.cfg.pool.refresh.every} epochs, the pool refreshed against "
                f"the {row} model between rounds ({ctx.cfg.pool.refresh.steps} steps per refresh)")
        pool_keys, model, summary = dict(first_pools), None, []

        def round_key(index: int) -> str:
            return content_key(kind, key_rules.refreshed_round_payload(run_key, index, pool_keys))

        def finished(index: int, manifest: dict[str, Any], cached: bool, seconds: dict[str, float]) -> None:
            summary.append({"round": index, "epochs": list(plan[index]), "checkpoint": manifest["key"],
                            "pools": dict(pool_keys), "cache_hit": cached, **seconds,
                            "pool_success": {a: pool.success_summary(ctx.root, k)["success_rate_stored"]
                                             for a, k in pool_keys.items()}})

        first = 0  # the first round not in the store
        while first < len(plan):
            started = time.perf_counter()
            if first > 0:
                pool_keys, _ = refresh_pools(ctx, dataset, row, first, pool_keys, model)
            key = round_key(first)
            ctx.claim(f"{kind}-round-{first}", key)
            found = checkpoints.verify_checkpoint(ctx.root, key)
            if found is None:
                break
            model = found
            finished(first, model, True, {"refresh_seconds": round(time.perf_counter() - started, 3)})
            first += 1
        if first < len(plan):
            model = train_rounds(ctx, dataset, row, plan, first, dict(pool_keys), model, start, teacher, round_key,
                                 finished,
                                 lambda index, last, actors: refresh_pools(ctx, dataset, row, index, pool_keys,
                                                                           last, actors),
                                 lambda keys: pool_keys.update(keys))
        ctx.claim(kind, model["key"])  # the row's model, as `mid export --row` finds it in the run's ref
        record["key"], record["cache_hit"] = model["key"], first == len(plan)
        record["details"] = {"sha256": model["sha256"], "rounds": summary, "final_epoch": model["history"][-1]}
    return model


def train_rounds(ctx: RunContext, dataset: DatasetReader, row: str, plan: list[tuple[int, int]], first: int,
                 pool_keys: dict[str, str], last_model: dict[str, Any] | None, start: dict[str, Any], teacher: dict[str, Any],
                 round_key, finished, refresh, set_pools) -> dict[str, Any]:
    """Rounds ``first``, ... of ``plan`` in one worker group, the driver refreshing between them."""
    import ray

    from workers.train_mid import train_mid_loop

    defense = defense_class(row)
    kind, mid = defense.kind, defense.objective == "mid"
    ctx.ensure_ray()
    key = round_key(first)
    workers = ctx.cfg.refreshed_training(defense.objective)[3]
    name = f"{kind}-{key}"
    rounds_url = fs.join(checkpoints.train_runs_url(ctx.root), name, "rounds")
    write_round(ctx, dataset, rounds_url, first, pool_keys, key)
    init = last_model["key"] if last_model is not None else (None if mid else start["key"])
    job = group_job(ctx, dataset, row, first, plan, key, variants_of(ctx, pool_keys), init, teacher["key"],
                    rounds_url, rows_fit(ctx, dataset, pool_keys, workers))
    ctx.say(f"{kind}: training rounds {first} to {len(plan) - 1} on {workers} Ray Train workers")
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["manifest"] = train_with_ray(ctx, train_mid_loop, {"job": job}, {}, workers, kind, key)
        except BaseException as e:  # handed to the driver's thread as is
            outcome["error"] = e

    # The refreshing actors live as long as the group: they take no CPU of their own, since
    # in this mode they work only while the workers wait for the next pool version.
    actors = pool.start_actors(ctx, dataset, "teacher" if mid and last_model is None else kind,
                               last_model or start, ctx.cfg.pool.num_actors, ctx.cfg.pool.bf16, num_cpus=0)
    thread = threading.Thread(target=fit, name=f"{kind}-rounds", daemon=True)
    thread.start()
    try:
        return feed_rounds(ctx, dataset, kind, plan, first, key, thread, outcome, actors, rounds_url, round_key,
                           finished, refresh, set_pools)
    finally:
        for actor in actors:
            ray.kill(actor)


def feed_rounds(ctx: RunContext, dataset: DatasetReader, kind: str, plan: list[tuple[int, int]], first: int,
                key: str, thread: threading.Thread, outcome: dict[str, Any], actors: list, rounds_url: str,
                round_key, finished, refresh, set_pools) -> dict[str, Any]:
    """The driver's side of a group's rounds: wait for each round's commit, make the next
    pool version and tell the workers; returns the last round's manifest."""
    model, index, round_started, refresh_seconds = None, first, time.perf_counter(), 0.0
    while index < len(plan):
        manifest = checkpoints.verify_checkpoint(ctx.root, key)
        if manifest is None:
            if not thread.is_alive():
                break  # the group stopped without committing the round: its error is raised below
            time.sleep(0.2)
            continue
        model, trained_at = manifest, time.perf_counter()
        finished(index, model, False, {"refresh_seconds": round(refresh_seconds, 3),
                                       "train_seconds": round(trained_at - round_started, 3)})
        index += 1
        if index < len(plan):
            keys, _ = refresh(index, model, actors)
            set_pools(keys)
            key = round_key(index)
            ctx.claim(f"{kind}-round-{index}", key)
            write_round(ctx, dataset, rounds_url, index, keys, key)
        round_started = time.perf_counter()
        refresh_seconds = round_started - trained_at
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    if model is None or index < len(plan):
        raise RuntimeError(f"{kind}: the worker group ended at round {index} of {len(plan)} without committing it")
    return model
