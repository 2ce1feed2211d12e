"""One prepared command for a machine with a GPU: every GPU path of the pipeline checked, and
the rates `mid plan --calibrate` needs measured, in at most 8 minutes.

    python benchmarks/gpu_check.py --out gpu-check.json        # on a GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --smoke --out smoke.json     # on CPU: the same code at toy sizes

Parts, each with a time budget (it stops early and reports what it reached; a part that fails
is recorded and the next one runs):

1. ``pool``: the pool actor's code (``workers.pool_generation.PoolGenerator``) on the GPU and
   on the CPU, same seed, on the bundled digits and on a folder of generated 224-pixel PNGs
   read by the image-folder reader: shards written, ε-ball, value range and chunk hashes
   verified, stored success rates within 1 point of each other.
2. ``bf16``: a bfloat16 pool shard against the float32 one: the stored success difference.
3. ``mid_stage``: MID's second-order step on Ray Train workers with ``use_gpu`` (NCCL; one
   worker per GPU, at most 2), three steps, against the same steps in one CPU process.
4. ``determinism``: a tiny ``mid pool`` twice on fresh stores (GPU training and GPU pool
   actors): the same keys, checkpoints and pool chunks, or which of them differ.
5. ``throughput``: ViT-B/16 at 224 pixels, batch 32: forward, attack step, training step and
   MID's second-order step in samples/s, as a share of the bf16 matmul peak measured in the
   same run, and each step's peak GPU memory. This is the file `mid plan --calibrate` reads.
6. ``mid_batch``: the largest MID batch (ViT-B/16, 224 pixels) that fits in GPU memory.

On CPU (``--smoke``) the same functions run with LeNet-sized models and a few samples, so the
script cannot rot: `tests/test_gpu_check.py` runs it in `make test`. Its figures say nothing
about a GPU. Exit status 1 when a part failed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage import checkpoints, datasets, pools  # noqa: E402
from storage.readers.base import RawDataset, resize_images  # noqa: E402
from storage.readers.digits import load_digits  # noqa: E402
from storage.readers.image_folder import decode_image  # noqa: E402
from workers.models import ModelSpec, build_classifier_model  # noqa: E402
from workers.gpu_check import MID_ATTACKS, MID_STEPS, mid_steps, mid_worker  # noqa: E402
from workers.pool_generation import PoolGenerator  # noqa: E402

SUCCESS_TOLERANCE = 0.01  # GPU and CPU pools: stored success rates within 1 point
PGD = {"PGD": {"eps": 0.1, "nb_iter": 10, "eps_iter": 0.02, "rand_init": True}}


@dataclass(frozen=True)
class Sizes:
    """The GPU run's sizes, and the smoke's toy sizes of the same code paths."""

    digits: int          # digits samples attacked (16 pixels, LeNet)
    folder_side: int     # the generated image folder's side
    folder_arch: str
    folder_images: int
    vit_arch: str        # the throughput model
    vit_side: int
    vit_batch: int
    matmul_n: int        # side of the bf16 matmuls that measure the peak
    timed_steps: int
    max_mid_batch: int
    budgets_s: tuple[tuple[str, float], ...]


GPU = Sizes(512, 224, "resnet18", 64, "vit_b16", 224, 32, 8192, 10, 512,
            (("pool", 60), ("bf16", 30), ("mid_stage", 90), ("determinism", 120), ("throughput", 100),
             ("mid_batch", 60)))
# The smoke's budgets only stop a hung part: a shared 2-core CI machine runs Ray's start-ups
# several times slower than an idle one (two tiny `mid pool` runs took 300 s beside other jobs).
SMOKE = Sizes(64, 32, "lenet", 20, "lenet", 16, 4, 256, 2, 8,
              (("pool", 120), ("bf16", 60), ("mid_stage", 300), ("determinism", 600), ("throughput", 120),
               ("mid_batch", 60)))


class Check:
    def __init__(self, sizes: Sizes, work: Path, device: torch.device):
        self.sizes, self.work, self.device = sizes, work, device
        self.deadline = float("inf")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def store(self, name: str) -> str:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return str(path)


# 1-2. Pools ------------------------------------------------------------------------------

def digits_dataset(n: int) -> tuple[RawDataset, ModelSpec]:
    raw = load_digits(0.2, seed=0)
    train = resize_images(raw.train_images[:n], 16)
    raw = RawDataset(train, raw.train_labels[:n], resize_images(raw.test_images[:8], 16), raw.test_labels[:8],
                     raw.class_names)
    return raw, ModelSpec("lenet", 1, 16, 10)


def folder_dataset(root: Path, n: int, side: int, arch: str) -> tuple[RawDataset, ModelSpec]:
    """``n`` PNGs of 10 classes, written to a folder and decoded by the image-folder reader
    (shorter side to ``side``, centre crop), as `mid` ingests an ImageNet-style folder."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(n):
        label = i % 10
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        gradient = np.linspace(0, 255, side * 5 // 4, dtype=np.float32)
        pixels = (np.add.outer(gradient * (label + 1) / 10, gradient)[..., None] / 2
                  + rng.normal(0, 20, (side * 5 // 4, side * 5 // 4, 3))).clip(0, 255).astype(np.uint8)
        path = folder / f"{i}.png"
        Image.fromarray(pixels).save(path)
        images.append(decode_image(path.read_bytes(), str(path), side))
        labels.append(label)
    images, labels = np.stack(images), np.asarray(labels, dtype=np.int64)
    raw = RawDataset(images, labels, images[:4], labels[:4], tuple(f"class{c}" for c in range(10)))
    return raw, ModelSpec(arch, 3, side, 10)


def attacked_store(check: Check, name: str, raw: RawDataset, spec: ModelSpec) -> str:
    root = check.store(name)
    datasets.write_dataset(root, "dataset-check", raw)
    torch.manual_seed(0)
    checkpoints.save_checkpoint(root, "baseline-check", build_classifier_model(spec).state_dict(),
                                {"kind": "baseline", "spec": spec.as_dict(), "history": []})
    return root


def pool_shard(root: str, key: str, clean_u8: np.ndarray, device: torch.device, bf16: bool = False) -> dict[str, Any]:
    """One PGD_N shard of the whole split, verified as the store verifies it."""
    n = len(clean_u8)
    pools.create_pool(root, key, num_samples=n, image_shape=clean_u8.shape[1:], variants=1, shard_size=n,
                      compressor="zstd", encoding="int8_delta",
                      attrs={"attack": "PGD_N", "eps": PGD["PGD"]["eps"], "split": "train", "threat_model": "linf"})
    generator = PoolGenerator(root, "dataset-check", "baseline", "baseline-check", 10, bf16=bf16, device=device)
    started = time.perf_counter()
    shard = generator.generate(key, "PGD_N", "train", 1, 0, 0, n, family_settings=PGD, batch_size=64, seed=0)
    seconds = time.perf_counter() - started
    pools.finalize_pool(root, key, 1, {})
    problems, chunks = pools.verify_pool(root, key)
    stored = pools.PoolReader.open(root, key).adv(0, 0, n, clean_u8=clean_u8)
    pools.check_invariants(stored, clean_u8, PGD["PGD"]["eps"])  # ε-ball and value range, or raises
    return {"success_rate_stored": shard["stats"]["success_rate_stored"], "samples_per_s": n / seconds,
            "chunks_verified": chunks, "problems": problems}


def check_pool(check: Check) -> dict[str, Any]:
    s = check.sizes
    devices = [check.device, torch.device("cpu")] if check.device.type == "cuda" else [torch.device("cpu")]
    out: dict[str, Any] = {"devices": [d.type for d in devices]}
    ok = True
    made = {"digits": lambda: digits_dataset(s.digits),
            "folder": lambda: folder_dataset(check.work / "folder", s.folder_images, s.folder_side, s.folder_arch)}
    for name, make in made.items():
        if check.left() <= 0:
            out["stopped"] = f"time budget spent before {name}"
            return {**out, "ok": False}
        raw, spec = make()
        root = attacked_store(check, f"pool-{name}", raw, spec)
        shards = {d.type: pool_shard(root, f"pool-{d.type}", raw.train_images, d) for d in devices}
        rates = [r["success_rate_stored"] for r in shards.values()]
        agree = max(rates) - min(rates) <= SUCCESS_TOLERANCE
        clean = all(not r["problems"] for r in shards.values())
        out[name] = {"arch": spec.arch, "side": spec.image_size, "samples": len(raw.train_images), "shards": shards,
                     "success_difference": max(rates) - min(rates), "agree_within_1_point": agree, "verified": clean}
        ok = ok and agree and clean
    return {**out, "ok": ok}


def check_bf16(check: Check) -> dict[str, Any]:
    raw, spec = digits_dataset(check.sizes.digits)
    root = attacked_store(check, "bf16", raw, spec)
    f32 = pool_shard(root, "pool-float32", raw.train_images, check.device)
    b16 = pool_shard(root, "pool-bf16", raw.train_images, check.device, bf16=True)
    views = [pools.PoolReader.open(root, key).adv(0, 0, len(raw.train_images), clean_u8=raw.train_images)
             for key in ("pool-float32", "pool-bf16")]
    same = np.array_equal(*views)
    return {"device": check.device.type, "float32": f32, "bf16": b16,
            "success_difference": b16["success_rate_stored"] - f32["success_rate_stored"],
            "identical_views": same, "ok": not f32["problems"] and not b16["problems"]}


# 3. MID on Ray Train ----------------------------------------------------------------------

def check_mid_stage(check: Check) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_runtime import start_local_ray
    from workers.loopback_torch import LoopbackTorchConfig

    use_gpu = check.device.type == "cuda"
    world = min(2, torch.cuda.device_count()) if use_gpu else 2
    out = check.work / "mid_stage.json"
    start_local_ray(None)
    try:
        TorchTrainer(mid_worker, train_loop_config={"out": str(out), "use_gpu": use_gpu},
                     torch_config=LoopbackTorchConfig(),
                     scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu,
                                                  resources_per_worker={"CPU": 0.5}),
                     run_config=RunConfig(name="gpu-check-mid", storage_path=check.store("ray-train"))).fit()
    finally:
        ray.shutdown()
    ran = json.loads(out.read_text())
    # The reference: the same ranks' batches in one CPU process, their gradients averaged.
    losses, weights = mid_steps(torch.device("cpu"), list(range(world)), lambda grads: grads)
    ran_weights = torch.tensor(ran["weights"])
    rank0_losses = losses[::world]
    weight_error = ((ran_weights - weights).norm() / weights.norm()).item()
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(ran["losses"], rank0_losses))
    return {"backend": ran["backend"], "world_size": ran["world_size"], "device": ran["device"],
            "steps": MID_STEPS, "relative_weight_error": weight_error, "relative_loss_error": loss_error,
            "ok": weight_error < 1e-4 and loss_error < 1e-4}


# 4. Determinism ---------------------------------------------------------------------------

def tiny_pool_overrides(use_gpu: bool) -> list[str]:
    tiny = ["data.train_limit=256", "data.test_limit=32", "models.baseline.epochs=1", "models.teacher.epochs=1",
            "pool.attacks=[PGD_N, FGSM_T]", "attacks.PGD.nb_iter=3", "pool.variants=1", "pool.shard_size=128"]
    gpu = ["ray.use_gpu=true", "models.num_workers=1", "ray.gpus_per_actor=1", "pool.num_actors=1"]
    return tiny + (gpu if use_gpu else [])


def store_contents(root: Path) -> dict[str, str]:
    """Every committed checkpoint's weights digest and every pool's chunk hashes, by key."""
    found = {}
    for manifest in sorted(root.glob("checkpoints/*/manifest.json")):
        found[manifest.parent.name] = json.loads(manifest.read_text()).get("sha256", "")
    for manifest in sorted(root.glob("pools/*/manifest.json")):
        chunks = [shard["sha256"] for shard in json.loads(manifest.read_text()).get("shards", [])]
        found[manifest.parent.name] = hashlib.sha256(json.dumps(chunks, sort_keys=True).encode()).hexdigest()
    return found


def check_determinism(check: Check) -> dict[str, Any]:
    use_gpu = check.device.type == "cuda"
    contents = []
    for run in ("first", "second"):
        store = check.work / f"determinism-{run}"
        command = [sys.executable, "-m", "pipeline", "pool", "configs/digits.yaml", "--store", str(store),
                   "--out", str(check.work / f"determinism-{run}-out"),
                   *(a for o in tiny_pool_overrides(use_gpu) for a in ("--set", o))]
        if check.left() <= 0:
            return {"stopped": f"time budget spent before the {run} run", "ok": False}
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(check.left(), 1))
        if done.returncode != 0:
            return {"error": f"the {run} run exited {done.returncode}: {done.stderr.strip()[-800:]}", "ok": False}
        contents.append(store_contents(store))
    first, second = contents
    differ = sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))
    return {"entries": len(first), "identical": not differ and bool(first), "differ": differ,
            "ok": not differ and bool(first)}


