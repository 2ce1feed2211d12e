"""Ray Train loop for every classifier: the rows of the table but MID's (the baseline, AT,
TRADES: each row's loss is its own, ``workers/defenses``), MID's teacher (cross-entropy +
λ·L1 reconstruction) and the transfer protocol's substitute, all streaming clean data from
the dataset store through Ray Data.

Epochs end with a Ray Train checkpoint on ``ray.checkpoint_interval_s``; a restarted worker
group resumes from the last one.
"""

from __future__ import annotations

import time
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from storage.checkpoints import save_checkpoint, verify_checkpoint
from workers.augment import augmentation_generator, crop_and_flip
from workers.defenses import classifier_defense
from workers.epoch_checkpoint import EpochCheckpoints, restore_state
from workers.jobs import ClassifierJob, WorkerGroup
from workers.loading import unwrap
from workers.models import ModelSpec, build_classifier_model, build_teacher, to_float
from workers.models.pretrained import load_pretrained
from workers.progress import epoch_bar, quiet_ray_train
from workers.reproducible import WorkerRows, deterministic_kernels
from workers.training_health import epoch_problem, record_stop

def objective(kind: str, settings: dict[str, Any], model, x: torch.Tensor, y: torch.Tensor):
    """(loss, clean or adversarial logits) of one batch for a model of this ``kind``;
    ``settings``: the epoch's (``ClassifierJob.epoch_settings``)."""
    if kind == "teacher":
        logits, reconstruction = model(x)
        if reconstruction is None:  # a backbone without a decoder (ViT); the config holds lambda_rec at 0
            return F.cross_entropy(logits, y), logits
        return F.cross_entropy(logits, y) + settings["lambda_rec"] * F.l1_loss(reconstruction, x), logits
    return classifier_defense(kind).loss(model, unwrap(model), x, y, settings)


def train_classifiers_loop(config: dict[str, Any]) -> None:
    """Train ``config["jobs"]`` (``ClassifierJob``) one after another in this worker group,
    on the same rows; ``config["group"]``: a ``WorkerGroup``.

    Models that read the same dataset (the classifier rows, the teacher, the substitute) share one
    worker group: starting one costs 10-14 s on a small machine (benchmarks/train_startup.py),
    more than a small model's whole training. A model already committed to the store (by a
    group that died after it) is skipped; the one an epoch checkpoint belongs to resumes.
    """
    loop_started_at = time.time()
    quiet_ray_train()
    torch.set_num_threads(1)  # workers get a fraction of a core each; more threads only contend
    device = ray.train.torch.get_device()
    deterministic_kernels(device)
    group: WorkerGroup = config["group"]
    rows = WorkerRows(ray.train.get_dataset_shard("train"), group.rows_in_memory)
    state = restore_state()
    job: ClassifierJob
    for job in config["jobs"]:
        if verify_checkpoint(job.root, job.checkpoint_key) is not None:
            continue
        resume = state if state is not None and state.get("checkpoint_key") == job.checkpoint_key else None
        problem = train_classifier(job, rows, resume, device, group.checkpoint_interval_s, loop_started_at)
        if problem is not None:  # the models after it are not trained either: the run stops here
            record_stop(group.stop_record, problem)
            return


def train_classifier(job: ClassifierJob, rows: WorkerRows, state: dict[str, Any] | None,
                     device: torch.device, checkpoint_interval_s: float, loop_started_at: float) -> str | None:
    """Train and commit one classifier; returns why it stopped uncommitted (``workers.training_health``), or None."""
    started = time.perf_counter()
    torch.manual_seed(job.seed)  # identical initial weights on every worker
    spec = ModelSpec(**job.spec)
    kind = job.kind
    model = build_teacher(spec) if kind == "teacher" else build_classifier_model(spec)
    if job.pretrained:  # checked and reported on the driver before training started
        load_pretrained(model.encoder, model.classifier, job.pretrained)
    optimizer = torch.optim.Adam(model.parameters(), lr=job.settings["lr"])
    history, first_epoch = [], 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, first_epoch = state["history"], state["epoch"] + 1
    model = ray.train.torch.prepare_model(model)
    rank = ray.train.get_context().get_world_rank()
    world_size = ray.train.get_context().get_world_size()  # throughput is the whole group's
    checkpoints = EpochCheckpoints(checkpoint_interval_s, job.epochs, device)
    bar = epoch_bar(f"{kind} training", job.epochs, show=rank == 0)
    bar.update(first_epoch)
    augmentation = job.augmentation
    for epoch in range(first_epoch, job.epochs):
        settings = job.epoch_settings(epoch)
        start, waited, seen, steps, correct, total_loss = time.perf_counter(), rows.wait_seconds, 0, 0, 0, 0.0
        crops = augmentation_generator(job.seed, rank, epoch)
        for batch in rows.batches(job.batch_size, job.seed, rank, epoch, device):
            x = crop_and_flip([to_float(batch["clean"])], augmentation.mode, augmentation.crop_padding, crops)[0]
            y = batch["label"]
            loss, logits = objective(kind, settings, model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            seen += len(y)
            correct += (logits.argmax(1) == y).sum().item()
            total_loss += loss.item() * len(y)
        seconds = time.perf_counter() - start
        problem = epoch_problem(kind, epoch, steps, job.batch_size, total_loss / max(seen, 1), model, device)
        if problem is not None:
            bar.close()
            return problem
        metrics = {"epoch": epoch, "loss": total_loss / max(seen, 1), "train_accuracy": 100.0 * correct / max(seen, 1),
                   "samples_per_second": seen * world_size / seconds, "seconds": seconds,
                   "data_wait_seconds": rows.wait_seconds - waited,
                   "lr": optimizer.param_groups[0]["lr"], "resumed": state is not None and epoch == first_epoch}
        if settings.get("attack") is not None:
            metrics["attack_eps"] = settings["attack"]["eps"]
        history.append(metrics)
        checkpoints.end_epoch(epoch, metrics, {"checkpoint_key": job.checkpoint_key, "model": unwrap(model).state_dict(),
                                               "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history})
        bar.set_description(f"{kind} training (loss {metrics['loss']:.3f}, "
                            f"train acc {metrics['train_accuracy']:.1f}%)")
        bar.update(1)
    bar.close()
    if rank == 0:
        save_checkpoint(job.root, job.checkpoint_key, unwrap(model).state_dict(),
                        {"kind": kind, "spec": spec.as_dict(), "history": history,
                         "worker_seconds": {"training": time.perf_counter() - started,
                                            "checkpoints": checkpoints.seconds,
                                            "loop_started_at": loop_started_at, "committed_at": time.time()}})
    return None
