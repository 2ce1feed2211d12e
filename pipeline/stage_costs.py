"""What one stage of a run costs, in multiply-accumulates per training sample
(``StageCost``), from the units ``workers.flops`` counts on real passes of the config's
models: a classifier's training, the pool, MID's student, a refreshed row's rounds.
``mid plan`` (pipeline/plan.py) walks a run's stages and adds them up; each row's stage
(pipeline/rows.py) names its own cost here.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import keys as key_rules
from pipeline import run_plan
from pipeline.config import RunConfig
from workers.defenses import classifier_defense, defense_class


@dataclass
class StageCost:
    name: str
    per_sample_macs: float  # one pass over one sample: the stage's whole work for it
    samples: int            # samples × epochs (or × variants) the stage processes
    note: str
    attack_per_sample_macs: float = 0.0  # the part of per_sample_macs spent on attack steps

    @property
    def attack_macs(self) -> float:
        return self.attack_per_sample_macs * self.samples

    @property
    def total_macs(self) -> float:
        return self.per_sample_macs * self.samples


def steps_of(cfg: RunConfig, attack: str) -> int | None:
    """Gradient steps per image, as the attack's own class counts them (None: no fixed count)."""
    from workers.attacks import attack_class, parse_attack_name

    family, _ = parse_attack_name(attack)
    return attack_class(family).steps(getattr(cfg.attacks, family).model_dump())


def variants_of(cfg: RunConfig, attack: str) -> int:
    from workers.attacks import make_attack

    return cfg.pool.variants if make_attack(attack, cfg.attacks.family_settings()).stochastic else 1


def classifier_cost(cfg: RunConfig, kind: str, units: dict[str, float], train_samples: int) -> StageCost:
    """A classifier's training, as the row whose loss trains it counts it (workers/defenses)."""
    settings = key_rules.training_settings(cfg, kind)
    defense = classifier_defense(kind)
    macs = defense.step_macs(settings, units)
    return StageCost(kind, macs, settings["epochs"] * train_samples, defense.summary(settings),
                     macs - units["train_step"] if defense.attacks_online() else 0.0)


def pool_cost(cfg: RunConfig, units: dict[str, float], train_samples: int,
              uncounted: list[str]) -> StageCost:
    macs, views = 0.0, 0
    for attack in cfg.pool.attacks:
        steps, variants = steps_of(cfg, attack), variants_of(cfg, attack)
        if steps is None:
            uncounted.append(f"{attack} (pool)")
            continue
        # + its success, measured before and after rounding
        macs += variants * (steps * units["attack_step"] + 2 * units["forward"])
        views += variants
    return StageCost("pool", macs, train_samples, f"{len(cfg.pool.attacks)} attacks, {views} views per sample", macs)


def refreshed_cost(cfg: RunConfig, row: str, units: dict[str, float], train_samples: int) -> StageCost:
    """A row trained on a refreshed pool: its rounds' training and the refreshes between
    them, per sample of the training split (pipeline/stages/refresh.py)."""
    defense = defense_class(row)
    epochs = training_epochs = run_plan.refreshed_training(cfg, row).epochs
    attacks, r = run_plan.refreshed_attacks(cfg), cfg.pool.refresh
    rounds = -(-epochs // max(1, r.every))
    if r.every == 0:  # staleness zero: `steps` per view in every epoch's step (+ the stored version's success,
        # on every sample or on pool.refresh.success_samples of them)
        measured = 1.0 if r.success_samples is None else min(1.0, r.success_samples / train_samples)
        refresh = (epochs * len(attacks) * r.steps * units["attack_step"]
                   + (rounds - 1) * len(attacks) * units["forward"] * measured)
    else:  # a refresh continues one view per attack by `steps` steps (+ its success, before and after rounding)
        refresh = (rounds - 1) * len(attacks) * (r.steps * units["attack_step"] + 2 * units["forward"])
    if r.start == "random":  # version 0: random points, their success measured once (on the stored views)
        refresh += len(attacks) * units["forward"]
    if r.reset_every is not None:
        resets = (rounds - 1) // r.reset_every
        refresh += resets * sum(((steps_of(cfg, a) or 0) - r.steps) * units["attack_step"] for a in attacks)
    train = (units["mid_step"] if defense.objective == "mid"
             else len(cfg.pool.attacks) * units["train_step"]) * training_epochs
    return StageCost(defense.kind, train + refresh, train_samples,
                     f"{epochs} epochs in {rounds} rounds, " + (
                         f"{len(attacks)} attacks × {r.steps} steps in every step" if r.every == 0 else
                         f"{rounds - 1} refreshes of {len(attacks)} attacks × {r.steps} steps"), refresh)


def student_cost(cfg: RunConfig, units: dict[str, float], train_samples: int) -> StageCost:
    """MID's student on the stored pool: its epochs of meta steps (workers/mid.py)."""
    return StageCost("mid", units["mid_step"], cfg.mid.epochs * train_samples,
                     f"{cfg.mid.epochs} epochs, {'second' if cfg.mid.second_order else 'first'} "
                     f"order, {len(cfg.pool.attacks)} views + clean")
