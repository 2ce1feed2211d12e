"""Rows trained on a refreshed pool (MID-R, ATTA: workers/defenses; docs/design.md §4.1).

The row trains in rounds of ``pool.refresh.every`` epochs. Round r trains on pool version r
(version 0: the stored training pool); then version r+1 is made: every refreshed attack's
pool r continued by ``pool.refresh.steps`` attack steps against round r's model (the row's
own model: C_t ∘ E_s for MID-R, the classifier for ATTA), by the pool actors. Each round's
checkpoint and each pool version is a content-keyed entry of the store, claimed by the run,
so a rerun reuses them and an interrupted run resumes at the round (and the shard) it
reached. Rounds alternate with refreshes, and a pool is at most ``every`` epochs stale; or,
with ``pool.refresh.overlap``, version r+1 is made against round r-1's model while round r
trains (the start model for version 1): the actors work beside the workers, a pool is one
round staler, and both modes are deterministic.

``every: 0`` is staleness zero: a round is one epoch, the workers continue each batch's
views against the live model just before its step (workers/refresh_in_step.py) and carry
them in the round's checkpoint, and version r+1 is those carried views, stored by the pool
actors (``PoolGenerator.carry``). Still deterministic and resumable by round.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import replace
from typing import Any

from pipeline import keys as key_rules
from pipeline import run_plan
from pipeline.context import RunContext
from pipeline.training import train_with_ray
from pipeline.stages import pool
from pipeline.stages.models import model_spec, worker_augmentation
from storage import checkpoints, pools
from storage.datasets import DatasetReader, subset_indices
from storage.keys import content_key
from workers.defenses import defense_class
from workers.attacks import make_attack
from workers.jobs import InStepRefresh, MIDJob, PoolClassifierJob, PoolJob, RefreshedAttack


def rounds(ctx: RunContext, row: str) -> list[tuple[int, int]]:
    """Each round's epochs [first, stop)."""
    epochs, every = run_plan.refreshed_training(ctx.cfg, row).epochs, max(1, ctx.cfg.pool.refresh.every)
    return [(r * every, min(epochs, (r + 1) * every)) for r in range(math.ceil(epochs / every))]


def in_step(ctx: RunContext) -> bool:
    """Staleness zero: the views are continued in the training step (workers/refresh_in_step.py)."""
    return ctx.cfg.pool.refresh.every == 0


def refreshed_spec(ctx: RunContext, attack: str, previous_key: str, reset: bool, round_index: int,
                   carried_from: str | None = None, train_samples: int = 0) -> pool.RefreshedVersion:
    """Version ``round_index`` of ``attack``'s pool, after ``previous_key``: regenerated (a
    reset), carried by the workers (staleness zero) or continued by the actors."""
    p, how = ctx.cfg.pool, key_rules.refresh_settings(ctx.cfg, attack)
    common = (attack, "train", 1, p.encoding, p.delta_step, None, previous_key, how["steps"], how["step_size"])
    if reset:
        return pool.RegeneratedPool(*common, reset_seed=ctx.cfg.seed * 1_000_003 + round_index)
    if carried_from is not None:
        measured = subset_indices(train_samples, p.refresh.success_samples, ctx.cfg.seed)
        return pool.CarriedPool(*common, carried_from=carried_from,
                                measured=tuple(measured) if measured is not None else None)
    return pool.ContinuedPool(*common)


def random_start_spec(ctx: RunContext, attack: str) -> pool.RandomStartPool:
    """Version 0 of ``attack``'s refreshed pool under ``pool.refresh.start: random``."""
    p = ctx.cfg.pool
    return pool.RandomStartPool(attack, "train", 1, p.encoding, p.delta_step, None)


def in_step_settings(ctx: RunContext) -> InStepRefresh:
    """What the workers continue in the step, and how (each attack's ε and step size; the ε
    warm-up, AT's unless set)."""
    family_settings = ctx.cfg.attacks.family_settings()
    attacks = []
    for name in run_plan.refreshed_attacks(ctx.cfg):
        attack = make_attack(name, family_settings)
        attacks.append(RefreshedAttack(name, attack.eps, key_rules.refresh_settings(ctx.cfg, name)["step_size"],
                                       attack.targeted))
    return InStepRefresh(tuple(attacks), ctx.cfg.pool.refresh.steps, ctx.cfg.pool.delta_step,
                         run_plan.refreshed_eps_warmup(ctx.cfg))


def run(ctx: RunContext, dataset: DatasetReader, row: str, trained: dict[str, dict[str, Any]],
        first_pools: dict[str, str]) -> dict[str, Any]:
    """Train (or reuse) the row ``row`` round by round; returns its last round's manifest."""
    return RefreshedRow(ctx, dataset, row, trained, first_pools).run()


