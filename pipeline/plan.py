"""``mid plan``: what a config will cost before anything runs (docs/design.md §7).

Per-sample costs are counted on real passes of the config's models (``workers.flops``:
torch's FlopCounterMode, MID's second-order step included) and multiplied out by the config:
samples, attacks, steps, random-start variants, epochs. Bytes come from the image shape
and the bytes one stored value takes (``BYTES_PER_VALUE``: a measured ratio or a stated
assumption). Hours assume N GPUs, each at ``--gpu-tflops`` peak and ``--utilisation`` of it, or,
with ``--calibrate FILE``, at the rates `benchmarks/gpu_check.py` measured for each unit of work
(forward, attack step, training step, MID's step) on a real GPU.

Counts are in multiply-accumulates (MACs), the unit papers call FLOPs (ViT-B/16: 17.6 G);
hours use 2 FLOPs per MAC against the peak, which counts the same way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from pipeline import run_plan
from pipeline.config import RunConfig
from pipeline.errors import PipelineError
from pipeline.rows import row_stage
from pipeline.stage_costs import StageCost, classifier_cost, pool_cost, steps_of, variants_of
from workers.defenses import classifier_rows, defense_class

# An H100 SXM's dense bf16 tensor-core peak (NVIDIA's spec sheet). No GPU was lent to the
# project to measure one; `--gpu-tflops` / `--utilisation` replace these.
DEFAULT_GPU = "H100 SXM (spec sheet, dense bf16)"
DEFAULT_GPU_TFLOPS = 989.0
DEFAULT_UTILISATION = 0.35  # an assumption: large-batch ViT training reaches 30-50% of peak

# Bytes one stored value (one pixel channel of one sample) takes, compressed, and why.
BYTES_PER_VALUE = {
    "dataset": (1.0, "assumed: uint8 pixels of natural images, which lossless zstd barely shrinks"),
    "int8_delta": (0.46, "measured: 360 B per 784-pixel MNIST PGD_N view, int8 deltas, zstd "
                         "(docs/results.md, pool storage); a smaller ε has fewer distinct deltas"),
    "uint8": (1.0, "assumed: adversarial uint8 images compress like the clean ones"),
}

# What `mid plan` puts in data.path when none is given: a plan needs no data when the
# config's plan: section gives the sizes.
PATH_NOT_GIVEN = "(not given)"

# Gradient steps of each attack family: the config's iteration counts. JSMA's and
# AutoAttack's cost depends on the data (saliency iterations until success; AutoAttack's
# restarts, early stops and Square's queries), so the plan names them instead of guessing.
@dataclass
class DataShape:
    train: int
    test: int
    channels: int
    side: int
    num_classes: int
    sizes_from: str

    @property
    def values(self) -> int:
        """Stored values (pixel channels) per image."""
        return self.channels * self.side * self.side


def _limited(count: int, limit: int | None) -> int:
    return min(count, limit) if limit else count


def data_shape(cfg: RunConfig) -> DataShape:
    """The splits' sizes and the image shape: from ``plan:`` in the config, or read from the
    data files (every source but an image folder, whose size only a listing of millions of
    files would tell)."""
    d, p = cfg.data, cfg.plan
    if p.train_samples and p.test_samples and p.num_classes:
        if not d.image_size:
            raise PipelineError("plan: data.image_size is needed with plan.train_samples (the images' side)")
        return DataShape(_limited(p.train_samples, d.train_limit), _limited(p.test_samples, d.test_limit),
                         p.channels, d.image_size, p.num_classes, "the config's plan: section")
    from storage.readers import reader

    source = reader(d.source)
    if source.streaming or d.path == PATH_NOT_GIVEN:
        raise PipelineError(f"plan: the size of a {d.source} dataset is not known without reading it; set "
                            f"plan.train_samples, plan.test_samples and plan.num_classes in the config")
    raw = source.load(d.path, d.test_fraction, cfg.seed)
    channels, height, _ = raw.train_images.shape[1:]
    return DataShape(_limited(len(raw.train_labels), d.train_limit), _limited(len(raw.test_labels), d.test_limit),
                     channels, d.image_size or height, len(raw.class_names),
                     f"the files at {d.path}" if d.path else f"the bundled {d.source}")


def unit_costs(cfg: RunConfig, shape: DataShape) -> dict[str, float]:
    from workers.flops import unit_costs as counted
    from workers.models import ModelSpec

    spec = ModelSpec(arch=cfg.models.arch, in_channels=shape.channels, image_size=shape.side,
                     num_classes=shape.num_classes, feature_dim=cfg.models.feature_dim,
                     mean=cfg.models.mean, std=cfg.models.std)
    # As a CPU worker takes it (the counts do not depend on the device).
    return counted(spec, cfg.mid.step(on_gpu=False), list(cfg.pool.attacks), cfg.models.teacher.lambda_rec)


def rows_after_pool_by_kind(cfg: RunConfig) -> dict[str, str]:
    """{its stage's name (the row's kind): row} of the rows trained after the pool."""
    return {defense_class(row).kind: row for row in run_plan.rows_after_pool(cfg)}


def stage_costs(cfg: RunConfig, shape: DataShape, units: dict[str, float]) -> tuple[list[StageCost], list[str]]:
    """Every stage of a run of ``cfg`` (``pipeline.run_plan.run_stages``: the driver's own list, so
    the plan counts what a run builds, no more), and the attacks whose cost is not counted."""
    n, teacher = shape.train, cfg.models.teacher
    attack_step, forward = units["attack_step"], units["forward"]
    names = run_plan.run_stages(cfg)
    after_pool = rows_after_pool_by_kind(cfg)
    stages: list[StageCost] = []
    uncounted: list[str] = []
    for name in names:
        if name == "teacher":
            stages.append(StageCost("teacher", units["teacher_step"], teacher.epochs * n, f"{teacher.epochs} epochs"))
        elif name in cfg.classifier_kinds():
            stages.append(classifier_cost(cfg, name, units, n))
        elif name == "pool":
            stages.append(pool_cost(cfg, units, n, uncounted))
        elif name in after_pool:
            defense = defense_class(after_pool[name])
            stages.append(row_stage(defense.row).cost(cfg, defense, units, n))
    # The stored test attacks (attacks-source, attacks-transfer) and the adaptive part of eval.
    test_attack_macs, adaptive_macs = 0.0, 0.0
    # The row that is the source protocol's own model reads its stored attacks as its adaptive
    # ones (pipeline/stages/evaluate.py:adaptive_from_stored): no crafting in eval.
    source_stored = "attacks-source" in names
    source_kind = cfg.pool.source_model if cfg.eval.source_model == "pool" else cfg.eval.source_model
    defenses = sum(1 for row in cfg.eval.defenses
                   if not (source_stored and row in classifier_rows() and defense_class(row).kind == source_kind))
    for attack in cfg.eval.attacks:
        steps = steps_of(cfg, attack)
        samples = _limited(shape.test, cfg.eval.subset.get(attack))
        if steps is None:
            uncounted.append(f"{attack} (evaluation)")
            continue
        test_attack_macs += samples * (steps * attack_step + 2 * forward)
        adaptive_macs += defenses * samples * (steps * attack_step + forward)
    # Per test image, over the attacks of the table (subsets included).
    stored = [name.removeprefix("attacks-") for name in names if name.startswith("attacks-")]
    if stored:
        stages.append(StageCost("test attacks", test_attack_macs * len(stored) / shape.test, shape.test,
                                f"stored once, {' + '.join(stored)}"))
    if "adaptive" in cfg.eval.protocols and defenses:
        stages.append(StageCost("adaptive eval", adaptive_macs / shape.test, shape.test,
                                f"against each of {defenses} defenses"))
    return stages, uncounted


RATE_UNITS = ("forward", "attack_step", "train_step", "mid_step")


def read_calibration(path: str) -> dict[str, Any]:
    """The ``throughput`` part of a `benchmarks/gpu_check.py` record: the TFLOP/s one GPU
    sustained in each unit of work, and the bf16 matmul peak measured beside them."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise PipelineError(f"--calibrate {path}: not a readable JSON file ({e})") from None
    part = record.get("parts", {}).get("throughput", {}) if isinstance(record, dict) else {}
    units = part.get("units", {})
    missing = [u for u in RATE_UNITS if "tflops" not in units.get(u, {})]
    if part.get("status") != "ok" or missing:
        raise PipelineError(f"--calibrate {path}: no complete throughput measurement (a gpu-check record whose "
                            f"throughput part ran: `make gpu-check`); missing: {', '.join(missing) or 'its status'}")
    return {"file": path, "device": record.get("device", "?"), "smoke": bool(record.get("smoke")),
            "arch": part.get("arch"), "side": part.get("side"), "batch": part.get("batch"),
            "matmul_peak_tflops": part.get("matmul_peak_tflops"),
            "unit_tflops": {u: units[u]["tflops"] for u in RATE_UNITS}}


