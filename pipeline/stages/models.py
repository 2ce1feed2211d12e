"""Models: the baseline, the teacher, and the adversarial-training baselines AT and TRADES,
trained with Ray Train on the dataset store; and the Ray Train setup every training stage
shares (fault tolerance, per-epoch checkpoints in the store)."""

from __future__ import annotations

import threading
import time
from typing import Any

from pipeline.context import PipelineError, RunContext
from pipeline.preflight import starved_data_problem
from storage import checkpoints, fs
from storage.datasets import DatasetReader
from storage.keys import content_key
from workers.models import ModelSpec
from workers.training_health import read_stop


PRETRAINED_KINDS = ("baseline", "teacher")  # models.pretrained initialises these two
# The order batches reach a training step (workers.reproducible.WorkerRows): part of every
# trained model's key, so a store never mixes models trained under an earlier order.
BATCH_ORDER = 2
STOP_RECORD = "stopped.json"  # in a training run's folder: why its loop stopped without committing


def model_spec(ctx: RunContext, dataset: DatasetReader) -> ModelSpec:
    channels, height, width = dataset.image_shape()
    m = ctx.cfg.models
    try:
        return ModelSpec(arch=m.arch, in_channels=channels, image_size=height, num_classes=dataset.num_classes,
                         feature_dim=m.feature_dim, mean=m.mean, std=m.std)
    except ValueError as e:
        raise PipelineError(f"{e} (dataset {dataset.key})") from None


def augmentation_settings(ctx: RunContext) -> dict[str, Any]:
    """The workers' training augmentation; part of every trained model's key when on."""
    mode = ctx.cfg.data.augmentation()
    return {} if mode == "none" else {"augment": mode, "crop_padding": ctx.cfg.data.crop_padding}


def worker_augmentation(ctx: RunContext) -> dict[str, Any]:
    return {"augment": "none", "crop_padding": 0, **augmentation_settings(ctx)}


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


