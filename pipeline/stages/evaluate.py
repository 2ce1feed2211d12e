"""Eval: white-box attacks against each defended model, batch by batch on Ray actors."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from pipeline.context import RunContext
from storage import fs
from storage.datasets import DatasetReader
from storage.keys import content_key


def results_url(root: str, key: str) -> str:
    return fs.join(root, "results", f"{key}.json")


def run(ctx: RunContext, dataset: DatasetReader, defenses: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``defenses`` maps a row name to its models (with their sha256); returns the table."""
    e = ctx.cfg.eval
    with ctx.stage("eval") as record:
        key = content_key("eval", {"dataset": dataset.fingerprint, "defenses": defenses,
                                   "attacks": e.attacks, "settings": ctx.cfg.attacks.family_settings(),
                                   "seed": ctx.cfg.seed})
        record["key"] = key
        def build() -> dict[str, Any]:
            table = summarize(evaluate(ctx, dataset, defenses), e.attacks)
            fs.write_json_atomic(results_url(ctx.root, key), table)
            return table

        table, record["cache_hit"] = ctx.reuse_or_build(
            "eval", key, lambda: fs.read_json(results_url(ctx.root, key)), build)
        record["details"] = {"attacks": e.attacks}
    return table


def evaluate(ctx: RunContext, dataset: DatasetReader, defenses: dict[str, dict[str, Any]]) -> dict:
    import ray
    from ray.util import ActorPool

    from workers.evaluation import Evaluator

    ctx.ensure_ray()
    e = ctx.cfg.eval
    n = dataset.num_samples("test")
    tasks = [(defense, attack, lo, min(lo + e.batch_size, n))
             for defense in defenses for attack in [None, *e.attacks] for lo in range(0, n, e.batch_size)]
    actor_cls = ray.remote(num_cpus=ctx.cfg.ray.cpus_per_actor)(Evaluator)
    model_refs = {name: {k: v for k, v in d.items() if k != "sha256"} for name, d in defenses.items()}
    actors = [actor_cls.remote(ctx.root, dataset.key, model_refs, ctx.cfg.attacks.family_settings(),
                               dataset.num_classes, ctx.cfg.seed) for _ in range(e.num_actors)]
    ctx.say(f"eval: {len(defenses)} defenses x {len(e.attacks)} attacks + benign on {n} test samples")
    counts: dict[tuple[str, str | None], list[int]] = {}
    work = ActorPool(actors).map_unordered(lambda actor, t: actor.evaluate.remote(*t), tasks)
    for result in tqdm(work, total=len(tasks), desc="eval batches", unit="batch"):
        c = counts.setdefault((result["defense"], result["attack"]), [0, 0])
        c[0] += result["correct"]
        c[1] += result["total"]
    for actor in actors:
        ray.kill(actor)
    return counts


def summarize(counts: dict, attacks: list[str]) -> dict[str, Any]:
    """Accuracies in percent; ``avg`` is the mean over benign and every attack."""
    table = {}
    for defense in dict.fromkeys(d for d, _ in counts):
        acc = {a: 100.0 * counts[(defense, a)][0] / counts[(defense, a)][1] for a in [None, *attacks]}
        row = {"benign": round(acc[None], 2), "attacks": {a: round(acc[a], 2) for a in attacks}}
        row["avg"] = round(sum(acc.values()) / len(acc), 2)
        table[defense] = row
    return table
