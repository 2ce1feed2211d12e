"""One Ray Train stage of a run: its workers, its fault tolerance (a worker group restarted
from the last epoch checkpoint, kept in the store), Ctrl-C, and why a loop stopped without
committing. Stages say what to train on which data; how Ray Train runs it lives here."""

from __future__ import annotations

import os
from typing import Any

from pipeline.context import RunContext
from pipeline.errors import PipelineError
from pipeline.preflight import starved_data_problem
from pipeline.ray_runtime import fit_off_the_main_thread
from storage import checkpoints, fs
from workers.training_health import read_stop

STOP_RECORD = "stopped.json"  # in a training run's folder: why its loop stopped without committing


def train_storage(root: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train: the store's ``train/`` folder.

    Ray Train reads and writes through pyarrow; a remote store's fsspec file system is
    handed to it through pyarrow's FSSpecHandler, so the same credentials and endpoint
    serve checkpoints and data.
    """
    url = checkpoints.train_runs_url(root)
    if fs.is_local(url):
        path = url.removeprefix("file://")
        os.makedirs(path, exist_ok=True)
        return path, None
    import pyarrow.fs

    filesystem, path = fs.filesystem(url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem))


def train_with_ray(ctx: RunContext, loop, jobs: dict[str, Any], datasets: dict[str, Any],
                   num_workers: int, stage: str, key: str, commits: list[str] | None = None) -> dict[str, Any]:
    """Run a train loop on ``num_workers`` Ray Train workers (each named Ray Dataset is
    split across them) until the loop has committed the checkpoints ``commits`` (default:
    ``key``); returns the manifest of the last. ``jobs``: what the loop reads
    (``workers.jobs``); it also gets ``group``, a ``workers.jobs.WorkerGroup``.

    The run lives in the store's ``train/<stage>-<key>`` folder: a worker or node that dies
    restarts the worker group from the last epoch checkpoint (up to ``ray.max_failures``
    times), and a rerun after the driver died resumes there too, the name being the same.
    The folder is removed once every checkpoint is committed.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from workers.jobs import WorkerGroup
    from workers.loopback_torch import LoopbackTorchConfig

    from pipeline.console import close_worker_bars, quiet_driver_loggers

    quiet_driver_loggers()  # Ray Train set up its loggers on import
    name = f"{stage}-{key}"
    # Ray Data's read tasks need CPUs of their own; if the workers take them all, training
    # waits for data forever instead of failing. A local run was checked before Ray started
    # (pipeline.preflight); a joined cluster's CPUs are known only now.
    problem = starved_data_problem(f"{stage}.num_workers", num_workers, ctx.cfg.ray.cpus_per_worker,
                                   ray.cluster_resources().get("CPU", 0), "the Ray cluster")
    if problem:
        raise PipelineError(problem)
    storage_path, storage_filesystem = train_storage(ctx.root)
    # Where the loop says why it stopped without committing (workers.training_health).
    stop_record = fs.join(checkpoints.train_runs_url(ctx.root), name, STOP_RECORD)
    fs.remove(stop_record)
    group = WorkerGroup(rows_in_memory=rows_fit_in_workers(datasets, num_workers),
                        checkpoint_interval_s=ctx.cfg.ray.checkpoint_interval_s, stop_record=stop_record)
    loop_config = {**jobs, "group": group}
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config, datasets=datasets, torch_config=LoopbackTorchConfig(),
        # Fractional CPUs: on a small machine whole-CPU workers starve Ray Data's read tasks.
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=ctx.cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": ctx.cfg.ray.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=ctx.cfg.ray.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    fit_off_the_main_thread(trainer)
    close_worker_bars()  # only once the run is over: an interrupted run leaves at once
    problem = read_stop(stop_record)
    if problem is not None:
        # Its epoch checkpoints hold the same broken or untrained state: nothing to resume.
        fs.remove(fs.join(checkpoints.train_runs_url(ctx.root), name))
        raise PipelineError(problem)
    for committed in commits or [key]:
        manifest = checkpoints.verify_checkpoint(ctx.root, committed)
        if manifest is None:
            raise RuntimeError(f"{stage}: training finished but checkpoint {committed} is not in the store")
    # Committed: the run folder's resume state is only bytes now.
    fs.remove(fs.join(checkpoints.train_runs_url(ctx.root), name))
    return manifest


WORKER_ROWS_BYTES = 1 << 30  # at most this much of a training stage's data held in each worker's memory


def rows_fit_in_workers(datasets: dict[str, Any], num_workers: int) -> bool:
    """Whether each worker may keep its rows in memory across epochs (``workers.reproducible.
    WorkerRows``): every dataset was materialized (it fits the object store comfortably) and
    a worker's share of them all is at most ``WORKER_ROWS_BYTES``."""
    from ray.data.dataset import MaterializedDataset

    if not all(isinstance(d, MaterializedDataset) for d in datasets.values()):
        return False
    return sum(d.size_bytes() for d in datasets.values()) / num_workers <= WORKER_ROWS_BYTES
