"""One small base class that owns what every attack shares (torchattacks style).

An attack is named ``FAMILY_N`` (untargeted) or ``FAMILY_T`` (targeted to a random label
≠ y). A family file declares its advertorch class and how its settings map onto it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from workers import advertorch_compat  # noqa: F401  (must precede any advertorch import)


class Attack(ABC):
    family: ClassVar[str]
    settings_fields: ClassVar[tuple[str, ...]]

    def __init__(self, targeted: bool, settings: dict[str, Any]):
        self.targeted = targeted
        self.settings = {k: settings[k] for k in self.settings_fields}

    @property
    def name(self) -> str:
        return f"{self.family}_{'T' if self.targeted else 'N'}"

    @property
    def stochastic(self) -> bool:
        """Whether two runs can differ: a random start, or random target labels.

        A deterministic attack's variants would be identical copies, so its pool keeps one.
        """
        return self.targeted or bool(self.settings.get("rand_init", False))

    @property
    def eps(self) -> float:
        return float(self.settings["eps"])

    @abstractmethod
    def build(self, model: nn.Module):
        """The advertorch adversary for this attack against ``model``."""

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None = None) -> torch.Tensor:
        was_training = model.training
        model.eval()
        adversary = self.build(model)
        with torch.enable_grad():
            adv = adversary.perturb(x, target if self.targeted else y)
        model.train(was_training)
        return adv.detach()


def random_targets(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random label different from the true one, per sample."""
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes
