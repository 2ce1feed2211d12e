"""Pool generation throughput: adversarial samples per second of the pipeline's pool stage
(Ray actors + checks + Zarr writes + commits, the `mid pool` path) against a plain
single-process advertorch loop, on the same machine, in the same run.

Model training is not timed: the dataset is ingested into a fresh store by the real ingest
stage, a LeNet classifier is trained in this process and saved into the checkpoint store,
and Ray is started before the clock starts. Then:

* baseline: one process, torch threads = cores, the same model, attacks, settings,
  samples, targets and batch size, calling the attack's advertorch adversary batch after
  batch (no quantization, no checks, no writes);
* pipeline: ``pipeline.stages.pool.run`` on the fresh store, exactly what ``mid pool``
  runs: actors load the model from the store, attack shard by shard, quantize, check the
  ε-ball, encode, write Zarr chunks, commit, then the driver finalizes every pool. Its time
  includes the actors' start-up (import, model load) but not Ray's.

Samples = images x attacks x variants. Prints one JSON document. It also reports the
FLOP/s each path achieved against the machine's matrix-multiply peak, measured in the same
run (float32 ``torch.mm`` of 1024 and 2048 squares, torch threads = cores, best of five).
FLOPs are counted by ``torch.utils.flop_counter`` on the real model (``workers.flops``):
per adversarial sample, nb_iter attack steps (forward and input gradient) plus the success
checks each path runs (one forward in the plain loop; two in the pipeline, before and after
rounding to uint8). Like every such counter it counts matrix products and convolutions only.

    python benchmarks/pool_throughput.py --mnist ../shared/data/mnist --samples 4000
    python benchmarks/pool_throughput.py --samples 1024 --nb-iter 10     # digits
    python benchmarks/pool_throughput.py --cifar10 ../shared/data/cifar10 --samples 128 --nb-iter 5
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

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config_loader import load_config  # noqa: E402
from pipeline.context import RunContext  # noqa: E402
from pipeline.stages import ingest, pool  # noqa: E402
from pipeline.stages.models import model_spec  # noqa: E402
from storage import checkpoints  # noqa: E402
from storage import pools as pool_store  # noqa: E402
from storage.keys import content_key  # noqa: E402
from workers.attacks import make_attack, random_targets  # noqa: E402
from workers.loading import load_source_model  # noqa: E402
from workers.models import build_classifier_model, to_float  # noqa: E402
from workers.pool_generation import shard_seed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", default=None, help="folder of the MNIST IDX files (default: digits)")
    p.add_argument("--cifar10", default=None, help="folder of the CIFAR-10 python batches (ResNet-18)")
    p.add_argument("--samples", type=int, default=4000, help="train images to attack (per attack)")
    p.add_argument("--attacks", default="PGD_N,PGD_T", help="comma-separated attack names (at least 2)")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--nb-iter", type=int, default=40)
    p.add_argument("--eps-iter", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=256, help="attack batch size (pool.batch_size)")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--variants", type=int, default=1)
    p.add_argument("--cores", type=int, default=os.cpu_count(),
                   help="torch threads of the baseline and pool.num_actors (default: all cores)")
    p.add_argument("--epochs", type=int, default=2, help="source training epochs (not timed)")
    p.add_argument("--encoding", default="int8_delta", choices=["int8_delta", "uint8"])
    p.add_argument("--compressor", default="zstd", choices=list(pool_store.COMPRESSORS))
    p.add_argument("--keep-store", default=None, help="build the store in this folder and keep it")
    return p.parse_args(argv)


def build_config(args, root: str):
    attacks = args.attacks.split(",")
    overrides = [
        f"data.train_limit={args.samples}", "data.test_limit=64",
        f"pool.attacks=[{', '.join(attacks)}]", "pool.source_model=baseline",
        f"pool.variants={args.variants}", f"pool.batch_size={args.batch_size}",
        f"pool.shard_size={args.shard_size}", f"pool.num_actors={args.cores}",
        f"pool.encoding={args.encoding}", f"pool.compressor={args.compressor}",
        f"ray.num_cpus={args.cores}",
    ]
    if args.mnist:
        overrides += ["data.source=mnist", f"data.path={os.path.abspath(args.mnist)}", "data.image_size=null"]
    if args.cifar10:
        overrides += ["data.source=cifar10", f"data.path={os.path.abspath(args.cifar10)}", "data.image_size=null",
                      "models.arch=resnet18"]
    for family in ("PGD", "MIM", "BIM"):
        overrides += [f"attacks.{family}.eps={args.eps}", f"attacks.{family}.nb_iter={args.nb_iter}",
                      f"attacks.{family}.eps_iter={args.eps_iter}"]
    overrides += [f"attacks.FGSM.eps={args.eps}"]
    return load_config(REPO / "configs" / "digits.yaml", overrides, store=root)


def train_source(ctx, dataset, epochs: int) -> dict:
    """A classifier trained in this process (untimed), committed to the checkpoint store."""
    spec = model_spec(ctx, dataset)
    images, labels = dataset.load("train")
    torch.manual_seed(ctx.cfg.seed)
    model = build_classifier_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = to_float(torch.from_numpy(images)), torch.from_numpy(labels)
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for lo in range(0, len(y), 128):
            idx = order[lo:lo + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    key = content_key("baseline", {"benchmark": "pool_throughput", "dataset": dataset.fingerprint,
                                   "spec": spec.as_dict(), "epochs": epochs})
    return checkpoints.save_checkpoint(ctx.root, key, model.state_dict(),
                                       {"kind": "baseline", "spec": spec.as_dict(), "history": []})


def baseline_loop(ctx, dataset, source, attacks, variants, batch_size, threads) -> tuple[float, int, dict]:
    """The plain loop: same model, attacks, samples, targets and batch size, one process."""
    torch.set_num_threads(threads)
    model = load_source_model(ctx.root, "baseline", source["key"]).requires_grad_(False)
    images, labels_np = dataset.load("train")
    clean, labels = to_float(torch.from_numpy(images)), torch.from_numpy(labels_np)
    family_settings = ctx.cfg.attacks.family_settings()
    count, success = 0, {}
    started = time.perf_counter()
    for name in attacks:
        attack = make_attack(name, family_settings)
        hits = 0
        for variant in range(variants if attack.stochastic else 1):
            torch.manual_seed(shard_seed(ctx.cfg.seed, name, 0, variant))
            targets = random_targets(labels, dataset.num_classes, torch.Generator().manual_seed(variant))
            for lo in range(0, len(labels), batch_size):
                hi = min(lo + batch_size, len(labels))
                adv = attack.perturb(model, clean[lo:hi], labels[lo:hi], targets[lo:hi])
                count += hi - lo
                with torch.no_grad():
                    pred = model(adv).argmax(1)
                hits += int((pred == targets[lo:hi]).sum() if attack.targeted else (pred != labels[lo:hi]).sum())
        success[name] = round(100 * hits / (len(labels) * (variants if attack.stochastic else 1)), 2)
    return time.perf_counter() - started, count, success


def matmul_peak_flops(threads: int) -> dict:
    """The machine's float32 matrix-multiply rate (FLOP/s, 2 per multiply-add): best of five
    ``torch.mm`` of 1024 and 2048 squares with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    best = {}
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        best[n] = 2 * n ** 3 / min(times)
    return {"flops_per_second": max(best.values()), "by_size": {str(n): round(f / 1e9, 1) for n, f in best.items()}}


