from __future__ import annotations

from workers.defenses.base import RefreshedDefense


class MIDRefreshed(RefreshedDefense):
    """MID meta-trained, with the ``mid`` section's settings, on a pool refreshed every
    ``pool.refresh.every`` epochs against the student itself (C_t ∘ E_s): the attacks it
    learns invariance to stay the attacks that beat it."""

    row = "MID-R"
    kind = "mid-r"
    objective = "mid"
    reads_teacher_classifier = True
    init_from = "teacher"
    description = ("MID's C_t ∘ E_s meta-trained on a pool refreshed against itself every pool.refresh.every epochs "
                   "(the stored perturbations continued by a few attack steps)")
