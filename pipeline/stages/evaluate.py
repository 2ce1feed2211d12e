"""Eval: every defense scored under each protocol, batch by batch on Ray actors.

- ``source`` / ``transfer``: the stored test attacks (pools of the test split crafted once
  against the source model or the substitute) are fed to every defense;
- ``adaptive``: each attack is crafted against each defense itself, end to end. A row that
  is itself the model the source protocol's attacks were crafted on (the plain classifier,
  None) reads those stored attacks instead: they are exactly its white-box attacks, same
  attacks, settings, subsets and seed, so crafting them again against it was the demo's
  largest waste (docs/design.md §6).

Each (protocol, defense) cell is cached on its own, so a new row or protocol computes only
its own cells.
"""

from __future__ import annotations

from typing import Any


from pipeline.console import progress
from pipeline.context import RunContext
from pipeline.keys import eval_cell_payload
from pipeline.stages.work_order import as_completed, attack_cost, longest_first
from storage import fs
from storage.datasets import DatasetReader, subset_indices
from storage.keys import content_key
from storage.pools import PoolReader


def results_url(root: str, key: str) -> str:
    return fs.join(root, "results", f"{key}.json")


def adaptive_attacks(ctx: RunContext) -> list[str]:
    return ctx.cfg.eval.adaptive_attacks or ctx.cfg.eval.attacks


def cell_key(ctx: RunContext, dataset: DatasetReader, protocol: str, defense: dict[str, Any],
             stored: dict[str, str] | None) -> str:
    return content_key("eval", eval_cell_payload(ctx.cfg, dataset.fingerprint, protocol, defense, stored))


def adaptive_from_stored(names: list[str], defense: dict[str, Any], stored: dict[str, dict[str, str]],
                         crafted_on: dict[str, str]) -> dict[str, str] | None:
    """The stored test attacks ({attack: pool key}) that are this row's adaptive attacks
    ``names``: those of a protocol crafted against this very classifier (``crafted_on``:
    {protocol: model key}), when they hold every one; None when the row's must be crafted."""
    if defense.get("kind") != "classifier":
        return None
    for protocol, model_key in crafted_on.items():
        pools = stored.get(protocol, {})
        if model_key == defense["key"] and all(name in pools for name in names):
            return {name: pools[name] for name in names}
    return None


