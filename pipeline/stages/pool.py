"""Pools: Ray actors attack a fixed model shard by shard; one pool per attack.

The training pool (split ``train``, the attacks of ``pool.attacks``, K random-start variants,
against ``pool.source_model``) and the stored test attacks of the source and transfer
protocols (split ``test``, one variant, against the source model or the substitute; see
``run_test_attacks`` below) are the same kind of entry, made by the same code.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any


from pipeline.console import progress
from pipeline.context import RunContext
from pipeline.errors import PipelineError
from pipeline.keys import pool_payload
from pipeline.stages.work_order import attack_cost, longest_first
from storage import pools
from storage.datasets import DatasetReader, subset_indices
from storage.keys import content_key
from workers.attacks import make_attack, parse_attack_name


@dataclass(frozen=True)
class PoolSpec:
    """One pool: an attack on one split against one fixed model. A pool comes to be in one
    of five ways, each a type below, which says how its shards are made (``submit``) and
    what its attributes record beyond the attack's (``attrs``)."""

    attack: str
    split: str
    variants: int
    encoding: str
    delta_step: int
    indices: list[int] | None  # a seeded subset of the split, or None for all of it

    random_start = False  # a uniform random point of the ε-ball instead of an attack (its key says so)

    def num_samples(self, dataset: DatasetReader) -> int:
        return dataset.num_samples(self.split) if self.indices is None else len(self.indices)

    def seed(self, run_seed: int) -> int:
        return run_seed

    def attrs(self) -> dict[str, Any]:
        return {}

    def submit(self, actor, key: str, shard: int, lo: int, hi: int, run: dict[str, Any]):
        """The actor call that makes shard ``shard`` (samples [lo, hi)); ``run``: the run's
        family_settings, batch_size, seed and target."""
        return actor.generate.remote(key, self.attack, self.split, self.variants, shard, lo, hi,
                                     indices=self.indices and self.indices[lo:hi],
                                     family_settings=run["family_settings"], batch_size=run["batch_size"],
                                     seed=self.seed(run["seed"]), delta_step=self.delta_step, target=run["target"],
                                     random_start=self.random_start)


@dataclass(frozen=True)
class GeneratedPool(PoolSpec):
    """The attack run from the clean images: the training pool, a stored test attack."""


@dataclass(frozen=True)
class RandomStartPool(PoolSpec):
    """``pool.refresh.start: random``: version 0 of a refreshed row, a uniform random point of
    the ε-ball per sample (with the attack's targets), made without attack steps."""

    random_start = True

    def attrs(self) -> dict[str, Any]:
        return {"random_start": True}


@dataclass(frozen=True)
class RefreshedVersion(PoolSpec):
    """A version of a refreshed row's pool (pipeline/stages/refresh.py): the next after pool
    ``refresh_of``, made against the row's model with ``steps`` steps of ``step_size``."""

    refresh_of: str
    steps: int
    step_size: float

    def attrs(self) -> dict[str, Any]:
        return {"refresh": {"of": self.refresh_of, "steps": self.steps, "step_size": self.step_size,
                            "reset": False}}


@dataclass(frozen=True)
class ContinuedPool(RefreshedVersion):
    """Every view of the last version continued by ``steps`` attack steps."""

    def submit(self, actor, key, shard, lo, hi, run):
        return actor.refresh.remote(key, self.refresh_of, self.attack, shard, lo, hi,
                                    family_settings=run["family_settings"], steps=self.steps,
                                    step_size=self.step_size, batch_size=run["batch_size"],
                                    delta_step=self.delta_step)


@dataclass(frozen=True)
class RegeneratedPool(RefreshedVersion):
    """``pool.refresh.reset_every``: the attack made afresh, from the random starts of ``reset_seed``."""

    reset_seed: int

    def seed(self, run_seed: int) -> int:
        return self.reset_seed

    def attrs(self) -> dict[str, Any]:
        attrs = super().attrs()
        attrs["refresh"]["reset"] = True
        return attrs


@dataclass(frozen=True)
class CarriedPool(RefreshedVersion):
    """Staleness zero (``pool.refresh.every: 0``): the views the training workers continued in
    their steps and carried in the round checkpoint ``carried_from``, stored as they are."""

    carried_from: str
    # ``pool.refresh.success_samples``: the sorted training samples whose success against the
    # round's model is measured (None: every sample). The views stored are the same either way.
    measured: tuple[int, ...] | None = None

    def attrs(self) -> dict[str, Any]:
        attrs = super().attrs()
        attrs["refresh"]["carried_from"] = self.carried_from
        if self.measured is not None:
            attrs["refresh"]["success_samples"] = len(self.measured)
        return attrs

    def submit(self, actor, key, shard, lo, hi, run):
        measured = None
        if self.measured is not None:
            first, last = bisect.bisect_left(self.measured, lo), bisect.bisect_left(self.measured, hi)
            measured = list(self.measured[first:last])
        return actor.carry.remote(key, self.refresh_of, self.carried_from, self.attack, shard, lo, hi,
                                  family_settings=run["family_settings"], batch_size=run["batch_size"],
                                  measured=measured)


