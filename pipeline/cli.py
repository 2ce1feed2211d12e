"""The ``mid`` command (also ``python -m pipeline``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Meta Invariance Defense, end to end on Ray: ingest a dataset, train a baseline and a
teacher, generate the attacker pool once (cached, content-addressed), meta-train the
student on the cached pool, train the adversarial-training baselines (AT, TRADES), and
evaluate every defense under known and unknown attacks.

Every stage's output is keyed by a hash of its inputs and settings, so a second run
reuses what exists: only what changed is recomputed.
"""

EPILOG = """\
examples:
  mid run configs/digits.yaml --out runs/digits
  mid run configs/mnist.yaml --profile fast --set data.path=../shared/data/mnist
  mid run configs/digits.yaml --set mid.epochs=5 --set pool.attacks='[PGD_N, MIM_N]'
  mid pool configs/digits.yaml --set pool.attacks='[PGD_N, PGD_T, MIM_N, MIM_T, FGSM_N, BIM_N]'
  mid cache ls --json; mid cache verify; mid cache gc --dry-run
  mid run configs/digits.yaml --store s3://bucket/mid
  ray job submit --working-dir . -- python -m pipeline run configs/digits.yaml
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mid", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help_text, description=help_text)
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

    run = with_config("run", "run every stage and write the robustness report")
    run.add_argument("--out", default=None, metavar="DIR",
                     help="the run's output folder for report.md, results.json, metrics "
                          "(default: runs/<config name>)")
    pool = with_config("pool", "run the stages up to the attacker pool (ingest, baseline, teacher, pool)")
    pool.add_argument("--out", default=None, metavar="DIR", help="the run's output folder (default: runs/<name>)")
    with_config("validate", "check a config (and overrides) without running anything")

    cache = commands.add_parser("cache", help="list, verify or clean what a store holds",
                                description="list, verify or clean what a store holds")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", default="store", metavar="URL", help="the store: folder or fsspec URL (default: store)")
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", parents=[store], help="every entry: kind, key, attack, samples, bytes, complete, created")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    verify = actions.add_parser("verify", parents=[store],
                                help="re-hash committed data; exits 1 naming the entry, shard and array of any mismatch")
    verify.add_argument("key", nargs="?", help="one entry (default: all)")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    gc = actions.add_parser("gc", parents=[store],
                            help="remove uncommitted leftovers, entries that no run's ref (STORE/refs/) names, "
                                 "and the resume state of unfinished training runs (STORE/train/)")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "cache":
        from pipeline import cache

        if args.action == "ls":
            return cache.ls(args.store, args.json)
        if args.action == "verify":
            return cache.verify(args.store, args.key, args.json)
        return cache.gc(args.store, args.dry_run)
    # Validation first: a bad config must fail before anything heavy is imported or started.
    from pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides, args.store, args.profile)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"{args.config}: valid")
        return 0
    from pipeline import driver
    from pipeline.context import PipelineError

    out_dir = Path(args.out) if args.out else Path("runs") / cfg.name
    try:
        if args.command == "pool":
            driver.run_pool(cfg, out_dir)
        else:
            driver.run(cfg, out_dir)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
