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
from workers.augment import crop_and_flip
from workers.defenses import classifier_defense
from workers.epoch_checkpoint import EpochCheckpoints, restore_state
from workers.epoch_loop import EpochRun, StepObjective, train_epochs
from workers.jobs import ClassifierJob, WorkerGroup
from workers.loading import unwrap
from workers.models import ModelSpec, build_classifier_model, build_teacher, to_float
from workers.models.pretrained import load_pretrained
from workers.progress import quiet_ray_train
from workers.reproducible import WorkerRows, deterministic_kernels
from workers.training_health import record_stop

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


class ClassifierStep(StepObjective):
    """A classifier's optimizer step on a clean batch: its kind's objective, backward, Adam."""

    def __init__(self, job: ClassifierJob, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.job, self.model, self.optimizer = job, model, optimizer
        self.settings = job.settings

    def begin_epoch(self, epoch: int, rows: WorkerRows) -> None:
        self.settings = self.job.epoch_settings(epoch)

    def step(self, batch: dict[str, torch.Tensor], crops: torch.Generator) -> tuple[int, dict[str, float]]:
        augmentation = self.job.augmentation
        x = crop_and_flip([to_float(batch["clean"])], augmentation.mode, augmentation.crop_padding, crops)[0]
        y = batch["label"]
        loss, logits = objective(self.job.kind, self.settings, self.model, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return len(y), {"loss": loss.item() * len(y), "correct": (logits.argmax(1) == y).sum().item()}

    def epoch_figures(self, epoch: int, sums: dict[str, float], steps: int, seen: int) -> dict[str, Any]:
        figures = {"loss": sums.get("loss", 0.0) / max(seen, 1),
                   "train_accuracy": 100.0 * sums.get("correct", 0.0) / max(seen, 1)}
        if self.settings.get("attack") is not None:
            figures["attack_eps"] = self.settings["attack"]["eps"]
        return figures

    def state(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {"checkpoint_key": self.job.checkpoint_key, "model": unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": epoch, "history": history}

    def describe(self, figures: dict[str, Any]) -> str:
        return f"loss {figures['loss']:.3f}, train acc {figures['train_accuracy']:.1f}%"


def train_classifier(job: ClassifierJob, rows: WorkerRows, state: dict[str, Any] | None,
                     device: torch.device, checkpoint_interval_s: float, loop_started_at: float) -> str | None:
    """Train and commit one classifier; returns why it stopped uncommitted (``workers.training_health``), or None."""
    started = time.perf_counter()
    torch.manual_seed(job.seed)  # identical initial weights on every worker
    spec = ModelSpec(**job.spec)
    model = build_teacher(spec) if job.kind == "teacher" else build_classifier_model(spec)
    if job.pretrained:  # checked and reported on the driver before training started
        load_pretrained(model.encoder, model.classifier, job.pretrained)
    optimizer = torch.optim.Adam(model.parameters(), lr=job.settings["lr"])
    run = EpochRun(job.kind, job.epochs, job.batch_size, job.seed, device,
                   EpochCheckpoints(checkpoint_interval_s, job.epochs, device))
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        run.history, run.first_epoch, run.resumed = state["history"], state["epoch"] + 1, True
    step = ClassifierStep(job, ray.train.torch.prepare_model(model), optimizer)
    problem = train_epochs(run, step, lambda epoch, bar: rows)
    if problem is not None:
        return problem
    if ray.train.get_context().get_world_rank() == 0:
        save_checkpoint(job.root, job.checkpoint_key, unwrap(step.model).state_dict(),
                        {"kind": job.kind, "spec": spec.as_dict(), "history": run.history,
                         "worker_seconds": {"training": time.perf_counter() - started,
                                            "checkpoints": run.checkpoints.seconds,
                                            "loop_started_at": loop_started_at, "committed_at": time.time()}})
    return None