def training_pool_spec(ctx: RunContext, attack: str) -> PoolSpec:
    p = ctx.cfg.pool
    # K random-start variants for a stochastic attack, one for a deterministic one.
    variants = p.variants if make_attack(attack, ctx.cfg.attacks.family_settings()).stochastic else 1
    linf = ctx.cfg.attacks.linf_eps(attack) is not None
    return GeneratedPool(attack, "train", variants, p.encoding if linf else "uint8", p.delta_step if linf else 1, None)


def eval_pool_spec(ctx: RunContext, dataset: DatasetReader, attack: str) -> PoolSpec:
    """A stored test attack: one variant, exact uint8 rounding (never a coarser grid), and the
    seeded subset ``eval.subset`` gives it, if any."""
    eps = ctx.cfg.attacks.linf_eps(attack)
    indices = subset_indices(dataset.num_samples("test"), ctx.cfg.eval.subset.get(attack), ctx.cfg.seed)
    fits_int8 = eps is not None and eps <= pools.INT8_MAX_EPS
    return GeneratedPool(attack, "test", 1, "int8_delta" if fits_int8 else "uint8", 1, indices)


def pool_key(ctx: RunContext, dataset: DatasetReader, source: dict[str, Any], spec: PoolSpec) -> str:
    return content_key("pool", pool_payload(ctx.cfg, dataset.fingerprint, source["sha256"], spec))


def run(ctx: RunContext, dataset: DatasetReader, source: dict[str, Any]) -> dict[str, str]:
    """Generate (or reuse) the training pool of every attack of ``pool.attacks``; returns
    {attack name: pool key}."""
    specs = [training_pool_spec(ctx, attack) for attack in ctx.cfg.pool.attacks]
    return build_stage(ctx, "pool", "pools", dataset, ctx.cfg.pool.source_model, source, specs)


def run_test_attacks(ctx: RunContext, dataset: DatasetReader, protocol: str, source_kind: str,
                     source: dict[str, Any]) -> dict[str, str]:
    """The stored test attacks of the ``source`` or ``transfer`` protocol: every attack of the
    table crafted once against ``source``, as pools of the test split ({attack: key})."""
    specs = [eval_pool_spec(ctx, dataset, attack) for attack in ctx.cfg.eval.attacks]
    return build_stage(ctx, f"attacks-{protocol}", f"test-attacks-{protocol}", dataset, source_kind, source, specs)


def build_stage(ctx: RunContext, stage: str, label: str, dataset: DatasetReader, source_kind: str,
                source: dict[str, Any], specs: list[PoolSpec]) -> dict[str, str]:
    """The stage ``stage``: every pool of ``specs`` against ``source``, reused when complete."""
    with ctx.stage(stage) as record:
        keys = {s.attack: pool_key(ctx, dataset, source, s) for s in specs}
        record["key"] = content_key("pool-set", {"pools": keys})

        def say_found(found: list[str]) -> None:
            ctx.say(f"{stage}: {len(found)} of {len(keys)} pools complete in the store, not regenerating "
                    f"({', '.join(found)})")

        def generate(attacks: list[str]) -> dict[str, bool]:
            build(ctx, dataset, source_kind, source, [(s, keys[s.attack]) for s in specs if s.attack in attacks])
            return {attack: True for attack in attacks}

        _, generated = ctx.reuse_or_build_many(
            {label: keys}, keys, lambda key: True if is_complete(ctx, key) else None, generate, say_found)
        hits = {attack: attack not in generated for attack in keys}
        record["cache_hit"] = all(hits.values())
        record["details"] = {"source_model": source_kind, "attacks": {
            s.attack: {"key": keys[s.attack], "cache_hit": hits[s.attack], "split": s.split,
                       "samples": s.num_samples(dataset), **success_summary(ctx.root, keys[s.attack])}
            for s in specs}}
    return keys


def is_complete(ctx: RunContext, key: str) -> bool:
    return bool((pools.read_manifest(ctx.root, key) or {}).get("complete"))


def build(ctx: RunContext, dataset: DatasetReader, source_kind: str, source: dict[str, Any],
          todo_pools: list[tuple[PoolSpec, str]], actors: list | None = None) -> None:
    """Generate the missing shards of the pools ``todo_pools`` ([(spec, key)]) (on ``actors``,
    if given: ``generate``), then finalize each."""
    p = ctx.cfg.pool
    todo, ranges_of = [], {}
    for spec, key in todo_pools:
        family, _ = parse_attack_name(spec.attack)
        threat_model = make_attack(spec.attack, ctx.cfg.attacks.family_settings()).threat_model
        ranges = ranges_of[key] = pools.shard_ranges(spec.num_samples(dataset), p.shard_size)
        pools.create_pool(ctx.root, key, num_samples=spec.num_samples(dataset), image_shape=dataset.image_shape(),
                          variants=spec.variants, shard_size=p.shard_size, compressor=p.compressor,
                          encoding=spec.encoding, delta_step=spec.delta_step,
                          attrs={"attack": spec.attack, "settings": getattr(ctx.cfg.attacks, family).model_dump(),
                                 "threat_model": threat_model, "target": ctx.cfg.attacks.target,
                                 "dataset": dataset.fingerprint, "dataset_key": dataset.key, "split": spec.split,
                                 "indices": spec.indices,
                                 "source_model": {"kind": source_kind, **source_summary(source)},
                                 "seed": spec.seed(ctx.cfg.seed), **spec.attrs()})
        done = pools.committed_shards(ctx.root, key)
        todo += [(key, spec, i, lo, hi) for i, (lo, hi) in enumerate(ranges) if i not in done]
        if done:
            ctx.say(f"pool {spec.attack} ({spec.split}): resuming, {len(done)}/{len(ranges)} shards already committed")
    if todo:
        generate(ctx, dataset, source_kind, source, todo, actors)
    for spec, key in todo_pools:
        pools.finalize_pool(ctx.root, key, len(ranges_of[key]), {"attack": spec.attack})


