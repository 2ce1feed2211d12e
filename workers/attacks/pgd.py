from advertorch.attacks import LinfPGDAttack
from torch import nn

from workers.attacks.base import Attack


class PGD(Attack):
    """Madry et al.'s L∞ projected gradient descent with random start."""

    family = "PGD"
    settings_fields = ("eps", "nb_iter", "eps_iter", "rand_init")

    def build(self, model: nn.Module, num_classes: int):
        s = self.settings
        return LinfPGDAttack(model, eps=s["eps"], nb_iter=s["nb_iter"], eps_iter=s["eps_iter"],
                             rand_init=s["rand_init"], clip_min=0.0, clip_max=1.0,
                             targeted=self.targeted)
