"""A sweep's combined report: per protocol, one table in the protocol tables' layout with a
row per variant (the sweep's ``row`` of each trial, MID by default) under the reference
rows (the other defenses, shared by every trial); the trials with their status; and what
each stage output was built by, so a reader sees every shared stage built once.

Writes ``sweep.md``, ``sweep.json`` and ``sweep-<protocol>.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import report
from pipeline.sweep_config import Sweep, describe_overrides


def combined_rows(sweep: Sweep, records: dict[str, Any], protocol: str, known: list[str],
                  unknown: list[str]) -> dict[str, Any]:
    """{row label: summarized row}: the reference defenses of the first finished trial, then
    each finished variant's ``sweep.row``."""
    finished = {v: r for v, r in records.items() if "error" not in r and protocol in r["protocols"]}
    rows: dict[str, Any] = {}
    for record in list(finished.values())[:1]:
        for defense, row in record["protocols"][protocol].items():
            if defense != sweep.row:
                rows[defense] = row
    for variant, record in finished.items():
        if sweep.row in record["protocols"][protocol]:
            rows[variant] = record["protocols"][protocol][sweep.row]
    table = {}
    for label, row in rows.items():  # the table's columns: an attack a trial did not run shows as –
        cells = {**row, "attacks": {a: row["attacks"].get(a) for a in [*known, *unknown]}}
        table[label] = report.summarize(cells, known, unknown)
    return table


def builds(records: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every stage output the trials used: {key: {"what", "built_by": [variants]}} (a pool
    or stored test attack per attack)."""
    found: dict[str, dict[str, Any]] = {}
    for variant, record in records.items():
        for stage, info in record.get("stages", {}).items():
            parts = [(info["key"], stage, info["cache_hit"])]
            for attack, pool in info.get("attacks", {}).items():
                parts.append((pool["key"], f"{stage} {attack}", pool.get("cache_hit", info["cache_hit"])))
            for key, what, cache_hit in parts:
                entry = found.setdefault(key, {"what": what, "built_by": [], "used_by": []})
                entry["used_by"].append(variant)
                if not cache_hit:  # a reused trial's record says what it built when it ran
                    entry["built_by"].append(variant)
    return found


def sharing_lines(found: dict[str, dict[str, Any]], trials: int) -> list[str]:
    shared = {k: e for k, e in found.items() if len(set(e["used_by"])) > 1}
    twice = [f"{e['what']} ({', '.join(e['built_by'])})" for e in found.values() if len(e["built_by"]) > 1]
    pools = sorted(e["what"].removeprefix("pool ") for e in found.values() if e["what"].startswith("pool "))
    lines = [f"Shared by several of the {trials} trials and built at most once: {len(shared)} stage outputs "
             f"({', '.join(sorted({e['what'].split(' ')[0] for e in shared.values()}))}).",
             f"Training pool attacks generated, once each: {', '.join(pools)}."]
    lines.append(f"Built more than once: {'; '.join(twice)}." if twice else "Built more than once: nothing.")
    return lines


def trials_table(sweep: Sweep, records: dict[str, Any], reused: set[str]) -> list[str]:
    lines = ["| trial | overrides | status | seconds | built |", "|---|---|---|---:|---|"]
    for variant, record in records.items():
        if "error" in record:
            status, seconds, built = f"failed: {record['error']}", "", ""
        else:
            status = "reused" if variant in reused else "finished"
            seconds = f"{record['seconds']:.1f}"
            built = ", ".join(s for s, r in record["stages"].items() if not r["cache_hit"]) or "nothing"
        lines.append(f"| {variant} | {describe_overrides(sweep.overrides[variant])} | {status} | {seconds} | {built} |")
    return lines


def write(out_dir: Path, sweep: Sweep, records: dict[str, Any], reused: set[str]) -> str:
    """Returns what the console shows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = next(iter(sweep.trials.values()))
    known, unknown = base.eval.known, base.eval.unknown
    found = builds(records)
    md = [f"# MID sweep: {sweep.name}", "", f"Sweep file `{sweep.path}`; each variant's row is its {sweep.row} row, "
          f"under the rows of the other defenses (shared by every trial). Accuracy (%) on the test split.", ""]
    console = []
    tables = {}
    for protocol in base.eval.protocols:
        rows = combined_rows(sweep, records, protocol, known, unknown)
        if not rows:
            continue
        tables[protocol] = rows
        table = report.markdown_table(rows, known, unknown)
        report.plot(out_dir / f"sweep-{protocol}.png", f"{sweep.name}: {report.TITLES[protocol]}", rows, known,
                    unknown)
        md += [f"## {report.TITLES[protocol]}", "", table, "", f"![{protocol}](sweep-{protocol}.png)", ""]
        console += [f"{report.TITLES[protocol]}, sweep {sweep.name}:", table, ""]
    trials = trials_table(sweep, records, reused)
    sharing = sharing_lines(found, len(records))
    md += ["## Trials", "", *trials, "", *sharing, ""]
    console += [*trials, "", *sharing]
    (out_dir / "sweep.md").write_text("\n".join(md) + "\n")
    summary = {"name": sweep.name, "sweep_file": str(sweep.path), "row": sweep.row, "known": known,
               "unknown": unknown, "protocols": tables,
               "trials": {v: {"overrides": sweep.overrides[v], "digest": sweep.digest(v),
                              "status": "failed" if "error" in r else ("reused" if v in reused else "finished"),
                              **({"error": r["error"]} if "error" in r else
                                 {"seconds": r["seconds"], "stages": r["stages"]})}
                          for v, r in records.items()},
               "builds": found}
    (out_dir / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    return "\n".join(console).rstrip()
