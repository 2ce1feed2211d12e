"""A training epoch that leaves an untrained or broken model stops its stage
(``workers.training_health``); the distributed decision is ``test_distributed_mid``'s, the
whole stage through the CLI ``test_training_resume``'s."""

import torch
from torch import nn

from workers.training_health import epoch_problem

CPU = torch.device("cpu")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_a_healthy_epoch_passes():
    assert epoch_problem("baseline", 0, 5, 32, 0.7, model(), CPU) is None


def test_an_epoch_without_steps_stops_the_stage():
    """Before: `mid pool configs/digits.yaml --set data.train_limit=64` committed a baseline
    trained on nothing (loss 0.000, accuracy 0.0 %) and made the pool against it."""
    problem = epoch_problem("baseline", 0, 0, 128, 0.0, model(), CPU)
    assert "baseline" in problem and "zero optimizer steps in epoch 0" in problem and "batch_size=128" in problem


def test_a_non_finite_loss_or_weight_stops_the_stage():
    """Before: `--set mid.beta=.inf` committed a student with NaN weights (MID at 3.1 %)."""
    assert "loss became inf in epoch 2" in epoch_problem("MID", 2, 4, 32, float("inf"), model(), CPU)
    broken = model()
    with torch.no_grad():
        broken[1].running_var[1] = float("nan")  # buffers count: they are in the committed weights
    problem = epoch_problem("teacher", 1, 4, 32, 0.3, broken, CPU)
    assert "teacher" in problem and "epoch 1" in problem and "1.running_var" in problem
