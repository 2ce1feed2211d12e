"""Dataset, checkpoint and pool stores on real Zarr files on disk."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import checkpoints, datasets, pools
from storage.keys import content_key
from storage.readers.digits import load_digits


def test_dataset_round_trip_and_fingerprint(tmp_path):
    raw = load_digits(0.2, seed=0)
    manifest = datasets.write_dataset(str(tmp_path), "dataset-x", raw)
    reader = datasets.DatasetReader.open(str(tmp_path), "dataset-x")
    images, labels = reader.load("train")
    np.testing.assert_array_equal(images, raw.train_images)
    np.testing.assert_array_equal(labels, raw.train_labels)
    assert reader.fingerprint == manifest["fingerprint"] == datasets.fingerprint(raw)
    other = load_digits(0.2, seed=1)
    assert datasets.fingerprint(other) != reader.fingerprint


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the ingest stage"):
        datasets.DatasetReader.open(str(tmp_path), "dataset-nope")


def test_checkpoint_sha_is_verified(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.zeros(4)}
    manifest = checkpoints.save_checkpoint(str(tmp_path), "ck", state, {"kind": "test"})
    loaded, again = checkpoints.load_checkpoint(str(tmp_path), "ck")
    assert torch.equal(loaded["w"], state["w"]) and again["sha256"] == manifest["sha256"]
    weights = tmp_path / "checkpoints" / "ck" / checkpoints.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the sha256"):
        checkpoints.load_checkpoint(str(tmp_path), "ck")
    assert checkpoints.verify_checkpoint(str(tmp_path), "ck") is None


def test_content_keys_change_with_any_setting():
    base = {"attack": "PGD_N", "settings": {"eps": 0.3}, "seed": 0}
    assert content_key("pool", base) == content_key("pool", dict(base))
    assert content_key("pool", base) != content_key("pool", {**base, "seed": 1})
    assert content_key("pool", base) != content_key("pool", {**base, "settings": {"eps": 0.2}})


@settings(max_examples=200, deadline=None)
@given(eps=st.floats(0.001, 1.0), seed=st.integers(0, 2**31))
def test_quantized_views_stay_in_the_ball_and_range(eps, seed):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 256, (4, 1, 5, 5)).astype(np.uint8)
    adv = clean / 255.0 + rng.uniform(-eps, eps, clean.shape) * rng.choice([1.0, 1.2], clean.shape)
    stored = pools.quantize(adv, clean, eps)
    pools.check_invariants(stored, clean, eps)
    assert stored.dtype == np.uint8


@settings(max_examples=200, deadline=None)
@given(eps=st.floats(0.01, 0.49), step=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_delta_grid_stays_in_the_ball_and_round_trips_int8(eps, step, seed):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 256, (3, 1, 6, 6)).astype(np.uint8)
    adv = clean / 255.0 + rng.uniform(-1.5 * eps, 1.5 * eps, clean.shape)
    stored = pools.quantize(adv, clean, eps, step)
    pools.check_invariants(stored, clean, eps)
    delta = stored.astype(int) - clean.astype(int)
    assert not (delta % step).any()
    code = pools.encode(stored, clean, "int8_delta", step)
    assert np.array_equal(pools.decode(code, clean, "int8_delta", step), stored)


def test_invariant_check_rejects_views_outside_the_ball():
    clean = np.full((2, 1, 2, 2), 100, np.uint8)
    with pytest.raises(ValueError, match="leaves the ε-ball"):
        pools.check_invariants(clean + 80, clean, 0.3)


def make_pool(root, key, n=10, shard_size=4, variants=2, encoding="uint8", compressor="zstd"):
    pools.create_pool(root, key, num_samples=n, image_shape=(1, 2, 2), variants=variants,
                      shard_size=shard_size, compressor=compressor, encoding=encoding, attrs={"attack": "PGD_N"})
    return pools.shard_ranges(n, shard_size)


@pytest.mark.parametrize("encoding,compressor", [("uint8", "zstd"), ("int8_delta", "zstd"), ("int8_delta", "lzma")])
def test_pool_commit_protocol(tmp_path, encoding, compressor):
    root, key = str(tmp_path), "pool-a"
    ranges = make_pool(root, key, encoding=encoding, compressor=compressor)
    assert ranges == [(0, 4), (4, 8), (8, 10)]
    clean = np.full((10, 1, 2, 2), 128, np.uint8)
    for shard, (lo, hi) in enumerate(ranges[:2]):
        adv = np.stack([clean[lo:hi] + 1, clean[lo:hi] - 1])
        pools.write_shard(root, key, shard=shard, start=lo, stop=hi, eps=0.1, adv_u8=adv,
                          clean_u8=clean[lo:hi], targets=np.full((2, hi - lo), -1), stats={})
    with pytest.raises(RuntimeError, match="incomplete"):
        pools.PoolReader.open(root, key)
    partial = pools.PoolReader.open(root, key, allow_partial=True)
    assert partial.committed_ranges() == [(0, 4), (4, 8)]
    assert (partial.adv(0, 0, 8, clean[:8]) == 129).all()
    with pytest.raises(RuntimeError, match=r"\[4, 10\) are not all committed"):
        partial.adv(0, 4, 10, clean[4:])
    with pytest.raises(RuntimeError, match="not committed"):
        pools.finalize_pool(root, key, len(ranges), {})
    pools.write_shard(root, key, shard=2, start=8, stop=10, eps=0.1, adv_u8=np.stack([clean[8:] + 1, clean[8:] - 1]),
                      clean_u8=clean[8:], targets=np.full((2, 2), -1), stats={})
    pools.finalize_pool(root, key, len(ranges), {})
    reader = pools.PoolReader.open(root, key)
    assert (reader.adv(0, 0, 10, clean) == 129).all() and (reader.adv(1, 0, 10, clean) == 127).all()
    assert (reader.adv(2, 0, 10, clean) == 129).all()  # epoch e reads variant e mod K
    assert pools.verify_pool(root, key) == ([], 12)  # 3 shards x 2 variants x (views, targets) re-hashed
    record = json.loads((tmp_path / "pools" / key / "commits" / "shard-00001.json").read_text())
    array = "adv" if encoding == "uint8" else "delta"
    assert record["start"] == 4 and [len(h) for h in record["sha256"][array]] == [64, 64]  # one per chunk


def test_a_shard_outside_the_ball_is_never_written(tmp_path):
    root, key = str(tmp_path), "pool-b"
    make_pool(root, key)
    clean = np.full((4, 1, 2, 2), 10, np.uint8)
    with pytest.raises(ValueError, match="ε-ball"):
        pools.write_shard(root, key, shard=0, start=0, stop=4, eps=0.01, adv_u8=np.stack([clean + 50] * 2),
                          clean_u8=clean, targets=np.full((2, 4), -1), stats={})
    assert pools.committed_shards(root, key) == {}


@pytest.mark.parametrize("compressor", ["none", "zstd", "lzma", "blosc"])
def test_verify_names_the_pool_shard_and_array_of_a_corrupted_chunk(tmp_path, compressor):
    root, key = str(tmp_path), "pool-c"
    ranges = make_pool(root, key, variants=1, compressor=compressor)
    rng = np.random.default_rng(0)
    clean = rng.integers(10, 240, (10, 1, 2, 2)).astype(np.uint8)
    for shard, (lo, hi) in enumerate(ranges):
        pools.write_shard(root, key, shard=shard, start=lo, stop=hi, eps=0.1, adv_u8=clean[None, lo:hi] + 3,
                          clean_u8=clean[lo:hi], targets=np.full((1, hi - lo), -1), stats={})
    pools.finalize_pool(root, key, len(ranges), {})
    assert pools.verify_pool(root, key) == ([], 2 * len(ranges))  # views and targets of every shard
    chunk = tmp_path / "pools" / key / "adv" / "c" / "0" / "1" / "0" / "0" / "0"  # variant 0, shard 1
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x5A
    chunk.write_bytes(bytes(data))
    problems, _ = pools.verify_pool(root, key)
    assert len(problems) == 1 and problems[0].startswith(f"pool {key} shard 1 array adv"), problems
