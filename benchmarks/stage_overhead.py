"""What Ray Train costs a small run: each training stage of a config (the digits demo by
default) in the pipeline against the same epochs of the same loop in one plain process,
same run, same machine; and where the difference goes. Prints one JSON document.

Untimed: ingest, and the training pool MID needs (the pool stage is
benchmarks/pool_throughput.py's subject). Ray's start is timed and reported apart: a run
pays it once. Then, in this order:

* single process, torch threads = cores: per classifier (baseline, teacher, AT, TRADES,
  substitute, as the config has them) and for MID, the loop's own step
  (``workers.train_classifier.objective``; ``workers.mid.meta_objective`` and
  ``meta_gradients``) over the same epochs, batch size and data, in memory;
* pipeline: ``models.run_many`` (the classifiers: one Ray Train worker group) and
  ``mid.run``, exactly what ``mid run`` calls, on a fresh store.

Each Train stage's difference is split into: start-up (the driver's dataset read, the
trainer's and worker group's start, until the loop's first line), teardown (from the last
commit until ``fit()`` returned and the run folder was removed), epoch checkpoints, data
wait (the first epoch's read included), and the rest of the workers' time against the
single process (their steps on a fraction of a core each, gradient all-reduce, model set-up).

    .venv/bin/python benchmarks/stage_overhead.py                  # the digits demo
    .venv/bin/python benchmarks/stage_overhead.py --set mid.epochs=5

At toy size (tests/test_benchmarks.py), with --set overrides only: data.train_limit=128,
data.test_limit=32, one epoch of every model and of MID, one pool variant of one shard,
2-step PGD and MIM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import run_plan  # noqa: E402
from pipeline.config_loader import load_config  # noqa: E402
from pipeline.context import RunContext  # noqa: E402
from pipeline.stages import ingest, mid, models, pool  # noqa: E402
from storage.pools import PoolReader  # noqa: E402
from workers.augment import augmentation_generator, crop_and_flip  # noqa: E402
from workers.loading import load_teacher  # noqa: E402
from workers.mid import FrozenTeacher, apply_gradients, draw_held_out, meta_gradients, meta_objective  # noqa: E402
from workers.models import ModelSpec, build_classifier_model, build_teacher, to_float  # noqa: E402
from workers.jobs import ClassifierJob, MIDJob  # noqa: E402
from workers.train_classifier import objective  # noqa: E402
from workers.pool_objectives import initial_student  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "digits.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the single process")
    return p.parse_args(argv)


def batches(count: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(count, generator=generator)
    for lo in range(0, count - batch_size + 1, batch_size):
        yield order[lo:lo + batch_size]


def single_process_classifier(job: ClassifierJob, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The epochs of ``workers.train_classifier.train_classifier`` in this process."""
    started = time.perf_counter()
    torch.manual_seed(job.seed)
    spec = ModelSpec(**job.spec)
    model = build_teacher(spec) if job.kind == "teacher" else build_classifier_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=job.settings["lr"])
    generator = torch.Generator().manual_seed(job.seed)
    for epoch in range(job.epochs):
        settings = job.epoch_settings(epoch)
        crops = augmentation_generator(job.seed, 0, epoch)
        for rows in batches(len(labels), job.batch_size, generator):
            x = crop_and_flip([to_float(images[rows])], job.augmentation.mode, job.augmentation.crop_padding, crops)[0]
            loss, _ = objective(job.kind, settings, model, x, labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def single_process_mid(job: MIDJob, clean: torch.Tensor, labels: torch.Tensor,
                       views: list[dict[str, torch.Tensor]]) -> float:
    """The epochs of ``workers.train_on_pool.train_on_pool_loop`` in this process (no all-reduce)."""
    started = time.perf_counter()
    teacher_model = load_teacher(job.root, job.teacher_key)
    teacher = FrozenTeacher(teacher_model.encoder, teacher_model.classifier, teacher_model.decoder)
    student = initial_student(job, teacher)
    optimizer = torch.optim.Adam(student.parameters(), lr=job.lr)
    attacks, step = list(job.attacks), 0
    generator = torch.Generator().manual_seed(job.seed)
    for epoch in range(job.epochs):
        variant = views[epoch % len(views)]
        crops = augmentation_generator(job.seed, 0, epoch)
        for rows in batches(len(labels), job.batch_size, generator):
            held_out = draw_held_out(attacks, job.seed, step)
            x, *adv = crop_and_flip([to_float(clean[rows]), *[to_float(variant[a][rows]) for a in attacks]],
                                    job.augmentation.mode, job.augmentation.crop_padding, crops)
            loss, _ = meta_objective(student, teacher, x, dict(zip(attacks, adv)), labels[rows], held_out, job.step)
            apply_gradients(student, meta_gradients(student, loss), optimizer)
            step += 1
    return time.perf_counter() - started


def split(stage_started: float, stage_ended: float, manifests: list[dict[str, Any]],
          single_seconds: float) -> dict[str, float]:
    """Where a Train stage's time went, from the workers' own clocks in the manifests."""
    worker = [m["worker_seconds"] for m in manifests]
    epochs = sum(h["seconds"] for m in manifests for h in m["history"])
    data_wait = sum(h.get("data_wait_seconds", h.get("data_wait_fraction", 0.0) * h["seconds"])
                    for m in manifests for h in m["history"])
    training = sum(w["training"] for w in worker)
    checkpoints = sum(w["checkpoints"] for w in worker)
    return {
        "startup": round(min(w["loop_started_at"] for w in worker) - stage_started, 2),
        "teardown": round(stage_ended - max(w["committed_at"] for w in worker), 2),
        "epoch_checkpoints": round(checkpoints, 2),
        "data_wait": round(data_wait, 2),
        "worker_steps_minus_single_process": round(epochs - data_wait - single_seconds, 2),
        "worker_setup_and_commit": round(training - epochs - checkpoints, 2),
    }


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="stage-overhead-")
    root = os.path.join(tmp.name, "store")
    cfg = load_config(Path(args.config), args.set, store=root)
    ctx = RunContext(cfg, Path(tmp.name) / "run").open()
    dataset = ingest.run(ctx)
    kinds = run_plan.trained_classifiers(cfg)
    spec = models.model_spec(ctx, dataset)
    jobs = {kind: models.model_job(ctx, dataset, spec, kind) for kind in kinds}
    images_u8, labels_np = dataset.load("train")
    images, labels = torch.from_numpy(images_u8), torch.from_numpy(labels_np)

    torch.set_num_threads(args.threads)
    single = {kind: single_process_classifier(job, images, labels) for kind, job in jobs.items()}

    began = time.time()
    ctx.ensure_ray()
    ray_start = time.time() - began

    began = time.time()
    trained = models.run_many(ctx, dataset, kinds)
    group_ended = time.time()
    group = {"pipeline_seconds": round(group_ended - began, 2), "single_process_seconds": round(sum(single.values()), 2),
             "models": kinds,
             "split": split(began, group_ended, [trained[k] for k in kinds], sum(single.values()))}
    group["ratio"] = round((group_ended - began) / sum(single.values()), 2)  # not of the rounded figures
    per_model = {kind: {"worker_seconds": round(trained[kind]["worker_seconds"]["training"], 2),
                        "single_process_seconds": round(single[kind], 2),
                        "ratio": round(trained[kind]["worker_seconds"]["training"] / single[kind], 2)}
                 for kind in kinds}

    pool_keys = pool.run(ctx, dataset, trained[cfg.pool.source_model])  # untimed: MID's input
    mid_job = mid.mid_job(ctx, dataset, trained["teacher"], pool_keys, key="unused: not committed")
    readers = {a: PoolReader.open(root, k) for a, k in pool_keys.items()}
    views = [{a: torch.from_numpy(r.adv(v, 0, len(labels), images_u8)) for a, r in readers.items()}
             for v in range(cfg.pool.variants)]
    torch.set_num_threads(args.threads)
    mid_single = single_process_mid(mid_job, images, labels, views)
    began = time.time()
    student = mid.run(ctx, dataset, trained["teacher"], pool_keys)
    mid_ended = time.time()
    mid_stage = {"pipeline_seconds": round(mid_ended - began, 2), "single_process_seconds": round(mid_single, 2),
                 "split": split(began, mid_ended, [student], mid_single)}
    mid_stage["ratio"] = round((mid_ended - began) / mid_single, 2)
    ctx.close("finished")

    import ray

    ray.shutdown()
    tmp.cleanup()
    report = {
        "benchmark": "stage_overhead", "config": os.path.relpath(args.config, REPO), "overrides": args.set,
        "cores": os.cpu_count(), "single_process_threads": args.threads,
        "train_workers": {"classifiers": cfg.models.num_workers, "mid": cfg.mid.num_workers,
                          "cpus_per_worker": cfg.ray.cpus_per_worker},
        "checkpoint_interval_s": cfg.ray.checkpoint_interval_s,
        "ray_start_seconds": round(ray_start, 2),
        "stages": {"classifiers (one worker group)": group, "mid": mid_stage},
        "classifiers_inside_the_group": per_model,
        "max_stage_ratio": max(group["ratio"], mid_stage["ratio"]),
    }
    report["meets_2x"] = report["max_stage_ratio"] <= 2.0
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
