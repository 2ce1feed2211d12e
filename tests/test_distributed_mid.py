"""Distributed MID: with 2 Ray Train workers (gloo), the meta-gradient averaged across
workers equals the single-process computation over the same two local batches, with the
same held-out attack and the same fast-weight steps. A non-finite loss on one worker stops
every worker's stage alike (workers.training_health)."""

import json
import os

import numpy as np
import torch
from torch import nn

from workers.training_health import epoch_problem
from workers.mid import (FrozenTeacher, LossWeights, MetaSettings, average_across_workers, draw_held_out,
                         meta_gradients, meta_objective)

ATTACKS = ["PGD_N", "PGD_T", "MIM_N", "MIM_T"]
SETTINGS = MetaSettings(inner_lr=0.3, beta=1.0, temperature=2.0, second_order=True,
                        meta_train=LossWeights(1.5, 0.8, 1.0), meta_test=LossWeights(1.0, 1.0, 1.0))


def models():
    torch.manual_seed(0)  # identical weights on every worker and in the reference
    student = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    teacher = FrozenTeacher(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double(),
                            nn.Linear(4, 3).double(), nn.Sequential(nn.Linear(4, 6), nn.Sigmoid()).double())
    return student, teacher


def local_batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)  # each worker's own, different data
    clean = torch.rand(8, 6, generator=g, dtype=torch.float64)
    views = {a: (clean + 0.2 * torch.randn(8, 6, generator=g, dtype=torch.float64)).clamp(0, 1) for a in ATTACKS}
    return clean, views, torch.randint(0, 3, (8,), generator=g)


def meta_gradient(rank: int, step: int) -> list[torch.Tensor]:
    student, teacher = models()
    clean, views, labels = local_batch(rank)
    held_out = draw_held_out(ATTACKS, seed=0, step=step)
    loss, _ = meta_objective(student, teacher, clean, views, labels, held_out, SETTINGS)
    return meta_gradients(student, loss)


def worker_loop(config):
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    averaged = average_across_workers(meta_gradient(rank, config["step"]))
    flat = torch.cat([g.reshape(-1) for g in averaged]).tolist()
    # Only rank 1's loss is non-finite: both workers must still take the same decision.
    student, _ = models()
    problem = epoch_problem("MID", 3, 1, 8, float("nan") if rank == 1 else 0.5, student, torch.device("cpu"))
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"gradient": flat, "problem": problem}, f)


def test_two_workers_average_equals_single_process(tmp_path, ray_local):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    step = 5
    TorchTrainer(worker_loop, train_loop_config={"out": str(tmp_path), "step": step},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="equivalence")).fit()
    written = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    per_rank = [np.array(w["gradient"]) for w in written]

    reference = [torch.cat([g.reshape(-1) for g in meta_gradient(rank, step)]).numpy() for rank in (0, 1)]
    expected = (reference[0] + reference[1]) / 2
    np.testing.assert_array_equal(per_rank[0], per_rank[1])  # every worker steps with the same gradient
    np.testing.assert_allclose(per_rank[0], expected, rtol=1e-12, atol=1e-14)
    assert not np.allclose(reference[0], reference[1])  # the two local batches really differ
    # A training stage stops on every worker when one worker's loss is non-finite.
    assert "loss became nan in epoch 3" in written[1]["problem"], written
    assert "epoch 3" in written[0]["problem"] and "another worker" in written[0]["problem"], written
