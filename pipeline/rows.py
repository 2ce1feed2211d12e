"""How each row of the tables is trained: the stage objects the rows name.

A row's class (``workers/defenses``) says what the row is; its base class says which stage
trains it, and that stage is one object here:

- ``ClassifierStage``: a classifier C ∘ E, trained in the classifiers' worker group before
  the pool (``pipeline/stages/models.py``): None, AT, TRADES;
- ``PoolStudentStage``: MID's student on the stored pool (``pipeline/stages/mid.py``);
- ``RefreshedPoolStage``: rounds on a pool refreshed against the row's own model
  (``pipeline/stages/refresh.py``): MID-R, ATTA.

Each names the stages its row's model needs (the cost table), its own stage's cost
(``mid plan``), the unit of work that stage runs at (``mid plan --calibrate``) and, for the
stages after the pool, how it is built. The driver, ``mid plan``, the cost table and the
run plan walk the rows through these objects, so a new kind of row is a class here and a
base class in ``workers/defenses/base.py``, and a new row of an existing kind is its file
and one registry line (docs/extending.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from pipeline import run_plan, stage_costs
from pipeline.config import RunConfig
from workers.defenses import defense_class
from workers.defenses.base import ClassifierDefense, Defense, PoolStudentDefense, RefreshedDefense

if TYPE_CHECKING:
    from pipeline.context import RunContext
    from storage.datasets import DatasetReader


class RowStage(ABC):
    """The stage that trains a kind of row (its row's model is named by the row's ``kind``)."""

    @abstractmethod
    def needs(self, cfg: RunConfig, defense: type[Defense]) -> list[str]:
        """The stages whose outputs the row's model is built from, its own last."""

    @abstractmethod
    def cost(self, cfg: RunConfig, defense: type[Defense], units: dict[str, float],
             train_samples: int) -> stage_costs.StageCost:
        """Its own stage's multiply-accumulates per training sample (``mid plan``)."""

    def step_unit(self, defense: type[Defense]) -> str:
        """The unit of work (``workers.flops``) the row's own stage runs at."""
        return "train_step"


class AfterPoolStage(RowStage):
    """A row trained by a stage of its own after the pool: every row but a classifier
    (``run_plan.rows_after_pool``), in the table's order."""

    @abstractmethod
    def train(self, ctx: RunContext, dataset: DatasetReader, defense: type[Defense],
              trained: dict[str, dict[str, Any]], pool_keys: dict[str, str]) -> dict[str, Any]:
        """Train (or reuse) the row's model; its manifest. ``trained``: the manifests so far, by kind."""


class ClassifierStage(RowStage):
    def needs(self, cfg, defense):
        return [defense.kind]

    def cost(self, cfg, defense, units, train_samples):
        return stage_costs.classifier_cost(cfg, defense.kind, units, train_samples)


class PoolStudentStage(AfterPoolStage):
    def needs(self, cfg, defense):
        return ["teacher", "pool", defense.kind]

    def cost(self, cfg, defense, units, train_samples):
        return stage_costs.student_cost(cfg, units, train_samples)

    def step_unit(self, defense):
        return "mid_step"

    def train(self, ctx, dataset, defense, trained, pool_keys):
        from pipeline.stages import mid

        return mid.run(ctx, dataset, trained["teacher"], pool_keys)


class RefreshedPoolStage(AfterPoolStage):
    def needs(self, cfg, defense):
        # Starting from random points of the ε-ball (its own stage makes them), it reads the
        # stored pool only for the attacks it does not refresh.
        random_start = cfg.pool.refresh.start == "random"
        if random_start and set(run_plan.refreshed_attacks(cfg)) == set(cfg.pool.attacks):
            return [defense.init_from, defense.kind]
        return [defense.init_from, "pool", defense.kind]

    def cost(self, cfg, defense, units, train_samples):
        return stage_costs.refreshed_cost(cfg, defense.row, units, train_samples)

    def step_unit(self, defense):
        return "mid_step" if defense.objective == "mid" else "train_step"

    def train(self, ctx, dataset, defense, trained, pool_keys):
        from pipeline.stages import refresh

        return refresh.run(ctx, dataset, defense.row, trained, pool_keys)


STAGES: dict[type[Defense], RowStage] = {
    ClassifierDefense: ClassifierStage(),
    PoolStudentDefense: PoolStudentStage(),
    RefreshedDefense: RefreshedPoolStage(),
}


def row_stage(row: str) -> RowStage:
    """The stage that trains ``row``, by its class's base."""
    defense = defense_class(row)
    for base, stage in STAGES.items():
        if issubclass(defense, base):
            return stage
    raise TypeError(f"row {row!r}: {defense.__name__} derives from none of {', '.join(b.__name__ for b in STAGES)}")

