"""The attack registry: adding an attack is one file and one line here.

The registry names each family's class by module, and imports it (with torch and
advertorch) only when an attack is built: validating a config, or `mid validate`, needs the
names alone and stays quick.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.attacks.base import Attack

FAMILIES: dict[str, str] = {  # family -> "module:class" in this package
    "PGD": "pgd:PGD",
    "MIM": "mim:MIM",
    "FGSM": "fgsm:FGSM",
    "BIM": "bim:BIM",
}
SUFFIXES = {"N": False, "T": True}
ATTACK_NAMES = tuple(sorted(f"{f}_{s}" for f in FAMILIES for s in SUFFIXES))

__all__ = ["ATTACK_NAMES", "FAMILIES", "Attack", "attack_class", "make_attack", "parse_attack_name",
           "random_targets"]


def parse_attack_name(name: str) -> tuple[str, bool]:
    family, _, suffix = name.rpartition("_")
    if family not in FAMILIES or suffix not in SUFFIXES:
        raise ValueError(f"unknown attack {name!r} (allowed: {', '.join(ATTACK_NAMES)})")
    return family, SUFFIXES[suffix]


def attack_class(family: str) -> type["Attack"]:
    module, _, name = FAMILIES[family].partition(":")
    return getattr(import_module(f"{__name__}.{module}"), name)


def make_attack(name: str, family_settings: dict[str, dict[str, Any]]) -> "Attack":
    family, targeted = parse_attack_name(name)
    return attack_class(family)(targeted, family_settings[family])


def __getattr__(name: str) -> Any:
    if name in ("Attack", "random_targets"):  # the torch-side names, imported on first use
        return getattr(import_module(f"{__name__}.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
