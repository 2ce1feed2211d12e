"""The report: one table per protocol in the paper's layout (rows = defenses; columns =
Benign, each known attack, each unknown attack, the averages over known, unknown and all),
each saying what its attacks were crafted against; a grouped bar chart per protocol.

Writes ``report.md``, ``results.json``, ``report.html`` (self-contained: tables and charts
inline, opens in a browser with no server) and ``<protocol>.png``.
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

TITLES = {"source": "Source protocol (the paper's Table 2)",
          "transfer": "Transfer protocol (the paper's Table 3)",
          "adaptive": "Adaptive protocol (white-box)"}


def crafted_against(protocol: str, meta: dict[str, Any]) -> str:
    """The table's one line saying what its attacks were crafted against."""
    if protocol == "source":
        return (f"Attacks crafted once against the fixed {meta['source_model']['kind']} "
                f"(`{meta['source_model']['key']}`) and fed to every defense: grey-box, not white-box.")
    if protocol == "transfer":
        model = meta["source_model"]
        return (f"Attacks crafted once against a substitute, a plain classifier of the same architecture trained "
                f"independently (seed {model['seed']}, `{model['key']}`), and fed to every defense: black-box transfer.")
    return "Attacks crafted against each defense itself, end to end (MID: the teacher's classifier on the " \
           "student's features): white-box."


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def summarize(row: dict[str, Any], known: list[str], unknown: list[str]) -> dict[str, Any]:
    """A row with its averages; an attack not run under the protocol (None) is left out of them."""
    ran = {a: v for a, v in row["attacks"].items() if v is not None}
    return {**row, "avg_known": _mean([ran[a] for a in known if a in ran]),
            "avg_unknown": _mean([ran[a] for a in unknown if a in ran]),
            "avg": _mean([row["benign"], *ran.values()])}  # the paper's Avg: benign and every attack


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def columns(known: list[str], unknown: list[str]) -> list[str]:
    return ["Benign", *known, *unknown, "Avg known", "Avg unknown", "Avg"]


def row_cells(row: dict[str, Any], known: list[str], unknown: list[str]) -> list[str]:
    return [_cell(v) for v in [row["benign"], *(row["attacks"][a] for a in [*known, *unknown]),
                               row["avg_known"], row["avg_unknown"], row["avg"]]]


def markdown_table(defenses: dict[str, Any], known: list[str], unknown: list[str]) -> str:
    cols = columns(known, unknown)
    lines = ["| Defense | " + " | ".join(cols) + " |", "|---|" + "|".join(["---:"] * len(cols)) + "|",
             "| *attack* | | " + " | ".join(["known"] * len(known) + ["unknown"] * len(unknown)) + " | | | |"]
    lines += [f"| {name} | " + " | ".join(row_cells(row, known, unknown)) + " |" for name, row in defenses.items()]
    return "\n".join(lines)


def notes(protocol: str, meta: dict[str, Any], defenses: dict[str, Any], known: list[str],
          unknown: list[str]) -> list[str]:
    """What a reader needs to read the table right: subsets, each stored attack's success
    against the model it was crafted on, which AutoAttack ran, label leaking."""
    out = []
    attacks = meta.get("attacks", {})
    if attacks:
        rates = ", ".join(f"{a} {attacks[a]['success_rate_stored']:.1f}" for a in [*known, *unknown] if a in attacks)
        out.append(f"Success rate (%) of each stored attack against the model it was crafted on: {rates}.")
    samples = {a: min(row["samples"].get(a, row["samples"]["benign"]) for row in defenses.values())
               for a in ["benign", *known, *unknown]}
    total = samples["benign"]
    partial = [f"{a} on {samples[a]}" for a in [*known, *unknown] if samples[a] < total]
    if partial:
        out.append(f"Seeded subsets of the {total} test samples (eval.subset): " + ", ".join(partial) + ".")
    skipped = [a for a in [*known, *unknown] if all(row["attacks"][a] is None for row in defenses.values())]
    if skipped:
        out.append(f"Not run under this protocol (eval.adaptive_attacks): {', '.join(skipped)}.")
    if meta.get("autoattack"):
        out.append(f"AA_N: {meta['autoattack']}.")
    if protocol != "adaptive":
        leaks = [f"{d} {a} {row['attacks'][a]:.1f} > {row['benign']:.1f}" for d, row in defenses.items()
                 for a in known if row["attacks"][a] is not None and row["attacks"][a] > row["benign"]]
        if leaks:
            out.append("Accuracy above benign under a known attack (" + "; ".join(leaks) + "): the defense learned "
                       "the fixed model's perturbations, which carry the true label (label leaking); the "
                       "adaptive table shows what remains against attacks on the defense itself.")
    return out


