"""Meta Invariance Defense: the per-view losses and the meta step of docs/design.md §3.

Notation: frozen teacher encoder E_t, classifier C_t, decoder D_t; student encoder E_s(θ);
p(z) = softmax(z / τ) over the feature's channel dimension (dim 1: the feature vector, or
the channels at each location of a feature map). For a view x̃_v of a clean batch (x, y):

    AC_v = KL(p(E_t(x)) || p(E_s(x̃_v)))                 adversarial consistency
    CC_v = KL(p(E_t(x)) || p(E_t(D_t(E_s(x̃_v)))))        cyclic consistency (through frozen D_t, E_t)
    LC_v = CE(C_t(E_s(x̃_v)), y)                          label consistency
    RC_v = KL(softmax(C_t(E_s(x))) || softmax(C_t(E_s(x̃_v))))   robustness consistency
    J(θ; V) = Σ_v ω_AC·AC_v + ω_CC·CC_v + ω_LC·LC_v + ω_RC·RC_v

RC is not the paper's: it is TRADES' robustness term (the defended model's clean prediction
against its prediction on an adversarial view, both moved by the gradient), an option for
MID on a refreshed pool (docs/design.md §4.1); its weight is 0 by default, and the clean
view's own RC is 0.

One step holds out a* ∈ A: g = ∇θ J(θ; V), θ' = θ − α·g, L = J(θ; V) + β·J(θ'; {a*}).
Fast weights are a dict of tensors evaluated with ``torch.func.functional_call``, never
loaded into a module, so the graph from θ' back to θ is never cut (the defect of the
authors' public code, where ``load_state_dict`` made the meta-test loss constant in θ).

BatchNorm in the student (ResNets): the meta-train views go through the student in one
pass, so each step normalises with the statistics of the clean and adversarial views
together, and only that pass updates the running statistics. The meta-test pass (fast
weights, held-out view) normalises with its own batch's statistics and updates copies of
the running buffers that are thrown away: the held-out view is already in the running
statistics through earlier steps, where it was a meta-train view.

A teacher without a decoder (ViT) has no cyclic-consistency term; the config requires its
weights to be 0. A term whose weight is 0 is not computed at all.

The paper's Table 8 ablations are switches of this step, not other runs of it:
- without meta-learning (``meta=False``): every view is a training view each step,
  L = J(θ; {clean} ∪ A), with no held-out attack and no inner step;
- without distillation (``distill=False``): the teacher's features are no target (AC and CC
  are off in both phases); the student learns through the frozen C_t from labels alone;
- without AC or without CC: that term's weights are 0 in both phases (config only).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from workers.mid_settings import LossWeights, MetaSettings

CLEAN = "clean"


@dataclass
class FrozenTeacher:
    encoder: nn.Module
    classifier: nn.Module
    decoder: nn.Module

    def __post_init__(self):
        for module in (self.encoder, self.classifier, self.decoder):
            if module is not None:
                module.eval()
                module.requires_grad_(False)


def feature_distribution(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """p(z): softmax over dim 1 (the vector's entries, or a map's channels at each location)."""
    return F.softmax(z / temperature, dim=1)


def _kl_per_sample(p_target: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_target || p(logits)) per sample, summed over channels (and a map's locations)."""
    log_q = F.log_softmax(logits / temperature, dim=1)
    return F.kl_div(log_q, p_target, reduction="none").flatten(1).sum(1)


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class StudentWithClassifier(nn.Module):
    """E_s with a classifier of its own (``mid.classifier: trainable``), started from C_t:
    its forward gives the features and their logits, so the meta step's functional calls
    move both. Its state dict is an ``EncoderClassifier``'s (``encoder.*``, ``classifier.*``)."""

    def __init__(self, encoder: nn.Module, classifier: nn.Module):
        super().__init__()
        self.encoder, self.classifier = encoder, classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.classifier(z)


def defended_logits(student: nn.Module, params: dict[str, torch.Tensor], teacher: FrozenTeacher,
                    x: torch.Tensor) -> torch.Tensor:
    """The defended model's logits at ``params``: C_t(E_s(x)), or C_s(E_s(x)) for a student
    with its own classifier."""
    z = functional_call(student, params, (x,))
    return z[1] if isinstance(z, tuple) else teacher.classifier(z)


