from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from workers.attacks.base import Attack, FamilySettings

if TYPE_CHECKING:  # the config reads Settings from every family file: torch loads on use
    from torch import nn


class BIM(Attack):
    """Kurakin et al.'s basic iterative method (L∞, no random start)."""

    family = "BIM"

    class Settings(FamilySettings):
        eps: float = Field(0.3, gt=0.0, le=1.0)
        nb_iter: int = Field(40, gt=0)
        eps_iter: float = Field(0.05, gt=0.0)

    @classmethod
    def steps(cls, settings):
        return settings["nb_iter"]

    def build(self, model: nn.Module, num_classes: int):
        from advertorch.attacks import LinfBasicIterativeAttack

        s = self.settings
        return LinfBasicIterativeAttack(model, eps=s["eps"], nb_iter=s["nb_iter"],
                                        eps_iter=s["eps_iter"], clip_min=0.0, clip_max=1.0,
                                        targeted=self.targeted)
