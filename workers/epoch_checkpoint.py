"""Per-epoch Ray Train checkpoints: what a restarted worker group resumes from.

After a worker or node dies, Ray Train (``FailureConfig``) starts a new worker group and
``ray.train.get_checkpoint()`` hands it the last reported checkpoint; rerunning the same
stage after the driver died does the same, because the run's name and storage folder are
derived from the stage's content key. Only rank 0 writes: every worker holds the same
weights after each step (averaged gradients, same initial weights).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import ray.train
import torch

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