def view_objective(student: nn.Module, params: dict[str, torch.Tensor], teacher: FrozenTeacher,
                   views: list[torch.Tensor], labels: torch.Tensor, p_teacher: torch.Tensor,
                   weights: LossWeights, temperature: float, batch_views: bool = True,
                   clean_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """J(params; views) and its AC / CC / LC / RC parts (each summed over views, mean over batch).

    RC compares each view's prediction with the clean one: ``clean_logits`` when given (the
    meta-test phase, whose one view is adversarial), else the first view is the clean batch.

    ``batch_views`` sends all views through the networks in one forward pass (fewer, larger
    kernels: faster on a GPU); otherwise one pass per view (faster on CPU, where the larger
    batch only spills caches: 2.9 against 3.1 ms per sample for a 28x28 LeNet step). Both
    give the same value for a student without batch statistics; ``meta_objective`` always
    batches the views of a student with BatchNorm.
    """
    batch = labels.shape[0]
    chunks = [torch.cat(views)] if batch_views else views
    ac = cc = lc = rc = torch.zeros((), device=labels.device)
    view_logits = []
    for chunk in chunks:
        n = chunk.shape[0] // batch
        z = functional_call(student, params, (chunk,))
        z, logits = z if isinstance(z, tuple) else (z, None)  # a trainable classifier's logits
        if weights.ac or (weights.cc and teacher.decoder is not None):
            p_rep = p_teacher.repeat(n, *([1] * (p_teacher.dim() - 1)))
        if weights.ac:
            ac = ac + _kl_per_sample(p_rep, z, temperature).view(n, batch).mean(1).sum()
        if weights.cc and teacher.decoder is not None:
            cc = cc + _kl_per_sample(p_rep, teacher.encoder(teacher.decoder(z)), temperature).view(n, batch).mean(1).sum()
        if weights.lc or weights.rc:
            logits = teacher.classifier(z) if logits is None else logits
        if weights.lc:
            lc = lc + F.cross_entropy(logits, labels.repeat(n), reduction="none").view(n, batch).mean(1).sum()
        if weights.rc:
            view_logits.append(logits)
    if weights.rc:
        logits = torch.cat(view_logits)
        if clean_logits is None:
            clean_logits, logits = logits[:batch], logits[batch:]
        n = logits.shape[0] // batch
        p_clean = F.softmax(clean_logits, dim=1).repeat(n, 1)
        rc = _kl_per_sample(p_clean, logits, 1.0).view(n, batch).mean(1).sum()
    total = weights.ac * ac + weights.cc * cc + weights.lc * lc + weights.rc * rc
    return total, {"ac": ac.item(), "cc": cc.item(), "lc": lc.item(), "rc": rc.item()}


def draw_held_out(attacks: list[str], seed: int, step: int) -> str:
    """The held-out attack of a step; every worker draws the same one for the same step."""
    return random.Random(seed * 1_000_003 + step).choice(attacks)


def meta_objective(student: nn.Module, teacher: FrozenTeacher, clean: torch.Tensor,
                   adversarial: dict[str, torch.Tensor], labels: torch.Tensor, held_out: str,
                   settings: MetaSettings) -> tuple[torch.Tensor, dict[str, float]]:
    """L(θ) = J(θ; V) + β·J(θ − α∇J(θ; V); {a*}) with V = ({clean} ∪ A) \\ {a*}; without
    meta-learning L(θ) = J(θ; {clean} ∪ A)."""
    if held_out not in adversarial:
        raise KeyError(f"held-out attack {held_out!r} is not among the views {sorted(adversarial)}")
    params = dict(student.named_parameters())
    batch_norm = has_batch_norm(student)
    p_teacher = None
    if settings.distill:
        with torch.no_grad():
            p_teacher = feature_distribution(teacher.encoder(clean), settings.temperature)
    if not settings.meta:
        total, parts = view_objective(student, params, teacher, [clean, *adversarial.values()], labels, p_teacher,
                                      settings.weights(settings.meta_train), settings.temperature,
                                      settings.batch_views or batch_norm)
        return total, {"meta_train": total.item(), "meta_test": 0.0, "loss": total.item(), **parts}
    train_views = [clean] + [x for name, x in adversarial.items() if name != held_out]
    j_train, train_parts = view_objective(student, params, teacher, train_views, labels,
                                          p_teacher, settings.weights(settings.meta_train), settings.temperature,
                                          settings.batch_views or batch_norm)
    # retain_graph: J(θ; V) is differentiated again as part of L, also in first order.
    grads = torch.autograd.grad(j_train, list(params.values()), create_graph=settings.second_order,
                                retain_graph=True)
    fast = {name: p - settings.inner_lr * (g if settings.second_order else g.detach())
            for (name, p), g in zip(params.items(), grads)}
    if batch_norm:  # the meta-test pass must not move the running statistics (module docstring)
        fast.update({name: b.clone() for name, b in student.named_buffers()})
    test_weights = settings.weights(settings.meta_test)
    # RC of the held-out view compares it with the clean prediction of the fast weights.
    clean_logits = defended_logits(student, fast, teacher, clean) if test_weights.rc else None
    j_test, test_parts = view_objective(student, fast, teacher, [adversarial[held_out]], labels,
                                        p_teacher, test_weights, settings.temperature, clean_logits=clean_logits)
    total = j_train + settings.beta * j_test
    metrics = {"meta_train": j_train.item(), "meta_test": j_test.item(), "loss": total.item(),
               **{f"{k}": train_parts[k] + test_parts[k] for k in ("ac", "cc", "lc", "rc")}}
    return total, metrics


def meta_gradients(student: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(student.parameters())))


def average_across_workers(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Mean of each gradient over all workers, in one flat all-reduce.

    DistributedDataParallel cannot wrap a step that calls ``torch.autograd.grad`` with
    ``create_graph=True``, so the outer gradient is reduced explicitly, once per step.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return grads
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    out, offset = [], 0
    for g in grads:
        out.append(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return out


def apply_gradients(student: nn.Module, grads: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    for p, g in zip(student.parameters(), grads):
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