def plot(path: Path, title: str, defenses: dict[str, Any], known: list[str], unknown: list[str]) -> None:
    # matplotlib writes a font cache on first import; keep it out of the user's home and OUT.
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "mid-matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["Benign", *known, *unknown]
    width = 0.8 / len(defenses)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(labels) * max(1, len(defenses) / 2)), 3.6))
    for i, (name, row) in enumerate(defenses.items()):
        values = [row["benign"], *(row["attacks"][a] for a in [*known, *unknown])]
        xs = [j + (i - (len(defenses) - 1) / 2) * width for j in range(len(labels))]
        ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
               width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.axvline(len(known) + 0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(ncol=len(defenses), fontsize="small", loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _html_table(defenses: dict[str, Any], known: list[str], unknown: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["Defense", *columns(known, unknown)])
    rows = "".join("<tr><th>" + html.escape(name) + "</th>" + "".join(f"<td>{c}</td>" for c in
                   row_cells(row, known, unknown)) + "</tr>" for name, row in defenses.items())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def format_macs(value: float) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:.3g} "


def cost_lines(costs: dict[str, Any], summary: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """The cost table (markdown) and its notes: each row's training cost beside its average
    accuracy under each protocol."""
    protocols = list(summary)
    head = ["Defense", "Seconds", "Attack MACs", "Training MACs", *(f"Avg {p}" for p in protocols)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row, c in costs.items():
        avgs = [_cell(summary[p].get(row, {}).get("avg")) for p in protocols]
        lines.append(f"| {row} | {c['seconds']:.1f} | {format_macs(c['attack_macs'])}MAC | {format_macs(c['training_macs'])}MAC | "
                     + " | ".join(avgs) + " |")
    notes = ["Seconds: wall time this run spent in the row's own stages (a stage shared by rows, such as the "
             "pool, counts in each); MACs: multiply-accumulates of its attack steps and training steps, counted "
             "on real passes of the model as `mid plan` counts them."]
    cached = {row: c["cached"] for row, c in costs.items() if c["cached"]}
    if cached:
        notes.append("Reused from the store (0 seconds in this run, MACs still counted): "
                     + "; ".join(f"{row}: {', '.join(names)}" for row, names in cached.items()) + ".")
    return "\n".join(lines), notes


def plot_cost(path: Path, costs: dict[str, Any], rows: dict[str, Any], protocol: str) -> None:
    """Average accuracy under ``protocol`` against each row's counted MACs, one point per row."""
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "mid-matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for row, c in costs.items():
        if row in rows:
            macs = max(c["attack_macs"] + c["training_macs"], 1.0)
            ax.scatter([macs], [rows[row]["avg"]])
            ax.annotate(row, (macs, rows[row]["avg"]), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.set_xscale("log")
    ax.set_xlabel("training cost (MACs: attack + training steps)")
    ax.set_ylabel(f"{protocol} average accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Robustness against cost ({protocol})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stages_md(stages: dict[str, Any]) -> list[str]:
    lines = ["## Stages", "", "| stage | key | cache hit | seconds |", "|---|---|---|---:|"]
    return lines + [f"| {s} | `{r['key']}` | {r['cache_hit']} | {r['seconds']:.1f} |" for s, r in stages.items()]


def write(out_dir: Path, name: str, protocols: dict[str, dict[str, Any]], meta: dict[str, dict[str, Any]],
          stages: dict[str, Any], known: list[str], unknown: list[str], costs: dict[str, Any] | None = None) -> str:
    """``protocols``: {protocol: {defense: row}}; ``meta``: {protocol: what its attacks were
    crafted against and their success rates}; ``costs``: each row's training cost
    (``pipeline.costs``). Returns the tables as printed on the console."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {p: {d: summarize(row, known, unknown) for d, row in rows.items()} for p, rows in protocols.items()}
    md = [f"# MID robustness report: {name}", "",
          "Accuracy (%) on the test split, one table per protocol; the averages are over the known attacks, the "
          "unknown ones, and benign with every attack (the paper's Avg).", ""]
    console, body = [], []
    for p, rows in summary.items():
        table = markdown_table(rows, known, unknown)
        lines = [crafted_against(p, meta[p]), *notes(p, meta[p], rows, known, unknown)]
        plot(out_dir / f"{p}.png", TITLES[p], rows, known, unknown)
        md += [f"## {TITLES[p]}", "", *lines[:1], "", table, "", *(f"- {n}" for n in lines[1:]), "",
               f"![{p}]({p}.png)", ""]
        console += [f"{TITLES[p]}: {lines[0]}", table, *lines[1:], ""]
        image = base64.b64encode((out_dir / f"{p}.png").read_bytes()).decode()
        body.append(f"<h2>{html.escape(TITLES[p])}</h2><p>{html.escape(lines[0])}</p>"
                    + _html_table(rows, known, unknown)
                    + "".join(f"<p class=note>{html.escape(n)}</p>" for n in lines[1:])
                    + f'<img alt="{p}" src="data:image/png;base64,{image}">')
    if costs:
        table, cost_notes = cost_lines(costs, summary)
        protocol = "adaptive" if "adaptive" in summary else list(summary)[-1]
        plot_cost(out_dir / "cost.png", costs, summary[protocol], protocol)
        md += ["## Training cost", "", table, "", *(f"- {n}" for n in cost_notes), "", "![cost](cost.png)", ""]
        console += ["Training cost:", table, *cost_notes, ""]
        image = base64.b64encode((out_dir / "cost.png").read_bytes()).decode()
        body.append("<h2>Training cost</h2>" + "".join(f"<p class=note>{html.escape(n)}</p>" for n in cost_notes)
                    + f"<pre>{html.escape(table)}</pre>" + f'<img alt="cost" src="data:image/png;base64,{image}">')
    md += _stages_md(stages)
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    results = {"protocols": {p: {"defenses": rows, **meta[p]} for p, rows in summary.items()},
               "known": known, "unknown": unknown, "stages": stages, **({"costs": costs} if costs else {})}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    style = ("body{font-family:sans-serif;max-width:72em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}.note{color:#444;font-size:90%}"
             "img{max-width:100%}")
    (out_dir / "report.html").write_text(
        f"<!doctype html><html><head><meta charset=utf-8><title>MID report: {html.escape(name)}</title>"
        f"<style>{style}</style></head><body><h1>MID robustness report: {html.escape(name)}</h1>"
        + "".join(body) + "</body></html>\n")
    return "\n".join(console).rstrip()
