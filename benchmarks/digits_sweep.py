"""Single-process sweep on digits: robustness of MID trained on a fixed pool, next to Madry
PGD adversarial training (online attacks on the live model) as a reference.

Same models, attacks and MID step as the pipeline, without Ray, so settings can be
compared in minutes. Two evaluation protocols (``--protocols``, both by default):

  source    every EVAL attack is crafted once, on the test split, against the fixed source
            model (``--source``: the model MID's training pool is generated against),
            quantized to uint8 inside the ε-ball like the pool (storage.pools.quantize), and
            None and the defense are both scored on those same stored images: the paper's
            Table 2 protocol. Not white-box: with ``--source baseline`` it is white-box for
            None only (up to quantization), a transfer attack for the defense.
  adaptive  white-box: every EVAL attack is crafted against each scored model itself.

Targets of the targeted attacks are the same seeded random labels ≠ y in both protocols.
Prints one JSON line per run: per protocol, None's row and the defense's row (benign, each
attack, avg over benign and all attacks) and the gap defense avg − None avg; and seconds.

    python benchmarks/digits_sweep.py --eps 0.1 --epochs 40 --lr 1e-4 --variants 4
    python benchmarks/digits_sweep.py --eps 0.2 --mode madry --init random --epochs 30
    python benchmarks/digits_sweep.py --smoke --epochs 1 --steps 2   # tests: the same code, toy sizes

``--smoke`` trains the baseline and the teacher 2 epochs instead of 30 and 40 (give small
``--epochs`` and ``--steps`` too); nothing else changes, and its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.pools import quantize  # noqa: E402
from storage.readers.base import resize_images  # noqa: E402
from storage.readers.digits import load_digits  # noqa: E402
from workers.attacks import make_attack, random_targets  # noqa: E402
from workers.mid import FrozenTeacher, LossWeights, MetaSettings, draw_held_out, meta_gradients, meta_objective  # noqa: E402
from workers.models import EncoderClassifier, ModelSpec, build_classifier_model, build_encoder, build_teacher, to_float  # noqa: E402

POOL = ["PGD_N", "PGD_T", "MIM_N", "MIM_T"]
EVAL = POOL + ["FGSM_N", "FGSM_T", "BIM_N", "BIM_T"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=16, help="image side after bilinear upsampling")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=20, help="iterations of PGD/MIM/BIM; step = 2.5·ε/steps")
    p.add_argument("--mode", choices=["mid", "madry"], default="mid")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3, help="outer learning rate (and α for MID)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--variants", type=int, default=1, help="pool variants K; epoch e uses e mod K")
    p.add_argument("--source", choices=["baseline", "teacher"], default="teacher")
    p.add_argument("--init", choices=["teacher", "random"], default="teacher")
    p.add_argument("--protocols", default="source,adaptive",
                   help="comma-separated evaluation protocols: source (attacks crafted once against --source), "
                        "adaptive (white-box, against each model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true",
                   help="baseline and teacher trained 2 epochs instead of 30 and 40 (toy size, for tests)")
    return p.parse_args()


def train_plain(model, images, labels, epochs, teacher=False):
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for i in range(0, len(labels), 64):
            idx = order[i:i + 64]
            x, y = to_float(images[idx]), labels[idx]
            if teacher:
                logits, reconstruction = model(x)
                loss = F.cross_entropy(logits, y) + F.l1_loss(reconstruction, x)
            else:
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def finish_row(row: dict[str, float]) -> dict[str, float]:
    row["avg"] = float(np.mean(list(row.values())))
    return {k: round(v, 1) for k, v in row.items()}


def robustness_row(model, x, y, settings) -> dict[str, float]:
    """Adaptive (white-box) protocol: every attack crafted against ``model`` itself."""
    torch.manual_seed(5)
    row = {"benign": accuracy(model, x, y)}
    for name in EVAL:
        targets = random_targets(y, 10, torch.Generator().manual_seed(1))
        row[name] = accuracy(model, make_attack(name, settings).perturb(model, x, y, targets), y)
    return finish_row(row)


def source_attacks(source, x_u8, y, settings, eps) -> dict[str, torch.Tensor]:
    """Source protocol: each attack crafted once against ``source``, stored as uint8 like the pool."""
    torch.manual_seed(5)
    x, stored = to_float(x_u8), {}
    for name in EVAL:
        targets = random_targets(y, 10, torch.Generator().manual_seed(1))
        adv = make_attack(name, settings).perturb(source, x, y, targets)
        stored[name] = to_float(torch.from_numpy(quantize(adv.numpy(), x_u8.numpy(), eps)))
    return stored


def stored_row(model, x, y, stored: dict[str, torch.Tensor]) -> dict[str, float]:
    return finish_row({"benign": accuracy(model, x, y), **{name: accuracy(model, adv, y) for name, adv in stored.items()}})


def source_model(args, baseline, teacher_model):
    """The model the pool and the source protocol's attacks are crafted against."""
    if args.source == "baseline":
        return baseline
    return EncoderClassifier(teacher_model.encoder, teacher_model.classifier).eval()


