from __future__ import annotations

from typing import Literal

from pydantic import Field

from workers.defenses.base import RefreshedDefense, RefreshedSettings


class MIDRefreshedSettings(RefreshedSettings):
    """MID-R's schedule (``models.mid_r``): unset fields are ``mid``'s, so MID's own row keeps
    its settings while MID-R trains on its own schedule."""

    classifier: Literal["teacher", "trainable"] | None = Field(
        None, description="the label term's classifier: the teacher's, frozen, or a trainable copy (none: "
                          "mid.classifier)")


class MIDRefreshed(RefreshedDefense):
    """MID meta-trained, with the ``mid`` section's settings, on a pool refreshed every
    ``pool.refresh.every`` epochs against the student itself (C_t ∘ E_s): the attacks it
    learns invariance to stay the attacks that beat it."""

    row = "MID-R"
    kind = "mid-r"
    objective = "mid"
    reads_teacher_classifier = True
    init_from = "teacher"
    Settings = MIDRefreshedSettings
    description = ("MID's C_t ∘ E_s meta-trained on a pool refreshed against itself every pool.refresh.every epochs "
                   "(the stored perturbations continued by a few attack steps)")
