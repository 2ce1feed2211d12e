"""Checks of a run's inputs before Ray starts: `mid validate` prints them, `mid run` and
`mid pool` refuse to start while any fails.

The config itself is already valid here (pydantic); this looks at what it points to: the
data files (present, headers parse, lengths match what the headers promise), and the store
(a store or a new location, writable; for object stores, credentials and a bucket that
answers). Each problem is one line naming the file or URL and what to do.
"""

from __future__ import annotations

import os

from pipeline.config import RunConfig
from storage.readers import reader
from storage import store as store_location


def problems(cfg: RunConfig) -> list[str]:
    found = [f"data.path: {p}" for p in data_problems(cfg)]
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


def data_problems(cfg: RunConfig) -> list[str]:
    return reader(cfg.data.source).problems(cfg.data.path)
