"""Ray Train loop for the rows trained on the pool's views: stream clean images and every
pool view, aligned by sample, and take the job's step (``workers/pool_objectives.py``):
MID's meta step for a ``MIDJob`` (MID, MID-R), the row's own loss on a whole classifier
for a ``PoolClassifierJob`` (ATTA), gradients averaged across workers.

A row trained on a refreshed pool (MID-R, ATTA) runs all its rounds in one worker group
(``PoolJob.refreshed``): each round's rows come from the pool version the driver publishes
on its round channel, read by each worker through Ray Data, and each round ends with a
committed checkpoint, reported on that channel, which the driver refreshes the next
version against.

Epochs end with a Ray Train checkpoint on ``ray.checkpoint_interval_s``; a restarted worker
group resumes from the last one.
"""

from __future__ import annotations

import time
from typing import Any

import ray.train
import ray.train.torch
import torch

from storage.checkpoints import load_checkpoint, load_optimizer_state, save_checkpoint
from workers.defenses import defense_class
from workers.epoch_checkpoint import EpochCheckpoints, restore_state
from workers.epoch_loop import EpochRun, train_epochs
from workers.jobs import MIDJob, PoolClassifierJob, PoolJob, RefreshedRounds, WorkerGroup
from workers.loading import load_teacher
from workers.mid import FrozenTeacher
from workers.models import ModelSpec, build_classifier_model, build_encoder
from workers.pool_objectives import MetaStep, PoolViewsStep, RowLossStep, initial_student, with_classifier
from workers.progress import quiet_ray_train
from workers.refresh_in_step import CarriedViews
from workers.reproducible import WorkerRows, deterministic_kernels
from workers.training_health import record_stop


def variant_dataset_name(variant: int) -> str:
    return f"train_variant_{variant}"


def worker_range(spec: dict[str, Any], rank: int, world_size: int) -> tuple[int, int]:
    """This worker's samples of a round: an equal, contiguous share of the training split."""
    share = spec["samples"] // world_size
    return rank * share, (rank + 1) * share


class StoredPoolRows:
    """The fixed pool's rows: one Ray Train dataset shard per variant."""

    def __init__(self, job: PoolJob, group: WorkerGroup):
        self.shards = [WorkerRows(ray.train.get_dataset_shard(variant_dataset_name(k)), group.rows_in_memory)
                       for k in range(job.variants)]

    def variant_of(self, epoch: int) -> int:
        return epoch % len(self.shards)  # epoch e reads pool variant e mod K

    def rows_of(self, epoch: int, bar) -> WorkerRows:
        return self.shards[self.variant_of(epoch)]

    def carried_views(self, epoch: int, rows: WorkerRows) -> CarriedViews | None:
        return None


class RoundRows:
    """A refreshed pool's rows, round by round: each round's pool version once the driver
    publishes it on the round channel, read through Ray Data in the store's order."""

    def __init__(self, job: PoolJob, rank: int, world_size: int):
        self.job, self.rounds, self.rank, self.world_size = job, job.refreshed, rank, world_size
        self.spec: dict[str, Any] | None = None
        self.shards: list[WorkerRows] = []

    def variant_of(self, epoch: int) -> int:
        return epoch % len(self.shards)

    def rows_of(self, epoch: int, bar) -> WorkerRows:
        index = self.rounds.round_of(epoch)
        if self.spec is None or self.spec["round"] != index:
            bar.set_description(f"{self.job.row} training (waiting for pool version {index})")
            self.spec = ray.get(self.rounds.channel.round.remote(index))
            self.shards = self.read(self.spec)
        return self.shards[self.variant_of(epoch)]

    def read(self, spec: dict[str, Any]) -> list[WorkerRows]:
        """This worker's rows of a round's pool version, one ``WorkerRows`` per variant. Kept
        in memory when they fit, and always at staleness zero, where the worker carries its
        continued views in them."""
        import ray.data

        from storage.datasource import AlignedViewsDatasource

        ray.data.DataContext.get_current().execution_options.preserve_order = True
        rows = worker_range(spec, self.rank, self.world_size)
        in_memory = self.rounds.rows_in_memory or self.rounds.in_step is not None
        return [WorkerRows(ray.data.read_datasource(AlignedViewsDatasource(
                    self.job.root, self.rounds.dataset_key, "train", pools=spec["pools"], variant=k, rows=rows)),
                    in_memory)
                for k in range(spec["variants"])]

    def carried_views(self, epoch: int, rows: WorkerRows) -> CarriedViews | None:
        """At staleness zero a round is one epoch whose views are continued in the step."""
        if self.rounds.in_step is None:
            return None
        return CarriedViews(self.rounds.in_step, rows, self.job.root, self.spec["pools"],
                            *worker_range(self.spec, self.rank, self.world_size),
                            self.rounds.in_step.eps_scale(epoch))


