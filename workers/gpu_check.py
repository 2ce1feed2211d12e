"""The Ray Train side of `benchmarks/gpu_check.py`'s ``mid_stage`` part: a few of MID's
second-order steps on each worker of a group (NCCL on GPUs, gloo on CPUs), gradients averaged
by ``workers.mid.average_across_workers`` as the MID stage averages them, and the same steps in
one process, to compare. Here and not in the script because Ray pickles a function of a
script's ``__main__`` by value, torch's module objects with it, where it imports a package's
by name on the worker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from workers.mid import (FrozenTeacher, apply_gradients, average_across_workers, draw_held_out, meta_gradients,
                         meta_objective)
from workers.mid_settings import MetaSettings
from workers.models import ModelSpec, build_encoder, build_teacher

MID_ATTACKS = ["PGD_N", "PGD_T", "MIM_N", "MIM_T"]
MID_STEPS = 3


def mid_models():
    spec = ModelSpec("lenet", 1, 16, 10)
    torch.manual_seed(0)
    teacher = build_teacher(spec)
    student = build_encoder(spec)
    student.load_state_dict(teacher.encoder.state_dict())  # the student starts as the teacher's encoder
    return student, FrozenTeacher(teacher.encoder, teacher.classifier, teacher.decoder)


def mid_batch(rank: int, step: int, device: torch.device):
    g = torch.Generator().manual_seed(1000 * rank + step)
    clean = torch.rand(8, 1, 16, 16, generator=g)
    views = {a: (clean + 0.1 * torch.randn(clean.shape, generator=g)).clamp(0, 1).to(device) for a in MID_ATTACKS}
    return clean.to(device), views, torch.randint(0, 10, (8,), generator=g).to(device)


def mid_steps(device: torch.device, ranks: list[int], reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]]):
    """MID_STEPS second-order steps; each rank in ``ranks`` takes its own batch, the
    gradients go through ``reduce``. Returns the losses and the final weights."""
    settings = MetaSettings(inner_lr=1e-2)
    student, teacher = mid_models()
    student, teacher.encoder, teacher.classifier, teacher.decoder = (
        m.to(device) for m in (student, teacher.encoder, teacher.classifier, teacher.decoder))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for step in range(MID_STEPS):
        held_out = draw_held_out(MID_ATTACKS, seed=0, step=step)
        per_rank = []
        for rank in ranks:
            clean, views, labels = mid_batch(rank, step, device)
            loss, _ = meta_objective(student, teacher, clean, views, labels, held_out, settings)
            per_rank.append(meta_gradients(student, loss))
            losses.append(loss.item())
        grads = reduce([torch.stack(gs).mean(0) for gs in zip(*per_rank)])
        apply_gradients(student, grads, optimizer)
    return losses, torch.cat([p.detach().reshape(-1).cpu() for p in student.parameters()])


def mid_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch.distributed as dist
    from ray.train.torch import get_device

    # TF32 would round convolutions to 10 bits; the comparison is with float32 on a CPU.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rank = ray.train.get_context().get_world_rank()
    device = get_device() if config["use_gpu"] else torch.device("cpu")
    losses, weights = mid_steps(device, [rank], average_across_workers)
    if rank == 0:
        Path(config["out"]).write_text(json.dumps({"losses": losses, "weights": weights.tolist(),
                                                   "backend": dist.get_backend(), "device": str(device),
                                                   "world_size": dist.get_world_size()}))
