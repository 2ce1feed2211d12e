"""The sweep file of ``mid sweep``: a base config plus named variants, each a full run config.

    name: ablations-digits
    base: ../digits.yaml            # relative to this file
    profile: null                   # a profile of the base config, applied first
    set: {mid.epochs: 5}            # overrides of every trial
    variants:                       # name -> overrides (dotted keys, as with --set)
      full: {}
      no-meta: {mid.meta: false}
    grid: {pool.variants: [1, 2]}   # or a grid: one variant per combination
    row: MID                        # the row of each trial that the combined table shows
    max_concurrent_trials: 1

Every trial's config is built and validated here, before Ray starts; a problem names the
sweep file, the variant and the field.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator

from pipeline.config import SAFE_NAME, RunConfig, Section
from pipeline.config_loader import (ConfigError, format_validation_error, merge_profile, parse_override, read_profiles,
                                    read_tree, set_path)
from storage.store import check_url
from workers.defenses import DEFAULT_ROW, DEFENSES

VARIANT_NAME_LENGTH = 40
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")
MAX_TRIALS = 10_000  # even with --yes: each trial is a whole run, and each config is built here first


class SweepFile(Section):
    name: str = Field(..., description="names the sweep's output folder and, with each variant, its trials' runs")
    base: str = Field(..., description="the base config, relative to the sweep file")
    profile: str | None = Field(None, description="a profile of the base config, applied before everything else")
    set: dict[str, Any] = Field({}, description="overrides of every trial (dotted keys)")
    variants: dict[str, dict[str, Any]] = Field({}, description="variant name -> its overrides (dotted keys)")
    grid: dict[str, list[Any]] = Field({}, description="dotted key -> values; one variant per combination")
    row: Literal[tuple(DEFENSES)] = Field(DEFAULT_ROW, description="the row each trial contributes")
    max_concurrent_trials: PositiveInt = Field(1, description="trials Ray Tune runs at once")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not SAFE_NAME.fullmatch(v) or len(v) > 24:
            raise ValueError(f"{v!r} is not a safe sweep name: up to 24 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("variants")
    @classmethod
    def _safe_variant_names(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in v:
            if not VARIANT_NAME.fullmatch(str(name)):
                raise ValueError(f"variant {name!r}: up to 40 letters, digits, '.', '_' or '-' (it names "
                                 f"the trial's run and folder)")
        return v

    @field_validator("grid")
    @classmethod
    def _values_per_key(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:  # the grid's product would be empty: a sweep of no trials
                raise ValueError(f"{key}: no values; give at least one (e.g. {key}: [1, 2])")
        return v

    @model_validator(mode="after")
    def _some_variants(self):
        if bool(self.variants) == bool(self.grid):
            raise ValueError("give either variants (named overrides) or grid (values per key), exactly one")
        return self

    def trial_count(self) -> int:
        return len(self.variants) if self.variants else math.prod(len(values) for values in self.grid.values())

    def expanded(self) -> dict[str, dict[str, Any]]:
        """Variant name -> overrides; a grid's names say their values (``pool.variants=2``)."""
        if self.variants:
            return self.variants
        keys = list(self.grid)
        return {grid_variant_name(keys, values): dict(zip(keys, values))
                for values in itertools.product(*self.grid.values())}


