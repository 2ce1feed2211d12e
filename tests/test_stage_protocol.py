"""Every stage reaches the store one way (``RunContext.reuse_or_build_many``): claim, find,
lock the missing keys, find again, build only what is still missing.

Real runs on a real store: two processes ask for the same three entries, one of which is
already stored; the one that takes the locks first builds the other two, the second waits on
the locks and then reuses them, building nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from storage import runs

REPO = Path(__file__).resolve().parent.parent

# One process of the test: asks for entries a, b, c (JSON files under results/), building
# the missing ones slowly enough that the other process arrives while it holds the locks.
RUN = textwrap.dedent("""
    import json, sys, time
    from pipeline.config_loader import load_config
    from pipeline.context import RunContext
    from storage import fs

    store, out, who, pause = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    cfg = load_config("configs/digits.yaml", [], store)
    keys = {name: f"eval-{name * 20}" for name in "abc"}
    url = lambda key: fs.join(store, "results", key + ".json")
    heard = []

    def build(names):
        time.sleep(pause)
        for name in names:
            fs.write_json_atomic(url(keys[name]), {"by": who})
        return {name: {"by": who} for name in names}

    with RunContext(cfg, out, ref_name=who) as ctx:
        entries, built = ctx.reuse_or_build_many({"results": keys}, keys, lambda key: fs.read_json(url(key)),
                                                 build, heard.append)
    print(json.dumps({"entries": entries, "built": built, "heard": heard}))
""")


def start(store: Path, tmp_path: Path, who: str, pause: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, str(store), str(tmp_path / who), who, str(pause)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_build_each_missing_entry_once_and_the_later_one_reuses_it(tmp_path):
    store = tmp_path / "store"
    first = start(store, tmp_path, "first", 0.0)  # creates the store, then only finds what is there
    assert first.wait(120) == 0, first.stderr.read()
    (store / "results" / f"eval-{'c' * 20}.json").write_text(json.dumps({"by": "earlier"}))
    for name in "ab":
        (store / "results" / f"eval-{name * 20}.json").unlink()

    builder = start(store, tmp_path, "builder", 8.0)
    time.sleep(3.0)  # the builder holds the locks of a and b by now
    waiter = start(store, tmp_path, "waiter", 0.0)
    (built_out, _), (waited_out, waiter_said) = [p.communicate(timeout=180) for p in (builder, waiter)]
    assert builder.returncode == 0 and waiter.returncode == 0, waiter_said
    built_by, waited = json.loads(built_out), json.loads(waited_out)

    assert built_by["built"] == ["a", "b"]
    assert built_by["heard"] == [["c"]]
    assert waited["built"] == []  # it waited on the locks, found a and b, and built nothing
    assert waited["heard"] == [["a", "b", "c"]]
    expected = {"a": {"by": "builder"}, "b": {"by": "builder"}, "c": {"by": "earlier"}}
    assert built_by["entries"] == expected and waited["entries"] == expected
    assert "waiting: another run is building" in waiter_said
    # Each run named all three in its ref, so gc keeps them for either.
    refs = runs.read_refs(str(store))
    assert {ref["name"] for ref in refs.values()} == {"first", "builder", "waiter"}
    assert all(sorted(ref["keys"]["results"]) == ["a", "b", "c"] for ref in refs.values())