# 5-6. Throughput and memory -----------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, n: int, seconds: float = 3.0) -> float:
    """The bf16 matmul rate this device reaches: the denominator of every share below."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    synchronize(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or count < 3:
        a @ b
        count += 1
        if count % 10 == 0:
            synchronize(device)
    synchronize(device)
    return 2 * n ** 3 * count / (time.perf_counter() - started) / 1e12


def step_functions(spec: ModelSpec, batch: int, device: torch.device) -> dict[str, Callable[[], Any]]:
    """The four units of `mid plan` (workers.flops), as the stages run them on a GPU: bf16
    autocast forward passes (``pool.bf16``, ``mid.bf16``), float32 weights and gradients."""
    import torch.nn.functional as F

    from workers.device import bf16_autocast
    from workers.mid import FrozenTeacher, meta_gradients, meta_objective
    from workers.mid_settings import LossWeights, MetaSettings
    from workers.models import build_encoder, build_teacher

    bf16 = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, spec.in_channels, spec.image_size, spec.image_size, generator=g).to(device)
    y = torch.randint(spec.num_classes, (batch,), generator=g).to(device)
    model = build_classifier_model(spec).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    teacher_model = build_teacher(spec).to(device)
    teacher = FrozenTeacher(teacher_model.encoder, teacher_model.classifier, teacher_model.decoder)
    student = build_encoder(spec).to(device).train()
    cc = 0.0 if teacher.decoder is None else 1.0
    settings = MetaSettings(batch_views=True, meta_train=LossWeights(1.5, 0.8 * cc, 1.0),
                            meta_test=LossWeights(1.0, cc, 1.0))
    views = {a: x for a in MID_ATTACKS}

    def forward():
        with torch.no_grad(), bf16_autocast(bf16, device):
            model.eval()(x)

    def attack_step():
        adv = x.clone().requires_grad_(True)
        with bf16_autocast(bf16, device):
            loss = F.cross_entropy(model.eval()(adv).float(), y)
        torch.autograd.grad(loss, adv)

    def train_step():
        with bf16_autocast(bf16, device):
            loss = F.cross_entropy(model.train()(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def mid_step():
        with bf16_autocast(bf16, device):
            loss, _ = meta_objective(student, teacher, x, views, y, MID_ATTACKS[0], settings)
        meta_gradients(student, loss)

    return {"forward": forward, "attack_step": attack_step, "train_step": train_step, "mid_step": mid_step}


def timed(step: Callable[[], Any], device: torch.device, steps: int, check: Check) -> tuple[float, int, int | None]:
    """(seconds per step, steps timed, peak bytes of GPU memory) after one warm-up step."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    started, done = time.perf_counter(), 0
    while done < steps and (done == 0 or check.left() > 0):
        step()
        done += 1
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return (time.perf_counter() - started) / done, done, peak


