"""The attack registry: adding an attack is one file and one line here."""

from __future__ import annotations

from typing import Any

from workers.attacks.base import Attack, random_targets
from workers.attacks.bim import BIM
from workers.attacks.fgsm import FGSM
from workers.attacks.mim import MIM
from workers.attacks.pgd import PGD

FAMILIES: dict[str, type[Attack]] = {cls.family: cls for cls in (PGD, MIM, FGSM, BIM)}
SUFFIXES = {"N": False, "T": True}
ATTACK_NAMES = tuple(sorted(f"{f}_{s}" for f in FAMILIES for s in SUFFIXES))

__all__ = ["ATTACK_NAMES", "FAMILIES", "Attack", "make_attack", "parse_attack_name", "random_targets"]


def parse_attack_name(name: str) -> tuple[str, bool]:
    family, _, suffix = name.rpartition("_")
    if family not in FAMILIES or suffix not in SUFFIXES:
        raise ValueError(f"unknown attack {name!r} (allowed: {', '.join(ATTACK_NAMES)})")
    return family, SUFFIXES[suffix]


def make_attack(name: str, family_settings: dict[str, dict[str, Any]]) -> Attack:
    family, targeted = parse_attack_name(name)
    return FAMILIES[family](targeted, family_settings[family])
