from __future__ import annotations

from workers.defenses.base import ClassifierDefense


class Plain(ClassifierDefense):
    """No defense: cross-entropy on clean images. Its model is also the default source of
    the pool and of the source protocol's attacks, so every run trains it."""

    row = "None"
    kind = "baseline"
    description = "no defense: the plain classifier C ∘ E trained on clean images (the baseline)"