def check_throughput(check: Check) -> dict[str, Any]:
    from workers.flops import attack_step_macs, forward_macs, mid_step_macs, train_step_macs
    from workers.mid_settings import LossWeights, MetaSettings

    s, device = check.sizes, check.device
    spec = ModelSpec(s.vit_arch, 3, s.vit_side, 10) if s.vit_arch.startswith("vit") else ModelSpec(s.vit_arch, 1, s.vit_side, 10)
    peak = matmul_peak_tflops(device, s.matmul_n)
    cc = 1.0 if s.vit_arch == "lenet" else 0.0
    macs = {"forward": forward_macs(spec, 1), "attack_step": attack_step_macs(spec, 1),
            "train_step": train_step_macs(spec, batch=1),
            "mid_step": mid_step_macs(spec, MetaSettings(meta_train=LossWeights(1.5, 0.8 * cc, 1.0),
                                                         meta_test=LossWeights(1.0, cc, 1.0)), MID_ATTACKS, 1)}
    units: dict[str, Any] = {}
    for name, step in step_functions(spec, s.vit_batch, device).items():
        if check.left() <= 0:
            units[name] = {"stopped": "time budget spent"}
            continue
        seconds, steps, peak_bytes = timed(step, device, s.timed_steps, check)
        rate = s.vit_batch / seconds
        tflops = 2 * macs[name] * rate / 1e12
        units[name] = {"samples_per_s": rate, "steps_timed": steps, "macs_per_sample": macs[name],
                       "tflops": tflops, "share_of_peak": tflops / peak, "peak_memory_bytes": peak_bytes}
    return {"device": device.type, "arch": spec.arch, "side": spec.image_size, "batch": s.vit_batch,
            "bf16_autocast": device.type == "cuda", "matmul_peak_tflops": peak, "units": units,
            "ok": all("samples_per_s" in u for u in units.values())}