def attack_flops(spec, nb_iter: int, checks: int) -> float:
    """FLOPs of one adversarial sample: ``nb_iter`` attack steps and ``checks`` forwards."""
    from workers.flops import FLOPS_PER_MAC, attack_step_macs, forward_macs

    return FLOPS_PER_MAC * (nb_iter * attack_step_macs(spec) + checks * forward_macs(spec))


def main(argv=None) -> dict:
    args = parse_args(argv)
    attacks = args.attacks.split(",")
    started = time.perf_counter()
    tmp = None
    if args.keep_store:
        root = os.path.abspath(args.keep_store)
        shutil.rmtree(root, ignore_errors=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pool-throughput-")
        root = os.path.join(tmp.name, "store")
    cfg = build_config(args, root)
    out_dir = Path(tmp.name if tmp else root) / "run"
    ctx = RunContext(cfg, out_dir).open()
    torch.set_num_threads(args.cores)

    t0 = time.perf_counter()
    dataset = ingest.run(ctx)
    source = train_source(ctx, dataset, args.epochs)
    prepare_s = time.perf_counter() - t0

    peak = matmul_peak_flops(args.cores)
    spec = model_spec(ctx, dataset)
    base_s, base_count, base_success = baseline_loop(ctx, dataset, source, attacks, args.variants,
                                                     args.batch_size, args.cores)

    import ray

    t0 = time.perf_counter()
    ctx.ensure_ray()  # Ray's start-up is not the pool stage's cost (`mid pool` starts it for training)
    ray_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    keys = pool.run(ctx, dataset, source)
    pool_s = time.perf_counter() - t0
    ctx.close("finished")
    record = ctx.stages["pool"]
    manifests = {a: pool_store.read_manifest(root, k) for a, k in keys.items()}
    pool_count = sum(m["attrs"]["variants"] * m["attrs"]["num_samples"] for m in manifests.values())
    shard_seconds = sum(s["stats"]["seconds"] for m in manifests.values() for s in m["shards"])
    ray.shutdown()
    assert pool_count == base_count, (pool_count, base_count)

    report = {
        "benchmark": "pool_throughput",
        "dataset": cfg.data.source, "image_shape": list(dataset.image_shape()), "images": dataset.num_samples("train"),
        "attacks": attacks, "variants": args.variants, "adversarial_samples": base_count,
        "attack_settings": cfg.attacks.PGD.model_dump(), "batch_size": args.batch_size,
        "shard_size": args.shard_size, "encoding": args.encoding, "compressor": args.compressor,
        "cores": os.cpu_count(), "baseline_threads": args.cores, "pool_actors": cfg.pool.num_actors,
        "baseline": {"seconds": round(base_s, 2), "samples_per_second": round(base_count / base_s, 1),
                     "success_rate": base_success},
        "pipeline_pool_stage": {
            "seconds": round(record.seconds, 2), "samples_per_second": round(pool_count / record.seconds, 1),
            "success_rate": {a: d["success_rate_stored"] for a, d in record.details["attacks"].items()},
            "actor_busy_seconds": round(shard_seconds, 2),
            "seconds_around_stage": round(pool_s, 2),
        },
        "ratio_pipeline_to_baseline": round(base_s / record.seconds, 3),
        "matmul_peak_gflops": round(peak["flops_per_second"] / 1e9, 1), "matmul_peak_by_size": peak["by_size"],
        "flops_counted_per_sample": {"baseline": attack_flops(spec, args.nb_iter, 1),
                                     "pipeline": attack_flops(spec, args.nb_iter, 2)},
        "untimed": {"ingest_and_training_seconds": round(prepare_s, 1), "ray_start_seconds": round(ray_s, 1)},
        "seconds": round(time.perf_counter() - started, 1),
    }
    for path, seconds in (("baseline", base_s), ("pipeline_pool_stage", record.seconds)):
        flops = report["flops_counted_per_sample"][path.split("_")[0]] * base_count / seconds
        report[path]["gflops_per_second"] = round(flops / 1e9, 2)
        report[path]["share_of_matmul_peak"] = round(flops / peak["flops_per_second"], 3)
    if args.keep_store:
        report["store"] = root
        report["pools"] = keys
        report["dataset_key"] = dataset.key
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
