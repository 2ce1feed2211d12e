from __future__ import annotations

from workers.defenses.base import PoolStudentDefense


class MID(PoolStudentDefense):
    """Meta Invariance Defense: the student encoder E_s, meta-trained on the stored attacker
    pool by the MID stage (``workers/train_on_pool.py``, settings in the config's ``mid``
    section), read by the frozen teacher's classifier C_t."""

    row = "MID"
    kind = "mid"
    description = ("MID's defended model C_t ∘ E_s: the teacher's classifier C_t reading the student encoder E_s, "
                   "meta-trained against the attacker pool")
