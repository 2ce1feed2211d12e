"""How a stage hands its attack tasks to its actors: longest first, each to the first free actor.

An actor pool takes tasks in the order given, and a stage ends when its last task does. Given
in the config's order, the slow attacks (CW's thousands of steps, AutoAttack's ensemble,
JSMA's per-pixel search) came last, and one actor worked through them while the others idled.
Handed out longest first (the classic longest-processing-time rule), the short tasks fill
the gaps at the end instead. Every task is seeded by its own attack and samples
(``workers.evaluation.batch_seed``, the pool shards' seeds), so the order changes no result.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, TypeVar

from workers.attacks import attack_class, parse_attack_name

Task = TypeVar("Task")


def attack_cost(attack: str | None, samples: int, family_settings: dict[str, dict[str, Any]]) -> float:
    """Gradient steps of ``attack`` on ``samples`` images, as the attack's class counts them;
    an attack with no fixed count (an ensemble, a search that stops per sample) is taken as the
    longest, and no attack (a clean forward pass) as the shortest."""
    if attack is None:
        return 0.0
    family, _ = parse_attack_name(attack)
    steps = attack_class(family).steps(family_settings[family])
    return math.inf if steps is None else float(steps * samples)


def longest_first(tasks: list[Task], cost: Callable[[Task], tuple[float, int]]) -> list[Task]:
    """``tasks`` by decreasing ``cost`` (a (cost, samples) pair, so the unbounded attacks go
    largest first too); equal costs keep their order."""
    return sorted(tasks, key=cost, reverse=True)


def as_completed(actors: list, tasks: list[Task], call: Callable[[Any, Task], Any]) -> Iterator[tuple[Task, Any]]:
    """(task, result) for every task, in the order they finish; ``call(actor, task)`` submits
    one. An actor gets its next task as soon as it is free.

    Written here because Ray's ActorPool offers neither half: its ordered ``map`` gives a freed
    actor no work until every earlier result is back (in the digits demo's eval, an actor done
    with a PGD batch waited on the other's AutoAttack batch), and its ``map_unordered`` does
    not say which task a result is of."""
    import ray

    queue, running = iter(tasks), {}
    for actor in actors:
        task = next(queue, None)
        if task is not None:
            running[call(actor, task)] = (actor, task)
    while running:
        (ready,), _ = ray.wait(list(running), num_returns=1)
        actor, task = running.pop(ready)
        following = next(queue, None)
        if following is not None:
            running[call(actor, following)] = (actor, following)
        yield task, ray.get(ready)
