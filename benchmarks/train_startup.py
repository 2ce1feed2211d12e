"""Ray Train's fixed cost per training stage: ``TorchTrainer.fit()`` of a loop that only
imports torch, on a local 2-CPU Ray instance with the pipeline's 0.2 s health-check
interval. Prints JSON: Ray's start, and per fit the seconds until the loop ran (worker
group start-up) and until fit() returned.

    .venv/bin/python benchmarks/train_startup.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time


def loop(config: dict) -> None:
    import torch  # noqa: F401 (what every real loop imports first)

    print(json.dumps({"loop_started": time.time()}), flush=True)


def main() -> None:
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    start = time.time()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    result = {"ray_init_seconds": round(time.time() - start, 1), "fits": []}
    storage = tempfile.mkdtemp()
    for workers in (1, 2, 2):
        began = time.time()
        TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                     run_config=RunConfig(storage_path=storage, name=f"probe-{workers}-{began}")).fit()
        result["fits"].append({"workers": workers, "seconds": round(time.time() - began, 1)})
    ray.shutdown()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
