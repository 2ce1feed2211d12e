"""Ray Data streams a dataset split with every pool view aligned by sample index."""

import numpy as np

from storage import datasets, pools
from storage.datasource import AlignedViewsDatasource
from storage.readers.digits import load_digits


def build_store(root, n_pools=2):
    raw = load_digits(0.2, seed=0)
    datasets.write_dataset(root, "dataset-d", raw)
    clean, _ = raw.split("train")
    n = len(clean)
    keys = {}
    for p in range(n_pools):
        key = f"pool-{p}"
        pools.create_pool(root, key, num_samples=n, image_shape=clean.shape[1:], variants=2,
                          shard_size=500, compressor="zstd", encoding=["uint8", "int8_delta"][p % 2],
                          attrs={"dataset_key": "dataset-d", "split": "train"})
        for shard, (lo, hi) in enumerate(pools.shard_ranges(n, 500)):
            # Each view encodes its own sample index and variant, so misalignment shows.
            adv = np.stack([np.clip(clean[lo:hi].astype(int) + (1 if v == 0 else -1) * (p + 1), 0, 255)
                            for v in range(2)]).astype(np.uint8)
            pools.write_shard(root, key, shard=shard, start=lo, stop=hi, eps=0.05, adv_u8=adv,
                              clean_u8=clean[lo:hi], targets=np.full((2, hi - lo), -1), stats={})
        pools.finalize_pool(root, key, len(pools.shard_ranges(n, 500)), {})
        keys[f"ATTACK{p}"] = key
    return raw, keys


def test_rows_are_aligned_across_views(tmp_path, ray_local):
    import ray.data

    root = str(tmp_path)
    raw, keys = build_store(root)
    for variant in (0, 1):
        source = AlignedViewsDatasource(root, "dataset-d", "train", pools=keys, variant=variant, block_rows=300)
        rows = ray.data.read_datasource(source, override_num_blocks=3).take_all()
        assert len(rows) == len(raw.train_labels)
        rows.sort(key=lambda r: r["index"])
        for row in rows[::97]:
            i = row["index"]
            np.testing.assert_array_equal(row["clean"], raw.train_images[i])
            assert row["label"] == raw.train_labels[i]
            for p, name in enumerate(keys):
                sign = 1 if variant == 0 else -1
                expected = np.clip(raw.train_images[i].astype(int) + sign * (p + 1), 0, 255)
                np.testing.assert_array_equal(row[name], expected)


def test_incomplete_pools_are_refused(tmp_path):
    import pytest

    root = str(tmp_path)
    raw, keys = build_store(root, n_pools=1)
    pools.create_pool(root, "pool-partial", num_samples=len(raw.train_labels), image_shape=(1, 8, 8),
                      variants=1, shard_size=500, compressor="none", encoding="uint8", attrs={})
    with pytest.raises(RuntimeError, match="incomplete"):
        AlignedViewsDatasource(root, "dataset-d", "train", pools={**keys, "X": "pool-partial"})


def test_rows_kept_in_a_worker_are_each_epochs_seeded_permutation_of_its_split(tmp_path, ray_local):
    """``WorkerRows`` in memory: every row of the worker's split once per epoch (full batches
    only), rows still aligned across views, the same batches for the same (seed, rank,
    epoch), another order the next epoch; and the same rows as streaming through Ray Data."""
    import ray.data
    import torch

    from workers.reproducible import WorkerRows

    root = str(tmp_path)
    raw, keys = build_store(root)
    source = AlignedViewsDatasource(root, "dataset-d", "train", pools=keys, variant=0, block_rows=300)
    dataset = ray.data.read_datasource(source, override_num_blocks=3).materialize()
    shards = dataset.streaming_split(1, equal=True)  # one consumer: a split's readers must all read at once
    kept, streamed = WorkerRows(shards[0], in_memory=True), WorkerRows(shards[0], in_memory=False)
    cpu, batch = torch.device("cpu"), 64

    def epoch(rows, number):
        return list(rows.batches(batch, seed=3, rank=0, epoch=number, device=cpu))

    first, second = epoch(kept, 0), epoch(kept, 1)
    assert len(first) == len(second) == len(kept.rows["label"]) // batch
    for batches in (first, second):
        indices = torch.cat([b["index"] for b in batches]).tolist()
        assert len(indices) == len(set(indices)) and set(indices) <= set(kept.rows["index"].tolist())
        for b in batches:  # each pool view is its clean image moved by +(p + 1), clipped
            moved = b["ATTACK0"].int() - b["clean"].int()
            assert ((moved == 1) | (b["clean"] == 255)).all()
    assert [b["index"].tolist() for b in first] != [b["index"].tolist() for b in second]
    again = WorkerRows(shards[0], in_memory=True)
    assert [b["index"].tolist() for b in epoch(again, 1)] == [b["index"].tolist() for b in second]
    assert sorted(kept.rows["index"].tolist()) == list(range(len(raw.train_labels)))  # the whole split, once
    via_ray_data = torch.cat([b["index"] for b in epoch(streamed, 0)]).tolist()
    assert len(set(via_ray_data)) == len(via_ray_data) == len(first) * batch
