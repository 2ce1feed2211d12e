"""When a training stage must stop instead of committing its model.

A model that took no optimizer step (every worker had less than one full batch) or whose
loss or weights became non-finite still "finishes": its loop ends, rank 0 would commit it,
and every later stage (the pool, MID, the tables) would build on it with exit status 0.
``epoch_problem`` runs at the end of every epoch; on a problem the loop writes it to the
stage's stop record (``record_stop``) and returns without committing, and the driver
reports that one line naming the stage and the epoch.

Why a record and not an exception: Ray Train retries every worker error up to
``ray.max_failures`` times, and the same data and settings fail the same way each time.
Every worker takes the same decision (a flag reduced across the group): a worker that
stopped alone would leave the others waiting in the next collective.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from storage import fs


def _first_non_finite(module: torch.nn.Module) -> str | None:
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _any_worker(flag: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def epoch_problem(stage: str, epoch: int, steps: int, batch_size: int, loss: float,
                  model: torch.nn.Module, device: torch.device) -> str | None:
    """Why this epoch left an untrained or broken model, or None; the same on every worker."""
    problem = None
    if steps == 0:
        problem = (f"{stage} training ran zero optimizer steps in epoch {epoch}: each worker got fewer rows "
                   f"than one batch (batch_size={batch_size}); lower the batch size or the number of workers, "
                   f"or train on more samples (data.train_limit)")
    elif not math.isfinite(loss):
        problem = f"{stage} training's loss became {loss} in epoch {epoch}; lower the learning rate or check the loss weights"
    elif (tensor := _first_non_finite(model)) is not None:
        problem = (f"{stage} training's weights became non-finite in epoch {epoch} ({tensor}); lower the "
                   f"learning rate or check the loss weights")
    if _any_worker(problem is not None, device) and problem is None:
        problem = f"{stage} training stopped in epoch {epoch}: another worker's loss or steps failed the check"
    return problem


def record_stop(url: str, problem: str) -> None:
    """Leave ``problem`` for the driver (rank 0 writes; every worker has the same one)."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        fs.write_json_atomic(url, {"problem": f"{problem}; nothing was committed"})


def read_stop(url: str) -> str | None:
    record: dict[str, Any] | None = fs.read_json(url)
    return record["problem"] if record else None
