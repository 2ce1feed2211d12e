import torch
from advertorch.attacks import JacobianSaliencyMapAttack
from torch import nn

from workers.attacks.base import Attack


class JSMA(Attack):
    """Papernot et al.'s Jacobian saliency map attack (targeted, L0): sets pairs of pixels to
    the maximum until the target label wins or a share γ of the pixels has changed."""

    family = "JSMA"
    threat_model = "l0"
    settings_fields = ("theta", "gamma", "chunk")

    def build(self, model: nn.Module, num_classes: int):
        s = self.settings
        return JacobianSaliencyMapAttack(model, num_classes, clip_min=0.0, clip_max=1.0,
                                         theta=s["theta"], gamma=s["gamma"])

    def run(self, adversary, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        # advertorch builds (batch, pixels, pixels) tensors every iteration: 100 MNIST images
        # take 1.6 GB and 807 s at once, so a few at a time bound the memory.
        step = self.settings["chunk"]
        return torch.cat([adversary.perturb(x[i:i + step], label[i:i + step]) for i in range(0, len(x), step)])
