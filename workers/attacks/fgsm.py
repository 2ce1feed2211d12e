from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from workers.attacks.base import Attack, FamilySettings

if TYPE_CHECKING:  # the config reads Settings from every family file: torch loads on use
    from torch import nn


class FGSM(Attack):
    """Goodfellow et al.'s fast gradient sign method: one step of size ε."""

    family = "FGSM"

    class Settings(FamilySettings):
        eps: float = Field(0.3, gt=0.0, le=1.0)

    @classmethod
    def steps(cls, settings):
        return 1

    def build(self, model: nn.Module, num_classes: int):
        from advertorch.attacks import GradientSignAttack

        return GradientSignAttack(model, eps=self.settings["eps"], clip_min=0.0, clip_max=1.0,
                                  targeted=self.targeted)