def stage_unit(cfg: RunConfig, stage: str) -> str:
    """The unit of work whose measured rate a stage runs at: attacks for the pool and the
    evaluation, MID's step for MID's rows, a training step for the classifiers (AT's attack
    steps and the teacher's decoder run at about that rate too)."""
    if stage in ("pool", "test attacks", "adaptive eval"):
        return "attack_step"
    row = rows_after_pool_by_kind(cfg).get(stage)
    return row_stage(row).step_unit(defense_class(row)) if row is not None else "train_step"


def plan(cfg: RunConfig, gpus: int, gpu_tflops: float, utilisation: float, gpu_name: str,
         calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """``calibration`` (``read_calibration``): each stage at the rate measured for its unit
    of work, instead of every stage at ``gpu_tflops`` × ``utilisation``."""
    shape = data_shape(cfg)
    units = unit_costs(cfg, shape)
    stages, uncounted = stage_costs(cfg, shape, units)
    if calibration is None:
        rates = dict.fromkeys(RATE_UNITS, gpus * gpu_tflops * 1e12 * utilisation)  # FLOP/s the cluster sustains
        gpu = {"name": gpu_name, "peak_tflops": gpu_tflops, "utilisation": utilisation}
    else:
        rates = {u: gpus * t * 1e12 for u, t in calibration["unit_tflops"].items()}
        gpu = {"name": calibration["device"], "peak_tflops": calibration["matmul_peak_tflops"], "utilisation": None,
               "calibration": calibration}

    def hours(macs: float, unit: str = "mid_step") -> float:
        return 2 * macs / rates[unit] / 3600

    bpv = {k: v for k, (v, _) in BYTES_PER_VALUE.items()}
    linf = {a: cfg.attacks.linf_eps(a) is not None for a in cfg.pool.attacks}
    pool_bpv = {a: bpv[cfg.pool.encoding if linf[a] else "uint8"] for a in cfg.pool.attacks}
    pool_bytes = sum(variants_of(cfg, a) * shape.train * shape.values * pool_bpv[a] for a in cfg.pool.attacks)
    dataset_bytes = (shape.train + shape.test) * shape.values * bpv["dataset"]
    # MID reads, per sample, the clean image and one variant of every pool attack.
    read_per_sample = shape.values * (bpv["dataset"] + sum(pool_bpv.values()))
    mid_samples_per_second = rates["mid_step"] / (2 * units["mid_step"])
    online_attack_macs = sum((steps_of(cfg, a) or 0) * units["attack_step"] for a in cfg.pool.attacks)
    cached_epoch = shape.train * units["mid_step"]
    at_epoch = classifier_cost(cfg, "at", units, 1).per_sample_macs * shape.train  # whether or not AT is a row
    cached_hours = hours(cached_epoch)
    online_hours = cached_hours + hours(shape.train * online_attack_macs, "attack_step")
    stage_hours = [hours(s.total_macs, stage_unit(cfg, s.name)) for s in stages]
    return {
        "config": cfg.name, "arch": cfg.models.arch, "data": asdict(shape),
        "gpus": gpus, "gpu": gpu,
        "macs_per_sample": units,
        "stages": [{"name": s.name, "per_sample_macs": s.per_sample_macs, "samples": s.samples,
                    "total_macs": s.total_macs, "hours": h, "note": s.note} for s, h in zip(stages, stage_hours)],
        "total_hours": sum(stage_hours),
        "storage": {"dataset_bytes": dataset_bytes, "pool_bytes": pool_bytes,
                    "bytes_per_value": {k: {"bytes": v, "why": why} for k, (v, why) in BYTES_PER_VALUE.items()}},
        "mid_reads": {"samples_per_second": mid_samples_per_second,
                      "bytes_per_second": mid_samples_per_second * read_per_sample},
        "per_epoch": {"mid_cached_hours": cached_hours, "mid_online_hours": online_hours,
                      "saved_hours": online_hours - cached_hours,
                      "saved_fraction": 1 - cached_hours / online_hours,
                      "at_hours": hours(at_epoch, "train_step"), "online_over_at": online_hours / hours(at_epoch, "train_step"),
                      "cached_over_at": cached_hours / hours(at_epoch, "train_step")},
        "not_counted": uncounted,
    }


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _hours(h: float) -> str:
    if h * 60 < 1:
        return f"{h * 3600:.2g} s"
    return f"{h * 60:.1f} min" if h < 1 else f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} days"


