"""What one sample costs in each unit of work of the pipeline, counted on real passes of
the real models by ``torch.utils.flop_counter.FlopCounterMode`` (the `mid plan` command).

Counts are multiply-accumulates (MACs): the unit the vision literature calls "FLOPs"
(ViT-B/16 at 224 pixels: 17.6 G). torch's counter reports 2 FLOPs per MAC, and a GPU's
peak FLOP/s counts the same way, so hours are 2 × MACs / (peak × utilisation). Like every
such counter it counts the matrix products and convolutions (forward, backward, and the
double backward of MID's second-order step), not element-wise work.

Units, per sample:
- ``forward``: C(E(x)) in eval mode (a success check, an evaluation batch);
- ``attack_step``: one gradient step of an attack: forward and backward to the input, the
  parameters frozen (what PGD, MIM, BIM and AT's inner loop repeat ``nb_iter`` times);
- ``train_step``, ``teacher_step``: the baseline's and the teacher's training objective,
  forward and backward to the parameters (the teacher's reconstruction term included);
- ``mid_step``: MID's meta step, ``meta_objective`` and ``meta_gradients`` of
  ``workers.mid`` with the config's views and order (docs/design.md §3.3).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from workers.mid import FrozenTeacher, StudentWithClassifier, meta_gradients, meta_objective
from workers.models import ModelSpec, build_classifier_model, build_encoder, build_teacher
from workers.models.build import LAYOUT
from workers.train_classifier import objective
from workers.mid_settings import MetaSettings

FLOPS_PER_MAC = 2  # torch's FlopCounterMode and GPU peak figures both count a multiply-add as 2


class _GlobalTotalOnly:
    """Stands in for FlopCounterMode's per-module tracker. That tracker hooks every
    module's backward, and under those hooks ``torch.autograd.grad`` with leaf inputs (an
    attack's input gradient, MID's meta-gradient) raises "A leaf node was passed to
    _will_engine_execute_node". Only the global total is needed here."""

    parents = ("Global",)

    def __enter__(self) -> "_GlobalTotalOnly":
        return self

    def __exit__(self, *exc) -> bool:
        return False


def counted_macs(work: Callable[[], Any]) -> int:
    """Multiply-accumulates of everything ``work`` runs."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalTotalOnly()
    with counter:
        work()
    return counter.get_total_flops() // FLOPS_PER_MAC


def _images(spec: ModelSpec, batch: int, generator: torch.Generator) -> torch.Tensor:
    shape = (batch, spec.in_channels, spec.image_size, spec.image_size)
    return torch.rand(shape, generator=generator).contiguous(memory_format=LAYOUT)


def forward_macs(spec: ModelSpec, batch: int = 2) -> float:
    generator = torch.Generator().manual_seed(0)
    model = build_classifier_model(spec).eval().requires_grad_(False)
    x = _images(spec, batch, generator)
    with torch.no_grad():
        return counted_macs(lambda: model(x)) / batch


def attack_step_macs(spec: ModelSpec, batch: int = 2) -> float:
    generator = torch.Generator().manual_seed(0)
    model = build_classifier_model(spec).eval().requires_grad_(False)
    x = _images(spec, batch, generator).requires_grad_(True)
    y = torch.randint(spec.num_classes, (batch,), generator=generator)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, x)

    return counted_macs(step) / batch


def train_step_macs(spec: ModelSpec, kind: str = "baseline", lambda_rec: float = 0.0, batch: int = 2) -> float:
    """The training objective of ``kind`` (baseline or teacher) and its parameter gradients."""
    generator = torch.Generator().manual_seed(0)
    model = (build_teacher(spec) if kind == "teacher" else build_classifier_model(spec)).train()
    x = _images(spec, batch, generator)
    y = torch.randint(spec.num_classes, (batch,), generator=generator)

    def step() -> None:
        loss, _ = objective(kind, {"lambda_rec": lambda_rec}, model, x, y)
        loss.backward()

    return counted_macs(step) / batch


def mid_step_macs(spec: ModelSpec, settings: MetaSettings, attacks: list[str], batch: int = 2) -> float:
    """One meta step on ``batch`` clean samples with one view per attack of the pool (one
    of them held out), as ``workers.train_on_pool`` takes it on a CPU worker."""
    generator = torch.Generator().manual_seed(0)
    teacher_model = build_teacher(spec)
    teacher = FrozenTeacher(teacher_model.encoder, teacher_model.classifier, teacher_model.decoder)
    student = build_encoder(spec).train().requires_grad_(True)
    if settings.trainable_classifier:  # the gradient reaches a classifier of the student's own too
        student = StudentWithClassifier(student, copy.deepcopy(teacher_model.classifier).requires_grad_(True))
    clean = _images(spec, batch, generator)
    views = {a: (clean + 0.03 * torch.randn(clean.shape, generator=generator)).clamp(0, 1) for a in attacks}
    labels = torch.randint(spec.num_classes, (batch,), generator=generator)

    def step() -> None:
        loss, _ = meta_objective(student, teacher, clean, views, labels, attacks[0], settings)
        meta_gradients(student, loss)

    return counted_macs(step) / batch


def unit_costs(spec: ModelSpec, mid_step: MetaSettings, attacks: list[str], lambda_rec: float,
               batch: int | None = None) -> dict[str, float]:
    """MACs per sample of every unit (see the module docstring).

    No counted operation's cost per sample depends on the batch, so large images are
    counted on one sample (ViT-B/16's second-order step takes half a minute on a CPU);
    small ones on two, so that BatchNorm has training statistics even where a ResNet's
    last stage is one pixel.
    """
    batch = batch or (1 if spec.image_size >= 64 else 2)
    torch.manual_seed(0)  # the models' initial weights; counts do not depend on them
    return {
        "forward": forward_macs(spec, batch),
        "attack_step": attack_step_macs(spec, batch),
        "train_step": train_step_macs(spec, "baseline", batch=batch),
        "teacher_step": train_step_macs(spec, "teacher", lambda_rec, batch),
        "mid_step": mid_step_macs(spec, mid_step, attacks, batch),
    }
