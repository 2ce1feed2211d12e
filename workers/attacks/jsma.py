from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from workers.attacks.base import Attack, FamilySettings

if TYPE_CHECKING:  # the config reads Settings from every family file: torch loads on use
    import torch
    from torch import nn


class JSMA(Attack):
    """Papernot et al.'s Jacobian saliency map attack (targeted, L0): sets pairs of pixels to
    the maximum until the target label wins or a share γ of the pixels has changed."""

    family = "JSMA"
    threat_model = "l0"

    class Settings(FamilySettings):
        """Very slow on 784 pixels: give it a subset (eval.subset)."""

        theta: float = Field(1.0, gt=0.0, le=1.0, description="change per chosen pixel")
        gamma: float = Field(1.0, gt=0.0, le=1.0, description="largest share of pixels changed")
        chunk: int = Field(16, gt=0, description="samples per call (memory grows as chunk × pixels²)")

    def build(self, model: nn.Module, num_classes: int):
        from advertorch.attacks import JacobianSaliencyMapAttack

        s = self.settings
        return JacobianSaliencyMapAttack(model, num_classes, clip_min=0.0, clip_max=1.0,
                                         theta=s["theta"], gamma=s["gamma"])

    def run(self, adversary, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        import torch

        # advertorch builds (batch, pixels, pixels) tensors every iteration: 100 MNIST images
        # take 1.6 GB and 807 s at once, so a few at a time bound the memory.
        step = self.settings["chunk"]
        return torch.cat([adversary.perturb(x[i:i + step], label[i:i + step]) for i in range(0, len(x), step)])