def rates_line(result: dict[str, Any]) -> str:
    """Which rates the hours use: measured ones (--calibrate) or spec-sheet peak × utilisation."""
    g = result["gpu"]
    c = g.get("calibration")
    if c is None:
        return (f"on {result['gpus']} GPUs x {g['peak_tflops']:g} TFLOP/s peak ({g['name']}) at "
                f"{g['utilisation']:.0%} utilisation (assumed; `--calibrate` takes measured rates)")
    line = (f"on {result['gpus']} GPUs at the rates measured on {c['device']} by benchmarks/gpu_check.py "
            f"({c['file']}: {c['arch']} at {c['side']} px, batch {c['batch']}): "
            + ", ".join(f"{u.replace('_', ' ')} {t:.3g}" for u, t in c["unit_tflops"].items())
            + f" TFLOP/s per GPU, bf16 matmul peak {c['matmul_peak_tflops']:.3g}")
    if c["smoke"]:
        line += "; SMOKE-sized record: these rates say nothing about a GPU"
    if c["arch"] != result["arch"]:
        line += f"; this config runs {result['arch']}, whose rates may differ"
    return line


def render(result: dict[str, Any]) -> str:
    d = result["data"]
    lines = [f"plan: {result['config']} ({result['arch']}, {d['channels']}x{d['side']}x{d['side']}, "
             f"{d['train']:,} train / {d['test']:,} test images, {d['num_classes']} classes; "
             f"sizes from {d['sizes_from']})",
             rates_line(result),
             "MACs = multiply-adds (papers' 'FLOPs'), counted on real passes by torch's FlopCounterMode", ""]
    units = result["macs_per_sample"]
    lines.append("per sample: " + ", ".join(f"{k.replace('_', ' ')} {_si(v, 'MAC')}" for k, v in units.items()))
    lines.append("")
    header = ["stage", "MACs / sample", "samples x passes", "total MACs", "hours", ""]
    rows = [[s["name"], _si(s["per_sample_macs"], ""), f"{s['samples']:,}", _si(s["total_macs"], ""),
             _hours(s["hours"]), s["note"]] for s in result["stages"]]
    rows.append(["total", "", "", _si(sum(s["total_macs"] for s in result["stages"]), ""),
                 _hours(result["total_hours"]), ""])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        lines.append("  ".join(str(c).ljust(w) if j in (0, 5) else str(c).rjust(w)
                               for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    s, r, e = result["storage"], result["mid_reads"], result["per_epoch"]
    lines += ["",
              f"store: dataset {_si(s['dataset_bytes'], 'B')}, training pool {_si(s['pool_bytes'], 'B')}; "
              f"bytes per stored value:",
              *(f"  {k}: {v['bytes']:g} ({v['why']})" for k, v in s["bytes_per_value"].items()),
              f"MID reads {_si(r['bytes_per_second'], 'B')}/s from the store at "
              f"{r['samples_per_second']:,.0f} samples/s (clean image + one view per pool attack)",
              f"per epoch: MID on the cached pool {_hours(e['mid_cached_hours'])}, with online attacks (the paper) "
              f"{_hours(e['mid_online_hours'])}: the pool saves {_hours(e['saved_hours'])} "
              f"({e['saved_fraction']:.0%}) per epoch; AT {_hours(e['at_hours'])} "
              f"(online MID / AT {e['online_over_at']:.2f}, cached MID / AT {e['cached_over_at']:.2f})"]
    if result["not_counted"]:
        lines.append(f"not counted (cost depends on the data): {', '.join(result['not_counted'])}")
    return "\n".join(lines)


def as_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)
