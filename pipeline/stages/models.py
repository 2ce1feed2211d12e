"""Models: the classifiers (the baseline, the teacher, the classifier rows such as AT and
TRADES, the substitute), trained with Ray Train on the dataset store
(``pipeline.training.train_with_ray``)."""

from __future__ import annotations

import time
from typing import Any

from pipeline import keys as key_rules
from pipeline.context import RunContext
from pipeline.errors import PipelineError
from pipeline.ray_runtime import read_views
from pipeline.training import train_with_ray
from storage import checkpoints
from storage.datasets import DatasetReader
from storage.keys import content_key
from workers.jobs import Augmentation, ClassifierJob
from workers.models import ModelSpec


def model_spec(ctx: RunContext, dataset: DatasetReader) -> ModelSpec:
    channels, height, width = dataset.image_shape()
    m = ctx.cfg.models
    try:
        return ModelSpec(arch=m.arch, in_channels=channels, image_size=height, num_classes=dataset.num_classes,
                         feature_dim=m.feature_dim, mean=m.mean, std=m.std)
    except ValueError as e:
        raise PipelineError(f"{e} (dataset {dataset.key})") from None


def worker_augmentation(ctx: RunContext) -> Augmentation:
    """The workers' training augmentation (in every trained model's key when on: pipeline.keys)."""
    mode = ctx.cfg.data.augmentation()
    return Augmentation(mode, ctx.cfg.data.crop_padding if mode != "none" else 0)


def check_pretrained(ctx: RunContext, spec: ModelSpec, kind: str) -> str:
    """Match the pretrained file against the model on the driver, before any worker starts;
    say what was loaded. Returns the file's sha256 (part of the model's key)."""
    from workers.models import build_classifier_model
    from workers.models.pretrained import PretrainedError, file_digest, load_pretrained

    path = ctx.cfg.models.pretrained
    model = build_classifier_model(spec)
    try:
        report = load_pretrained(model.encoder, model.classifier, path)
    except PretrainedError as e:
        raise PipelineError(str(e)) from None
    ctx.say(f"{kind}: {report.summary()}")
    return file_digest(path)


def clean_dataset(ctx: RunContext, dataset: DatasetReader):
    from storage.datasource import AlignedViewsDatasource

    return read_views(AlignedViewsDatasource(ctx.root, dataset.key, "train"))


def model_job(ctx: RunContext, dataset: DatasetReader, spec: ModelSpec, kind: str) -> ClassifierJob:
    """One classifier's job, under its content key. A section with a seed of its own (the
    substitute's) replaces the run's: its initial weights and batches differ from the baseline's."""
    pretrained_sha256 = check_pretrained(ctx, spec, kind) if key_rules.uses_pretrained(ctx.cfg, kind) else None
    payload = key_rules.model_payload(ctx.cfg, dataset.fingerprint, spec.as_dict(), kind, pretrained_sha256)
    settings = key_rules.training_settings(ctx.cfg, kind)
    return ClassifierJob(root=ctx.root, checkpoint_key=content_key(kind, payload), kind=kind, spec=spec.as_dict(),
                         seed=settings.get("seed", ctx.cfg.seed), settings=settings,
                         augmentation=worker_augmentation(ctx),
                         pretrained=ctx.cfg.models.pretrained if key_rules.uses_pretrained(ctx.cfg, kind) else None)


def run_many(ctx: RunContext, dataset: DatasetReader, kinds: list[str]) -> dict[str, dict[str, Any]]:
    """Train (or reuse) the classifiers ``kinds`` (``pipeline.run_plan.trained_classifiers``);
    returns their checkpoint manifests by kind.

    Those not in the store train one after another in ONE Ray Train worker group, on one
    read of the dataset (``workers.train_classifier.train_classifiers_loop``): a worker
    group's start costs more than a small model's training. Each gets its own stage record,
    with the seconds its own training took on the workers; the group's start-up and
    commit are in the first one's details.
    """
    from workers.train_classifier import train_classifiers_loop

    spec = model_spec(ctx, dataset)
    started = time.perf_counter()
    planned = {kind: model_job(ctx, dataset, spec, kind) for kind in kinds}

    def train(kinds_to_build: list[str]) -> dict[str, dict[str, Any]]:
        ctx.ensure_ray()
        # The run folder is "models-<first model's key>": gc keeps it while a ref names
        # that model, and a rerun of the same models finds its resume state.
        group = planned[kinds_to_build[0]].checkpoint_key
        ctx.say(f"{', '.join(kinds_to_build)}: training on {ctx.cfg.models.num_workers} Ray Train workers"
                + (" (one worker group, one after another)" if len(kinds_to_build) > 1 else ""))
        train_with_ray(ctx, train_classifiers_loop, {"jobs": [planned[k] for k in kinds_to_build]},
                       {"train": clean_dataset(ctx, dataset)}, ctx.cfg.models.num_workers, "models",
                       group, commits=[planned[k].checkpoint_key for k in kinds_to_build])
        return {kind: checkpoints.verify_checkpoint(ctx.root, planned[kind].checkpoint_key) for kind in kinds_to_build}

    keys = {kind: job.checkpoint_key for kind, job in planned.items()}
    manifests, built = ctx.reuse_or_build_many(keys, keys, lambda key: checkpoints.verify_checkpoint(ctx.root, key),
                                               train)
    group_seconds = time.perf_counter() - started
    worker_seconds = sum(manifests[k].get("worker_seconds", {}).get("training", 0.0) for k in built)
    for kind in kinds:
        manifest = manifests[kind]
        seconds = manifest.get("worker_seconds", {}).get("training", 0.0) if kind in built else 0.0
        details = {"sha256": manifest["sha256"], "train_accuracy": manifest["history"][-1]["train_accuracy"]}
        if kind in built and kind == built[0]:  # the group's start-up, data read and commits
            seconds += group_seconds - worker_seconds
            details["worker_group"] = {"models": built, "seconds": round(group_seconds, 3)}
        ctx.record_stage(kind, planned[kind].checkpoint_key, kind not in built, seconds, details)
    return manifests


def run(ctx: RunContext, dataset: DatasetReader, kind: str) -> dict[str, Any]:
    """Train (or reuse) one classifier; ``run_many`` of one."""
    return run_many(ctx, dataset, [kind])[kind]
