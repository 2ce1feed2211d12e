"""Pool: Ray actors attack the fixed source model shard by shard; one pool per attack."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from pipeline.context import PipelineError, RunContext
from storage import pools
from storage.datasets import DatasetReader
from storage.keys import content_key
from workers.attacks import make_attack, parse_attack_name

SPLIT = "train"


def stored_variants(ctx: RunContext, attack: str) -> int:
    """K random-start variants for a stochastic attack, one for a deterministic one."""
    return ctx.cfg.pool.variants if make_attack(attack, ctx.cfg.attacks.family_settings()).stochastic else 1


def pool_key(ctx: RunContext, dataset: DatasetReader, source: dict[str, Any], attack: str) -> str:
    family, _ = parse_attack_name(attack)
    p = ctx.cfg.pool
    return content_key("pool", {
        "dataset": dataset.fingerprint, "split": SPLIT, "source_sha256": source["sha256"],
        "attack": attack, "settings": getattr(ctx.cfg.attacks, family).model_dump(),
        "seed": ctx.cfg.seed, "variants": stored_variants(ctx, attack), "encoding": p.encoding, "delta_step": p.delta_step,
        "compressor": p.compressor, "shard_size": p.shard_size, "format_version": pools.FORMAT_VERSION,
    })


def run(ctx: RunContext, dataset: DatasetReader, source: dict[str, Any]) -> dict[str, str]:
    """Generate (or reuse) every pool of the config; returns {attack name: pool key}."""
    p = ctx.cfg.pool
    with ctx.stage("pool") as record:
        keys = {attack: pool_key(ctx, dataset, source, attack) for attack in p.attacks}
        record["key"] = content_key("pool-set", {"pools": keys})
        ctx.claim("pools", keys)
        hits = {attack: is_complete(ctx, key) for attack, key in keys.items()}
        missing = [attack for attack, hit in hits.items() if not hit]
        with ctx.build_locks([keys[attack] for attack in missing]):
            # Another run may have finished some of them while this one waited.
            hits.update({attack: is_complete(ctx, keys[attack]) for attack in missing})
            for attack, hit in hits.items():
                if hit:
                    ctx.say(f"pool {attack}: complete pool {keys[attack]} found, not regenerating")
            build(ctx, dataset, source, {a: keys[a] for a, hit in hits.items() if not hit})
        record["cache_hit"] = all(hits.values())
        record["details"] = {"attacks": {a: {"key": keys[a], "cache_hit": hits[a],
                                             **success_summary(ctx.root, keys[a])} for a in keys}}
    return keys


def is_complete(ctx: RunContext, key: str) -> bool:
    return bool((pools.read_manifest(ctx.root, key) or {}).get("complete"))


def build(ctx: RunContext, dataset: DatasetReader, source: dict[str, Any], keys: dict[str, str]) -> None:
    """Generate the missing shards of the pools ``keys`` ({attack: key}), then finalize each."""
    p = ctx.cfg.pool
    n = dataset.num_samples(SPLIT)
    ranges = pools.shard_ranges(n, p.shard_size)
    todo = []
    for attack, key in keys.items():
        family, _ = parse_attack_name(attack)
        variants = stored_variants(ctx, attack)
        pools.create_pool(ctx.root, key, num_samples=n, image_shape=dataset.image_shape(),
                          variants=variants, shard_size=p.shard_size, compressor=p.compressor,
                          encoding=p.encoding, delta_step=p.delta_step,
                          attrs={"attack": attack, "settings": getattr(ctx.cfg.attacks, family).model_dump(),
                                 "dataset": dataset.fingerprint, "dataset_key": dataset.key, "split": SPLIT,
                                 "source_model": {"kind": p.source_model, **source_summary(source)},
                                 "seed": ctx.cfg.seed})
        done = pools.committed_shards(ctx.root, key)
        todo += [(key, attack, variants, i, lo, hi) for i, (lo, hi) in enumerate(ranges) if i not in done]
        if done:
            ctx.say(f"pool {attack}: resuming, {len(done)}/{len(ranges)} shards already committed")
    if todo:
        generate(ctx, dataset, source, todo)
    for attack, key in keys.items():
        pools.finalize_pool(ctx.root, key, len(ranges), {"attack": attack})


def source_summary(source: dict[str, Any]) -> dict[str, Any]:
    return {"key": source["key"], "sha256": source["sha256"]}


def success_summary(root: str, key: str) -> dict[str, float]:
    shards = pools.read_manifest(root, key)["shards"]
    total = sum(s["stop"] - s["start"] for s in shards)
    rate = {k: sum(s["stats"][k] * (s["stop"] - s["start"]) for s in shards) / total
            for k in ("success_rate_float", "success_rate_stored")}
    return {k: round(100 * v, 2) for k, v in rate.items()}


def generate(ctx: RunContext, dataset: DatasetReader, source: dict[str, Any], todo: list[tuple]) -> None:
    import ray
    from ray.util import ActorPool

    from workers.pool_generation import PoolGenerator

    ctx.ensure_ray()
    p = ctx.cfg.pool
    actor_cls = ray.remote(num_cpus=ctx.cfg.ray.cpus_per_actor)(PoolGenerator)
    actors = [actor_cls.remote(ctx.root, dataset.key, SPLIT, p.source_model, source["key"], dataset.num_classes)
              for _ in range(min(p.num_actors, len(todo)))]
    family_settings = ctx.cfg.attacks.family_settings()
    ctx.say(f"pool: generating {len(todo)} shards on {len(actors)} actors against the {p.source_model}")
    work = ActorPool(actors).map_unordered(
        lambda actor, t: actor.generate.remote(*t, family_settings=family_settings, batch_size=p.batch_size,
                                               seed=ctx.cfg.seed, delta_step=p.delta_step), todo)
    done = 0
    try:
        for _ in tqdm(work, total=len(todo), desc="pool shards", unit="shard"):
            done += 1
    except ray.exceptions.RayActorError as e:
        # A lost worker or node costs only the shards in flight: every committed shard stays.
        raise PipelineError(f"pool generation stopped after {done}/{len(todo)} shards: a pool actor died "
                           f"({type(e).__name__}). Committed shards are kept; rerun the same command "
                           f"to generate only the missing ones.") from None
    finally:
        for actor in actors:
            ray.kill(actor)
