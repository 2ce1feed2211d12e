"""Checks of a run's inputs before Ray starts: `mid validate` prints them, `mid run` and
`mid pool` refuse to start while any fails.

The config itself is already valid here (pydantic); this looks at what it points to: the
data files (present, headers parse, lengths match what the headers promise), and the store
(a store or a new location, writable; for object stores, credentials and a bucket that
answers). Each problem is one line naming the file or URL and what to do.
"""

from __future__ import annotations

import os

from pipeline import run_plan
from pipeline.config import RunConfig
from storage.readers import reader
from storage.readers.base import DataFileError
from storage import store as store_location
from workers.defenses import refreshed_rows


def problems(cfg: RunConfig, command: str = "run") -> list[str]:
    """``command``: run (and validate) checks every stage of a whole run; pool only the
    stages up to the pool."""
    data = data_problems(cfg)
    found = [f"data.path: {p}" for p in data]
    if not data:  # the sizes come from the files' headers
        found += empty_epoch_problems(cfg, command)
    pretrained = cfg.models.pretrained
    if pretrained and not os.path.isfile(pretrained):
        found.append(f"models.pretrained: {pretrained}: no such file")
    found += store_location.probe_problems(cfg.store.url)  # each names the store already
    found += training_cpu_problems(cfg)
    return found


def training_cpu_problems(cfg: RunConfig) -> list[str]:
    """Training workers that would take every CPU of the local Ray instance this run starts:
    Ray Data's read tasks need CPUs of their own, and training would wait for data forever.
    (On a cluster the CPUs are only known once joined; ``train_with_ray`` checks there.)"""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return []
    total = cfg.ray.num_cpus or os.cpu_count() or 1
    found = [starved_data_problem(field, workers, cfg.ray.cpus_per_worker, total, "the local Ray instance")
             for field, workers in (("models.num_workers", cfg.models.num_workers),
                                    ("mid.num_workers", cfg.mid.num_workers))]
    return [problem for problem in found if problem]


def starved_data_problem(field: str, workers: int, cpus_per_worker: float, total: float, where: str) -> str | None:
    """The problem line when ``workers`` training workers of ``cpus_per_worker`` CPUs take all
    ``total`` CPUs of ``where``, leaving Ray Data's read tasks none; None when they fit."""
    if workers * cpus_per_worker < total:
        return None
    return (f"ray.cpus_per_worker: {field}={workers} workers x {cpus_per_worker:g} CPUs take all {total:g} CPUs "
            f"of {where} and leave none for Ray Data; lower ray.cpus_per_worker "
            f"(e.g. {total / (workers + 1):.2g}) or {field}")


def field_value(cfg: RunConfig, field: str):
    """The value of the config field named by its dotted path (``models.num_workers``)."""
    value = cfg
    for name in field.split("."):
        value = getattr(value, name)
    return value


def data_problems(cfg: RunConfig) -> list[str]:
    return reader(cfg.data.source).problems(cfg.data.path)


def training_stages(cfg: RunConfig, command: str = "run") -> dict[str, list[tuple[str, int]]]:
    """The worker-count field of each training worker group that ``command`` runs -> its
    stages' batch-size fields and values (as ``pipeline.driver`` picks the stages)."""
    kinds = run_plan.trained_classifiers(cfg, command)
    groups = {"models.num_workers": [(f"models.{kind}.batch_size", getattr(cfg.models, kind).batch_size)
                                     for kind in kinds]}
    if "mid" in run_plan.run_stages(cfg, command):
        groups["mid.num_workers"] = [("mid.batch_size", cfg.mid.batch_size)]
    if command == "run":
        for row in run_plan.rows_after_pool(cfg):
            if row in refreshed_rows():  # its own worker group, on its own schedule
                schedule = run_plan.refreshed_training(cfg, row)
                stages = groups.setdefault(schedule.workers_field, [])
                if (schedule.batch_size_field, schedule.batch_size) not in stages:
                    stages.append((schedule.batch_size_field, schedule.batch_size))
    return groups


def empty_epoch_problems(cfg: RunConfig, command: str = "run") -> list[str]:
    """Training stages whose workers would get fewer samples than one batch. A worker trains
    on full batches only (``workers.reproducible``) and Ray Train splits the train split
    evenly, so such a stage would run zero steps every epoch and commit an untrained model."""
    d = cfg.data
    try:
        counted = reader(d.source).train_samples(d.path, d.test_fraction) or cfg.plan.train_samples
    except DataFileError as e:
        return [f"data.path: {e}"]
    if counted is None and d.train_limit is None:
        return []  # an image folder: only a listing of every file would tell
    samples = min(n for n in (counted, d.train_limit) if n is not None)
    limited = d.train_limit is not None and d.train_limit <= (counted or d.train_limit)
    source = f"data.train_limit={d.train_limit} gives" if limited else f"the train split's {samples} samples give"
    found = []
    for workers_field, stages in training_stages(cfg, command).items():
        workers = field_value(cfg, workers_field)
        per_worker = samples // workers
        short = [(field, batch) for field, batch in stages if batch > per_worker]
        if short:
            batches = ", ".join(f"{field}={batch}" for field, batch in short)
            found.append(f"{short[0][0]}: {source} {per_worker} samples per worker, below {batches} with "
                         f"{workers_field}={workers}: every epoch would run zero steps; lower the batch size or "
                         f"{workers_field}{', or raise data.train_limit' if limited else ''}")
    return found
