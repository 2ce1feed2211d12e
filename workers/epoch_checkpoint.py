"""Epoch checkpoints of a training stage: what a restarted worker group resumes from.

After a worker or node dies, Ray Train (``FailureConfig``) starts a new worker group and
``ray.train.get_checkpoint()`` hands it the last reported checkpoint; rerunning the same
stage after the driver died does the same, because the run's name and storage folder are
derived from the stage's content key. Only rank 0 writes: every worker holds the same
weights after each step (averaged gradients, same initial weights).

Checkpoints are taken at the end of an epoch once ``ray.checkpoint_interval_s`` has passed
since the last one (0: every epoch), never after the last epoch (the stage commits its
model to the store instead). Each report is a round trip through Ray Train's controller
and a copy into the run's storage; on small data that cost more than the epoch itself.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import ray.train
import torch
import torch.distributed as dist

STATE_FILE = "state.pt"


def report_epoch(metrics: dict[str, Any], state: dict[str, Any]) -> None:
    """Report one epoch's metrics on every worker, with rank 0's checkpoint of ``state``."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, os.path.join(folder, STATE_FILE))
        # report() copies the folder into the run's storage before returning.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def restore_state() -> dict[str, Any] | None:
    """The state of the last checkpointed epoch, or None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, STATE_FILE), weights_only=True)


class EpochCheckpoints:
    """Decides, at each epoch's end, whether to checkpoint; every worker takes rank 0's
    decision (Ray Train's report is collective: workers that disagreed would wait forever)."""

    def __init__(self, interval_s: float, epochs: int, device: torch.device):
        self.interval_s, self.epochs, self.device = interval_s, epochs, device
        self.last = time.monotonic()
        self.seconds = 0.0  # spent reporting, for the stage's history

    def due(self, epoch: int) -> bool:
        if epoch >= self.epochs - 1:
            return False
        due = time.monotonic() - self.last >= self.interval_s
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([int(due)], device=self.device)
            dist.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def end_epoch(self, epoch: int, metrics: dict[str, Any], state: dict[str, Any]) -> bool:
        """Checkpoint ``state`` if one is due; returns whether it did."""
        if not self.due(epoch):
            return False
        started = time.monotonic()
        report_epoch(metrics, state)
        self.last = time.monotonic()
        self.seconds += self.last - started
        return True
