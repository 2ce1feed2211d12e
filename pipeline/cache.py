"""``mid cache``: list, verify and garbage-collect what a store holds.

Every action opens the store with ``storage.store.open_existing`` first: a location that is
missing, a file, or a folder without the store marker is refused before anything is read
or removed.
"""

from __future__ import annotations

import datetime
import json
import sys
from collections import Counter

from storage import catalog, fs, locks, runs
from storage import store as store_location


def _when(stamp: float | None) -> str:
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M") if stamp else "-"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"


def init(url: str) -> int:
    root = store_location.adopt(url)
    print(f"{root}: MID store ({store_location.MARKER_FILE})")
    return 0


def ls(url: str, as_json: bool) -> int:
    root = store_location.open_existing(url)
    entries = catalog.list_entries(root)
    problems = [e.problem for e in entries if e.problem]
    if as_json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
    elif entries:
        print(f"{'KIND':<10} {'KEY':<34} {'ATTACK':<7} {'SPLIT':<5} {'SAMPLES':>8} {'SIZE':>10} {'COMPLETE':<8} CREATED")
        for e in entries:
            print(f"{e.kind:<10} {e.key:<34} {e.attack or '-':<7} {e.split or '-':<5} "
                  f"{e.samples if e.samples is not None else '-':>8} "
                  f"{_size(e.bytes):>10} {str(e.complete).lower():<8} {_when(e.created)}")
    refs = runs.read_refs(root)
    if refs and not as_json:
        # Newest first: the ref a bare name stands for (mid export, gc --ref) is the first of its name.
        print(f"{'REF':<44} {'STATUS':<11} {'KEYS':>4} UPDATED")
        for ident, ref in sorted(refs.items(), key=lambda item: -(item[1].get("updated") or 0)):
            print(f"{ident:<44} {str(ref.get('status', '-')):<11} {len(runs.strings_in(ref.get('keys', {}))):>4} "
                  f"{_when(ref.get('updated'))}")
    kinds = Counter(e.kind for e in entries)
    parts = ", ".join(_plural(kinds[k], k) for k in ("dataset", "checkpoint", "pool", "results") if kinds[k])
    incomplete = sum(not e.complete for e in entries)
    summary = (f"{root}: {_plural(len(entries), 'entry', 'entries')}"
               + (f" ({parts})" if parts else "") + f", {_size(sum(e.bytes for e in entries))}, "
               f"{incomplete} incomplete, {len(problems)} with problems, {_plural(len(refs), 'ref')}")
    print(summary, file=sys.stderr if as_json else sys.stdout)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def verify(url: str, key: str | None, as_json: bool) -> int:
    root = store_location.open_existing(url)
    entries = [e for e in catalog.list_entries(root) if key is None or e.key == key]
    if key is not None and not entries:
        print(f"error: no entry {key!r} in store {root} (mid cache ls lists them)", file=sys.stderr)
        return 2
    report = {e.key: catalog.verify_entry(root, e) for e in entries}
    if as_json:
        print(json.dumps([{"kind": e.kind, "key": e.key, "ok": not report[e.key].problems,
                           "chunks": report[e.key].chunks, "skipped": report[e.key].skipped,
                           "problems": report[e.key].problems} for e in entries], indent=2))
    else:
        for e in entries:
            checked = report[e.key]
            if checked.problems:
                status = f"FAILED ({_plural(len(checked.problems), 'problem')})"
            else:
                status = f"skipped ({checked.skipped})" if checked.skipped else "ok"
            print(f"{e.kind} {e.key}: {status}")
            for problem in checked.problems:
                print(f"  {problem}", file=sys.stderr)
    corrupt = sum(bool(r.problems) for r in report.values())
    skipped = sum(bool(r.skipped) for r in report.values())
    pools = sum(e.kind == "pool" for e in entries)
    chunks = sum(r.chunks for e in entries if e.kind == "pool" for r in [report[e.key]])
    summary = (f"{_plural(len(entries), 'entry', 'entries')}, {_plural(pools, 'pool')}, "
               f"{chunks} chunks verified, {corrupt} corrupt, {skipped} not committed yet")
    print(summary, file=sys.stderr if as_json else sys.stdout)
    return 1 if corrupt else 0


