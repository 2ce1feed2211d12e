"""Ingest: raw dataset files → the Zarr dataset store (uint8 NCHW images, labels)."""

from __future__ import annotations

from dataclasses import replace

from pipeline.context import RunContext
from storage import datasets
from storage.keys import content_key
from storage.raw import load_raw, resize_images, source_digest, take_subset


def dataset_key(ctx: RunContext) -> str:
    d = ctx.cfg.data
    return content_key("dataset", {
        "source": d.source, "raw_sha256": source_digest(d.source, d.path), "image_size": d.image_size,
        "test_fraction": d.test_fraction if d.source == "digits" else None,
        "train_limit": d.train_limit, "test_limit": d.test_limit, "seed": ctx.cfg.seed,
        "format_version": datasets.FORMAT_VERSION,
    })


def ingest(ctx: RunContext, key: str) -> dict:
    d = ctx.cfg.data
    ctx.say(f"ingest: reading {d.source}" + (f" from {d.path}" if d.path else ""))
    raw = load_raw(d.source, d.path, d.test_fraction, ctx.cfg.seed)
    train_x, train_y = take_subset(raw.train_images, raw.train_labels, d.train_limit, ctx.cfg.seed)
    test_x, test_y = take_subset(raw.test_images, raw.test_labels, d.test_limit, ctx.cfg.seed + 1)
    if d.image_size:
        train_x, test_x = resize_images(train_x, d.image_size), resize_images(test_x, d.image_size)
    raw = replace(raw, train_images=train_x, train_labels=train_y, test_images=test_x, test_labels=test_y)
    return datasets.write_dataset(ctx.root, key, raw)


def run(ctx: RunContext) -> datasets.DatasetReader:
    with ctx.stage("ingest") as record:
        key = dataset_key(ctx)
        record["key"] = key
        _, record["cache_hit"] = ctx.reuse_or_build(
            "ingest", key, lambda: datasets.read_manifest(ctx.root, key), lambda: ingest(ctx, key))
        reader = datasets.DatasetReader.open(ctx.root, key)
        record["details"] = {"fingerprint": reader.fingerprint, "shapes": reader.manifest["shapes"]}
    return reader
