"""Single-process sweep on digits: white-box robustness of MID trained on a fixed pool,
next to Madry PGD adversarial training (online attacks on the live model) as a reference.

Same models, attacks and MID step as the pipeline, without Ray, so settings can be
compared in minutes. Prints one JSON line per run: None's row, the defense's row, the gap
in average accuracy, and seconds on this machine.

    python benchmarks/digits_sweep.py --eps 0.1 --epochs 40 --lr 1e-4 --variants 4
    python benchmarks/digits_sweep.py --eps 0.2 --mode madry --init random --epochs 30
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from storage.pools import quantize
from storage.raw import load_digits, resize_images
from workers.attacks import make_attack, random_targets
from workers.mid import FrozenTeacher, LossWeights, MetaSettings, draw_held_out, meta_gradients, meta_objective
from workers.models import EncoderClassifier, ModelSpec, build_classifier_model, build_encoder, build_teacher, to_float

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
    p.add_argument("--threads", type=int, default=1)
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


def robustness_row(model, x, y, settings) -> dict[str, float]:
    torch.manual_seed(5)
    row = {"benign": accuracy(model, x, y)}
    for name in EVAL:
        targets = random_targets(y, 10, torch.Generator().manual_seed(1))
        row[name] = accuracy(model, make_attack(name, settings).perturb(model, x, y, targets), y)
    row["avg"] = float(np.mean(list(row.values())))
    return {k: round(v, 1) for k, v in row.items()}


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


def mid(args, spec, baseline, teacher_model, images, labels, settings):
    source = baseline if args.source == "baseline" else EncoderClassifier(teacher_model.encoder, teacher_model.classifier).eval()
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
    torch.set_num_threads(args.threads)
    step = 2.5 * args.eps / args.steps
    settings = {"PGD": {"eps": args.eps, "nb_iter": args.steps, "eps_iter": step, "rand_init": True},
                "MIM": {"eps": args.eps, "nb_iter": args.steps, "eps_iter": step, "decay_factor": 1.0},
                "FGSM": {"eps": args.eps},
                "BIM": {"eps": args.eps, "nb_iter": args.steps, "eps_iter": step}}
    raw = load_digits(0.2, seed=0)
    images, labels = torch.from_numpy(resize_images(raw.train_images, args.size)), torch.from_numpy(raw.train_labels)
    test_x, test_y = to_float(torch.from_numpy(resize_images(raw.test_images, args.size))), torch.from_numpy(raw.test_labels)
    spec = ModelSpec("lenet", 1, args.size, 10)
    torch.manual_seed(0)
    baseline = train_plain(build_classifier_model(spec), images, labels, 30)
    teacher_model = train_plain(build_teacher(spec), images, labels, 40, teacher=True)
    start = time.perf_counter()
    train = madry if args.mode == "madry" else lambda *a: mid(args, spec, baseline, *a[2:])
    defended = train(args, spec, teacher_model, images, labels, settings)
    seconds = time.perf_counter() - start
    none_row, defended_row = robustness_row(baseline, test_x, test_y, settings), robustness_row(defended, test_x, test_y, settings)
    print(json.dumps({"args": vars(args), "None": none_row, args.mode: defended_row,
                      "gap": round(defended_row["avg"] - none_row["avg"], 1), "train_seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