def starting_model(job: PoolJob, teacher: FrozenTeacher | None) -> tuple[torch.nn.Module, list]:
    """The model the job trains and the history it continues: ``init_checkpoint``'s weights
    when set (a previous round's, whose history goes on, or ATTA's baseline), else MID's
    initial student."""
    if isinstance(job, PoolClassifierJob):
        model = build_classifier_model(ModelSpec(**job.spec))
    elif job.init_checkpoint is None:
        return initial_student(job, teacher), []
    else:
        model = with_classifier(job, build_encoder(ModelSpec(**job.spec)), teacher)
    state, manifest = load_checkpoint(job.root, job.init_checkpoint)
    model.load_state_dict(state)
    model.train()
    return model.requires_grad_(True), list(manifest["history"]) if job.first_epoch > 0 else []


def train_on_pool_loop(config: dict[str, Any]) -> None:
    """Train ``config["job"]`` (a ``MIDJob`` or ``PoolClassifierJob``); ``config["group"]``: a ``WorkerGroup``."""
    job: PoolJob = config["job"]
    group: WorkerGroup = config["group"]
    started, loop_started_at = time.perf_counter(), time.time()
    quiet_ray_train()
    torch.set_num_threads(1)  # workers get a fraction of a core each; more threads only contend
    device = ray.train.torch.get_device()
    deterministic_kernels(device)
    teacher = None
    if isinstance(job, MIDJob):
        teacher_model = load_teacher(job.root, job.teacher_key).to(device)
        teacher = FrozenTeacher(teacher_model.encoder, teacher_model.classifier, teacher_model.decoder)
    model, history = starting_model(job, teacher)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=job.lr)
    if job.first_epoch > 0 and job.init_checkpoint is not None:  # a later round: the optimizer goes on
        optimizer.load_state_dict(load_optimizer_state(job.root, job.init_checkpoint))
    run = EpochRun(job.row, job.epochs, job.batch_size, job.seed, device,
                   EpochCheckpoints(group.checkpoint_interval_s, job.epochs, device), job.first_epoch, history)
    steps = sum(h["steps"] for h in history)  # the held-out draw goes on where the last round stopped
    state = restore_state()
    if state is not None:
        model.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        run.history, run.first_epoch, run.resumed, steps = state["history"], state["epoch"] + 1, True, state["step"]
    rank = ray.train.get_context().get_world_rank()
    world_size = ray.train.get_context().get_world_size()
    source = StoredPoolRows(job, group) if job.refreshed is None else RoundRows(job, rank, world_size)
    objective: PoolViewsStep = (MetaStep(job, model, optimizer, device, source, steps, teacher)
                                if isinstance(job, MIDJob) else RowLossStep(job, model, optimizer, device, source, steps))

    def end_epoch(epoch: int, figures: dict[str, Any]) -> None:
        rounds: RefreshedRounds | None = job.refreshed
        if rounds is None or not rounds.is_last_epoch_of_round(epoch):
            return
        # Committed before the epoch checkpoint: a group restarted from an earlier one
        # retrains to the same weights and commits them again, unchanged.
        spec, carried = source.spec, objective.carried
        if carried is not None:  # every worker's carried views, then the manifest that commits them
            carried.commit(job.root, spec["checkpoint"], rank)
            if world_size > 1:
                torch.distributed.barrier()
        if rank == 0:
            commit(job, spec["checkpoint"], model, run, started, loop_started_at, optimizer.state_dict(),
                   {"ranks": world_size, "attacks": [a.name for a in rounds.in_step.attacks]} if carried else None)
            ray.get(rounds.channel.committed.remote(spec["round"], spec["checkpoint"]))

    problem = train_epochs(run, objective, source.rows_of, end_epoch)
    if problem is not None:
        record_stop(group.stop_record, problem)
        return
    if rank == 0 and job.refreshed is None:
        commit(job, job.checkpoint_key, model, run, started, loop_started_at)


def commit(job: PoolJob, key: str, model: torch.nn.Module, run: EpochRun, started: float, loop_started_at: float,
           optimizer: dict[str, Any] | None = None, carried: dict[str, Any] | None = None) -> None:
    mid = isinstance(job, MIDJob)
    save_checkpoint(job.root, key, model.state_dict(),
                    {"kind": defense_class(job.row).checkpoint_kind(), "spec": job.spec,
                     "teacher_key": job.teacher_key if mid else None,
                     **({"row": job.row} if job.refreshed is not None else {}),
                     **({"carried": carried} if carried is not None else {}),
                     **({"classifier": "trainable"} if mid and job.step.trainable_classifier else {}),
                     "history": run.history, "worker_seconds": {"training": time.perf_counter() - started,
                                                                "checkpoints": run.checkpoints.seconds,
                                                                "loop_started_at": loop_started_at,
                                                                "committed_at": time.time()}}, optimizer)
