from __future__ import annotations

from pydantic import Field

from workers.defenses.base import AdversarialTrainSettings, ClassifierDefense


class TRADES(ClassifierDefense):
    """Zhang et al. 2019: clean cross-entropy plus β·KL between the clean and the attacked
    predictions, the attack maximising that KL."""

    row = "TRADES"
    kind = "trades"
    description = "TRADES: a classifier C ∘ E trained online against PGD with the TRADES loss"

    class Settings(AdversarialTrainSettings):
        beta: float = Field(6.0, ge=0.0, description="weight of the KL robustness term (TRADES' 1/λ)")

    @staticmethod
    def loss(model, plain, x, y, settings):
        from workers.adversarial_training import trades_loss

        return trades_loss(model, plain, x, y, settings["attack"], settings["beta"])

    @classmethod
    def step_macs(cls, settings, units):
        # The attack, the clean forward pass it starts from, then clean and attacked images trained together.
        return settings["attack"]["nb_iter"] * units["attack_step"] + units["forward"] + 2 * units["train_step"]

    @classmethod
    def summary(cls, settings):
        return f"TRADES-{settings['attack']['nb_iter']}, {settings['epochs']} epochs"
