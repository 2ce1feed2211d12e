from advertorch.attacks import GradientSignAttack
from torch import nn

from workers.attacks.base import Attack


class FGSM(Attack):
    """Goodfellow et al.'s fast gradient sign method: one step of size ε."""

    family = "FGSM"
    settings_fields = ("eps",)

    def build(self, model: nn.Module, num_classes: int):
        return GradientSignAttack(model, eps=self.settings["eps"], clip_min=0.0, clip_max=1.0,
                                  targeted=self.targeted)
