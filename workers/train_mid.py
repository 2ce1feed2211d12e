"""Ray Train loop for MID: stream clean images and every pool view, aligned by sample,
and take the meta step of ``workers.mid`` with the outer gradient averaged across workers.

A row trained on a refreshed pool (MID-R, ATTA) runs the same loop over all its rounds in
one worker group (``MIDJob.refreshed``): each round's rows come from the pool version the
driver publishes on that channel, read by each worker through Ray Data, and each round
ends with a committed checkpoint, reported on the driver's round channel
(``RefreshedRounds.channel``), which the driver refreshes the next version against.
ATTA takes its row's loss (workers/defenses: cross-entropy on every view) on a whole
classifier instead of the meta step (``MIDJob.objective``), the one other thing that differs.

Epochs end with a Ray Train checkpoint on ``ray.checkpoint_interval_s``; a restarted worker
group resumes from the last one.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import ray.train
import ray.train.torch
import torch

from storage.checkpoints import load_checkpoint, load_optimizer_state, save_checkpoint
from workers.augment import augmentation_generator, crop_and_flip
from workers.defenses import defense_class
from workers.device import bf16_autocast
from workers.epoch_checkpoint import EpochCheckpoints, restore_state
from workers.loading import load_teacher
from workers.progress import epoch_bar, quiet_ray_train
from workers.refresh_in_step import CarriedViews, attack_model
from workers.reproducible import WorkerRows, deterministic_kernels
from workers.training_health import epoch_problem, record_stop
from workers.jobs import MIDJob, RefreshedRounds, WorkerGroup
from workers.mid import (FrozenTeacher, StudentWithClassifier, apply_gradients, average_across_workers,
                         draw_held_out, meta_gradients, meta_objective)
from workers.models import ModelSpec, build_classifier_model, build_encoder, to_float


def variant_dataset_name(variant: int) -> str:
    return f"train_variant_{variant}"


def with_classifier(job: MIDJob, encoder: torch.nn.Module, teacher: FrozenTeacher) -> torch.nn.Module:
    """The student as it trains: E_s, or, with ``mid.classifier: trainable``, E_s with a copy
    of C_t of its own."""
    if not job.step.trainable_classifier:
        return encoder
    return StudentWithClassifier(encoder, copy.deepcopy(teacher.classifier))


def initial_student(job: MIDJob, teacher: FrozenTeacher) -> torch.nn.Module:
    """Same weights on every worker: a copy of E_t, or a seeded fresh encoder."""
    if job.init_student == "teacher":
        student = copy.deepcopy(teacher.encoder)
    else:
        torch.manual_seed(job.seed)
        student = build_encoder(ModelSpec(**job.spec))
    student = with_classifier(job, student, teacher)
    student.train()
    return student.requires_grad_(True)


def starting_model(job: MIDJob, teacher: FrozenTeacher | None) -> tuple[torch.nn.Module, list]:
    """The model the job trains and the history it continues: ``init_checkpoint``'s weights
    when set (a previous round's, whose history goes on, or ATTA's baseline), else MID's
    initial student."""
    if job.objective == "cross_entropy":
        model = build_classifier_model(ModelSpec(**job.spec))
    elif job.init_checkpoint is None:
        return initial_student(job, teacher), []
    else:
        model = with_classifier(job, build_encoder(ModelSpec(**job.spec)), teacher)
    state, manifest = load_checkpoint(job.root, job.init_checkpoint)
    model.load_state_dict(state)
    model.train()
    return model.requires_grad_(True), list(manifest["history"]) if job.first_epoch > 0 else []


def wait_for_round(rounds: RefreshedRounds, index: int) -> dict[str, Any]:
    """Round ``index``'s spec, once the driver has published it (its pool version is complete)."""
    return ray.get(rounds.channel.round.remote(index))


def worker_range(spec: dict[str, Any], rank: int, world_size: int) -> tuple[int, int]:
    """This worker's samples of a round: an equal, contiguous share of the training split."""
    share = spec["samples"] // world_size
    return rank * share, (rank + 1) * share


