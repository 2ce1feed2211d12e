from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from workers.attacks.base import Attack, FamilySettings

if TYPE_CHECKING:  # the config reads Settings from every family file: torch loads on use
    import torch
    from torch import nn

# The attacks of each version, ART's closest to Croce & Hein's: ART has no FAB, and its
# AutoAttack runs every attack untargeted first, then those that can be targeted against
# each other label in turn (APGD-T of the original uses 9 targets the same way).
VERSIONS = {
    "standard": "APGD-CE, APGD-DLR, Square-5000, then APGD-CE/DLR targeted at each other label (ART; no FAB)",
    "fast": "APGD-CE and APGD-DLR (50 iterations each), Square-1000, untargeted (ART)",
}


class AutoAttack(Attack):
    """AutoAttack (L∞) from IBM's Adversarial Robustness Toolbox: an ensemble of
    parameter-free attacks, stopping per sample at the first that succeeds."""

    family = "AA"

    class Settings(FamilySettings):
        eps: float = Field(0.3, gt=0.0, le=1.0)
        version: Literal["standard", "fast"] = Field(
            "standard", description="standard: ART's closest set to the original; fast: fewer iterations, untargeted")
        batch_size: int = Field(128, gt=0)

    @property
    def stochastic(self) -> bool:
        return True  # APGD and Square draw random starts and patches

    def build(self, model: nn.Module, num_classes: int):
        from art.attacks.evasion import AutoAttack as ARTAutoAttack
        from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack
        import numpy as np
        from art.estimators.classification import PyTorchClassifier
        from torch import nn

        s = self.settings
        eps, standard = s["eps"], s["version"] == "standard"
        sample = next(model.parameters())
        classifier = PyTorchClassifier(model, loss=nn.CrossEntropyLoss(), input_shape=self.input_shape,
                                       nb_classes=num_classes, clip_values=(0.0, 1.0), device_type=sample.device.type)
        iterations = 100 if standard else 50
        apgd = [AutoProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=iterations,
                                             nb_random_init=1, batch_size=s["batch_size"], loss_type=loss,
                                             verbose=False)
                for loss in ("cross_entropy", "difference_logits_ratio")]
        square = SquareAttack(classifier, norm=np.inf, eps=eps, max_iter=5000 if standard else 1000, p_init=0.8,
                              nb_restarts=1, batch_size=s["batch_size"], verbose=False)
        return ARTAutoAttack(classifier, norm=np.inf, eps=eps, eps_step=2 * eps, attacks=[*apgd, square],
                             batch_size=s["batch_size"], targeted=standard)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                target: torch.Tensor | None = None) -> torch.Tensor:
        self.input_shape = tuple(x.shape[1:])
        return super().perturb(model, x, y, target)

    def run(self, adversary, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        import numpy as np
        import torch

        adv = adversary.generate(x.cpu().numpy().astype(np.float32), label.cpu().numpy())
        return torch.from_numpy(adv).to(x.device, x.dtype)
