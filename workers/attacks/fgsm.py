from advertorch.attacks import GradientSignAttack
from pydantic import Field
from torch import nn

from workers.attacks.base import Attack, FamilySettings


class FGSM(Attack):
    """Goodfellow et al.'s fast gradient sign method: one step of size ε."""

    family = "FGSM"

    class Settings(FamilySettings):
        eps: float = Field(0.3, gt=0.0, le=1.0)

    @classmethod
    def steps(cls, settings):
        return 1

    def build(self, model: nn.Module, num_classes: int):
        return GradientSignAttack(model, eps=self.settings["eps"], clip_min=0.0, clip_max=1.0,
                                  targeted=self.targeted)
