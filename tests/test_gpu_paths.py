"""The GPU paths that can be checked without a GPU: settings a cluster cannot meet are
refused instead of waiting forever, and a bf16 pool (pool.bf16) keeps every stored
invariant and reports its success rate measured in float32. The same actor code runs on
CUDA when Ray gives it a GPU (docs/results.md records where that was measured)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config_loader import load_config
from pipeline.context import RunContext
from pipeline.errors import PipelineError
from storage import datasets, pools
from storage.checkpoints import save_checkpoint
from storage.readers.base import resize_images
from storage.readers.digits import load_digits
from workers.models import ModelSpec, build_classifier_model
from workers.pool_generation import PoolGenerator

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, field", [("ray.gpus_per_actor=0.5", "ray.gpus_per_actor"),
                                             ("ray.use_gpu=true", "ray.use_gpu")])
def test_gpus_the_cluster_lacks_are_refused_by_name(tmp_path, override, field):
    ctx = RunContext(load_config("configs/digits.yaml", [override]), tmp_path)
    with pytest.raises(PipelineError, match=f"{field}: asks for .* GPU.* the Ray cluster has 0"):
        ctx.check_gpus(0)
    ctx.check_gpus(1)  # a cluster with one GPU is enough for either


def test_a_bf16_pool_shard_keeps_its_invariants_and_measures_success_in_float32(tmp_path):
    root = str(tmp_path / "store")
    raw = load_digits(0.2, seed=0)
    train = resize_images(raw.train_images[:64], 16)
    from dataclasses import replace
    raw = replace(raw, train_images=train, train_labels=raw.train_labels[:64],
                  test_images=resize_images(raw.test_images[:8], 16), test_labels=raw.test_labels[:8])
    datasets.write_dataset(root, "dataset-test", raw)
    torch.manual_seed(0)
    spec = ModelSpec("lenet", 1, 16, 10)
    save_checkpoint(root, "baseline-test", build_classifier_model(spec).state_dict(),
                    {"kind": "baseline", "spec": spec.as_dict(), "history": []})
    eps = 0.1
    settings = {"PGD": {"eps": eps, "nb_iter": 5, "eps_iter": 0.03, "rand_init": True}}
    stored, success = {}, {}
    for key, bf16 in (("pool-bf16", True), ("pool-float32", False)):
        pools.create_pool(root, key, num_samples=64, image_shape=(1, 16, 16), variants=1, shard_size=64,
                          compressor="zstd", encoding="int8_delta",
                          attrs={"attack": "PGD_N", "eps": eps, "split": "train", "threat_model": "linf"})
        generator = PoolGenerator(root, "dataset-test", "baseline", "baseline-test", 10, bf16=bf16)
        shard = generator.generate(key, "PGD_N", "train", 1, 0, 0, 64, family_settings=settings,
                                   batch_size=32, seed=0)
        success[key] = shard["stats"]["success_rate_stored"]
        stored[key] = pools.PoolReader.open(root, key, allow_partial=True).adv(0, 0, 64, clean_u8=train)
        pools.check_invariants(stored[key], train, eps)
    # Same seeds, same random start: only bf16's rounding of the gradients tells them apart.
    assert not np.array_equal(stored["pool-bf16"], stored["pool-float32"])
    # ... and the attack they make is as strong: both measured in float32, within 4 of 64 samples.
    assert abs(success["pool-bf16"] - success["pool-float32"]) <= 4 / 64, success
    assert success["pool-float32"] > 0.5  # a real attack, not two failures that agree


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_pool_path_writes_verified_shards_as_successful_as_the_cpus(tmp_path):
    """The pool actor's code on the GPU and on the CPU, same seed, digits and a generated
    image folder (benchmarks/gpu_check.py's ``pool`` part at its smoke sizes)."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    result = gpu_check.check_pool(gpu_check.Check(gpu_check.SMOKE, tmp_path, torch.device("cuda")))
    assert result["devices"] == ["cuda", "cpu"]
    for name in ("digits", "folder"):
        assert result[name]["verified"] and result[name]["agree_within_1_point"], result[name]