def train_with_ray(ctx: RunContext, loop, loop_config: dict[str, Any], datasets: dict[str, Any],
                   num_workers: int, stage: str, key: str, commits: list[str] | None = None) -> dict[str, Any]:
    """Run a train loop on ``num_workers`` Ray Train workers (each named Ray Dataset is
    split across them) until the loop has committed the checkpoints ``commits`` (default:
    ``key``); returns the manifest of the last.

    The run lives in the store's ``train/<stage>-<key>`` folder: a worker or node that dies
    restarts the worker group from the last epoch checkpoint (up to ``ray.max_failures``
    times), and a rerun after the driver died resumes there too, the name being the same.
    The folder is removed once every checkpoint is committed.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

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
    storage_path, storage_filesystem = ctx.ray_train_storage()
    # Where the loop says why it stopped without committing (workers.training_health).
    stop_record = fs.join(checkpoints.train_runs_url(ctx.root), name, STOP_RECORD)
    fs.remove(stop_record)
    loop_config = {**loop_config, "rows_in_memory": rows_fit_in_workers(datasets, num_workers),
                   "checkpoint_interval_s": ctx.cfg.ray.checkpoint_interval_s, "stop_record": stop_record}
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


def fit_off_the_main_thread(trainer) -> Any:
    """``trainer.fit()``, with Ctrl-C left to the pipeline.

    On the main thread, Ray Train replaces the SIGINT handler with its own, which aborts the
    run and then exits the process with a status that says nothing (and is never restored).
    Off the main thread it registers none, so Ctrl-C reaches this thread as
    KeyboardInterrupt: the run records itself as interrupted, keeps its last epoch
    checkpoint for the next run to resume from, and stops Ray.
    """
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread as is
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


OBJECT_STORE_SHARE = 0.25  # at most this share of the object store holds a cached dataset
READ_TASK_BYTES = 256 << 20  # bytes of rows per read task of a streamed dataset


def read_views(source):
    """A Ray Dataset over ``source``, kept in the object store when it fits comfortably.

    Streaming restarts the read pipeline every epoch, and the first batches of each epoch
    wait for it (14-24% of MID's step time on digits); a small dataset is read once and
    materialized instead. Larger ones keep streaming from the store, in read tasks of about
    ``READ_TASK_BYTES`` each so that a cluster reads in parallel, and in blocks that fit a
    small object store (``storage.datasource.TARGET_BLOCK_BYTES``).
    """
    import ray
    import ray.data

    from storage.datasource import TARGET_BLOCK_BYTES

    size = source.estimate_inmemory_data_size()
    budget = OBJECT_STORE_SHARE * ray.cluster_resources().get("object_store_memory", 0)
    # Ray Data joins a read task's output into blocks of up to target_max_block_size (128 MiB
    # by default): with a few large blocks in flight a pool larger than the object store
    # spills whole. The datasets of this driver take the datasource's block size instead.
    context = ray.data.DataContext.get_current()
    context.target_max_block_size = TARGET_BLOCK_BYTES
    # Blocks in read order, to every training worker by size alone: the same rows reach the
    # same worker on every run (workers.reproducible). Ray Train copies this setting into
    # each split dataset's execution options when the trainer is made.
    context.execution_options.preserve_order = True
    if size <= budget:
        return ray.data.read_datasource(source, override_num_blocks=4).materialize()
    return ray.data.read_datasource(source, override_num_blocks=max(4, size // READ_TASK_BYTES))


def clean_dataset(ctx: RunContext, dataset: DatasetReader):
    from storage.datasource import AlignedViewsDatasource

    return read_views(AlignedViewsDatasource(ctx.root, dataset.key, "train"))


def training_settings(ctx: RunContext, kind: str) -> dict[str, Any]:
    """Everything a model's training depends on besides the data and the architecture."""
    settings = getattr(ctx.cfg.models, kind).model_dump(exclude={"attack"})
    if not settings.get("eps_warmup_epochs", 1):
        settings.pop("eps_warmup_epochs")  # the default leaves the keys of existing models as they were
    if kind in ("at", "trades"):
        settings["attack"] = ctx.cfg.training_attack(kind).model_dump()
    return settings


def model_key(ctx: RunContext, dataset: DatasetReader, spec: ModelSpec, kind: str) -> tuple[str, dict[str, Any]]:
    """(content key, the worker's config) of one classifier. The substitute's own seed (in
    its settings) replaces the run's for its initial weights."""
    settings = {**training_settings(ctx, kind), **augmentation_settings(ctx)}
    pretrained = ctx.cfg.models.pretrained if kind in PRETRAINED_KINDS else None
    if pretrained:
        settings["pretrained_sha256"] = check_pretrained(ctx, spec, kind)
    key = content_key(kind, {"dataset": dataset.fingerprint, "spec": spec.as_dict(), "train": settings,
                             "seed": ctx.cfg.seed, "num_workers": ctx.cfg.models.num_workers,
                             "batch_order": BATCH_ORDER})
    config = {"root": ctx.root, "checkpoint_key": key, "kind": kind, "spec": spec.as_dict(), "seed": ctx.cfg.seed,
              "pretrained": pretrained, **settings, **worker_augmentation(ctx)}
    return key, config


def run_many(ctx: RunContext, dataset: DatasetReader, kinds: list[str]) -> dict[str, dict[str, Any]]:
    """Train (or reuse) the classifiers ``kinds`` (``baseline``, ``teacher``, ``at``,
    ``trades``, ``substitute``); returns their checkpoint manifests by kind.

    Those not in the store train one after another in ONE Ray Train worker group, on one
    read of the dataset (``workers.train_classifier.train_classifiers_loop``): a worker
    group's start costs more than a small model's training. Each gets its own stage record,
    with the seconds its own training took on the workers; the group's start-up and
    commit are in the first one's details.
    """
    from workers.train_classifier import train_classifiers_loop

    spec = model_spec(ctx, dataset)
    started = time.perf_counter()
    planned = {kind: model_key(ctx, dataset, spec, kind) for kind in kinds}

    def train(kinds_to_build: list[str]) -> dict[str, dict[str, Any]]:
        ctx.ensure_ray()
        # The run folder is "models-<first model's key>": gc keeps it while a ref names
        # that model, and a rerun of the same models finds its resume state.
        group = planned[kinds_to_build[0]][0]
        ctx.say(f"{', '.join(kinds_to_build)}: training on {ctx.cfg.models.num_workers} Ray Train workers"
                + (" (one worker group, one after another)" if len(kinds_to_build) > 1 else ""))
        train_with_ray(ctx, train_classifiers_loop, {"models": [planned[k][1] for k in kinds_to_build]},
                       {"train": clean_dataset(ctx, dataset)}, ctx.cfg.models.num_workers, "models",
                       group, commits=[planned[k][0] for k in kinds_to_build])
        return {kind: checkpoints.verify_checkpoint(ctx.root, planned[kind][0]) for kind in kinds_to_build}

    keys = {kind: key for kind, (key, _) in planned.items()}
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
        ctx.record_stage(kind, planned[kind][0], kind not in built, seconds, details)
    return manifests


def run(ctx: RunContext, dataset: DatasetReader, kind: str) -> dict[str, Any]:
    """Train (or reuse) one classifier; ``run_many`` of one."""
    return run_many(ctx, dataset, [kind])[kind]
