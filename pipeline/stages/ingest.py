"""Ingest: raw dataset files → the Zarr dataset store (uint8 NCHW images, labels).

In-memory formats (digits, IDX, CIFAR, SVHN) are read whole, subset and resized here;
image folders are decoded by Ray Data and streamed into the store chunk by chunk.
"""

from __future__ import annotations

from dataclasses import replace


from pipeline.console import progress
from pipeline.context import RunContext
from pipeline.keys import dataset_payload
from storage import datasets
from storage.keys import content_key
from storage.readers import reader
from storage.readers.base import resize_images, take_subset

DECODE_BATCH_ROWS = 256


def dataset_key(ctx: RunContext) -> str:
    d = ctx.cfg.data
    return content_key("dataset", dataset_payload(ctx.cfg, reader(d.source).digest(d.path)))


def split_limits(ctx: RunContext) -> dict[str, tuple[int | None, int]]:
    """Each split's subset size and the seed that draws it."""
    d = ctx.cfg.data
    return {"train": (d.train_limit, ctx.cfg.seed), "test": (d.test_limit, ctx.cfg.seed + 1)}


def ingest(ctx: RunContext, key: str) -> dict:
    d = ctx.cfg.data
    source = reader(d.source)
    ctx.say(f"ingest: reading {d.source}" + (f" from {d.path}" if d.path else ""))
    if source.streaming:
        return ingest_streaming(ctx, key, source)
    raw = source.load(d.path, d.test_fraction, ctx.cfg.seed)
    limits = split_limits(ctx)
    train_x, train_y = take_subset(raw.train_images, raw.train_labels, *limits["train"])
    test_x, test_y = take_subset(raw.test_images, raw.test_labels, *limits["test"])
    if d.image_size:
        train_x, test_x = resize_images(train_x, d.image_size), resize_images(test_x, d.image_size)
    raw = replace(raw, train_images=train_x, train_labels=train_y, test_images=test_x, test_labels=test_y)
    return datasets.write_dataset(ctx.root, key, raw)


def ingest_streaming(ctx: RunContext, key: str, source) -> dict:
    """Decode on Ray Data, write chunk by chunk; a failure leaves nothing committed."""
    ctx.ensure_ray()
    size, writer = ctx.cfg.data.image_size, datasets.DatasetWriter(ctx.root, key)
    try:
        for split, (limit, seed) in split_limits(ctx).items():
            files, labels = source.selected(ctx.cfg.data.path, split, limit, seed)
            with progress(total=len(files), desc=f"decoding {split} images", unit="img") as bar:
                def batches():
                    done = 0
                    for paths, images in source.decoded_batches(files, size, DECODE_BATCH_ROWS):
                        if list(paths) != files[done:done + len(paths)]:  # preserve_order is on; make sure
                            raise RuntimeError(f"ingest: Ray Data returned {split} images out of order")
                        done += len(paths)
                        bar.update(len(paths))
                        yield images
                writer.write_split(split, labels, (3, size, size), batches())
        return writer.commit(source.classes(ctx.cfg.data.path))
    except BaseException:
        writer.abort()
        raise


def run(ctx: RunContext) -> datasets.DatasetReader:
    with ctx.stage("ingest") as record:
        key = dataset_key(ctx)
        record["key"] = key
        _, record["cache_hit"] = ctx.reuse_or_build(
            "ingest", key, lambda: datasets.read_manifest(ctx.root, key), lambda: ingest(ctx, key))
        reader_ = datasets.DatasetReader.open(ctx.root, key)
        record["details"] = {"fingerprint": reader_.fingerprint, "shapes": reader_.manifest["shapes"]}
    return reader_
