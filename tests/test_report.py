"""The report's layout and arithmetic: one table per protocol with the paper's columns, the
averages over known, unknown and all, attacks not run left out of them, a self-contained
HTML page, and results.json in the documented shape."""

import json

from pipeline import report

KNOWN, UNKNOWN = ["PGD_N", "MIM_T"], ["FGSM_N", "CW_N"]


def row(benign, attacks, samples=None):
    return {"benign": benign, "attacks": attacks, "samples": samples or {"benign": 100}}


def test_three_tables_with_their_averages_and_notes(tmp_path):
    protocols = {
        "source": {"None": row(90.0, {"PGD_N": 10.0, "MIM_T": 20.0, "FGSM_N": 30.0, "CW_N": 40.0}),
                   "MID": row(80.0, {"PGD_N": 95.0, "MIM_T": 70.0, "FGSM_N": 60.0, "CW_N": 50.0},
                              {"benign": 100, "CW_N": 25})},
        "adaptive": {"None": row(90.0, {"PGD_N": 0.0, "MIM_T": None, "FGSM_N": 5.0, "CW_N": None}),
                     "MID": row(80.0, {"PGD_N": 2.0, "MIM_T": None, "FGSM_N": 9.0, "CW_N": None})},
    }
    meta = {"source": {"source_model": {"kind": "baseline", "key": "baseline-k", "sha256": "s"},
                       "attacks": {a: {"success_rate_stored": 99.0} for a in KNOWN + UNKNOWN}},
            "adaptive": {"attacks": {}}}
    printed = report.write(tmp_path, "t", protocols, meta, {}, KNOWN, UNKNOWN)

    results = json.loads((tmp_path / "results.json").read_text())
    mid = results["protocols"]["source"]["defenses"]["MID"]
    assert (mid["avg_known"], mid["avg_unknown"], mid["avg"]) == (82.5, 55.0, 71.0)
    assert results["protocols"]["source"]["source_model"]["kind"] == "baseline"
    adaptive = results["protocols"]["adaptive"]["defenses"]["None"]
    assert (adaptive["avg_known"], adaptive["avg_unknown"], adaptive["avg"]) == (0.0, 5.0, 31.67)  # None: not run
    md = (tmp_path / "report.md").read_text()
    assert "## Source protocol (the paper's Table 2)" in md and "## Adaptive protocol (white-box)" in md
    assert "| Defense | Benign | PGD_N | MIM_T | FGSM_N | CW_N | Avg known | Avg unknown | Avg |" in md
    assert "| MID | 80.0 | 95.0 | 70.0 | 60.0 | 50.0 | 82.5 | 55.0 | 71.0 |" in md
    assert "| None | 90.0 | 0.0 | – | 5.0 | – | 0.0 | 5.0 | 31.7 |" in md
    assert "CW_N on 25" in md and "Not run under this protocol (eval.adaptive_attacks): MIM_T, CW_N" in md
    assert "label leaking" in md and "MID PGD_N 95.0 > 80.0" in md  # above benign: said plainly
    assert "grey-box, not white-box" in printed
    page = (tmp_path / "report.html").read_text()
    assert page.count("<table>") == 2 and page.count("data:image/png;base64,") == 2
    assert (tmp_path / "source.png").read_bytes().startswith(b"\x89PNG")
