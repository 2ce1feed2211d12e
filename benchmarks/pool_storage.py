"""Pool storage cost: bytes per adversarial view of each encoding x compressor, and what
quantization does to the attack's success rate.

A LeNet source classifier is trained in this process (a few epochs), an attack (PGD_N and
PGD_T by default: ε 0.3, 40 steps of 0.01, as in the paper's MNIST setting) is run on a
subset of train images as float32, and the views are stored through the real pool API
(storage.pools: create_pool / write_shard / finalize_pool) into a temporary folder, once
per encoding (uint8, int8_delta) and compressor (zstd, blosc, none). For each it reports
bytes on disk per view (the chunks of the view array and of `target`, and all files of the
pool including commit records and manifest), the ratio to float32 (4·C·H·W bytes per
view), and the success rate on the source model before quantization (float32) and after
(decoded from the store), with their difference in points.

Targets of the issue: at least 10x smaller than float32, at most 0.5 points of success
change. Prints one JSON document.

    python benchmarks/pool_storage.py --mnist ../shared/data/mnist --samples 2000
    python benchmarks/pool_storage.py                      # scikit-learn digits, 16x16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage import pools  # noqa: E402
from storage.readers.base import resize_images  # noqa: E402
from storage.readers.digits import load_digits  # noqa: E402
from storage.readers.idx import MNIST_CLASSES, load_idx_dataset  # noqa: E402
from workers.attacks import make_attack, parse_attack_name, random_targets  # noqa: E402
from workers.models import ModelSpec, build_classifier_model, to_float  # noqa: E402

ENCODINGS = ("uint8", "int8_delta")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", default=None, help="folder of the MNIST IDX files (default: digits)")
    p.add_argument("--samples", type=int, default=2000, help="train images to attack")
    p.add_argument("--train-samples", type=int, default=20000, help="images to train the source on")
    p.add_argument("--epochs", type=int, default=3, help="source training epochs")
    p.add_argument("--attacks", default="PGD_N,PGD_T", help="comma-separated attack names")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--nb-iter", type=int, default=40)
    p.add_argument("--eps-iter", type=float, default=0.01)
    p.add_argument("--no-rand-init", action="store_true")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--compressors", default=",".join(pools.COMPRESSORS))
    p.add_argument("--delta-steps", default="1", help="comma-separated delta grids in grey levels (1 = exact)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="write the pools under this folder and keep them")
    p.add_argument("--bf16", action="store_true",
                   help="also generate each attack under bfloat16 autocast (pool.bf16) and report its stored "
                        "success rate, measured in float32, beside the float32 pool's")
    return p.parse_args(argv)


def load_data(args):
    if args.mnist:
        raw = load_idx_dataset(args.mnist, MNIST_CLASSES)
        return raw.train_images, raw.train_labels, "mnist"
    raw = load_digits(0.2, args.seed)
    return resize_images(raw.train_images, 16), raw.train_labels, "digits"


def train_source(images_u8, labels, spec, epochs, batch_size, seed):
    torch.manual_seed(seed)
    model = build_classifier_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = to_float(torch.from_numpy(images_u8)), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for lo in range(0, len(y), batch_size):
            idx = order[lo:lo + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


def hits(model, x, labels, targets, targeted):
    with torch.no_grad():
        pred = torch.cat([model(x[lo:lo + 1024]).argmax(1) for lo in range(0, len(x), 1024)])
    return (pred == targets) if targeted else (pred != labels)


def folder_bytes(path: Path, sub: str | None = None) -> int:
    base = path / sub if sub else path
    return sum(f.stat().st_size for f in base.rglob("*") if f.is_file()) if base.exists() else 0


def store_and_read(root, key, attack, encoding, compressor, clean_u8, adv_u8, targets, stats, shard_size, step):
    n = len(clean_u8)
    ranges = pools.shard_ranges(n, shard_size)
    started = time.perf_counter()
    pools.create_pool(root, key, num_samples=n, image_shape=clean_u8.shape[1:], variants=1,
                      shard_size=shard_size, compressor=compressor, encoding=encoding, delta_step=step,
                      attrs={"attack": attack.name, "settings": attack.settings, "dataset_key": None,
                             "split": "train", "seed": 0})
    target_col = targets if attack.targeted else np.full(n, -1, dtype=np.int64)
    for i, (lo, hi) in enumerate(ranges):
        pools.write_shard(root, key, shard=i, start=lo, stop=hi, eps=attack.eps, adv_u8=adv_u8[None, lo:hi],
                          clean_u8=clean_u8[lo:hi], targets=target_col[None, lo:hi], stats=stats)
    pools.finalize_pool(root, key, len(ranges), {"attack": attack.name})
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    reader = pools.PoolReader.open(root, key)
    decoded = reader.adv(0, 0, n, clean_u8=clean_u8)
    read_s = time.perf_counter() - started
    assert not pools.verify_pool(root, key)[0]
    return decoded, write_s, read_s


def measure(root, name, attack, encoding, compressor, step, model, clean_u8, adv_u8, y, targets, stats,
            float_hits, rate_float, float_bytes, shard_size, attack_s, linf) -> dict:
    """Store one view set with one encoding, compressor and delta grid; size and success after."""
    key = f"pool-{name}-{encoding}-{compressor}-step{step}"
    decoded, write_s, read_s = store_and_read(root, key, attack, encoding, compressor, clean_u8, adv_u8,
                                              targets.numpy(), stats, shard_size, step)
    assert np.array_equal(decoded, adv_u8)
    stored_hits = hits(model, to_float(torch.from_numpy(decoded)), y, targets, attack.targeted)
    rate_stored = float(stored_hits.float().mean()) * 100
    url = Path(pools.pool_url(root, key))
    view_bytes = folder_bytes(url, pools.ENCODINGS[encoding]["array"]) + folder_bytes(url, "target")
    per_view = view_bytes / len(y)
    return {
        "attack": name, "encoding": encoding, "compressor": compressor, "delta_step": step,
        "bytes_per_view": round(per_view, 1),
        "bytes_per_view_with_metadata": round(folder_bytes(url) / len(y), 1),
        "ratio_to_float32": round(float_bytes / per_view, 2),
        "ratio_to_float32_with_metadata": round(float_bytes * len(y) / folder_bytes(url), 2),
        "success_float": round(rate_float, 2), "success_stored": round(rate_stored, 2),
        "success_change_points": round(rate_stored - rate_float, 2),
        "flipped_samples": int((float_hits != stored_hits).sum()),
        "meets_10x": float_bytes / per_view >= 10,
        "meets_0.5_points": abs(rate_stored - rate_float) <= 0.5,
        "write_seconds": round(write_s, 3), "read_decode_seconds": round(read_s, 3),
        "attack_seconds": round(attack_s, 1), "max_linf_float": round(linf, 4),
    }


def compare_bf16(name, attack, model, clean, clean_u8, y, targets, adv_float32, args, float_seconds) -> dict:
    """The same attack under bf16 autocast (what pool.bf16 does in the pool actors): stored
    success rate of both pools, each measured with the float32 model."""
    from workers.device import bf16_autocast

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with bf16_autocast(True, clean.device):
        adv_bf16 = torch.cat([attack.perturb(model, clean[lo:hi], y[lo:hi], targets[lo:hi])
                              for lo, hi in pools.shard_ranges(len(y), args.batch_size)]).float()
    bf16_seconds = time.perf_counter() - t0
    rates = {}
    for label, images in (("float32", adv_float32), ("bf16", adv_bf16)):
        stored = to_float(torch.from_numpy(pools.quantize(images.numpy(), clean_u8, attack.eps, 1)))
        rates[label] = round(float(hits(model, stored, y, targets, attack.targeted).float().mean()) * 100, 2)
    return {"attack": name, "device": clean.device.type, "success_rate_stored_float32": rates["float32"],
            "success_rate_stored_bf16": rates["bf16"], "seconds_float32": round(float_seconds, 2),
            "seconds_bf16": round(bf16_seconds, 2)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    images, labels, source = load_data(args)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(labels))
    train_idx = np.sort(order[:min(args.train_samples, len(labels))])
    attack_idx = np.sort(rng.choice(len(labels), size=min(args.samples, len(labels)), replace=False))
    c, h, w = images.shape[1:]
    spec = ModelSpec(arch="lenet", in_channels=c, image_size=h, num_classes=10)
    model = train_source(images[train_idx], labels[train_idx], spec, args.epochs, 128, args.seed)
    clean_u8, y_np = np.ascontiguousarray(images[attack_idx]), labels[attack_idx]
    clean, y = to_float(torch.from_numpy(clean_u8)), torch.from_numpy(y_np)
    clean_accuracy = float((~hits(model, clean, y, y, False)).float().mean()) * 100
    train_s = time.perf_counter() - started

    settings = {"PGD": {"eps": args.eps, "nb_iter": args.nb_iter, "eps_iter": args.eps_iter,
                        "rand_init": not args.no_rand_init},
                "MIM": {"eps": args.eps, "nb_iter": args.nb_iter, "eps_iter": args.eps_iter, "decay_factor": 1.0},
                "BIM": {"eps": args.eps, "nb_iter": args.nb_iter, "eps_iter": args.eps_iter},
                "FGSM": {"eps": args.eps}}
    float_bytes = 4 * c * h * w
    results, bf16_rows, tmp = [], [], None
    if args.keep:
        root = os.path.abspath(args.keep)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pool-storage-")
        root = tmp.name
    for name in args.attacks.split(","):
        parse_attack_name(name)
        attack = make_attack(name, settings)
        torch.manual_seed(args.seed)
        targets = random_targets(y, 10, torch.Generator().manual_seed(args.seed + 1))
        t0 = time.perf_counter()
        adv = torch.cat([attack.perturb(model, clean[lo:hi], y[lo:hi], targets[lo:hi])
                         for lo, hi in pools.shard_ranges(len(y), args.batch_size)])
        attack_s = time.perf_counter() - t0
        float_hits = hits(model, adv, y, targets, attack.targeted)
        rate_float = float(float_hits.float().mean()) * 100
        if args.bf16:
            bf16_rows.append(compare_bf16(name, attack, model, clean, clean_u8, y, targets, adv, args, attack_s))
        linf = float((adv - clean).abs().max())
        for step in (int(v) for v in args.delta_steps.split(",")):
            adv_u8 = pools.quantize(adv.numpy(), clean_u8, attack.eps, step)
            quantized_hits = hits(model, to_float(torch.from_numpy(adv_u8)), y, targets, attack.targeted)
            stats = {"success_rate_float": rate_float / 100,
                     "success_rate_stored": float(quantized_hits.float().mean())}
            for encoding in ENCODINGS:
                for compressor in args.compressors.split(","):
                    results.append(measure(root, name, attack, encoding, compressor, step, model, clean_u8, adv_u8,
                                           y, targets, stats, float_hits, rate_float, float_bytes, args.shard_size,
                                           attack_s, linf))
    if tmp is not None:
        tmp.cleanup()
    report = {
        "benchmark": "pool_storage", "dataset": source, "image_shape": [c, h, w], "samples": len(y),
        "source_model": {"arch": "lenet", "train_samples": len(train_idx), "epochs": args.epochs,
                         "clean_accuracy_on_attacked_samples": round(clean_accuracy, 2),
                         "train_seconds": round(train_s, 1)},
        "attack_settings": settings["PGD"], "shard_size": args.shard_size,
        "float32_bytes_per_view": float_bytes,
        "note": "bytes_per_view counts the view array's chunks and the target array's chunks; int8_delta "
                "also needs the clean images, which the dataset store already holds (not counted)",
        "results": results,
        **({"bf16": bf16_rows} if args.bf16 else {}),
        "all_meet_targets": all(r["meets_10x"] and r["meets_0.5_points"] for r in results),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
