"""The paper's table layout: rows = defenses, columns = Benign, each attack, Avg."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def markdown_table(defenses: dict[str, Any], known: list[str], unknown: list[str]) -> str:
    columns = ["Benign", *known, *unknown, "Avg"]
    header = "| Defense | " + " | ".join(columns) + " |"
    groups = "| | " + " | ".join([""] + ["known"] * len(known) + ["unknown"] * len(unknown) + [""]) + " |"
    rule = "|---|" + "|".join(["---:"] * len(columns)) + "|"
    rows = []
    for name, row in defenses.items():
        cells = [row["benign"], *(row["attacks"][a] for a in [*known, *unknown]), row["avg"]]
        rows.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join([header, rule, groups.replace("| | ", "| *attack* | ", 1), *rows])


def write(out_dir: Path, name: str, defenses: dict[str, Any], stages: dict[str, Any],
          known: list[str], unknown: list[str]) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(defenses, known, unknown)
    lines = [f"# MID robustness report: {name}", "",
             "White-box accuracy (%) on the test split; every attack runs against the defended model itself.",
             "", table, "", "## Stages", "", "| stage | key | cache hit | seconds |", "|---|---|---|---:|"]
    lines += [f"| {s} | `{r['key']}` | {r['cache_hit']} | {r['seconds']:.1f} |" for s, r in stages.items()]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    (out_dir / "results.json").write_text(json.dumps({"defenses": defenses, "stages": stages}, indent=2) + "\n")
    return table
