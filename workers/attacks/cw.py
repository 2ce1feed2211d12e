from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from workers.attacks.base import Attack, FamilySettings

if TYPE_CHECKING:  # the config reads Settings from every family file: torch loads on use
    from torch import nn


class CW(Attack):
    """Carlini & Wagner's L2 attack: the smallest L2 change that flips the label, found by
    Adam in tanh space with a binary search over the loss constant. Not ε-bounded."""

    family = "CW"
    threat_model = "l2"

    class Settings(FamilySettings):
        """Defaults: the authors' code. At learning_rate 0.01 few MNIST pixels move (the
        success rate under each table shows it); 0.1 succeeds."""

        max_iterations: int = Field(500, gt=0)
        binary_search_steps: int = Field(4, gt=0)
        confidence: float = Field(1.0, ge=0.0)
        initial_const: float = Field(1.0, gt=0.0)
        learning_rate: float = Field(0.01, gt=0.0)

    @classmethod
    def steps(cls, settings):
        return settings["max_iterations"] * settings["binary_search_steps"]

    def build(self, model: nn.Module, num_classes: int):
        from advertorch.attacks import CarliniWagnerL2Attack

        s = self.settings
        return CarliniWagnerL2Attack(model, num_classes, confidence=s["confidence"], targeted=self.targeted,
                                     learning_rate=s["learning_rate"], binary_search_steps=s["binary_search_steps"],
                                     max_iterations=s["max_iterations"], initial_const=s["initial_const"],
                                     clip_min=0.0, clip_max=1.0)
