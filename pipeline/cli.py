"""The ``mid`` command (also ``python -m pipeline``)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from workers.defenses import DEFAULT_ROW, exportable_rows

DESCRIPTION = """\
Meta Invariance Defense, end to end on Ray: ingest a dataset, train a baseline and a
teacher, generate the attacker pool once (cached, content-addressed), meta-train the
student on the cached pool, train the adversarial-training baselines (AT, TRADES), and
evaluate every defense under known and unknown attacks, under three protocols:
source (attacks crafted once against the fixed model the pool came from, the paper's
Table 2), transfer (against an independently trained substitute, Table 3) and adaptive
(against each defense itself, white-box).

Every stage's output is keyed by a hash of its inputs and settings, so a second run
reuses what exists: only what changed is recomputed.
"""

EPILOG = """\
Exit status: 0 done, 1 a run or check failed, 2 bad input (config, data files, store),
130 interrupted. Every error is one line; with --debug the traceback follows (runs keep it
in OUT/logs/ either way).


examples:
  mid run configs/digits.yaml --out runs/digits
  mid run configs/mnist.yaml --profile fast --set data.path=../shared/data/mnist
  mid run configs/cifar10.yaml --profile fast --set data.path=../shared/data/cifar10   (ResNet-18)
  mid run configs/digits.yaml --set mid.epochs=5 --set pool.attacks='[PGD_N, MIM_N]'
  mid pool configs/digits.yaml --set pool.attacks='[PGD_N, PGD_T, MIM_N, MIM_T, FGSM_N, BIM_N]'
  mid validate configs/mnist.yaml --set data.path=../shared/data/mnist
  mid sweep configs/experiments/ablations-digits.yaml   (Table 8 on Ray Tune, one shared store)
  mid export digits runs/digits/export --format onnx
  mid cache ls --json; mid cache verify; mid cache gc --dry-run; mid cache gc --ref old-run --yes
  mid run configs/digits.yaml --store s3://bucket/mid
  ray job submit --working-dir . -- python -m pipeline run configs/digits.yaml
