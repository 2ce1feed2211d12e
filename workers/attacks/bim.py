from advertorch.attacks import LinfBasicIterativeAttack
from torch import nn

from workers.attacks.base import Attack


class BIM(Attack):
    """Kurakin et al.'s basic iterative method (L∞, no random start)."""

    family = "BIM"
    settings_fields = ("eps", "nb_iter", "eps_iter")

    def build(self, model: nn.Module, num_classes: int):
        s = self.settings
        return LinfBasicIterativeAttack(model, eps=s["eps"], nb_iter=s["nb_iter"],
                                        eps_iter=s["eps_iter"], clip_min=0.0, clip_max=1.0,
                                        targeted=self.targeted)