def _label(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_label(v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}-{_label(v)}" for k, v in value.items())
    return str(value)


def grid_variant_name(keys: list[str], values: tuple[Any, ...]) -> str:
    """A grid combination's name: its values (``variants=2,beta=0.5``), made safe for a
    folder and a run name whatever the values are (lists, paths); a name past 40 characters
    keeps its start and a digest of the values, so names stay distinct."""
    text = ",".join(f"{k.split('.')[-1]}={_label(v)}" for k, v in zip(keys, values))
    name = re.sub(r"[^A-Za-z0-9._,=+-]", "_", text).lstrip("._,=+-") or "v"
    if len(name) > VARIANT_NAME_LENGTH or name != text:
        digest = hashlib.sha256(json.dumps(list(values), sort_keys=True, default=str).encode()).hexdigest()[:8]
        name = f"{name[:VARIANT_NAME_LENGTH - 9]}-{digest}"
    return name


@dataclass
class Sweep:
    name: str
    path: Path
    row: str
    max_concurrent_trials: int
    trials: dict[str, RunConfig]        # variant -> its validated run config
    overrides: dict[str, dict[str, Any]]  # variant -> what it changes against the base

    def digest(self, variant: str) -> str:
        """What a finished trial's result is reused for: its whole config."""
        return hashlib.sha256(self.trials[variant].model_dump_json().encode()).hexdigest()[:20]


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """Paths as the sweep's driver means them: a trial runs in a Ray Tune worker, whose
    working directory is not the driver's."""
    cfg.store.url = check_url(cfg.store.url)
    if cfg.data.path and "://" not in cfg.data.path:
        cfg.data.path = os.path.abspath(cfg.data.path)
    if cfg.models.pretrained and "://" not in cfg.models.pretrained:
        cfg.models.pretrained = os.path.abspath(cfg.models.pretrained)
    return cfg


def _problem(path: Path, where: str, message: str) -> ConfigError:
    return ConfigError(f"config error: {path}: {where}: {message}")


def load_sweep(path: str | Path, overrides: list[str] = (), store: str | None = None,
               max_concurrent_trials: int | None = None, max_trials: int | None = None) -> Sweep:
    """Every trial's config, validated. ``overrides`` (--set) apply to every trial, after the
    sweep file's own settings; ``store`` replaces every trial's store. A sweep of more than
    ``max_trials`` trials is refused (``mid sweep`` asks for --yes past 64)."""
    path = Path(path)
    try:
        spec = SweepFile.model_validate(read_tree(path))
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, SweepFile).replace("config error: ", f"config error: {path}: ")) from None
    # Counted before any trial's config is built: a few grid lines can multiply to millions.
    count = spec.trial_count()
    where = "variants" if spec.variants else "grid"
    factors = "" if spec.variants else f" ({' x '.join(str(len(v)) for v in spec.grid.values())})"
    if count > MAX_TRIALS:
        raise _problem(path, where, f"{count:,} trials{factors}, above the {MAX_TRIALS:,} a sweep may hold "
                                    f"(each is a whole run)")
    if max_trials is not None and count > max_trials:
        raise _problem(path, where, f"{count:,} trials{factors}, more than {max_trials}, each a whole run; "
                                    f"pass --yes to run them all")
    cli = [parse_override(text) for text in overrides]
    # Each trial's run is named <sweep>-<variant>: its ref in the store and folder must not
    # be shared with another trial's, so a name given anywhere else would be overridden.
    given = [("set", spec.set), *((f"variant {v}", o) for v, o in spec.variants.items()), ("--set", dict(cli))]
    named = [origin for origin, keys in given if "name" in keys]
    if named:
        raise _problem(path, f"{named[0]}: name", f"a trial's run is named by the sweep ({spec.name}-<variant>); "
                                                  f"rename the variant or the sweep instead")
    base_path = (path.parent / spec.base).resolve()
    if not base_path.is_file():
        raise _problem(path, "base", f"{spec.base}: no such file (looked for {base_path})")
    base = read_tree(base_path)
    profiles = read_profiles(base, base_path)
    if spec.profile is not None:
        if spec.profile not in profiles:
            raise _problem(path, "profile", f"{spec.profile!r}: {base_path.name} defines no such profile "
                                            f"(available: {', '.join(profiles) or 'none'})")
        merge_profile(base, profiles[spec.profile])
    trials, changes = {}, {}
    for variant, variant_overrides in spec.expanded().items():
        run_name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{spec.name}-{variant}".replace("=", ""))
        tree = copy.deepcopy(base)
        for origin, items in ((f"{path}: set:", spec.set.items()),
                              (f"{path}: variant {variant}:", variant_overrides.items()),
                              ("--set", cli), ("", [("name", run_name)])):
            for key, value in items:
                set_path(tree, key, value, origin)  # an error names where the key was given
        if store is not None:
            set_path(tree, "store.url", store)
        try:
            trials[variant] = with_absolute_paths(RunConfig.model_validate(tree))
        except ValidationError as e:
            lines = format_validation_error(e).replace("config error: ", f"config error: {path}: variant {variant}: ")
            raise ConfigError(lines) from None
        rows = trials[variant].eval.defenses
        if spec.row not in rows:  # the combined table would show an empty row
            raise _problem(path, f"variant {variant}: row", f"{spec.row!r} is not a row of the trial's tables "
                                                             f"(eval.defenses: {', '.join(rows)}); add it to "
                                                             f"eval.defenses or pick another row")
        changes[variant] = variant_overrides
    stores = {cfg.store.url for cfg in trials.values()}
    if len(stores) > 1:  # the point of a sweep is one store: shared stages are built once
        raise _problem(path, "store.url", f"every trial must use one store, got {sorted(stores)}")
    return Sweep(spec.name, path, spec.row, max_concurrent_trials or spec.max_concurrent_trials, trials, changes)


def describe_overrides(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()) or "the base"
