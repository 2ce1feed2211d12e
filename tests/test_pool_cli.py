"""`mid pool` and `mid cache` on a real store: reuse per attack, ls, verify, gc."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from storage import pools, runs

pytestmark = pytest.mark.end_to_end  # `make test-fast` leaves this file out

TINY = ["data.train_limit=256", "data.test_limit=32", "models.baseline.epochs=2", "models.teacher.epochs=2",
        "attacks.PGD.nb_iter=3", "attacks.PGD.eps_iter=0.04", "attacks.MIM.nb_iter=3", "attacks.MIM.eps_iter=0.04",
        "attacks.BIM.nb_iter=3", "attacks.BIM.eps_iter=0.04", "pool.shard_size=64"]
SHARDS = 4  # 256 samples / 64


def mid(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def mid_pool(store, out, attacks):
    args = ["pool", "configs/digits.yaml", "--store", str(store), "--out", str(out)]
    for override in [*TINY, f"pool.attacks=[{', '.join(attacks)}]"]:
        args += ["--set", override]
    return mid(*args)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool-cli") / "store"
    first = mid_pool(root, root.parent / "out", ["PGD_N", "MIM_N"])
    assert f"pool: generating {2 * SHARDS} shards" in first.stderr
    return root


def cache_ls(store):
    return {e["key"]: e for e in json.loads(mid("cache", "ls", "--store", str(store), "--json").stdout)}


def test_growing_the_pool_generates_only_the_new_attacks(store):
    grown = mid_pool(store, store.parent / "out", ["PGD_N", "MIM_N", "FGSM_N", "BIM_N"])
    assert "pool: 2 of 4 pools complete in the store, not regenerating (PGD_N, MIM_N)" in grown.stderr
    assert f"pool: generating {2 * SHARDS} shards" in grown.stderr  # FGSM_N and BIM_N only
    entries = cache_ls(store)
    attacks = sorted(e["attack"] for e in entries.values() if e["kind"] == "pool")
    assert attacks == ["BIM_N", "FGSM_N", "MIM_N", "PGD_N"]
    for e in entries.values():
        assert e["complete"] and e["bytes"] > 0
        if e["kind"] == "pool":
            assert e["samples"] == 256 and e["created"] > 0


def test_identical_settings_never_regenerate(store):
    before = {e["attack"]: k for k, e in cache_ls(store).items() if e["kind"] == "pool"}
    again = mid_pool(store, store.parent / "out", ["PGD_N", "MIM_N"])  # identical settings: nothing new
    assert "pool: generating" not in again.stderr and "starting a local Ray instance" not in again.stderr
    assert {e["attack"]: k for k, e in cache_ls(store).items() if e["kind"] == "pool"} == before


def test_verify_names_a_corrupted_chunk(store):
    clean = mid("cache", "verify", "--store", str(store))
    # A dataset, 2 checkpoints, 4 pools of 4 shards with views and targets: PGD_N keeps the digits
    # config's 4 random-start variants, the deterministic MIM_N, FGSM_N and BIM_N one each.
    assert clean.stdout.strip().splitlines()[-1] == \
        f"7 entries, 4 pools, {4 * 2 * (4 + 1 + 1 + 1)} chunks verified, 0 corrupt, 0 not committed yet"
    key = next(k for k, e in cache_ls(store).items() if e.get("attack") == "PGD_N")
    chunk = Path(store) / "pools" / key / "delta" / "c" / "0" / "2" / "0" / "0" / "0"  # variant 0, shard 2
    original = chunk.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    try:
        result = mid("cache", "verify", key, "--store", str(store), check=False)
        assert result.returncode == 1
        assert f"pool {key} shard 2 array delta" in result.stderr
        assert ", 1 corrupt," in result.stdout.strip().splitlines()[-1]
        as_json = json.loads(mid("cache", "verify", "--store", str(store), "--json", check=False).stdout)
        assert [e["key"] for e in as_json if not e["ok"]] == [key]
    finally:
        chunk.write_bytes(original)
    assert mid("cache", "verify", "--store", str(store)).returncode == 0


def test_gc_removes_leftovers_and_unreferenced_entries(store):
    # A leftover of a killed generation: arrays created, nothing committed.
    pools.create_pool(str(store), "pool-leftover", num_samples=256, image_shape=(1, 16, 16), variants=1,
                      shard_size=64, compressor="zstd", encoding="uint8", attrs={"attack": "PGD_T"})
    tmp_file = Path(store) / "results" / "x.json.tmp-0123"
    tmp_file.parent.mkdir(exist_ok=True)
    tmp_file.write_text("{")
    # Resume state of a training stage whose driver died.
    train_run = Path(store) / "train" / "mid-mid-0123456789abcdef0123"
    (train_run / "checkpoint_2026-01-01_00-00-00").mkdir(parents=True)
    (train_run / "checkpoint_2026-01-01_00-00-00" / "state.pt").write_bytes(b"x" * 100)
    # Each run of the config keeps its own ref (issue 22): the grown pool's run still names
    # FGSM_N and BIM_N, until its ref is dropped.
    mid_pool(store, store.parent / "out", ["PGD_N", "MIM_N"])
    grown = [ident for ident, ref in runs.read_refs(str(store)).items() if "FGSM_N" in ref["keys"].get("pools", {})]
    assert len(grown) == 1 and grown[0].startswith("digits-pool-")
    kept = mid("cache", "gc", "--store", str(store), "--dry-run").stdout
    assert "not referenced by any run" not in kept, kept
    dry = mid("cache", "gc", "--store", str(store), "--dry-run", "--ref", grown[0]).stdout
    assert f"would drop ref {grown[0]}" in dry
    assert "pool-leftover (uncommitted leftover" in dry and "temporary file" in dry
    assert "mid-mid-0123456789abcdef0123 (resume state of a training run no ref names" in dry
    assert dry.count("not referenced by any run") == 2
    assert "pool-leftover" in cache_ls(store)  # a dry run removes nothing
    mid("cache", "gc", "--store", str(store), "--yes", "--ref", grown[0])
    left = cache_ls(store)
    assert sorted(e["attack"] for e in left.values() if e["kind"] == "pool") == ["MIM_N", "PGD_N"]
    assert not tmp_file.exists() and not train_run.exists()
    assert mid("cache", "verify", "--store", str(store)).returncode == 0
