"""One attack step (forward and input gradient, weights frozen: what PGD repeats) of the
pool's LeNet on MNIST-sized images, per sample, by batch size and memory layout, and
with ``torch.compile``; in this process with ``--threads`` torch threads. Prints JSON.

    .venv/bin/python benchmarks/attack_step.py --threads 1
    .venv/bin/python benchmarks/attack_step.py --threads 2 --compile
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.models import ModelSpec, build_classifier_model  # noqa: E402


def microseconds_per_sample(model, batch: int, repeats: int) -> float:
    x0 = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.randint(10, (batch,), generator=torch.Generator().manual_seed(1))

    def step() -> None:
        x = x0.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(x), y), x)

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return round((time.perf_counter() - started) / repeats / batch * 1e6, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the model (slow to compile)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = ModelSpec(arch="lenet", in_channels=1, image_size=28, num_classes=10)
    model = build_classifier_model(spec).eval().requires_grad_(False)  # channels_last, as the pipeline builds it
    report = {"threads": args.threads, "channels_last_us_per_sample": {}}
    for batch in (64, 256, 1024):
        report["channels_last_us_per_sample"][batch] = microseconds_per_sample(model, batch, max(5, 4096 // batch))
    contiguous = build_classifier_model(spec).eval().requires_grad_(False).to(memory_format=torch.contiguous_format)
    report["contiguous_us_per_sample_256"] = microseconds_per_sample(contiguous, 256, 16)
    if args.compile:
        started = time.perf_counter()
        compiled = torch.compile(model)
        microseconds_per_sample(compiled, 256, 1)
        report["compile_seconds"] = round(time.perf_counter() - started, 1)
        report["compiled_us_per_sample_256"] = microseconds_per_sample(compiled, 256, 16)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