def source_summary(source: dict[str, Any]) -> dict[str, Any]:
    return {"key": source["key"], "sha256": source["sha256"]}


def success_summary(root: str, key: str) -> dict[str, float]:
    """The attack's success rate (%) against the model it was crafted on, before and after
    rounding to uint8, over the samples it was measured on (every sample, or a carried
    version's seeded sample: ``pool.refresh.success_samples``)."""
    shards = pools.read_manifest(root, key)["shards"]
    measured = [s["stats"].get("measured_samples", s["stop"] - s["start"]) for s in shards]
    total = max(sum(measured), 1)
    rate = {k: sum(s["stats"][k] * n for s, n in zip(shards, measured)) / total
            for k in ("success_rate_float", "success_rate_stored")}
    return {k: round(100 * v, 2) for k, v in rate.items()}


def start_actors(ctx: RunContext, dataset: DatasetReader, source_kind: str, source: dict[str, Any], count: int,
                 bf16: bool, num_cpus: float | None = None) -> list:
    """``count`` pool actors attacking ``source``; ``num_cpus``: instead of ray.cpus_per_actor."""
    import ray

    from workers.pool_generation import PoolGenerator

    options = {**ctx.actor_options(), **({"num_cpus": num_cpus} if num_cpus is not None else {})}
    actor_cls = ray.remote(**options)(PoolGenerator)
    return [actor_cls.remote(ctx.root, dataset.key, source_kind, source["key"], dataset.num_classes, bf16=bf16)
            for _ in range(count)]


def generate(ctx: RunContext, dataset: DatasetReader, source_kind: str, source: dict[str, Any],
             todo: list[tuple], actors: list | None = None) -> None:
    """Generate the shards ``todo`` on new actors, or on ``actors`` (kept alive), which are
    pointed at ``source`` first."""
    import ray
    from ray.util import ActorPool

    ctx.ensure_ray()
    p = ctx.cfg.pool
    if ctx.cfg.attacks.target != "random" and ctx.cfg.attacks.target >= dataset.num_classes:
        raise PipelineError(f"attacks.target: {ctx.cfg.attacks.target} is not a class of this dataset "
                            f"(0 to {dataset.num_classes - 1})")
    owned = actors is None
    if owned:
        # bf16 speeds up the training pool only: the stored test attacks are measurements, kept float32.
        bf16 = p.bf16 and all(spec.split == "train" for _, spec, *_ in todo)
        actors = start_actors(ctx, dataset, source_kind, source, min(p.num_actors, len(todo)), bf16)
    else:
        ray.get([actor.load_source.remote(source_kind, source["key"]) for actor in actors])
    family_settings = ctx.cfg.attacks.family_settings()
    splits = sorted({spec.split for _, spec, *_ in todo})
    if owned:  # a refreshed row's own actors: its stage says what they do, round by round
        verb = "refreshing" if all(isinstance(spec, RefreshedVersion) for _, spec, *_ in todo) else "generating"
        ctx.say(f"pool: {verb} {len(todo)} shards ({'/'.join(splits)} split) on {len(actors)} actors "
                f"against the {source_kind}")

    run = {"family_settings": family_settings, "batch_size": p.batch_size, "seed": ctx.cfg.seed,
           "target": ctx.cfg.attacks.target}

    def submit(actor, task):
        key, spec, shard, lo, hi = task
        return spec.submit(actor, key, shard, lo, hi, run)

    def cost(task: tuple) -> tuple[float, int]:
        _, spec, _, lo, hi = task
        return attack_cost(spec.attack, hi - lo, family_settings), hi - lo

    work = ActorPool(actors).map_unordered(submit, longest_first(todo, cost))
    done = 0
    try:
        for _ in progress(work, total=len(todo), desc="pool shards", unit="shard"):
            done += 1
    except ray.exceptions.RayActorError as e:
        # A lost worker or node costs only the shards in flight: every committed shard stays.
        raise PipelineError(f"pool generation stopped after {done}/{len(todo)} shards: a pool actor died "
                           f"({type(e).__name__}). Committed shards are kept; rerun the same command "
                           f"to generate only the missing ones.") from None
    finally:
        if owned:
            for actor in actors:
                ray.kill(actor)