def check_mid_batch(check: Check) -> dict[str, Any]:
    """Doubling, then bisection, of MID's batch until a step no longer fits (an out-of-memory
    error) or the budget is spent; on CPU, up to the smoke's largest batch."""
    s, device = check.sizes, check.device
    spec = ModelSpec(s.vit_arch, 3, s.vit_side, 10) if s.vit_arch.startswith("vit") else ModelSpec(s.vit_arch, 1, s.vit_side, 10)

    def fits(batch: int) -> bool:
        try:
            step_functions(spec, batch, device)["mid_step"]()
            synchronize(device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    good, bad, tried = 0, None, []
    batch = 1
    while batch <= s.max_mid_batch and check.left() > 0:
        tried.append(batch)
        if not fits(batch):
            bad = batch
            break
        good, batch = batch, batch * 2
    while bad is not None and bad - good > 1 and check.left() > 0:
        middle = (good + bad) // 2
        tried.append(middle)
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    limit = "out of memory" if bad is not None else ("the largest tried" if batch > s.max_mid_batch else "time budget")
    return {"arch": spec.arch, "side": spec.image_size, "largest_fitting_batch": good, "first_not_fitting": bad,
            "bounded_by": limit, "tried": tried, "ok": good > 0}


PARTS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "pool": check_pool, "bf16": check_bf16, "mid_stage": check_mid_stage, "determinism": check_determinism,
    "throughput": check_throughput, "mid_batch": check_mid_batch,
}