def run(ctx: RunContext, dataset: DatasetReader, defenses: dict[str, dict[str, Any]],
        stored: dict[str, dict[str, str]], crafted_on: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """``defenses`` maps a row name to its models (with their sha256); ``stored`` maps the
    source / transfer protocol to its test pools ({attack: key}), ``crafted_on`` to the key
    of the model they were crafted against. Returns, per protocol of the config,
    {defense: {"benign", "attacks": {attack: accuracy or None}, "samples": ..}}."""
    with ctx.stage("eval") as record:
        # What each cell feeds its row: stored test attacks, or None (crafted here, adaptive).
        names, crafted_on = adaptive_attacks(ctx), crafted_on or {}
        feeds = {(p, d): stored[p] if p in stored else adaptive_from_stored(names, spec, stored, crafted_on)
                 for p in ctx.cfg.eval.protocols for d, spec in defenses.items()}
        keys = {(p, d): cell_key(ctx, dataset, p, defenses[d], feed) for (p, d), feed in feeds.items()}
        record["key"] = content_key("eval-set", {"cells": sorted(keys.values())})

        def compute(cells: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
            results = evaluate(ctx, dataset, defenses, feeds, cells)
            for cell in cells:
                fs.write_json_atomic(results_url(ctx.root, keys[cell]), results[cell])
            return results

        cells, computed = ctx.reuse_or_build_many(
            {"results": {f"{p}/{d}": k for (p, d), k in keys.items()}}, keys,
            lambda key: fs.read_json(results_url(ctx.root, key)), compute)
        record["cache_hit"] = not computed
        record["details"] = {"cells": len(keys), "computed": len(computed)}
    return {p: {d: in_table_order(cells[(p, d)], ctx.cfg.eval.attacks) for d in defenses}
            for p in ctx.cfg.eval.protocols}


def in_table_order(row: dict[str, Any], attacks: list[str]) -> dict[str, Any]:
    """A cell as stored (JSON with sorted keys) with its attacks in the table's order again. An
    adaptive cell holds only ``eval.adaptive_attacks`` (its key lists those): the table's other
    attacks show as not run."""
    return {**row, "attacks": {a: row["attacks"].get(a) for a in attacks}}


def evaluate(ctx: RunContext, dataset: DatasetReader, defenses: dict[str, dict[str, Any]],
             feeds: dict[tuple[str, str], dict[str, str] | None],
             cells: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    import ray

    from workers.evaluation import Evaluator

    ctx.ensure_ray()
    e = ctx.cfg.eval
    n = dataset.num_samples("test")
    batches = [(lo, min(lo + e.batch_size, n)) for lo in range(0, n, e.batch_size)]
    tasks: list[tuple] = []  # (protocol, defense, attack or None, method, args)
    for defense in dict.fromkeys(d for _, d in cells):
        tasks += [(None, defense, None, "benign", (defense, lo, hi)) for lo, hi in batches]
    for protocol, defense in cells:
        if feeds[(protocol, defense)] is not None:
            for attack, key in feeds[(protocol, defense)].items():
                size = PoolReader.open(ctx.root, key).attrs["num_samples"]
                tasks += [(protocol, defense, attack, "stored", (defense, key, lo, min(lo + e.batch_size, size)))
                          for lo in range(0, size, e.batch_size)]
        else:
            for attack in adaptive_attacks(ctx):
                indices = subset_indices(n, e.subset.get(attack), ctx.cfg.seed)
                size = n if indices is None else len(indices)
                tasks += [(protocol, defense, attack, "adaptive",
                           (defense, attack, lo, min(lo + e.batch_size, size),
                            None if indices is None else indices[lo:lo + e.batch_size]))
                          for lo in range(0, size, e.batch_size)]
    family_settings = ctx.cfg.attacks.family_settings()

    def cost(task: tuple) -> tuple[float, int]:
        _, _, attack, method, args = task
        if method == "adaptive":  # (defense, attack, lo, hi, indices): an attack crafted here
            return attack_cost(attack, args[3] - args[2], family_settings), args[3] - args[2]
        lo, hi = args[-2:]  # benign or stored images: one forward pass each
        return 0.0, hi - lo

    tasks = longest_first(tasks, cost)
    actor_cls = ray.remote(**ctx.actor_options())(Evaluator)
    model_refs = {name: {k: v for k, v in d.items() if k != "sha256"} for name, d in defenses.items()}
    actors = [actor_cls.remote(ctx.root, dataset.key, model_refs, family_settings,
                               dataset.num_classes, ctx.cfg.seed, ctx.cfg.attacks.target)
              for _ in range(min(e.num_actors, len(tasks)))]
    protocols = sorted({p for p, _ in cells})
    ctx.say(f"eval: {len(tasks)} batches ({', '.join(protocols)}) on {len(actors)} actors")
    counts: dict[tuple, list[int]] = {}
    work = as_completed(actors, tasks, lambda actor, t: getattr(actor, t[3]).remote(*t[4]))
    try:
        for task, result in progress(work, total=len(tasks), desc="eval batches", unit="batch"):
            c = counts.setdefault(task[:3], [0, 0])
            c[0] += result["correct"]
            c[1] += result["total"]
    finally:
        for actor in actors:
            ray.kill(actor)
    table_attacks = e.attacks
    built = {}
    for protocol, defense in cells:
        correct, total = counts[(None, defense, None)]
        row = {"benign": round(100.0 * correct / total, 2), "attacks": {}, "samples": {"benign": total}}
        for attack in table_attacks:
            if (protocol, defense, attack) in counts:
                correct, total = counts[(protocol, defense, attack)]
                row["attacks"][attack] = round(100.0 * correct / total, 2)
                row["samples"][attack] = total
            else:
                row["attacks"][attack] = None  # not run under this protocol (eval.adaptive_attacks)
        built[(protocol, defense)] = row
    return built