"""


MAX_TRIALS_UNASKED = 64  # a sweep of more trials than this needs --yes


def number(kind, low, high, low_allowed: bool = True):
    """An argparse type: ``kind`` from ``low`` (excluded unless ``low_allowed``) to ``high``."""
    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value):  # nan passes every comparison below; inf has no bound above
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < low or (value == low and not low_allowed) or (high is not None and value > high):
            bound = f"{'at least' if low_allowed else 'above'} {low}" + (f", at most {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range ({bound})")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the traceback of an error, not just its one line")
    parser = argparse.ArgumentParser(prog="mid", description=DESCRIPTION, epilog=EPILOG, parents=[debug],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help_text, description=help_text, parents=[debug])
        p.add_argument("config", help="experiment YAML (see configs/)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override one config value, YAML-parsed (repeatable), e.g. mid.epochs=5")
        p.add_argument("--store", default=None, metavar="URL",
                       help="store for datasets, checkpoints and pools: a folder or an fsspec URL "
                            "(default: store.url of the config, 'store')")
        p.add_argument("--profile", default=None, metavar="NAME",
                       help="apply a named profile from the config's 'profiles:' section before "
                            "--set (e.g. 'fast' in configs/mnist.yaml)")
        return p

    run = with_config("run", "run every stage and write the robustness report (one table per protocol: "
                             "source, transfer, adaptive)")
    run.add_argument("--out", default=None, metavar="DIR",
                     help="the run's output folder for report.md, report.html, results.json, the charts, "
                          "metrics and logs (default: runs/<config name>)")
    pool = with_config("pool", "run the stages up to the attacker pool (ingest, baseline, teacher, pool)")
    pool.add_argument("--out", default=None, metavar="DIR", help="the run's output folder (default: runs/<name>)")
    sweep = commands.add_parser(
        "sweep", parents=[debug], help="run a sweep file's variants of a config as trials on Ray Tune, over one store",
        description="Run the variants of a sweep file (a base config plus named overrides, or a grid) as trials on "
                    "Ray Tune, one whole run per trial, all on one store: the dataset, the models, the training "
                    "pools and the stored test attacks are built by the first trial that needs them and reused by "
                    "the others. Writes OUT/sweep.md, OUT/sweep.json and a chart per protocol: one table per "
                    "protocol with a row per variant. A rerun reuses the trials that finished; a failed trial is "
                    "reported and the others go on. See configs/experiments/.")
    sweep.add_argument("sweep_file", metavar="SWEEP", help="sweep YAML (see configs/experiments/)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override one config value of every trial, after the sweep file's (repeatable)")
    sweep.add_argument("--store", default=None, metavar="URL", help="the store of every trial (default: the base "
                                                                    "config's store.url)")
    sweep.add_argument("--out", default=None, metavar="DIR",
                       help="the sweep's folder: the combined report, and each trial's run under trials/<variant>/ "
                            "(default: runs/<sweep name>)")
    sweep.add_argument("--max-concurrent-trials", type=number(int, 1, None), default=None, metavar="N",
                       help="trials at once (default: the sweep file's max_concurrent_trials, 1)")
    sweep.add_argument("--yes", "-y", action="store_true",
                       help=f"run a sweep of more than {MAX_TRIALS_UNASKED} trials (refused without it: each trial is "
                            f"a whole run)")
    for p in (run, pool, sweep):
        p.add_argument("--verbose", action="store_true",
                       help="show Ray's own output (worker logs, Ray Data and Ray Train lines) on the terminal; "
                            "by default it goes to OUT/logs/ray.log")
    plan = with_config("plan", "what a run of the config costs, before it runs: MACs per sample of every stage "
                               "counted on the real models (MID's second-order step included), multiplied out by "
                               "the config; bytes stored and read; hours on N GPUs")
    plan.add_argument("--gpus", type=number(int, 1, None), default=8, metavar="N",
                      help="GPUs of the cluster (default: 8)")
    plan.add_argument("--gpu-tflops", type=number(float, 0, None, low_allowed=False), default=None, metavar="X",
                      help="peak TFLOP/s of one GPU at the run's precision (default: an H100's dense bf16, 989)")
    plan.add_argument("--utilisation", type=number(float, 0, 1, low_allowed=False), default=None, metavar="U",
                      help="share of the peak the stages sustain, 0 to 1 (default: 0.35, an assumption)")
    plan.add_argument("--calibrate", metavar="FILE", default=None,
                      help="the hours at the rates a GPU sustained in `make gpu-check` (its JSON record), each stage "
                           "at its own unit's rate, instead of --gpu-tflops x --utilisation")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    with_config("validate", "check a config (and overrides) and what it points to: data files, store; "
                            "runs nothing")

    store = argparse.ArgumentParser(add_help=False, parents=[debug])
    store.add_argument("--store", default="store", metavar="URL", help="the store: folder or fsspec URL (default: store)")
    export = commands.add_parser(
        "export", parents=[store], help="write one trained model of a run as a self-contained file with a JSON card",
        description="Write one model of a finished run (MID's C_t ∘ E_s by default, or another row of its tables) "
                    "as one self-contained file, normalisation inside, with a JSON card beside it: dataset, input "
                    "shape, pool attacks, ε, the row's results under every protocol of the run, and the store keys "
                    "it came from.")
    export.add_argument("run_or_key", metavar="RUN_OR_KEY",
                        help="a run's ref (e.g. 'digits-3f9a2c1b', listed by mid cache ls), a run name (its newest "
                             "ref, e.g. 'digits') or a checkpoint key (mid-…)")
    export.add_argument("out", metavar="OUT", help="the folder to write the model and card.json into")
    export.add_argument("--format", required=True, choices=["safetensors", "torchscript", "onnx"],
                        help="safetensors: weights and the architecture's spec; torchscript: a traced module; "
                             "onnx: an ONNX graph (needs the 'export' extra: pip install 'mid-pipeline[export]')")
    export.add_argument("--force", action="store_true",
                        help="replace the model file and card.json if OUT already holds them")
    export.add_argument("--row", choices=exportable_rows(),
                        help=f"which row of the run's tables to export (default: {DEFAULT_ROW}; a checkpoint key "
                             f"exports its own model)")

    cache = commands.add_parser("cache", help="list, verify or clean what a store holds",
                                description="list, verify or clean what a store holds; every action refuses a "
                                            "location that is not a MID store (no mid-store.json)")
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", parents=[store], help="every entry: kind, key, attack, samples, bytes, complete, "
                                                        "created; every ref (one per run); then a summary line")
    ls.add_argument("--json", action="store_true", help="machine-readable output (the summary goes to stderr)")
    verify = actions.add_parser("verify", parents=[store],
                                help="re-hash committed data; exits 1 naming the entry, shard and array of any mismatch")
    verify.add_argument("key", nargs="?", help="one entry (default: all)")
    verify.add_argument("--json", action="store_true", help="machine-readable output (the summary goes to stderr)")
    gc = actions.add_parser("gc", parents=[store],
                            help="remove what no run needs: entries no ref (STORE/refs/) or live run names, their "
                                 "leftovers, abandoned training state; lists it and asks first",
                            description="Remove what no run needs. Kept: every entry, uncommitted pool and training "
                                        "resume state that a ref names (a run writes its ref when it starts, so an "
                                        "interrupted run keeps everything until its ref is dropped with --ref), and "
                                        "everything a live run's lease names. While any run is in progress on the "
                                        "store, gc removes nothing (it says which run, exit status 0); two gcs on "
                                        "one store take turns.")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.add_argument("--yes", "-y", action="store_true", help="remove without asking (needed without a terminal)")
    gc.add_argument("--ref", dest="drop_refs", action="append", default=[], metavar="REF",
                    help="drop the ref REF first (e.g. an interrupted run you will not resume), so what only it "
                         "named is removed too: its id (digits-3f9a2c1b, listed by mid cache ls) or its run's "
                         "name when only one ref has it (repeatable)")
    actions.add_parser("init", parents=[store], help="create an empty store, or mark a store written by an older "
                                                     "mid (one whose every file is one a store writes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    out_dir = store = None
    try:
        if args.command == "cache":
            return run_cache(args)
        if args.command == "export":
            from pipeline.export import export_command

            return export_command(args)
        if args.command == "sweep":
            return run_sweep(args)
        # Validation first: a bad config must fail before anything heavy is imported or started.
        from pipeline.config_loader import ConfigError, load_config

        try:
            cfg = load_config(args.config, args.overrides, args.store, args.profile)
        except ConfigError as e:
            if args.command != "plan" or "data.path is required" not in str(e):
                print(e, file=sys.stderr)
                return 2
            cfg = None
        if args.command == "plan":
            return run_plan(args, cfg)
        from pipeline import preflight

        problems = preflight.problems(cfg, "pool" if args.command == "pool" else "run")
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if args.command == "validate":
            if not problems:
                print(f"{args.config}: valid (config, data files and store checked)")
            return 2 if problems else 0
        if problems:
            return 2
        from pipeline import driver

        out_dir = Path(args.out) if args.out else Path("runs") / cfg.name
        store = cfg.store.url
        if args.command == "pool":
            driver.run_pool(cfg, out_dir, args.verbose)
        else:
            driver.run(cfg, out_dir, args.verbose)
        return 0
    except KeyboardInterrupt:
        print("interrupted: committed stages are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as error:  # the one place every failure is turned into one line
        from pipeline.errors import report

        return report(error, out_dir, debug, store)


def run_sweep(args: argparse.Namespace) -> int:
    """``mid sweep``: every trial's config and inputs are checked before Ray starts."""
    from pipeline import preflight, sweep
    from pipeline.config_loader import ConfigError
    from pipeline.sweep_config import load_sweep

    try:
        spec = load_sweep(args.sweep_file, args.overrides, args.store, args.max_concurrent_trials,
                          max_trials=None if args.yes else MAX_TRIALS_UNASKED)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    variants_of: dict[str, list[str]] = {}  # a problem -> the variants that have it
    for variant, cfg in spec.trials.items():
        for problem in preflight.problems(cfg):
            variants_of.setdefault(problem, []).append(variant)
    for problem, variants in variants_of.items():
        where = "" if len(variants) == len(spec.trials) else f"{args.sweep_file}: variant {', '.join(variants)}: "
        print(f"error: {where}{problem}", file=sys.stderr)
    if variants_of:
        return 2
    return sweep.run(spec, Path(args.out) if args.out else Path("runs") / spec.name, args.verbose)