def madry(args, spec, teacher_model, images, labels, settings):
    torch.manual_seed(0)
    if args.init == "random":
        model = build_classifier_model(spec)
    else:
        model = EncoderClassifier(copy.deepcopy(teacher_model.encoder), copy.deepcopy(teacher_model.classifier))
    optimizer = torch.optim.Adam(model.parameters(), args.lr)
    attack = make_attack("PGD_N", settings)
    for _ in range(args.epochs):
        order = torch.randperm(len(labels))
        for i in range(0, len(labels) - args.batch_size + 1, args.batch_size):
            idx = order[i:i + args.batch_size]
            x, y = to_float(images[idx]), labels[idx]
            adv = attack.perturb(model, x, y)
            model.train()
            loss = F.cross_entropy(model(adv), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def mid(args, spec, source, teacher_model, images, labels, settings):
    pools = []
    for k in range(args.variants):  # generated once, ahead of training, like the pipeline's pool
        torch.manual_seed(1000 + k)
        generator = torch.Generator().manual_seed(k)
        pool = {}
        for name in POOL:
            adv = make_attack(name, settings).perturb(source, to_float(images), labels, random_targets(labels, 10, generator))
            pool[name] = torch.from_numpy(quantize(adv.numpy(), images.numpy(), args.eps))
        pools.append(pool)
    teacher = FrozenTeacher(teacher_model.encoder, teacher_model.classifier, teacher_model.decoder)
    torch.manual_seed(0)
    student = copy.deepcopy(teacher_model.encoder) if args.init == "teacher" else build_encoder(spec)
    student.requires_grad_(True).train()
    optimizer = torch.optim.Adam(student.parameters(), args.lr)
    meta = MetaSettings(inner_lr=args.lr, meta_train=LossWeights(1.5, 0.8, 1.0), meta_test=LossWeights(1.0, 1.0, 1.0))
    step = 0
    for epoch in range(args.epochs):
        pool, order = pools[epoch % args.variants], torch.randperm(len(labels))
        for i in range(0, len(labels) - args.batch_size + 1, args.batch_size):
            idx = order[i:i + args.batch_size]
            held_out = draw_held_out(POOL, 0, step)
            step += 1
            loss, _ = meta_objective(student, teacher, to_float(images[idx]),
                                     {k: to_float(v[idx]) for k, v in pool.items()}, labels[idx], held_out, meta)
            for p, g in zip(student.parameters(), meta_gradients(student, loss)):
                p.grad = g
            optimizer.step()
            optimizer.zero_grad()
    return EncoderClassifier(student, teacher_model.classifier).eval()


def main():
    args = parse_args()
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = set(protocols) - {"source", "adaptive"}
    if unknown or not protocols:
        raise SystemExit(f"--protocols: unknown {sorted(unknown)} (allowed: source, adaptive)")
    torch.set_num_threads(args.threads)
    step = 2.5 * args.eps / args.steps
    settings = {"PGD": {"eps": args.eps, "nb_iter": args.steps, "eps_iter": step, "rand_init": True},
                "MIM": {"eps": args.eps, "nb_iter": args.steps, "eps_iter": step, "decay_factor": 1.0},
                "FGSM": {"eps": args.eps},
                "BIM": {"eps": args.eps, "nb_iter": args.steps, "eps_iter": step}}
    raw = load_digits(0.2, seed=0)
    images, labels = torch.from_numpy(resize_images(raw.train_images, args.size)), torch.from_numpy(raw.train_labels)
    test_u8, test_y = torch.from_numpy(resize_images(raw.test_images, args.size)), torch.from_numpy(raw.test_labels)
    test_x = to_float(test_u8)
    spec = ModelSpec("lenet", 1, args.size, 10)
    torch.manual_seed(0)
    baseline_epochs, teacher_epochs = (2, 2) if args.smoke else (30, 40)
    baseline = train_plain(build_classifier_model(spec), images, labels, baseline_epochs)
    teacher_model = train_plain(build_teacher(spec), images, labels, teacher_epochs, teacher=True)
    source = source_model(args, baseline, teacher_model)
    start = time.perf_counter()
    train = madry if args.mode == "madry" else lambda *a: mid(args, spec, source, *a[2:])
    defended = train(args, spec, teacher_model, images, labels, settings)
    seconds = time.perf_counter() - start
    result = {"args": vars(args)}
    for protocol in protocols:
        begin = time.perf_counter()
        if protocol == "source":
            stored = source_attacks(source, test_u8, test_y, settings, args.eps)
            none_row, defended_row = (stored_row(m, test_x, test_y, stored) for m in (baseline, defended))
        else:
            none_row, defended_row = (robustness_row(m, test_x, test_y, settings) for m in (baseline, defended))
        result[protocol] = {"None": none_row, args.mode: defended_row,
                            "gap": round(defended_row["avg"] - none_row["avg"], 1),
                            "seconds": round(time.perf_counter() - begin, 1)}
        if protocol == "source":
            result[protocol]["against"] = args.source
    result["train_seconds"] = round(seconds, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