def round_rows(job: MIDJob, spec: dict[str, Any], rank: int, world_size: int) -> list[WorkerRows]:
    """This worker's rows of a round's pool version, one ``WorkerRows`` per variant, read
    through Ray Data in the store's order. Kept in memory when they fit, and always at
    staleness zero, where the worker carries its continued views in them."""
    import ray.data

    from storage.datasource import AlignedViewsDatasource

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    rows = worker_range(spec, rank, world_size)
    in_memory = job.refreshed.rows_in_memory or job.refreshed.in_step is not None
    return [WorkerRows(ray.data.read_datasource(AlignedViewsDatasource(
                job.root, job.refreshed.dataset_key, "train", pools=spec["pools"], variant=k, rows=rows)), in_memory)
            for k in range(spec["variants"])]


def autocast(job: MIDJob, device: torch.device):
    """bfloat16 autocast of the forward passes on GPU workers when ``mid.bf16`` is set.

    Gradients and the fast weights stay float32 (autocast keeps parameters in their dtype).
    """
    return bf16_autocast(job.bf16 and device.type == "cuda", device)


def train_mid_loop(config: dict[str, Any]) -> None:
    """Meta-train ``config["job"]`` (a ``MIDJob``); ``config["group"]``: a ``WorkerGroup``."""
    job: MIDJob = config["job"]
    group: WorkerGroup = config["group"]
    started, loop_started_at = time.perf_counter(), time.time()
    quiet_ray_train()
    torch.set_num_threads(1)  # workers get a fraction of a core each; more threads only contend
    device = ray.train.torch.get_device()
    deterministic_kernels(device)
    teacher = None
    if job.objective == "mid":
        teacher_model = load_teacher(job.root, job.teacher_key).to(device)
        teacher = FrozenTeacher(teacher_model.encoder, teacher_model.classifier, teacher_model.decoder)
    student, history = starting_model(job, teacher)
    student = student.to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=job.lr)
    if job.first_epoch > 0 and job.init_checkpoint is not None:  # a later round: the optimizer goes on
        optimizer.load_state_dict(load_optimizer_state(job.root, job.init_checkpoint))
    first_epoch = job.first_epoch
    step = sum(h["steps"] for h in history)  # the held-out draw goes on where the last round stopped
    state = restore_state()
    if state is not None:
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        history, first_epoch, step = state["history"], state["epoch"] + 1, state["step"]
    settings = job.step
    attacks = list(job.attacks)
    row_loss = defense_class(job.row).loss if job.objective == "cross_entropy" else None
    rank = ray.train.get_context().get_world_rank()
    world_size = ray.train.get_context().get_world_size()  # throughput is the whole group's
    rounds, round_spec, carried = job.refreshed, None, None
    if rounds is None:
        shards = [WorkerRows(ray.train.get_dataset_shard(variant_dataset_name(k)), group.rows_in_memory)
                  for k in range(job.variants)]
    checkpoints = EpochCheckpoints(group.checkpoint_interval_s, job.epochs, device)
    bar = epoch_bar(f"{job.row} training", job.epochs, show=rank == 0)
    bar.update(first_epoch)
    for epoch in range(first_epoch, job.epochs):
        if rounds is not None and (round_spec is None or round_spec["round"] != rounds.round_of(epoch)):
            bar.set_description(f"{job.row} training (waiting for pool version {rounds.round_of(epoch)})")
            round_spec = wait_for_round(rounds, rounds.round_of(epoch))
            shards = round_rows(job, round_spec, rank, world_size)
        start, waited, seen, steps, sums = time.perf_counter(), 0.0, 0, 0, {}
        shard = shards[epoch % len(shards)]  # epoch e reads pool variant e mod K
        if rounds is not None and rounds.in_step is not None:  # a round is one epoch at staleness zero
            carried = CarriedViews(rounds.in_step, shard, job.root, round_spec["pools"],
                                   *worker_range(round_spec, rank, world_size), rounds.in_step.eps_scale(epoch))
            attacked = attack_model(job.objective, student, teacher)
        crops = augmentation_generator(job.seed, rank, epoch)
        batches = iter(shard.batches(job.batch_size, job.seed, rank, epoch, device))
        while True:
            fetch = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - fetch
            if batch is None:
                break
            if carried is not None:
                carried.continue_batch(student, attacked, batch)
            held_out = draw_held_out(attacks, job.seed, step)
            clean, *views = crop_and_flip([to_float(batch[name]) for name in ["clean", *attacks]],
                                          job.augmentation.mode, job.augmentation.crop_padding, crops)
            with autocast(job, device):
                if job.objective == "mid":
                    loss, metrics = meta_objective(student, teacher, clean, dict(zip(attacks, views)),
                                                   batch["label"], held_out, settings)
                else:
                    loss, metrics = row_loss(student, views, batch["label"])
            grads = average_across_workers(meta_gradients(student, loss))
            apply_gradients(student, grads, optimizer)
            step += 1
            steps += 1
            seen += len(batch["label"])
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        seconds = time.perf_counter() - start
        problem = epoch_problem(job.row, epoch, steps, job.batch_size, sums.get("loss", 0.0) / max(steps, 1),
                                student, device)
        if problem is not None:
            bar.close()
            record_stop(group.stop_record, problem)
            return
        epoch_metrics = {"epoch": epoch, "variant": epoch % len(shards), "steps": steps,
                         "samples_per_second": seen * world_size / seconds, "data_wait_fraction": waited / seconds,
                         "seconds": seconds, "lr": optimizer.param_groups[0]["lr"],
                         "resumed": state is not None and epoch == first_epoch,
                         **{k: v / max(steps, 1) for k, v in sums.items()}}
        history.append(epoch_metrics)
        if rounds is not None and rounds.is_last_epoch_of_round(epoch):
            # Committed before the epoch checkpoint: a group restarted from an earlier one
            # retrains to the same weights and commits them again, unchanged.
            if carried is not None:  # every worker's carried views, then the manifest that commits them
                carried.commit(job.root, round_spec["checkpoint"], rank)
                if world_size > 1:
                    torch.distributed.barrier()
            if rank == 0:
                commit(job, round_spec["checkpoint"], student, history, started, loop_started_at,
                       checkpoints.seconds, optimizer.state_dict(),
                       {"ranks": world_size, "attacks": [a.name for a in rounds.in_step.attacks]} if carried else None)
                ray.get(rounds.channel.committed.remote(round_spec["round"], round_spec["checkpoint"]))
        checkpoints.end_epoch(epoch, epoch_metrics, {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                                                     "epoch": epoch, "step": step, "history": history})
        bar.set_description(f"{job.row} training (loss {epoch_metrics['loss']:.3f}, "
                            f"data wait {epoch_metrics['data_wait_fraction']:.0%})")
        bar.update(1)
    bar.close()
    if rank == 0 and rounds is None:
        commit(job, job.checkpoint_key, student, history, started, loop_started_at, checkpoints.seconds)


def commit(job: MIDJob, key: str, student: torch.nn.Module, history: list[dict[str, Any]], started: float,
           loop_started_at: float, checkpoint_seconds: float, optimizer: dict[str, Any] | None = None,
           carried: dict[str, Any] | None = None) -> None:
    save_checkpoint(job.root, key, student.state_dict(),
                    {"kind": job.commit_kind, "spec": job.spec, "teacher_key": job.teacher_key,
                     **({"row": job.row} if job.refreshed is not None else {}),
                     **({"carried": carried} if carried is not None else {}),
                     **({"classifier": "trainable"} if job.step.trainable_classifier else {}),
                     "history": history, "worker_seconds": {"training": time.perf_counter() - started,
                                                            "checkpoints": checkpoint_seconds,
                                                            "loop_started_at": loop_started_at,
                                                            "committed_at": time.time()}}, optimizer)
