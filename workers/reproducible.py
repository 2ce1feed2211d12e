"""What makes a training stage give the same bits on every run of a config (same machine,
same worker count): each worker's batches, in a seeded order, and deterministic kernels.

The rows a worker receives are fixed on the driver (``preserve_order`` in
``pipeline.ray_runtime.read_views``: Ray Data then hands blocks to the workers in read
order, and its output splitter assigns them by size alone, not by which worker asked
first). Here each worker shuffles them with a seed of its own per epoch.

A dataset small enough that the driver materialized it is read by each worker once and
reshuffled in the worker's memory every epoch (``WorkerRows``): Ray Data's streaming split
restarts its executor every epoch otherwise, which on small data costs more than the
epoch's steps. Larger datasets stream through Ray Data every epoch.

Still varies across machines: float results of the same kernels on other CPUs or GPUs
(vector widths, thread counts, cuBLAS / cuDNN versions), and a different ``num_workers``
splits the data differently. A run resumed after a worker died redraws the random starts
of AT's and TRADES' attacks (the global generator is not in the epoch checkpoint).
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Iterator

import numpy as np
import torch

PREFETCH_BATCHES = 4  # batches Ray Data prepares ahead of the step; keeps data wait small


def worker_seed(seed: int, rank: int, epoch: int, stream: str) -> int:
    """A 32-bit seed per (run seed, worker, epoch, purpose): streams never share one."""
    digest = hashlib.sha256(f"{seed}:{rank}:{epoch}:{stream}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def deterministic_kernels(device: torch.device) -> None:
    """torch's deterministic algorithms where it has them. warn_only: a model with an op
    that has none on this device (max-unpooling's CUDA backward, in mid_cnn's decoder)
    still trains, with a warning in the worker's log, rather than stopping the run."""
    if device.type == "cuda":
        # cuBLAS picks reduction orders by workspace; a fixed one makes them repeatable.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def epoch_batches(shard: Any, batch_size: int, seed: int, rank: int, epoch: int,
                  device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's training batches of ``epoch``: full batches, locally shuffled with a
    seed of their own (Ray Data's local shuffle is unseeded otherwise)."""
    return shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                    prefetch_batches=PREFETCH_BATCHES, local_shuffle_buffer_size=4 * batch_size,
                                    local_shuffle_seed=worker_seed(seed, rank, epoch, "shuffle"))


class WorkerRows:
    """This worker's rows of one Ray Dataset shard, epoch after epoch.

    ``in_memory``: read the shard once (in the order Ray Data hands it over) and draw each
    epoch's batches from a seeded permutation of those rows, a full shuffle. Otherwise every
    epoch streams the shard through Ray Data with ``epoch_batches``' local shuffle buffer.
    Every worker gets the same number of rows (Ray Train splits with ``equal=True``), so
    every worker takes the same number of steps either way.
    """

    def __init__(self, shard: Any, in_memory: bool):
        self.shard, self.in_memory = shard, in_memory
        self.rows: dict[str, torch.Tensor] | None = None
        self.wait_seconds = 0.0  # spent waiting for batches, all epochs together
        self._position: dict[int, int] | None = None  # sample index -> row, for ``write``

    def _read(self) -> dict[str, torch.Tensor]:
        parts: dict[str, list[np.ndarray]] = {}
        for block in self.shard.iter_batches(batch_size=None, batch_format="numpy"):
            for name, values in block.items():
                parts.setdefault(name, []).append(values)
        return {name: torch.from_numpy(np.concatenate(values)) for name, values in parts.items()}

    def column(self, name: str) -> torch.Tensor:
        """All this worker's rows of column ``name`` (in memory only)."""
        if self.rows is None:
            self.rows = self._read()
        return self.rows[name]

    def write(self, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Replace column ``name`` of the samples ``index`` (the rows' "index" column) by
        ``values``: a refreshed view carried in memory (workers/refresh_in_step.py)."""
        if self._position is None:
            self._position = {int(i): row for row, i in enumerate(self.column("index").tolist())}
        rows = torch.tensor([self._position[int(i)] for i in index.tolist()])
        self.rows[name][rows] = values.to(self.rows[name].device, self.rows[name].dtype)

    def batches(self, batch_size: int, seed: int, rank: int, epoch: int,
                device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        source = self._batches(batch_size, seed, rank, epoch, device)
        while True:
            started = time.perf_counter()
            batch = next(source, None)
            self.wait_seconds += time.perf_counter() - started
            if batch is None:
                return
            yield batch

    def _batches(self, batch_size: int, seed: int, rank: int, epoch: int,
                 device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        if not self.in_memory:
            yield from epoch_batches(self.shard, batch_size, seed, rank, epoch, device)
            return
        if self.rows is None:
            self.rows = self._read()
        count = len(next(iter(self.rows.values())))
        order = torch.randperm(count, generator=torch.Generator().manual_seed(worker_seed(seed, rank, epoch, "shuffle")))
        for lo in range(0, count - batch_size + 1, batch_size):  # full batches, as drop_last
            rows = order[lo:lo + batch_size]
            yield {name: values[rows].to(device) for name, values in self.rows.items()}
