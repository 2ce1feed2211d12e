"""Training cost per epoch: MID on a cached pool (second and first order) against Madry
adversarial training with PGD-40 and PGD-10, on the authors' MNIST LeNet setting, on the
same machine, in the same run. Prints one JSON document.

Every number comes from the real stages on a fresh store: the ingest, baseline, teacher
and pool stages prepare a pool of the authors' attacks (ε = 0.3, 40 steps) on a subset of
MNIST, then each trainer runs ``--epochs`` epochs on Ray Train workers (the `mid run`
path). A trainer's cost is its training loop's wall time per epoch (Ray start-up and the
first epoch, which warms up Ray Data, excluded) divided by the samples of the epoch, per
1,000 samples. MID's epoch includes reading the pool through Ray Data; AT's includes
generating its attack online, which is what the cached pool saves.

Targets (issue 4): MID second order <= 0.25x AT PGD-40 and <= 1.0x AT PGD-10.

    python benchmarks/train_cost.py --mnist ../shared/data/mnist --samples 4096
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config_loader import load_config  # noqa: E402
from pipeline.context import RunContext  # noqa: E402
from pipeline.driver import prepare_pool  # noqa: E402
from pipeline.stages import mid, models  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", required=True, help="folder of the MNIST IDX files")
    p.add_argument("--samples", type=int, default=4096, help="train images (a seeded subset)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per trainer; the first is not timed")
    p.add_argument("--batch-size", type=int, default=256, help="the authors' MID batch; used by every trainer")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers per trainer")
    p.add_argument("--store", default=None, help="store to use (default: a temporary folder, removed after)")
    return p.parse_args(argv)


def cost(history: list[dict], batch_size: int) -> dict:
    """Seconds per 1,000 samples, from the epochs after the first."""
    timed = history[1:] or history
    per_1k = [1000.0 / h["samples_per_second"] for h in timed]
    row = {"seconds_per_1k_samples": round(sum(per_1k) / len(per_1k), 3),
           "epoch_seconds": [round(h["seconds"], 2) for h in history]}
    if "data_wait_fraction" in history[0]:
        row["data_wait_fraction"] = [round(h["data_wait_fraction"], 4) for h in history]
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    store = args.store or tempfile.mkdtemp(prefix="train-cost-")
    # The baseline and teacher only make the pool: the config's batch, or one batch per worker
    # when --samples is smaller (a toy run), since a worker needs at least one batch.
    prepare_batch = min(256, args.samples // args.workers)
    base = [f"data.path={os.path.abspath(args.mnist)}", f"data.train_limit={args.samples}", "data.test_limit=256",
            "models.baseline.epochs=2", "models.teacher.epochs=2", "pool.variants=1",
            f"models.baseline.batch_size={prepare_batch}", f"models.teacher.batch_size={prepare_batch}",
            f"models.num_workers={args.workers}", f"mid.num_workers={args.workers}",
            f"mid.epochs={args.epochs}", f"mid.batch_size={args.batch_size}",
            f"models.at.epochs={args.epochs}", f"models.at.batch_size={args.batch_size}"]
    trainers = {
        "mid_second_order": ["mid.second_order=true"],
        "mid_first_order": ["mid.second_order=false"],
        "at_pgd40": ["models.at.attack.nb_iter=40"],
        "at_pgd10": ["models.at.attack.nb_iter=10", "models.at.attack.eps_iter=0.04"],
    }
    try:
        out = Path(store) / "runs"
        start = time.perf_counter()
        ctx = RunContext(load_config(REPO / "configs/mnist.yaml", base, store), out).open()
        dataset, trained, pool_keys = prepare_pool(ctx)
        teacher = trained["teacher"]
        ctx.close("finished")
        prepare_seconds = time.perf_counter() - start
        results = {}
        for name, overrides in trainers.items():
            cfg = load_config(REPO / "configs/mnist.yaml", base + overrides, store)
            run_ctx = RunContext(cfg, out / name).open()  # joins the Ray instance the first context started
            if name.startswith("mid"):
                manifest = mid.run(run_ctx, dataset, teacher, pool_keys)
            else:
                manifest = models.run(run_ctx, dataset, "at")
            run_ctx.close("finished")
            results[name] = cost(manifest["history"], args.batch_size)
            print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
        mid2 = results["mid_second_order"]["seconds_per_1k_samples"]
        report = {
            "setting": {"dataset": "MNIST", "train_samples": args.samples, "epochs": args.epochs,
                        "batch_size": args.batch_size, "workers": args.workers, "cpus": os.cpu_count(),
                        "pool": list(pool_keys), "eps": 0.3, "pool_attack_steps": 40},
            "prepare_seconds": round(prepare_seconds, 1),
            "trainers": results,
            "ratios": {
                "mid_second_order / at_pgd40": round(mid2 / results["at_pgd40"]["seconds_per_1k_samples"], 3),
                "mid_second_order / at_pgd10": round(mid2 / results["at_pgd10"]["seconds_per_1k_samples"], 3),
                "mid_first_order / at_pgd40": round(results["mid_first_order"]["seconds_per_1k_samples"]
                                                    / results["at_pgd40"]["seconds_per_1k_samples"], 3),
                "mid_second_order / mid_first_order": round(
                    mid2 / results["mid_first_order"]["seconds_per_1k_samples"], 3),
            },
            "targets": {"mid_second_order / at_pgd40": 0.25, "mid_second_order / at_pgd10": 1.0},
        }
        report["targets_met"] = all(report["ratios"][k] <= v for k, v in report["targets"].items())
        print(json.dumps(report, indent=2))
        return report
    finally:
        if args.store is None:
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
