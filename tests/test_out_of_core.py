"""Data larger than the object store: a pool of 100 MB on a Ray instance whose object store
holds 80 MB streams through Ray Data (``read_views``) to the trainer's iterator without
spilling a byte, every row once and aligned; materializing the same rows does not fit
and spills, so the test can tell the two apart.

It needs its own Ray instance (the object store's size and the spill folder are fixed when
Ray starts), so the check runs in a subprocess: this file is also that script.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.end_to_end  # `make test-fast` leaves this file out

SAMPLES, SIDE, SHARD = 4096, 64, 1024
OBJECT_STORE_BYTES = 80 << 20  # Ray's minimum is 75 MiB
ATTACKS = ("FGSM_N", "FGSM_T")


def build_store(root: str) -> dict[str, str]:
    """A dataset of random 3×64×64 images (incompressible, so the rows' bytes are real bytes)
    and one FGSM pool per attack, crafted by the real attacks against a LeNet and written
    shard by shard through the pool store; returns {attack: pool key}."""
    import torch

    from pipeline.config import AttackSettings
    from storage import datasets, pools
    from storage.readers.base import RawDataset
    from workers.attacks import make_attack, make_targets
    from workers.models import ModelSpec, build_classifier_model, to_float

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (SAMPLES, 3, SIDE, SIDE), dtype=np.uint8)
    labels = rng.integers(0, 10, SAMPLES).astype(np.int64)
    datasets.write_dataset(root, "big", RawDataset(images, labels, images[:64], labels[:64],
                                                   tuple(str(c) for c in range(10))))
    torch.manual_seed(0)
    model = build_classifier_model(ModelSpec("lenet", 3, SIDE, 10)).eval()
    settings = AttackSettings(FGSM={"eps": 8 / 255}).family_settings()
    keys = {}
    for attack_name in ATTACKS:
        attack, key = make_attack(attack_name, settings), f"pool-{attack_name.lower()}"
        ranges = pools.shard_ranges(SAMPLES, SHARD)
        pools.create_pool(root, key, num_samples=SAMPLES, image_shape=(3, SIDE, SIDE), variants=1, shard_size=SHARD,
                          compressor="none", encoding="int8_delta",
                          attrs={"attack": attack_name, "split": "train", "indices": None, "dataset_key": "big"})
        for shard, (lo, hi) in enumerate(ranges):
            clean = images[lo:hi]
            y = torch.from_numpy(labels[lo:hi])
            targets = make_targets(y, 10, torch.Generator().manual_seed(shard), "random")
            adv = attack.perturb(model, to_float(torch.from_numpy(clean)), y, targets)
            stored = pools.quantize(adv.numpy(), clean, attack.eps, 1)[None]
            pools.write_shard(root, key, shard=shard, start=lo, stop=hi, eps=attack.eps, adv_u8=stored,
                              clean_u8=clean, targets=np.full((1, hi - lo), -1), stats={})
        pools.finalize_pool(root, key, len(ranges), {"attack": attack_name})
        keys[attack_name] = key
    return keys


class SpillWatch:
    """The most bytes the spill folder held while watched."""

    def __init__(self, folder: Path):
        self.folder, self.most, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, self.held())
            time.sleep(0.02)

    def held(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())

    def __enter__(self) -> "SpillWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.most = max(self.most, self.held())


def check(work: Path) -> dict:
    import ray
    import ray.data

    from pipeline.ray_runtime import read_views
    from storage.datasets import DatasetReader
    from storage.datasource import AlignedViewsDatasource
    from storage.pools import PoolReader

    root, spill = str(work / "store"), work / "spill"
    spill.mkdir()
    keys = build_store(root)
    pool_bytes = len(keys) * SAMPLES * 3 * SIDE * SIDE  # the pool's rows as MID reads them, decoded
    ray.init(address="local", num_cpus=2, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
             _node_ip_address="127.0.0.1", _system_config={"object_spilling_config": json.dumps(
                 {"type": "filesystem", "params": {"directory_path": str(spill)}})})
    ray.data.DataContext.get_current().enable_progress_bars = False
    source = AlignedViewsDatasource(root, "big", "train", pools=keys)
    streamed = read_views(source)
    seen, mismatched = [], 0
    dataset, readers = DatasetReader.open(root, "big"), {a: PoolReader.open(root, k) for a, k in keys.items()}
    with SpillWatch(spill) as streaming:
        # As workers.train_on_pool iterates its shard: shuffled locally, batches prefetched.
        for batch in streamed.iter_torch_batches(batch_size=64, local_shuffle_buffer_size=256, prefetch_batches=4):
            index = batch["index"].numpy()
            seen += index.tolist()
            row = int(index[0])
            clean, _ = dataset.load("train", row, row + 1)
            mismatched += int(not np.array_equal(batch["clean"][0].numpy(), clean[0]))
            for attack, reader in readers.items():
                mismatched += int(not np.array_equal(batch[attack][0].numpy(), reader.adv(0, row, row + 1, clean)[0]))
    with SpillWatch(spill) as materializing:
        held = ray.data.read_datasource(source, override_num_blocks=4).materialize()
        rows = held.count()
    ray.shutdown()
    return {"pool_bytes": pool_bytes, "row_bytes": source.estimate_inmemory_data_size(),
            "materialized_by_read_views": type(streamed).__name__ == "MaterializedDataset",
            "rows_seen": sorted(seen) == list(range(SAMPLES)), "mismatched": mismatched,
            "spilled_bytes_streaming": streaming.most, "spilled_bytes_materializing": materializing.most,
            "materialized_rows": rows}


def test_a_pool_larger_than_the_object_store_streams_without_spilling(tmp_path):
    result = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["pool_bytes"] > OBJECT_STORE_BYTES, report  # the premise: the pool does not fit
    assert not report["materialized_by_read_views"], report
    assert report["rows_seen"] and report["mismatched"] == 0, report
    assert report["spilled_bytes_streaming"] == 0, report
    # The control: the same rows held in the object store do not fit, and Ray spills them.
    assert report["materialized_rows"] == SAMPLES and report["spilled_bytes_materializing"] > 0, report


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(check(Path(sys.argv[1]))))
