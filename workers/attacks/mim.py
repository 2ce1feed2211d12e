from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from workers.attacks.base import Attack, FamilySettings

if TYPE_CHECKING:  # the config reads Settings from every family file: torch loads on use
    from torch import nn


class MIM(Attack):
    """Dong et al.'s momentum iterative method (L∞)."""

    family = "MIM"

    class Settings(FamilySettings):
        eps: float = Field(0.3, gt=0.0, le=1.0)
        nb_iter: int = Field(40, gt=0)
        eps_iter: float = Field(0.01, gt=0.0)
        decay_factor: float = Field(1.0, ge=0.0)

    @classmethod
    def steps(cls, settings):
        return settings["nb_iter"]

    def build(self, model: nn.Module, num_classes: int):
        from advertorch.attacks import MomentumIterativeAttack

        s = self.settings
        return MomentumIterativeAttack(model, eps=s["eps"], nb_iter=s["nb_iter"],
                                       eps_iter=s["eps_iter"], decay_factor=s["decay_factor"],
                                       clip_min=0.0, clip_max=1.0, targeted=self.targeted)
