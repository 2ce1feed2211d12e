"""One small base class that owns what every attack shares (torchattacks style).

An attack is named ``FAMILY_N`` (untargeted) or ``FAMILY_T`` (targeted: a seeded random
label ≠ y, or one fixed label, ``attacks.target``). A family file declares its library
class and how its settings map onto it, and its threat model: L∞ attacks are bounded by
ε; CW (L2) and JSMA (L0) are not, so nothing checks their images against an ε-ball.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch, numpy and the attack libraries load on first use, not on import: the config reads
# every family's Settings (pipeline/config.py), and `mid validate` stays a second.


class FamilySettings(BaseModel):
    """What a family's ``Settings`` derive from: its fields and defaults are the config's
    ``attacks.<FAMILY>`` section, which pipeline/config.py builds from them (validated there
    like every section: unknown names and non-finite numbers refused)."""


class Attack(ABC):
    family: ClassVar[str]
    Settings: ClassVar[type[FamilySettings]]  # the family's settings: names, defaults, bounds
    threat_model: ClassVar[str] = "linf"  # "linf" (bounded by settings["eps"]), "l2" or "l0"

    def __init__(self, targeted: bool, settings: dict[str, Any]):
        self.targeted = targeted
        self.settings = {k: settings[k] for k in self.Settings.model_fields}

    @classmethod
    def steps(cls, settings: dict[str, Any]) -> int | None:
        """Gradient steps per image (``mid plan`` counts them); None when no fixed count
        says its cost (an ensemble or a search that stops per sample)."""
        return None

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
    def eps(self) -> float | None:
        """The L∞ radius; None for an attack that is not L∞-bounded."""
        return float(self.settings["eps"]) if self.threat_model == "linf" else None

    @abstractmethod
    def build(self, model: nn.Module, num_classes: int):
        """The library's adversary for this attack against ``model``."""

    def run(self, adversary, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Adversarial images of ``x``; ``label`` is the target of a targeted attack, else y."""
        return adversary.perturb(x, label)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None = None) -> torch.Tensor:
        import torch

        from workers import advertorch_compat  # noqa: F401  (before any family's build imports advertorch)

        was_training = model.training
        model.eval()
        with torch.no_grad():
            num_classes = model(x[:1]).shape[-1]
        adversary = self.build(model, num_classes)
        # advertorch flattens gradients with .view, which a channels-last image of more than
        # one channel cannot take: the attacks see plain NCHW (the model converts on its own).
        x = x.contiguous()
        with torch.enable_grad():
            adv = self.run(adversary, x, target if self.targeted else y)
        model.train(was_training)
        return adv.detach()


def seed_attack_randomness(seed: int) -> None:
    """Seed the global generators the attack libraries draw from: torch's (advertorch's random
    starts) and numpy's (ART's AutoAttack), so an attack's output depends on ``seed`` alone."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def random_targets(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random label different from the true one, per sample."""
    import torch

    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes


def make_targets(labels: torch.Tensor, num_classes: int, generator: torch.Generator,
                 target: str | int = "random") -> torch.Tensor:
    """Target labels of a targeted attack: ``"random"`` (a seeded label ≠ y) or one fixed
    label for every sample (the authors' code aims everything at 0, so a sample whose label
    already is the target counts as a success and its accuracy as the share of that class)."""
    import torch

    if target == "random":
        return random_targets(labels, num_classes, generator)
    return torch.full_like(labels, int(target))