def run_plan(args: argparse.Namespace, cfg) -> int:
    """``mid plan``: a plan needs no data files when the config's ``plan:`` section gives the
    dataset's size, so a missing data.path is filled with a marker instead of refused."""
    from pipeline import plan
    from pipeline.config_loader import ConfigError, load_config

    if cfg is None:
        try:
            cfg = load_config(args.config, [*args.overrides, f"data.path={plan.PATH_NOT_GIVEN}"], args.store,
                              args.profile)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 2
    tflops = args.gpu_tflops or plan.DEFAULT_GPU_TFLOPS
    gpu_name = plan.DEFAULT_GPU if args.gpu_tflops is None else f"{tflops:g} TFLOP/s given"
    from pipeline.errors import PipelineError
    from storage.readers.base import DataFileError

    if args.calibrate and (args.gpu_tflops or args.utilisation):
        print("error: --calibrate takes the measured rates; leave out --gpu-tflops and --utilisation", file=sys.stderr)
        return 2
    try:
        calibration = plan.read_calibration(args.calibrate) if args.calibrate else None
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.json:
        print(f"plan: counting MACs on real passes of {cfg.models.arch} (a minute for ViT-B on a CPU) ...",
              file=sys.stderr)
    try:
        result = plan.plan(cfg, args.gpus, tflops, args.utilisation or plan.DEFAULT_UTILISATION, gpu_name,
                           calibration)
    except (PipelineError, DataFileError) as e:  # what the plan cannot size: bad input, one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.as_json(result) if args.json else plan.render(result))
    return 0


def run_cache(args: argparse.Namespace) -> int:
    from pipeline import cache
    from storage.store import StoreError

    try:
        if args.action == "init":
            return cache.init(args.store)
        if args.action == "ls":
            return cache.ls(args.store, args.json)
        if args.action == "verify":
            return cache.verify(args.store, args.key, args.json)
        return cache.gc(args.store, args.dry_run, args.yes, args.drop_refs)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
