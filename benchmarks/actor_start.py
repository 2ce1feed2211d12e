"""What an actor's start costs on a local Ray instance, and what preloading torch into Ray's
worker processes changes: 3 rounds of 2 actors that import torch, created together and
killed, after Ray has been idle for a few seconds. Prints JSON: seconds per round.

    .venv/bin/python benchmarks/actor_start.py                 # Ray's defaults
    .venv/bin/python benchmarks/actor_start.py --preload torch

Ray starts (and preloads) idle workers only when it starts, so only the first round can
find them ready (docs/results.md, "Where a worker group's start goes").
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preload", nargs="*", default=[], help="modules Ray imports in every worker it starts")
    parser.add_argument("--idle", type=float, default=8.0, help="seconds to wait after Ray's start")
    args = parser.parse_args()

    import ray

    system_config = {"preload_python_modules": args.preload} if args.preload else {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             _system_config=system_config)

    @ray.remote(num_cpus=0.5)
    class ImportsTorch:
        def __init__(self) -> None:
            import torch  # noqa: F401 (what a training worker or pool actor imports first)

        def pid(self) -> int:
            return os.getpid()

    time.sleep(args.idle)
    rounds = []
    for _ in range(3):
        began = time.time()
        actors = [ImportsTorch.remote() for _ in range(2)]
        ray.get([actor.pid.remote() for actor in actors])
        rounds.append(round(time.time() - began, 2))
        for actor in actors:
            ray.kill(actor)
        time.sleep(3)
    ray.shutdown()
    print(json.dumps({"preload": args.preload, "seconds_per_round": rounds}))


if __name__ == "__main__":
    main()
