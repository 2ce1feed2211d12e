"""What makes a training stage give the same bits on every run of a config (same machine,
same worker count): each worker's batches, in a seeded order, and deterministic kernels.

The rows a worker receives are fixed on the driver (``preserve_order`` in
``pipeline.stages.models.read_views``: Ray Data then hands blocks to the workers in read
order, and its output splitter assigns them by size alone, not by which worker asked
first). Here each worker shuffles them with a seed of its own per epoch.

Still varies across machines: float results of the same kernels on other CPUs or GPUs
(vector widths, thread counts, cuBLAS / cuDNN versions), and a different ``num_workers``
splits the data differently. A run resumed after a worker died redraws the random starts
of AT's and TRADES' attacks (the global generator is not in the epoch checkpoint).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterator

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
