"""The attack registry: adding an attack is one file and one line here (docs/extending.md).

The registry names each family's class by module. A family's class owns its settings (the
config's ``attacks.<FAMILY>`` section is built from them) and its step count (``mid
plan``), so nothing else names a family.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.attacks.base import Attack

# family -> ("module:class" in this package, the variants it has: N untargeted, T targeted)
FAMILIES: dict[str, tuple[str, str]] = {
    "PGD": ("pgd:PGD", "NT"),
    "MIM": ("mim:MIM", "NT"),
    "FGSM": ("fgsm:FGSM", "NT"),
    "BIM": ("bim:BIM", "NT"),
    "CW": ("cw:CW", "NT"),
    "JSMA": ("jsma:JSMA", "T"),  # the paper's JSMA is targeted only, AutoAttack untargeted only
    "AA": ("autoattack:AutoAttack", "N"),
}
SUFFIXES = {"N": False, "T": True}
ATTACK_NAMES = tuple(sorted(f"{f}_{s}" for f, (_, variants) in FAMILIES.items() for s in variants))

__all__ = ["ATTACK_NAMES", "FAMILIES", "Attack", "attack_class", "make_attack", "make_targets",
           "parse_attack_name", "random_targets", "seed_attack_randomness"]


def parse_attack_name(name: str) -> tuple[str, bool]:
    family, _, suffix = name.rpartition("_")
    if name not in ATTACK_NAMES:
        raise ValueError(f"unknown attack {name!r} (allowed: {', '.join(ATTACK_NAMES)})")
    return family, SUFFIXES[suffix]


def attack_class(family: str) -> type["Attack"]:
    module, _, name = FAMILIES[family][0].partition(":")
    return getattr(import_module(f"{__name__}.{module}"), name)


def make_attack(name: str, family_settings: dict[str, dict[str, Any]]) -> "Attack":
    family, targeted = parse_attack_name(name)
    return attack_class(family)(targeted, family_settings[family])


def __getattr__(name: str) -> Any:
    if name in ("Attack", "make_targets", "random_targets", "seed_attack_randomness"):  # the torch-side names, imported on first use
        return getattr(import_module(f"{__name__}.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
