"""The steps of the rows trained on the pool's views (``workers/train_on_pool.py``):
MID's meta step on a student encoder (MID, MID-R) and a refreshed classifier row's own
loss on every view (ATTA). Both see a batch's clean image and its views of every pool
attack, aligned by sample, cropped alike; both average their gradient across the workers.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from typing import Any, Protocol

import torch

from workers.augment import crop_and_flip
from workers.defenses import defense_class
from workers.device import bf16_autocast
from workers.epoch_loop import StepObjective
from workers.jobs import MIDJob, PoolClassifierJob, PoolJob
from workers.mid import (FrozenTeacher, StudentWithClassifier, apply_gradients, average_across_workers,
                         draw_held_out, meta_gradients, meta_objective)
from workers.models import ModelSpec, build_encoder, to_float
from workers.refresh_in_step import CarriedViews, student_classifier
from workers.reproducible import WorkerRows


class PoolRows(Protocol):
    """Where a pool row's epochs read their rows (``workers.train_on_pool``)."""

    def variant_of(self, epoch: int) -> int: ...

    def carried_views(self, epoch: int, rows: WorkerRows) -> CarriedViews | None: ...


class PoolViewsStep(StepObjective):
    """One step on a batch's clean image and pool views: the batch's refreshed views are
    continued first at staleness zero, then the row's ``loss``, its gradient averaged
    across workers, one Adam step."""

    def __init__(self, job: PoolJob, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, source: PoolRows, steps: int):
        self.job, self.model, self.optimizer, self.source = job, model, optimizer, source
        self.attacks = list(job.attacks)
        self.steps = steps  # every step before this one, all rounds together (MID's held-out draw goes on)
        self.carried: CarriedViews | None = None
        # bfloat16 autocast of the forward passes on GPU workers when mid.bf16 is set;
        # gradients and the fast weights stay float32 (autocast keeps parameters in their dtype).
        self.autocast = job.bf16 and device.type == "cuda"
        self.device = device

    @abstractmethod
    def loss(self, clean: torch.Tensor, views: list[torch.Tensor],
             labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's loss and the figures its epoch averages."""

    @abstractmethod
    def attacked_model(self) -> torch.nn.Module:
        """What the batch's refreshed views are continued against at staleness zero."""

    def begin_epoch(self, epoch: int, rows: WorkerRows) -> None:
        self.carried = self.source.carried_views(epoch, rows)

    def step(self, batch: dict[str, torch.Tensor], crops: torch.Generator) -> tuple[int, dict[str, float]]:
        if self.carried is not None:
            self.carried.continue_batch(self.model, self.attacked_model(), batch)
        augmentation = self.job.augmentation
        clean, *views = crop_and_flip([to_float(batch[name]) for name in ["clean", *self.attacks]],
                                      augmentation.mode, augmentation.crop_padding, crops)
        with bf16_autocast(self.autocast, self.device):
            loss, figures = self.loss(clean, views, batch["label"])
        apply_gradients(self.model, average_across_workers(meta_gradients(self.model, loss)), self.optimizer)
        self.steps += 1
        return len(batch["label"]), figures

    def epoch_figures(self, epoch: int, sums: dict[str, float], steps: int, seen: int) -> dict[str, Any]:
        return {"variant": self.source.variant_of(epoch), **{k: v / max(steps, 1) for k, v in sums.items()}}

    def state(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {"student": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                "step": self.steps, "history": history}

    def describe(self, figures: dict[str, Any]) -> str:
        return f"loss {figures['loss']:.3f}, data wait {figures['data_wait_fraction']:.0%}"


class MetaStep(PoolViewsStep):
    """MID's step (``workers/mid.py``): one view held out per step, drawn from the seed and
    the step's index, and distillation from the frozen teacher."""

    def __init__(self, job: MIDJob, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, source: PoolRows, steps: int, teacher: FrozenTeacher):
        super().__init__(job, model, optimizer, device, source, steps)
        self.teacher, self.settings = teacher, job.step

    def loss(self, clean, views, labels):
        held_out = draw_held_out(self.attacks, self.job.seed, self.steps)
        return meta_objective(self.model, self.teacher, clean, dict(zip(self.attacks, views)), labels, held_out,
                              self.settings)

    def attacked_model(self) -> torch.nn.Module:
        return student_classifier(self.model, self.teacher)


class RowLossStep(PoolViewsStep):
    """A refreshed classifier row's own loss on every view (``RefreshedDefense.loss``; ATTA's
    cross-entropy) on a whole classifier."""

    def __init__(self, job: PoolClassifierJob, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, source: PoolRows, steps: int):
        super().__init__(job, model, optimizer, device, source, steps)
        self.row_loss = defense_class(job.row).loss

    def loss(self, clean, views, labels):
        return self.row_loss(self.model, views, labels)

    def attacked_model(self) -> torch.nn.Module:
        return self.model


def with_classifier(job: MIDJob, encoder: torch.nn.Module, teacher: FrozenTeacher) -> torch.nn.Module:
    """The student as it trains: E_s, or, with ``mid.classifier: trainable``, E_s with a copy
    of C_t of its own."""
    if not job.step.trainable_classifier:
        return encoder
    return StudentWithClassifier(encoder, copy.deepcopy(teacher.classifier))


def initial_student(job: MIDJob, teacher: FrozenTeacher) -> torch.nn.Module:
    """Same weights on every worker: a copy of E_t, or a seeded fresh encoder."""
    if job.init_student == "teacher":
        student = copy.deepcopy(teacher.encoder)
    else:
        torch.manual_seed(job.seed)
        student = build_encoder(ModelSpec(**job.spec))
    student = with_classifier(job, student, teacher)
    student.train()
    return student.requires_grad_(True)
