"""The channel between a refreshed row's driver and its worker group (pipeline/stages/refresh.py).

One Ray actor per worker group, started by the driver and handed to the workers in their
job: the driver publishes round r (its pool version and checkpoint key) once the version
is in the store; the workers wait for it, train the round and report its committed
checkpoint, which the driver waits for before making the next version. Nobody polls a
file: each side blocks on a call the other side's call completes.

A worker group restarted by Ray Train from an epoch checkpoint asks again for a round it
already had; the actor keeps every published round and commit, so it gets the same answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray


@ray.remote(num_cpus=0)  # it only hands messages on; a CPU reserved for it could starve the workers
class RoundChannel:
    """Rounds published by the driver, commits reported by the workers (an async actor:
    every waiting call holds no thread)."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, Any]] = {}
        self.commits: dict[int, str] = {}
        self.ended = False
        self.changed = asyncio.Condition()

    async def publish(self, index: int, spec: dict[str, Any]) -> None:
        """The driver: round ``index`` may start (its pool version is complete)."""
        async with self.changed:
            self.rounds[index] = spec
            self.changed.notify_all()

    async def round(self, index: int) -> dict[str, Any]:
        """A worker: round ``index``'s spec, once the driver has published it."""
        async with self.changed:
            await self.changed.wait_for(lambda: index in self.rounds)
            return self.rounds[index]

    async def committed(self, index: int, key: str) -> None:
        """Rank 0: round ``index``'s checkpoint ``key`` is committed to the store."""
        async with self.changed:
            self.commits[index] = key
            self.changed.notify_all()

    async def end(self) -> None:
        """The driver's fit thread: the worker group has stopped (finished or failed)."""
        async with self.changed:
            self.ended = True
            self.changed.notify_all()

    async def commit_of(self, index: int) -> str | None:
        """The driver: round ``index``'s committed checkpoint key; None if the group
        stopped without committing it."""
        async with self.changed:
            await self.changed.wait_for(lambda: index in self.commits or self.ended)
            return self.commits.get(index)
