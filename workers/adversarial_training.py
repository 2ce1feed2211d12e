"""The objectives of the adversarial-training baselines: Madry PGD AT and TRADES.

Both attack the model being trained, every step (online), which is what MID's cached pool
avoids paying for. The attack runs on the plain module (not the DDP wrapper, whose backward
hooks would all-reduce the attack's parameter gradients) with the parameters frozen, so
the attack's backward passes compute input gradients only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from workers import advertorch_compat  # noqa: F401  (must precede any advertorch import)
from advertorch.attacks import LinfPGDAttack  # noqa: E402


@contextmanager
def frozen_for_attack(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def pgd(model: nn.Module, settings: dict[str, Any], loss_fn=None) -> LinfPGDAttack:
    return LinfPGDAttack(model, loss_fn=loss_fn, eps=settings["eps"], nb_iter=settings["nb_iter"],
                         eps_iter=settings["eps_iter"], rand_init=settings["rand_init"],
                         clip_min=0.0, clip_max=1.0)


def madry_loss(model: nn.Module, plain: nn.Module, x: torch.Tensor, y: torch.Tensor,
               attack: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on PGD examples of the current model (Madry et al. 2018)."""
    with frozen_for_attack(plain), torch.enable_grad():
        x_adv = pgd(plain, attack).perturb(x, y).detach()
    logits = model(x_adv)
    return F.cross_entropy(logits, y), logits


def _kl_to_clean(logits_adv: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits_adv, dim=1), p_clean, reduction="sum")


def trades_loss(model: nn.Module, plain: nn.Module, x: torch.Tensor, y: torch.Tensor,
                attack: dict[str, Any], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CE(f(x), y) + β·KL(f(x) || f(x')), x' maximizing that KL in the ε-ball (Zhang et al. 2019).

    The inner maximization is advertorch's PGD with the KL as its loss. It starts from a
    uniform point of the ball (advertorch's random start) where TRADES' code starts from
    x + 0.001·N(0, 1): at x itself the KL's gradient is zero and PGD would not move.
    """
    with frozen_for_attack(plain), torch.enable_grad():
        p_clean = F.softmax(plain(x), dim=1).detach()
        x_adv = pgd(plain, {**attack, "rand_init": True}, loss_fn=_kl_to_clean).perturb(x, p_clean).detach()
    logits = model(torch.cat([x, x_adv]))
    clean_logits, adv_logits = logits.split(len(x))
    robust = F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(clean_logits, dim=1),
                      reduction="batchmean")
    return F.cross_entropy(clean_logits, y) + beta * robust, clean_logits
