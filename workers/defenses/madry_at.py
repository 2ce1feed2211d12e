from __future__ import annotations

from workers.defenses.base import AdversarialTrainSettings, ClassifierDefense


class MadryAT(ClassifierDefense):
    """Madry et al. 2018: cross-entropy on PGD examples of the model being trained."""

    row = "AT"
    kind = "at"
    description = "Madry adversarial training: a classifier C ∘ E trained online against PGD"
    Settings = AdversarialTrainSettings

    @staticmethod
    def loss(model, plain, x, y, settings):
        from workers.adversarial_training import madry_loss

        return madry_loss(model, plain, x, y, settings["attack"])

    @classmethod
    def step_macs(cls, settings, units):
        return settings["attack"]["nb_iter"] * units["attack_step"] + units["train_step"]

    @classmethod
    def summary(cls, settings):
        return f"AT-PGD-{settings['attack']['nb_iter']}, {settings['epochs']} epochs"
