from advertorch.attacks import MomentumIterativeAttack
from torch import nn

from workers.attacks.base import Attack


class MIM(Attack):
    """Dong et al.'s momentum iterative method (L∞)."""

    family = "MIM"
    settings_fields = ("eps", "nb_iter", "eps_iter", "decay_factor")

    def build(self, model: nn.Module, num_classes: int):
        s = self.settings
        return MomentumIterativeAttack(model, eps=s["eps"], nb_iter=s["nb_iter"],
                                       eps_iter=s["eps_iter"], decay_factor=s["decay_factor"],
                                       clip_min=0.0, clip_max=1.0, targeted=self.targeted)