def headline(name: str, r: dict[str, Any]) -> str:
    if "error" in r or "stopped" in r:
        return r.get("error") or r["stopped"]
    if name == "pool":
        def rates(shards: dict[str, Any]) -> str:
            return ", ".join(f"{device} {shard['success_rate_stored']:.3f}" for device, shard in shards.items())

        return "; ".join(f"{k}: success {rates(r[k]['shards'])}" for k in ("digits", "folder") if k in r)
    if name == "bf16":
        return f"bf16 - float32 stored success {r['success_difference']:+.3f}"
    if name == "mid_stage":
        return (f"{r['backend']} x{r['world_size']}: weights {r['relative_weight_error']:.1e}, "
                f"loss {r['relative_loss_error']:.1e} from one CPU process")
    if name == "determinism":
        return "identical" if r["identical"] else f"differ: {', '.join(r['differ'])}"
    if name == "throughput":
        return (f"peak {r['matmul_peak_tflops']:.1f} TFLOP/s; " + ", ".join(
            f"{k} {u['samples_per_s']:.1f}/s ({u['share_of_peak']:.0%})" for k, u in r["units"].items()
            if "samples_per_s" in u))
    if name == "mid_batch":
        return f"largest MID batch {r['largest_fitting_batch']} ({r['bounded_by']})"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check.json", help="the JSON record (written after every part)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on whatever device there is (CPU in CI)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), help="only these parts")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("gpu-check: no CUDA device here; --smoke runs the same code paths at toy sizes on CPU", file=sys.stderr)
        return 2
    sizes = SMOKE if args.smoke else GPU
    device = torch.device("cuda") if cuda else torch.device("cpu")
    os.chdir(REPO)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mid-gpu-check-"))
    check = Check(sizes, work, device)
    record: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "gpus": torch.cuda.device_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke, "sizes": asdict(sizes),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
    failed = False
    for name, budget in sizes.budgets_s:
        if args.parts and name not in args.parts:
            continue
        started = time.monotonic()
        check.deadline = started + budget
        print(f"gpu-check: {name} (budget {budget:.0f} s) ...", file=sys.stderr, flush=True)
        try:
            result = PARTS[name](check)
        except Exception as error:  # recorded; the next part still runs
            result = {"error": f"{type(error).__name__}: {error}"[:2000], "traceback": traceback.format_exc()[-4000:],
                      "ok": False}
        result["status"] = "ok" if result.pop("ok") else "failed"
        result["seconds"] = time.monotonic() - started
        result["budget_s"] = budget
        failed = failed or result["status"] != "ok"
        record["parts"][name] = result
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    table = io.StringIO()
    print(f"gpu-check on {record['device']} (torch {record['torch']}{', smoke sizes' if args.smoke else ''}):",
          file=table)
    for name, r in record["parts"].items():
        print(f"  {name:<12} {r['status']:<7} {r['seconds']:6.1f} s  {headline(name, r)}", file=table)
    print(table.getvalue(), end="")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
