"""What each row of the tables cost to train (results.json's ``costs``, the report's cost
table and chart): the wall seconds this run spent in the row's own stages, and the
multiply-accumulates of their attack steps and training steps, as ``mid plan`` counts them
on real passes of the model (``workers.flops``) for the dataset the run read.

A row's own stages are those its model needs: a classifier row's training; MID's teacher,
pool and student; a refreshed row's starting model (the teacher or the baseline), pool 0
(the stored pool, unless it starts from random points: ``pool.refresh.start``) and its
rounds with their refreshes. A stage reused from the store cost this run nothing:
its seconds are 0 here and the row lists it under ``cached``; its MACs are counted all the
same (they are what the row costs to build).
"""

from __future__ import annotations

from typing import Any

from pipeline import plan
from pipeline.config import RunConfig
from storage.datasets import DatasetReader
from pipeline.rows import row_stage
from workers.defenses import defense_class


def row_stages(cfg: RunConfig, row: str) -> list[str]:
    return row_stage(row).needs(cfg, defense_class(row))


def data_shape(dataset: DatasetReader) -> plan.DataShape:
    channels, side, _ = dataset.image_shape()
    return plan.DataShape(dataset.num_samples("train"), dataset.num_samples("test"), channels, side,
                          dataset.num_classes, f"dataset {dataset.key}")


def row_costs(cfg: RunConfig, dataset: DatasetReader, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{row: {seconds, attack_macs, training_macs, stages, cached}}; ``stages``: the run's
    stage records (``StageRecord.as_dict``) by name."""
    shape = data_shape(dataset)
    counted = {s.name: s for s in plan.stage_costs(cfg, shape, plan.unit_costs(cfg, shape))[0]}
    costs = {}
    for row in cfg.eval.defenses:
        names = row_stages(cfg, row)
        attack = sum(counted[n].attack_macs for n in names if n in counted)
        total = sum(counted[n].total_macs for n in names if n in counted)
        costs[row] = {"seconds": round(sum(stages[n]["seconds"] for n in names if n in stages), 1),
                      "attack_macs": attack, "training_macs": total - attack, "stages": names,
                      "cached": [n for n in names if stages.get(n, {}).get("cache_hit")]}
    return costs
