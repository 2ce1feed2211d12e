from __future__ import annotations

from workers.defenses.base import RefreshedDefense


class ATTA(RefreshedDefense):
    """Zheng et al. 2020, "Efficient Adversarial Training with Transferable Adversarial
    Examples": cross-entropy on perturbations carried from round to round, each refresh
    adding a few attack steps against the classifier being trained. Here the carried
    perturbations are the stored pool, refreshed against this classifier; it starts from the
    baseline (the model pool 0 was crafted against) and trains with the ``models.at``
    section's epochs, batch size and learning rate, so it is AT at equal training steps with
    transferred instead of fresh attacks. The table's row for what MID-R's meta-learning and
    distillation add beyond refreshing alone."""

    row = "ATTA"
    kind = "atta"
    objective = "cross_entropy"
    init_from = "baseline"
    description = ("ATTA: a classifier C ∘ E trained with cross-entropy on the stored pool, refreshed against itself "
                   "every pool.refresh.every epochs")
