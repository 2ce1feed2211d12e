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
