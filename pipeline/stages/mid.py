"""MID: Ray Train workers stream the dataset and every pool view through Ray Data."""

from __future__ import annotations

from typing import Any

from pipeline.context import RunContext
from pipeline.ray_runtime import read_views
from pipeline.training import train_with_ray
from pipeline.keys import mid_payload
from pipeline.stages.models import model_spec, worker_augmentation
from storage import checkpoints
from storage.datasets import DatasetReader
from storage.keys import content_key
from workers.jobs import MIDJob


def mid_job(ctx: RunContext, dataset: DatasetReader, teacher: dict[str, Any], pool_keys: dict[str, str],
            key: str) -> MIDJob:
    """The student's job, under its content key ``key``."""
    m = ctx.cfg.mid
    return MIDJob(root=ctx.root, checkpoint_key=key, teacher_key=teacher["key"],
                  spec=model_spec(ctx, dataset).as_dict(), seed=ctx.cfg.seed, attacks=tuple(pool_keys),
                  variants=ctx.cfg.pool.variants, epochs=m.epochs, batch_size=m.batch_size, lr=m.lr,
                  init_student=m.init_student, bf16=m.bf16, step=m.step(on_gpu=ctx.cfg.ray.use_gpu),
                  augmentation=worker_augmentation(ctx))


def run(ctx: RunContext, dataset: DatasetReader, teacher: dict[str, Any], pool_keys: dict[str, str]) -> dict[str, Any]:
    from storage.datasource import AlignedViewsDatasource
    from workers.train_on_pool import train_on_pool_loop, variant_dataset_name

    m = ctx.cfg.mid
    with ctx.stage("mid") as record:
        key = content_key("mid", mid_payload(ctx.cfg, dataset.fingerprint, teacher["sha256"], pool_keys))
        record["key"] = key
        def train() -> dict[str, Any]:
            ctx.ensure_ray()
            ctx.say(f"mid: meta-training on {m.num_workers} Ray Train workers "
                    f"({'second' if m.second_order else 'first'} order, held-out attack per step)")
            # One dataset per pool variant; epoch e streams variant e mod K (docs/design.md §4).
            variants = {variant_dataset_name(k): read_views(
                            AlignedViewsDatasource(ctx.root, dataset.key, "train", pools=pool_keys, variant=k))
                        for k in range(ctx.cfg.pool.variants)}
            if m.bf16 and not ctx.cfg.ray.use_gpu:
                ctx.say("mid: mid.bf16 applies to GPU workers only (ray.use_gpu is false): training in float32")
            return train_with_ray(ctx, train_on_pool_loop, {"job": mid_job(ctx, dataset, teacher, pool_keys, key)},
                                  variants, m.num_workers, "mid", key)

        manifest, record["cache_hit"] = ctx.reuse_or_build(
            "mid", key, lambda: checkpoints.verify_checkpoint(ctx.root, key), train)
        record["details"] = {"sha256": manifest["sha256"], "final_epoch": manifest["history"][-1]}
    return manifest
