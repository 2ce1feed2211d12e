"""The one epoch loop of every Ray Train stage: the classifiers, MID, MID-R and ATTA.

Each stage passes in its ``StepObjective`` (what one batch's optimizer step is, and how an
epoch's figures are averaged) and where each epoch's rows come from; the loop owns what
they share: the seeded batches and crops, the data-wait and throughput figures, the check
that stops a broken model before it is committed (``workers.training_health``), the epoch
checkpoints a restarted worker group resumes from (``workers.epoch_checkpoint``) and the
progress bar.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import ray.train
import torch

from workers.augment import augmentation_generator
from workers.epoch_checkpoint import EpochCheckpoints
from workers.progress import epoch_bar
from workers.reproducible import WorkerRows
from workers.training_health import epoch_problem


class StepObjective(ABC):
    """One training step of a stage's model, and the figures its epochs record."""

    model: torch.nn.Module  # what is trained: checked for non-finite weights after every epoch
    optimizer: torch.optim.Optimizer

    def begin_epoch(self, epoch: int, rows: WorkerRows) -> None:
        """Called before an epoch's first batch, with the rows it reads."""

    @abstractmethod
    def step(self, batch: dict[str, torch.Tensor], crops: torch.Generator) -> tuple[int, dict[str, float]]:
        """Take one optimizer step on ``batch`` (its crops drawn from ``crops``); returns the
        samples it saw and the figures to sum over the epoch."""

    @abstractmethod
    def epoch_figures(self, epoch: int, sums: dict[str, float], steps: int, seen: int) -> dict[str, Any]:
        """The epoch's figures from the summed ones; "loss" among them (the health check reads it)."""

    @abstractmethod
    def state(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        """What an epoch checkpoint holds to resume after ``epoch``."""

    def describe(self, figures: dict[str, Any]) -> str:
        """The progress bar's suffix after an epoch."""
        return f"loss {figures['loss']:.3f}"


@dataclass
class EpochRun:
    """The epochs a worker trains and what they continue from."""

    name: str  # the model's name in the progress bar and in a stop's message
    epochs: int
    batch_size: int
    seed: int
    device: torch.device
    checkpoints: EpochCheckpoints
    first_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # the epochs before first_epoch
    resumed: bool = False  # first_epoch continues from a Ray Train epoch checkpoint


def train_epochs(run: EpochRun, objective: StepObjective, rows_of: Callable[[int, Any], WorkerRows],
                 end_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> str | None:
    """Train epochs ``[run.first_epoch, run.epochs)``; returns why training stopped uncommitted
    (``workers.training_health``), or None. ``rows_of(epoch, bar)``: the epoch's rows (it may
    wait for them, saying so on the bar); ``end_epoch(epoch, figures)``: after the epoch's
    figures are recorded, before its checkpoint."""
    rank = ray.train.get_context().get_world_rank()
    world_size = ray.train.get_context().get_world_size()  # throughput is the whole group's
    bar = epoch_bar(f"{run.name} training", run.epochs, show=rank == 0)
    bar.update(run.first_epoch)
    try:
        for epoch in range(run.first_epoch, run.epochs):
            rows = rows_of(epoch, bar)
            objective.begin_epoch(epoch, rows)
            crops = augmentation_generator(run.seed, rank, epoch)
            started, waited, sums, steps, seen = time.perf_counter(), rows.wait_seconds, {}, 0, 0
            for batch in rows.batches(run.batch_size, run.seed, rank, epoch, run.device):
                samples, figures = objective.step(batch, crops)
                steps += 1
                seen += samples
                for name, value in figures.items():
                    sums[name] = sums.get(name, 0.0) + value
            seconds = time.perf_counter() - started
            figures = objective.epoch_figures(epoch, sums, steps, seen)
            problem = epoch_problem(run.name, epoch, steps, run.batch_size, figures.get("loss", 0.0),
                                    objective.model, run.device)
            if problem is not None:
                return problem
            waited = rows.wait_seconds - waited
            figures = {"epoch": epoch, "steps": steps, **figures, "samples_per_second": seen * world_size / seconds,
                       "seconds": seconds, "data_wait_seconds": waited, "data_wait_fraction": waited / seconds,
                       "lr": objective.optimizer.param_groups[0]["lr"],
                       "resumed": run.resumed and epoch == run.first_epoch}
            run.history.append(figures)
            if end_epoch is not None:
                end_epoch(epoch, figures)
            run.checkpoints.end_epoch(epoch, figures, objective.state(epoch, run.history))
            bar.set_description(f"{run.name} training ({objective.describe(figures)})")
            bar.update(1)
    finally:
        bar.close()
    return None
