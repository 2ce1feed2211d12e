"""``mid cache``: list, verify and garbage-collect what a store holds."""

from __future__ import annotations

import datetime
import json
import sys

from storage import catalog


def _when(stamp: float | None) -> str:
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M") if stamp else "-"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def ls(root: str, as_json: bool) -> int:
    entries = catalog.list_entries(root)
    if as_json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return 0
    if not entries:
        print(f"{root}: empty store")
        return 0
    print(f"{'KIND':<10} {'KEY':<34} {'ATTACK':<7} {'SAMPLES':>8} {'SIZE':>10} {'COMPLETE':<8} CREATED")
    for e in entries:
        print(f"{e.kind:<10} {e.key:<34} {e.attack or '-':<7} {e.samples if e.samples is not None else '-':>8} "
              f"{_size(e.bytes):>10} {str(e.complete).lower():<8} {_when(e.created)}")
    return 0


def verify(root: str, key: str | None, as_json: bool) -> int:
    entries = [e for e in catalog.list_entries(root) if key is None or e.key == key]
    if key is not None and not entries:
        print(f"no entry {key!r} in store {root}", file=sys.stderr)
        return 2
    report = {e.key: catalog.verify_entry(root, e) for e in entries}
    if as_json:
        print(json.dumps([{"kind": e.kind, "key": e.key, "ok": not report[e.key], "problems": report[e.key]}
                          for e in entries], indent=2))
    else:
        for e in entries:
            status = "ok" if not report[e.key] else f"FAILED ({len(report[e.key])} problems)"
            print(f"{e.kind} {e.key}: {status}")
            for problem in report[e.key]:
                print(f"  {problem}", file=sys.stderr)
    return 1 if any(report.values()) else 0


def gc(root: str, dry_run: bool) -> int:
    found = catalog.collect_garbage(root, dry_run)
    verb = "would remove" if dry_run else "removed"
    for url, reason, size in found:
        print(f"{verb} {url} ({reason}, {_size(size)})")
    print(f"{verb} {len(found)} entries, {_size(sum(s for _, _, s in found))}")
    return 0
