from advertorch.attacks import CarliniWagnerL2Attack
from torch import nn

from workers.attacks.base import Attack


class CW(Attack):
    """Carlini & Wagner's L2 attack: the smallest L2 change that flips the label, found by
    Adam in tanh space with a binary search over the loss constant. Not ε-bounded."""

    family = "CW"
    threat_model = "l2"
    settings_fields = ("max_iterations", "binary_search_steps", "confidence", "initial_const", "learning_rate")

    def build(self, model: nn.Module, num_classes: int):
        s = self.settings
        return CarliniWagnerL2Attack(model, num_classes, confidence=s["confidence"], targeted=self.targeted,
                                     learning_rate=s["learning_rate"], binary_search_steps=s["binary_search_steps"],
                                     max_iterations=s["max_iterations"], initial_const=s["initial_const"],
                                     clip_min=0.0, clip_max=1.0)
