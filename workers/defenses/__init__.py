"""The defense registry: a row of the tables is one file and one line here (docs/extending.md).

The registry names each row's class by module, in the tables' default order. A row's class
owns its model's kind, its description and, for a classifier, its settings section
(``models.<kind>``, built by pipeline/config.py), its loss and its cost per sample (``mid
plan``), so nothing else names a row.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.defenses.base import ClassifierDefense, Defense

# row -> "module:class" in this package
DEFENSES: dict[str, str] = {
    "None": "plain:Plain",
    "AT": "madry_at:MadryAT",
    "TRADES": "trades:TRADES",
    "MID": "mid:MID",
    "MID-R": "mid_refreshed:MIDRefreshed",
    "ATTA": "atta:ATTA",
}
STUDENT_ROW = "MID"  # the row the MID stage trains on the fixed pool
DEFAULT_ROW = STUDENT_ROW  # the row a command means when none is named (a sweep's trials' row, export of a run)

__all__ = ["DEFAULT_ROW", "DEFENSES", "STUDENT_ROW", "classifier_defense", "classifier_rows", "defense_class",
           "exportable_rows", "is_student_checkpoint", "reads_teacher_classifier", "refreshed_rows",
           "row_of_checkpoint"]


def defense_class(row: str) -> type["Defense"]:
    if row not in DEFENSES:
        raise ValueError(f"unknown defense {row!r} (allowed: {', '.join(DEFENSES)})")
    module, _, name = DEFENSES[row].partition(":")
    return getattr(import_module(f"{__name__}.{module}"), name)


def classifier_rows() -> list[str]:
    """The rows trained as classifiers in the classifiers' worker group, in registry order."""
    from workers.defenses.base import ClassifierDefense

    return [row for row in DEFENSES if issubclass(defense_class(row), ClassifierDefense)]


def refreshed_rows() -> list[str]:
    """The rows trained in rounds on a refreshed pool (``pipeline/stages/refresh.py``)."""
    from workers.defenses.base import RefreshedDefense

    return [row for row in DEFENSES if issubclass(defense_class(row), RefreshedDefense)]


def reads_teacher_classifier(row: str) -> bool:
    """Whether the row's model is a student encoder read by the teacher's C_t (MID, MID-R)."""
    return defense_class(row).reads_teacher_classifier


def is_student_checkpoint(manifest: dict) -> bool:
    """Whether a checkpoint is a student encoder E_s, read with its teacher's C_t (MID, MID-R)."""
    from workers.defenses.base import STUDENT_CHECKPOINT

    return manifest.get("kind") == STUDENT_CHECKPOINT


def row_of_checkpoint(manifest: dict) -> str | None:
    """The row whose model a checkpoint is (None: the teacher, the substitute). A student's
    manifest names its row, except MID's own (its manifests predate the rows on refreshed pools)."""
    if is_student_checkpoint(manifest):
        return manifest.get("row", STUDENT_ROW)
    return next((row for row in DEFENSES if defense_class(row).checkpoint_kind() == manifest["kind"]), None)


def exportable_rows() -> list[str]:
    """The rows whose model `mid export --row` writes."""
    return [row for row in DEFENSES if defense_class(row).exportable]


def classifier_defense(kind: str) -> type["ClassifierDefense"]:
    """The row whose loss trains a classifier of ``kind``. The substitute of the transfer
    protocol is not a row: it is trained like the plain classifier, with a seed of its own."""
    kind = "baseline" if kind == "substitute" else kind
    for row in classifier_rows():
        defense = defense_class(row)
        if defense.kind == kind:
            return defense
    raise ValueError(f"no defense row trains a classifier of kind {kind!r}")
