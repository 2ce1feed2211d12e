"""Ray Train's fixed cost per training stage: ``TorchTrainer.fit()`` of a loop that only
imports torch, on a local 2-CPU Ray instance with the pipeline's 0.2 s health-check
interval. Prints JSON: Ray's start, and per fit the seconds until the loop ran on its first
and on its last worker (``loop_started_seconds``: the worker group's start-up) and until
fit() returned (``seconds``).

    .venv/bin/python benchmarks/train_startup.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path


def loop(config: dict) -> None:
    import torch  # noqa: F401 (what every real loop imports first)

    started = time.time()
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"loop-started-{rank}.json").write_text(json.dumps({"loop_started": started}))


def main() -> None:
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    start = time.time()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    result = {"ray_init_seconds": round(time.time() - start, 1), "fits": []}
    tmp = tempfile.TemporaryDirectory(prefix="train-startup-")
    storage = tmp.name
    for i, workers in enumerate((1, 2, 2)):
        out = Path(storage, f"fit-{i}")
        out.mkdir()
        began = time.time()
        TorchTrainer(loop, train_loop_config={"out": str(out)},
                     scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                     run_config=RunConfig(storage_path=storage, name=f"probe-{workers}-{began}")).fit()
        ended = time.time()
        loop_started = sorted(json.loads(f.read_text())["loop_started"] for f in out.glob("loop-started-*.json"))
        if len(loop_started) != workers:
            raise RuntimeError(f"fit {i}: {len(loop_started)} of {workers} workers recorded their loop's start")
        result["fits"].append({"workers": workers, "seconds": round(ended - began, 1),
                               "loop_started_seconds": [round(loop_started[0] - began, 1),
                                                        round(loop_started[-1] - began, 1)]})
    ray.shutdown()
    tmp.cleanup()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