class RefreshedRow:
    """One refreshed row's rounds: which are in the store, and the training of the others.

    The committed rounds are walked first (each round's key needs the last one's weights);
    the rest train in one Ray Train worker group, which the driver feeds through a
    ``RoundChannel`` actor: once the workers report round r's checkpoint committed, it makes
    pool version r+1 with the pool actors (with ``pool.refresh.overlap``: while round r
    trains, against round r-1's model) and publishes round r+1, which the waiting workers
    read on (docs/design.md §4.1)."""

    def __init__(self, ctx: RunContext, dataset: DatasetReader, row: str, trained: dict[str, dict[str, Any]],
                 first_pools: dict[str, str]):
        self.ctx, self.dataset, self.row = ctx, dataset, row
        defense = defense_class(row)
        self.kind, self.objective, self.mid = defense.kind, defense.objective, defense.objective == "mid"
        self.teacher = trained["teacher"]
        self.start = trained["teacher" if defense.init_from == "teacher" else "baseline"]
        # pool.refresh.start: random: version 0 of each refreshed attack is a random point of its
        # ε-ball, (success) measured against the row's starting model, instead of the stored pool.
        self.random_starts = ({a: random_start_spec(ctx, a) for a in run_plan.refreshed_attacks(ctx.cfg)}
                              if ctx.cfg.pool.refresh.start == "random" else {})
        first_pools = {**first_pools, **{a: pool.pool_key(ctx, dataset, self.start, spec)
                                         for a, spec in self.random_starts.items()}}
        self.run_key = content_key(f"{self.kind}-run", key_rules.refreshed_run_payload(
            ctx.cfg, row, dataset.fingerprint, self.start["sha256"], self.teacher["sha256"] if self.mid else None,
            first_pools))
        self.plan = rounds(ctx, self.row)
        self.versions = [dict(first_pools)]  # every pool version's {attack: key}, by index
        self.model: dict[str, Any] | None = None  # the newest committed round's manifest
        self.round_models: list[dict[str, Any]] = []  # every committed round's manifest, by index
        self.summary: list[dict[str, Any]] = []  # per round, for results.json

    def run(self) -> dict[str, Any]:
        ctx, r = self.ctx, self.ctx.cfg.pool.refresh
        with ctx.stage(self.kind) as record:
            if in_step(ctx):
                ctx.say(f"{self.kind}: {len(self.plan)} rounds of 1 epoch, each batch's views continued by "
                        f"{r.steps} steps against the live {self.row} model just before its step (staleness zero)")
            else:
                ctx.say(f"{self.kind}: {len(self.plan)} rounds of {r.every} epochs, the pool refreshed against "
                        f"the {self.row} model between rounds ({r.steps} steps per refresh)")
            self.make_random_starts()
            first = self.walk_committed()
            if first < len(self.plan):
                self.train_from(first)
            ctx.claim(self.kind, self.model["key"])  # the row's model, as `mid export --row` finds it in the ref
            record["key"], record["cache_hit"] = self.model["key"], first == len(self.plan)
            record["details"] = {"sha256": self.model["sha256"], "rounds": self.summary,
                                 "final_epoch": self.model["history"][-1]}
        return self.model

    def make_random_starts(self) -> None:
        """Version 0 of the refreshed attacks, when it is a random start (reused if stored)."""
        if not self.random_starts:
            return
        ctx, keys = self.ctx, {a: self.versions[0][a] for a in self.random_starts}

        def build(attacks: list[str]) -> dict[str, bool]:
            ctx.say(f"{self.kind}: round 0: random starts in the ε-ball for {', '.join(attacks)} (no attack steps)")
            pool.build(ctx, self.dataset, self.init_kind(), self.start,
                       [(self.random_starts[a], keys[a]) for a in attacks])
            return {attack: True for attack in attacks}

        ctx.reuse_or_build_many({f"{self.kind}-pools-0": keys}, keys,
                                lambda key: True if pool.is_complete(ctx, key) else None, build)

    def init_kind(self) -> str:
        """The kind of model the row starts from (the teacher or the baseline)."""
        return defense_class(self.row).init_from

    def round_key(self, index: int) -> str:
        """Round ``index``'s checkpoint key, trained on the newest pool version."""
        return content_key(self.kind, key_rules.refreshed_round_payload(self.run_key, index, self.versions[index]))

    def record_round(self, index: int, cached: bool, seconds: dict[str, float]) -> None:
        self.summary.append({"round": index, "epochs": list(self.plan[index]), "checkpoint": self.model["key"],
                             "pools": dict(self.versions[index]), "cache_hit": cached, **seconds,
                             "pool_success": {a: pool.success_summary(self.ctx.root, k)["success_rate_stored"]
                                              for a, k in self.versions[index].items()}})

    def walk_committed(self) -> int:
        """Follow the rounds already in the store (making a missing pool version on the way);
        returns the first round that is not."""
        for index in range(len(self.plan)):
            started = time.perf_counter()
            if index > 0:
                self.refresh(index)
            key = self.round_key(index)
            self.ctx.claim(f"{self.kind}-round-{index}", key)
            found = checkpoints.verify_checkpoint(self.ctx.root, key)
            if found is None:
                return index
            self.model = found
            self.round_models.append(found)
            self.record_round(index, True, {"refresh_seconds": round(time.perf_counter() - started, 3)})
        return len(self.plan)

    def source_of(self, index: int) -> tuple[int, str, dict[str, Any]]:
        """(round, kind, manifest) of the model pool version ``index`` is made against: round
        index-1's, or with ``pool.refresh.overlap`` round index-2's (round -1: the start model)."""
        made_on = index - (2 if self.ctx.cfg.pool.refresh.overlap else 1)
        if made_on < 0:
            return made_on, self.init_kind(), self.start
        return made_on, self.kind, self.round_models[made_on]

    def refresh(self, index: int, actors: list | None = None) -> None:
        """Make pool version ``index`` (the refreshed attacks of the newest version against
        ``source_of(index)``'s model, on ``actors`` if given; the other attacks carried as they
        are) and make it the newest."""
        ctx, r = self.ctx, self.ctx.cfg.pool.refresh
        reset = r.reset_every is not None and index % r.reset_every == 0
        made_on, source_kind, source = self.source_of(index)
        carried_from = source["key"] if in_step(ctx) else None
        previous = self.versions[index - 1]
        specs = [refreshed_spec(ctx, attack, previous[attack], reset, index, carried_from,
                                self.dataset.num_samples("train"))
                 for attack in run_plan.refreshed_attacks(ctx.cfg)]
        keys = {s.attack: content_key("pool", key_rules.refreshed_pool_payload(
            ctx.cfg, previous[s.attack], source["sha256"], s.attack, reset)) for s in specs}

        def build(attacks: list[str]) -> dict[str, bool]:
            verb = "regenerating" if reset else "storing the carried views of" if carried_from else "refreshing"
            model = f"round {made_on}'s model" if made_on >= 0 else f"the {source_kind}"
            ctx.say(f"{self.kind}: pool version {index}: {verb} {', '.join(attacks)} against {model}")
            pool.build(ctx, self.dataset, source_kind, source,
                       [(s, keys[s.attack]) for s in specs if s.attack in attacks], actors)
            return {attack: True for attack in attacks}

        ctx.reuse_or_build_many({f"{self.kind}-pools-{index}": keys}, keys,
                                lambda key: True if pool.is_complete(ctx, key) else None, build)
        self.versions.append({**previous, **keys})

    def train_from(self, first: int) -> None:
        """Rounds ``first``, ... in one worker group, the driver refreshing between them."""
        import ray

        from pipeline.stages.round_channel import RoundChannel
        from workers.train_on_pool import train_on_pool_loop

        ctx = self.ctx
        ctx.ensure_ray()
        key = self.round_key(first)
        workers = run_plan.refreshed_training(ctx.cfg, self.row).num_workers
        # Ray Train's run folder is "<section>-<first round's key>": the section whose num_workers
        # the group has (mid, or models for ATTA), and a key the run's ref names (mid cache gc).
        section = "mid" if self.mid else "models"
        channel = RoundChannel.remote()
        self.publish(channel, first, key)
        job = self.group_job(first, key, channel, workers)
        ctx.say(f"{self.kind}: training rounds {first} to {len(self.plan) - 1} on {workers} Ray Train workers")
        outcome: dict[str, Any] = {}

        def fit() -> None:
            try:
                outcome["manifest"] = train_with_ray(ctx, train_on_pool_loop, {"job": job}, {}, workers, section, key)
            except BaseException as e:  # handed to the driver's thread as is
                outcome["error"] = e
            finally:
                channel.end.remote()  # a driver waiting for a round's commit stops waiting

        # The refreshing actors live as long as the group. They reserve no CPU (a reservation
        # could wait forever behind the workers' on a small machine): alternating, they work
        # only while the workers wait for the next pool version; with pool.refresh.overlap
        # they share the CPUs of the node they run on with whatever trains there.
        source_kind = self.init_kind() if self.model is None else self.kind
        actors = pool.start_actors(ctx, self.dataset, source_kind, self.model or self.start,
                                   ctx.cfg.pool.num_actors, ctx.cfg.pool.bf16, num_cpus=0)
        thread = threading.Thread(target=fit, name=f"{self.kind}-rounds", daemon=True)
        thread.start()
        try:
            self.feed(first, thread, actors, channel)
        finally:
            for actor in actors:
                ray.kill(actor)
        thread.join()
        ray.kill(channel)
        if "error" in outcome:
            raise outcome["error"]
        if not self.summary or self.summary[-1]["round"] != len(self.plan) - 1:
            raise RuntimeError(f"{self.kind}: the worker group ended before committing round {len(self.plan) - 1}")

    def feed(self, first: int, thread: threading.Thread, actors: list, channel) -> None:
        """The driver's side of the group: wait for each round's commit, make the next pool
        version, publish the round."""
        import ray

        overlap = self.ctx.cfg.pool.refresh.overlap
        index, round_started, refresh_seconds = first, time.perf_counter(), 0.0
        while index < len(self.plan):
            if overlap and index + 1 < len(self.plan):  # the next version, while round ``index`` trains
                refresh_started = time.perf_counter()
                self.refresh(index + 1, actors)
                refresh_seconds = time.perf_counter() - refresh_started
            committed = ray.get(channel.commit_of.remote(index))
            # Read from the store, verified: the channel says only that rank 0 committed it.
            manifest = checkpoints.verify_checkpoint(self.ctx.root, committed) if committed else None
            if manifest is None:
                return  # the group stopped without committing the round: train_from raises its error
            self.model, trained_at = manifest, time.perf_counter()
            self.round_models.append(manifest)
            self.record_round(index, False, {"refresh_seconds": round(refresh_seconds, 3),
                                             "train_seconds": round(trained_at - round_started, 3)})
            index += 1
            if index < len(self.plan):
                if not overlap:
                    self.refresh(index, actors)
                key = self.round_key(index)
                self.ctx.claim(f"{self.kind}-round-{index}", key)
                self.publish(channel, index, key)
            round_started = time.perf_counter()
            if not overlap:
                refresh_seconds = round_started - trained_at

    def publish(self, channel, index: int, key: str) -> None:
        """Tell the workers round ``index`` may start: its pool version is complete."""
        import ray

        ray.get(channel.publish.remote(index, {
            "round": index, "pools": self.versions[index], "checkpoint": key, "variants": self.variants(index),
            "samples": self.dataset.num_samples("train")}))

    def variants(self, index: int) -> int:
        """The most variants a pool of version ``index`` holds."""
        return max(pools.read_manifest(self.ctx.root, k)["attrs"]["variants"] for k in self.versions[index].values())

    def rows_fit(self, workers: int, index: int) -> bool:
        """Whether a worker may keep its rows of a round in memory (as ``read_views`` decides for MID)."""
        from pipeline.training import WORKER_ROWS_BYTES
        from storage.datasource import AlignedViewsDatasource

        size = AlignedViewsDatasource(self.ctx.root, self.dataset.key, "train",
                                      pools=self.versions[index]).estimate_inmemory_data_size()
        return size / workers <= WORKER_ROWS_BYTES

    def group_job(self, first: int, key: str, channel, workers: int) -> PoolJob:
        """The job of the worker group training rounds ``first``, ...: from the newest round's
        checkpoint (its weights, optimizer and history), or round 0's starting model. MID's
        step for MID-R (``MIDJob``), the row's own loss on a whole classifier for ATTA."""
        from workers.jobs import RefreshedRounds

        ctx, m = self.ctx, self.ctx.cfg.mid
        schedule = run_plan.refreshed_training(ctx.cfg, self.row)
        common = dict(root=ctx.root, checkpoint_key=key, row=self.row, spec=model_spec(ctx, self.dataset).as_dict(),
                      seed=ctx.cfg.seed, attacks=tuple(ctx.cfg.pool.attacks), variants=self.variants(first),
                      epochs=schedule.epochs, batch_size=schedule.batch_size, lr=schedule.lr, bf16=m.bf16,
                      augmentation=worker_augmentation(ctx), first_epoch=self.plan[first][0],
                      refreshed=RefreshedRounds(self.dataset.key, first, tuple(self.plan[first:]), channel,
                                                self.rows_fit(workers, first),
                                                in_step_settings(ctx) if in_step(ctx) else None))
        if self.mid:
            return MIDJob(**common, teacher_key=self.teacher["key"], init_student=m.init_student,
                          step=replace(m.step(on_gpu=ctx.cfg.ray.use_gpu),
                                       trainable_classifier=schedule.trainable_classifier),
                          init_checkpoint=self.model["key"] if self.model is not None else None)
        return PoolClassifierJob(**common, init_checkpoint=(self.model if self.model is not None else self.start)["key"])
