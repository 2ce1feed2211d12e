"""What an actor's start costs on a local Ray instance, and what preloading torch into Ray's
worker processes changes: 3 rounds of 2 actors that import torch, created together and
killed, after Ray has been idle for a few seconds. Prints JSON: seconds per round.

    .venv/bin/python benchmarks/actor_start.py                 # Ray's defaults
    .venv/bin/python benchmarks/actor_start.py --preload torch
    .venv/bin/python benchmarks/actor_start.py --smoke          # tests: 1 s idle, 0.5 s pauses

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
    parser.add_argument("--idle", type=float, default=None, help="seconds to wait after Ray's start (default 8)")
    parser.add_argument("--smoke", action="store_true",
                        help="the same rounds with shorter waits (idle 1 s unless --idle, 0.5 s between rounds "
                             "instead of 3 s), so tests can run it; its figures mean little")
    args = parser.parse_args()
    idle = args.idle if args.idle is not None else (1.0 if args.smoke else 8.0)
    pause = 0.5 if args.smoke else 3.0

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

    time.sleep(idle)
    rounds = []
    for _ in range(3):
        began = time.time()
        actors = [ImportsTorch.remote() for _ in range(2)]
        ray.get([actor.pid.remote() for actor in actors])
        rounds.append(round(time.time() - began, 2))
        for actor in actors:
            ray.kill(actor)
        time.sleep(pause)
    ray.shutdown()
    print(json.dumps({"preload": args.preload, "seconds_per_round": rounds}))


if __name__ == "__main__":
    main()