def resolve_refs(root: str, wanted: list[str]) -> list[str] | str:
    """The ref ids ``wanted`` name (ids or bare run names), or the one-line error."""
    refs = runs.read_refs(root)
    ids = []
    for name in wanted:
        found = runs.find_refs(refs, name)
        if not found:
            return f"no ref {name!r} in {root} (refs: {', '.join(sorted(refs)) or 'none'})"
        if len(found) > 1:
            # Dropping a ref releases what it names: never guess which run was meant.
            return f"{len(found)} refs are named {name!r} in {root} ({', '.join(found)}); name one of them"
        ids.append(found[0])
    return ids


def live_runs(root: str) -> str:
    """The live runs, for a message: 'digits-3f9a2c1b (pid 123 on host), ...'."""
    leases = runs.live_leases(root).values()
    return ", ".join(f"{lease.get('name')} (pid {lease.get('pid')} on {lease.get('host')})" for lease in leases) \
        or "one that is starting"


def gc(url: str, dry_run: bool, yes: bool, drop_refs: list[str]) -> int:
    """Remove what no run needs. While any run is live gc removes nothing: a starting run's
    lease names only what it has claimed so far, not what it is about to reuse."""
    root = store_location.open_existing(url)
    refs = runs.read_refs(root)
    resolved = resolve_refs(root, drop_refs)
    if isinstance(resolved, str):
        print(f"error: {resolved}", file=sys.stderr)
        return 2
    drop_refs = resolved
    live = {lease.get("name") for lease in runs.live_leases(root).values()}
    busy = [name for name in drop_refs if name in live]
    if busy:
        print(f"error: run {busy[0]!r} is in progress on {root}; its ref stays until it stops", file=sys.stderr)
        return 2
    if not dry_run and live:
        return _busy(root)
    found = catalog.garbage(root, without_refs=tuple(drop_refs))
    for name in drop_refs:
        print(f"{'would drop' if dry_run else 'dropping'} ref {name} ({refs[name].get('status', 'finished')})")
    for entry_url, reason, size in found:
        print(f"{'would remove' if dry_run else 'to remove'}: {entry_url} ({reason}, {_size(size)})")
    total = f"{_plural(len(found), 'item')}, {_size(sum(s for _, _, s in found))}"
    if dry_run:
        print(f"would remove {total}")
        if live:
            print(f"note: a run is in progress ({live_runs(root)}): gc --yes removes nothing until it ends")
        return 0
    if not found and not drop_refs:
        print(f"{root}: nothing to remove")
        return 0
    if not yes:
        if not sys.stdin.isatty():
            print(f"error: gc would remove {total}; confirm with --yes (no terminal to ask on), "
                  f"or list them with --dry-run", file=sys.stderr)
            return 2
        answer = input(f"remove {total}{' and drop ' + ', '.join(drop_refs) if drop_refs else ''}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    with locks.gc_lock(root, on_wait=lambda: print(f"waiting: another mid cache gc is running on {root}",
                                                   file=sys.stderr, flush=True)):
        with locks.store_exclusive(root, no_live_run=lambda: not runs.live_leases(root)) as free:
            if not free:
                return _busy(root)
            for name in drop_refs:
                runs.remove_ref(root, name)
            # Computed again: the store may have changed while we asked (or another gc ran).
            shown = {entry_url for entry_url, _, _ in found}
            found = [item for item in catalog.garbage(root) if item[0] in shown]
            # An object store has no lock a run takes: a run that starts now stops the removal.
            removed = catalog.remove(found, still_free=lambda: fs.is_local(root) or not runs.live_leases(root))
    done = found[:removed]
    print(f"removed {_plural(len(done), 'item')}, {_size(sum(s for _, _, s in done))}"
          + ("" if removed == len(found) else f"; stopped: a run started ({live_runs(root)})"))
    return 0


def _busy(root: str) -> int:
    """gc while a run is live: nothing removed, exit status 0 (nothing is wrong; run gc later)."""
    print(f"nothing removed: a run is in progress on {root}: {live_runs(root)}; gc removes nothing while a "
          f"run is live (run it again once it has ended)")
    return 0
