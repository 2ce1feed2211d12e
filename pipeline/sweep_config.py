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
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator

from pipeline.config import (SAFE_NAME, ConfigError, RunConfig, Section, _format_validation_error, merge_profile,
                             parse_override, read_profiles, read_tree, set_path)
from storage.store import check_url

VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")


class SweepFile(Section):
    name: str = Field(..., description="names the sweep's output folder and, with each variant, its trials' runs")
    base: str = Field(..., description="the base config, relative to the sweep file")
    profile: str | None = Field(None, description="a profile of the base config, applied before everything else")
    set: dict[str, Any] = Field({}, description="overrides of every trial (dotted keys)")
    variants: dict[str, dict[str, Any]] = Field({}, description="variant name -> its overrides (dotted keys)")
    grid: dict[str, list[Any]] = Field({}, description="dotted key -> values; one variant per combination")
    row: Literal["MID", "None", "AT", "TRADES"] = Field("MID", description="the row each trial contributes")
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

    @model_validator(mode="after")
    def _some_variants(self):
        if bool(self.variants) == bool(self.grid):
            raise ValueError("give either variants (named overrides) or grid (values per key), exactly one")
        return self

    def expanded(self) -> dict[str, dict[str, Any]]:
        """Variant name -> overrides; a grid's names say their values (``pool.variants=2``)."""
        if self.variants:
            return self.variants
        keys = list(self.grid)
        return {",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values)): dict(zip(keys, values))
                for values in itertools.product(*self.grid.values())}


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
               max_concurrent_trials: int | None = None) -> Sweep:
    """Every trial's config, validated. ``overrides`` (--set) apply to every trial, after the
    sweep file's own settings; ``store`` replaces every trial's store."""
    path = Path(path)
    try:
        spec = SweepFile.model_validate(read_tree(path))
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e).replace("config error: ", f"config error: {path}: ")) from None
    base_path = (path.parent / spec.base).resolve()
    if not base_path.is_file():
        raise _problem(path, "base", f"{spec.base}: no such file (looked for {base_path})")
    cli = [parse_override(text) for text in overrides]
    base = read_tree(base_path)
    profiles = read_profiles(base, base_path)
    if spec.profile is not None:
        if spec.profile not in profiles:
            raise _problem(path, "profile", f"{spec.profile!r}: {base_path.name} defines no such profile "
                                            f"(available: {', '.join(profiles) or 'none'})")
        merge_profile(base, profiles[spec.profile])
    trials, changes = {}, {}
    for variant, variant_overrides in spec.expanded().items():
        run_name = f"{spec.name}-{variant}".replace(",", "_").replace("=", "")
        tree = copy.deepcopy(base)
        for key, value in [*spec.set.items(), *variant_overrides.items(), *cli, ("name", run_name)]:
            set_path(tree, key, value)
        if store is not None:
            set_path(tree, "store.url", store)
        try:
            trials[variant] = with_absolute_paths(RunConfig.model_validate(tree))
        except ValidationError as e:
            lines = _format_validation_error(e).replace("config error: ", f"config error: {path}: variant {variant}: ")
            raise ConfigError(lines) from None
        changes[variant] = variant_overrides
    stores = {cfg.store.url for cfg in trials.values()}
    if len(stores) > 1:  # the point of a sweep is one store: shared stages are built once
        raise _problem(path, "store.url", f"every trial must use one store, got {sorted(stores)}")
    return Sweep(spec.name, path, spec.row, max_concurrent_trials or spec.max_concurrent_trials, trials, changes)


def describe_overrides(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()) or "the base"
