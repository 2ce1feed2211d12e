"""The pool store: one Zarr group per (attack, source model, dataset split, settings) key.

Layout under ``<store>/pools/<key>/`` (storage/FORMAT.md has the full description)::

    adv | delta   (K, N, C, H, W)  K random-start variants, one chunk = (1, shard_size, C, H, W)
                  uint8 images (encoding "uint8") or int8 deltas against the clean image in
                  1/255 units (encoding "int8_delta")
    target        int64 (K, N)     target labels of a targeted attack, -1 when untargeted
    commits/shard-00003.json       one record per committed shard: range, sha256 per chunk,
                                   success rates before and after quantization, settings
    manifest.json                  written once every shard is committed (= complete)

A shard is a contiguous range of samples aligned to chunk boundaries; its arrays are
written first and its commit record last, so a reader never trusts a half-written shard.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from storage import fs
from storage.datasets import DatasetReader
from storage.keys import sha256_bytes

# zarr warns each time it builds a numcodecs codec (lzma) from metadata; FORMAT.md says it once.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

FORMAT_VERSION = 2  # 2: int8_delta encoding, one sha256 per chunk in commit records
COMPRESSORS = ("zstd", "lzma", "blosc", "none")
ENCODINGS = {
    "uint8": {"array": "adv", "dtype": "uint8",
              "decode": "x = adv[k, i] / 255 (float in [0, 1])"},
    "int8_delta": {"array": "delta", "dtype": "int8",
                   "decode": "x = (clean[i] + step * delta[k, i]) / 255, clean = datasets/<dataset_key>/<split>/images"},
}
INT8_MAX_EPS = 127 / 255  # the largest ε whose deltas fit int8 exactly


def pool_url(root: str, key: str) -> str:
    return fs.join(root, "pools", key)


def _commit_url(root: str, key: str, shard: int) -> str:
    return fs.join(pool_url(root, key), "commits", f"shard-{shard:05d}.json")


def _codec(compressor: str):
    if compressor == "zstd":
        # Pools are written once at attack speed (~100 KB/s) and read many times: the slowest,
        # strongest zstd level costs nothing visible to write and decompresses as fast as level 3.
        return [zarr.codecs.ZstdCodec(level=19)]
    if compressor == "lzma":
        # Smallest pools (context modelling beats zstd on deltas) at slower reads; a numcodecs
        # codec, outside the Zarr v3 spec: other readers need numcodecs (storage/FORMAT.md).
        import numcodecs.zarr3

        return [numcodecs.zarr3.LZMA(preset=9)]
    if compressor == "blosc":
        return [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]
    if compressor == "none":
        return None
    raise ValueError(f"unknown compressor {compressor!r} (allowed: {', '.join(COMPRESSORS)})")


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def ball_radius(eps: float) -> int:
    """ε in whole grey levels: the largest integer delta that stays inside the ε-ball."""
    return int(np.floor(eps * 255 + 1e-6))


def quantize(adv: np.ndarray, clean_u8: np.ndarray, eps: float | None, step: int = 1) -> np.ndarray:
    """Round an adversarial float image to uint8 and project it back into the ε-ball.

    The delta against the clean image is rounded to a multiple of ``step`` grey levels
    (1: plain uint8 rounding; larger steps trade exactness for size, and the pool records
    the attack's success before and after). Rounding alone can leave the ball (ε = 0.3 is
    76.5/255), so the delta is clipped to the largest multiple of ``step`` inside it, then,
    staying on the grid, to the valid pixel range. An attack that is not L∞-bounded (CW, JSMA:
    ``eps`` None) is only rounded and kept in range.
    """
    clean = clean_u8.astype(np.int32)
    limit = 255 if eps is None else ball_radius(eps) // step
    code = np.clip(np.rint((adv.astype(np.float64) * 255.0 - clean) / step), -limit, limit)
    code = np.clip(code, np.ceil(-clean / step), np.floor((255 - clean) / step))
    return (clean + code.astype(np.int32) * step).astype(np.uint8)


def check_invariants(adv_u8: np.ndarray, clean_u8: np.ndarray, eps: float) -> None:
    """Every stored sample lies in the ε-ball around its clean image (uint8 keeps [0, 255])."""
    if adv_u8.dtype != np.uint8:
        raise TypeError(f"adversarial views must be uint8 images, got {adv_u8.dtype}")
    radius = ball_radius(eps)
    worst = np.abs(adv_u8.astype(np.int32) - clean_u8.astype(np.int32)).max(initial=0)
    if worst > radius:
        raise ValueError(f"adversarial view leaves the ε-ball: {worst}/255 > {radius}/255")


def encode(adv_u8: np.ndarray, clean_u8: np.ndarray, encoding: str, step: int = 1) -> np.ndarray:
    """uint8: the images; int8_delta: (adv − clean) / step, exact for deltas on the step grid."""
    if encoding == "uint8":
        return adv_u8
    delta = adv_u8.astype(np.int16) - clean_u8.astype(np.int16)
    if (delta % step).any():
        raise ValueError(f"deltas are not multiples of delta_step={step}; quantize with the same step")
    code = delta // step
    if np.abs(code).max(initial=0) > 127:
        raise ValueError("int8_delta cannot hold a delta beyond 127 steps; use encoding uint8")
    return code.astype(np.int8)


def decode(stored: np.ndarray, clean_u8: np.ndarray | None, encoding: str, step: int = 1) -> np.ndarray:
    if encoding == "uint8":
        return stored
    return (clean_u8.astype(np.int16) + stored.astype(np.int16) * step).astype(np.uint8)


def create_pool(root: str, key: str, *, num_samples: int, image_shape: tuple[int, ...], variants: int,
                shard_size: int, compressor: str, encoding: str, attrs: dict[str, Any], delta_step: int = 1) -> None:
    """Create the pool's arrays once; an existing pool with the same key is kept as it is."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r} (allowed: {', '.join(ENCODINGS)})")
    spec = ENCODINGS[encoding]
    group = zarr.open_group(fs.zarr_store(pool_url(root, key)), mode="a")
    if spec["array"] in group and "target" in group:
        return
    group.attrs.update({"format_version": FORMAT_VERSION, "encoding": {"kind": encoding, "step": delta_step, **spec},
                        "num_samples": num_samples, "shard_size": shard_size, "variants": variants,
                        "created": time.time(), **attrs})
    group.create_array(spec["array"], shape=(variants, num_samples, *image_shape), dtype=spec["dtype"],
                       chunks=(1, shard_size, *image_shape), compressors=_codec(compressor),
                       fill_value=0, overwrite=True)
    group.create_array("target", shape=(variants, num_samples), dtype="int64",
                       chunks=(1, shard_size), compressors=_codec(compressor), fill_value=-1, overwrite=True)


def committed_shards(root: str, key: str) -> dict[int, dict[str, Any]]:
    filesystem, path = fs.filesystem(fs.join(pool_url(root, key), "commits"))
    if not filesystem.exists(path):
        return {}
    records = {}
    for name in filesystem.ls(path, detail=False):
        base = name.rsplit("/", 1)[-1]
        if base.startswith("shard-") and base.endswith(".json"):
            record = fs.read_json(fs.join(pool_url(root, key), "commits", base))
            if record is not None:
                records[record["shard"]] = record
    return records


def _chunk_hashes(stored: np.ndarray) -> list[str]:
    """sha256 of each variant's chunk of a shard, over its decoded-from-Zarr contents."""
    return [sha256_bytes(np.ascontiguousarray(chunk).tobytes()) for chunk in stored]


def write_shard(root: str, key: str, *, shard: int, start: int, stop: int, eps: float | None,
                adv_u8: np.ndarray, clean_u8: np.ndarray, targets: np.ndarray,
                stats: dict[str, Any]) -> dict[str, Any]:
    """Check, encode and write one shard (all variants), then commit it.

    L∞ attacks are checked against their ε-ball; every attack is checked for an exact round
    trip through the encoding (uint8 itself keeps pixels in range)."""
    if adv_u8.shape[1] != stop - start:
        raise ValueError(f"shard {shard}: {adv_u8.shape[1]} samples for range [{start}, {stop})")
    group = zarr.open_group(fs.zarr_store(pool_url(root, key)), mode="r+")
    encoding = group.attrs["encoding"]
    for variant in adv_u8:
        if eps is not None:
            check_invariants(variant, clean_u8, eps)
    kind, step = encoding["kind"], encoding.get("step", 1)
    stored = np.stack([encode(v, clean_u8, kind, step) for v in adv_u8])
    if not all(np.array_equal(decode(s, clean_u8, kind, step), v) for s, v in zip(stored, adv_u8)):
        raise ValueError(f"shard {shard}: encoding {encoding['kind']} does not round-trip")
    targets = targets.astype(np.int64)
    group[encoding["array"]][:, start:stop] = stored
    group["target"][:, start:stop] = targets
    record = {
        "shard": shard, "start": start, "stop": stop,
        "sha256": {encoding["array"]: _chunk_hashes(stored), "target": _chunk_hashes(targets)},
        "stats": stats, "attack": group.attrs.get("attack"), "settings": group.attrs.get("settings"),
        "committed": time.time(),
    }
    fs.write_json_atomic(_commit_url(root, key, shard), record)
    return record


def read_manifest(root: str, key: str) -> dict[str, Any] | None:
    return fs.read_json(fs.join(pool_url(root, key), "manifest.json"))


def read_attrs(root: str, key: str) -> dict[str, Any]:
    """A pool's group attributes, complete or not ({} when its group was never created)."""
    manifest = read_manifest(root, key)
    if manifest is not None:
        return manifest["attrs"]
    metadata = fs.read_json(fs.join(pool_url(root, key), "zarr.json")) or {}
    return metadata.get("attributes", {})


def finalize_pool(root: str, key: str, num_shards: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Mark the pool complete once every shard has a commit record."""
    records = committed_shards(root, key)
    missing = sorted(set(range(num_shards)) - set(records))
    if missing:
        raise RuntimeError(f"pool {key}: shards {missing[:10]} are not committed")
    group = zarr.open_group(fs.zarr_store(pool_url(root, key)), mode="r")
    manifest = {"key": key, "complete": True, "num_shards": num_shards, "attrs": dict(group.attrs),
                "completed": time.time(), **extra, "shards": [records[i] for i in range(num_shards)]}
    fs.write_json_atomic(fs.join(pool_url(root, key), "manifest.json"), manifest)
    return manifest


def expected_shards(manifest: dict[str, Any]) -> int:
    """How many shards a complete pool has: its manifest says, or its attributes imply."""
    if "num_shards" in manifest:
        return int(manifest["num_shards"])
    attrs = manifest["attrs"]
    return len(shard_ranges(int(attrs["num_samples"]), int(attrs["shard_size"])))


def uncommitted_shards(root: str, key: str, manifest: dict[str, Any] | None = None) -> list[int]:
    """Shards of a pool marked complete whose commit record is missing (only the names are
    listed: cheap enough for ``mid cache ls`` on an object store)."""
    manifest = read_manifest(root, key) if manifest is None else manifest
    if not manifest or not manifest.get("complete"):
        return []
    present = {int(name[6:11]) for name in fs.children(pool_url(root, key), "commits")
               if name.startswith("shard-") and name.endswith(".json") and name[6:11].isdigit()}
    return [shard for shard in range(expected_shards(manifest)) if shard not in present]


def uncommitted_problem(key: str, shards: list[int]) -> str:
    listed = ", ".join(str(s) for s in shards[:10]) + (" …" if len(shards) > 10 else "")
    return (f"pool {key}: shard{'s' if len(shards) > 1 else ''} {listed} not committed (no "
            f"commits/shard-{shards[0]:05d}.json), though its manifest marks the pool complete")


def verify_pool(root: str, key: str) -> tuple[list[str], int]:
    """Re-hash every committed chunk: (one line per problem naming pool, shard and array,
    the number of chunks checked). A pool marked complete must have every shard's commit
    record; its chunks are checked against the records its manifest copied."""
    group = zarr.open_group(fs.zarr_store(pool_url(root, key), read_only=True), mode="r")
    version = group.attrs.get("format_version")
    if version != FORMAT_VERSION:
        return [f"pool {key}: written in pool format version {version}; this version verifies {FORMAT_VERSION}"], 0
    manifest = read_manifest(root, key) or {}
    missing = uncommitted_shards(root, key, manifest)
    problems, chunks = ([uncommitted_problem(key, missing)] if missing else []), 0
    records = committed_shards(root, key)
    if manifest.get("complete"):
        records.update({record["shard"]: record for record in manifest.get("shards", [])})
    for shard, record in sorted(records.items()):
        for array, expected in record["sha256"].items():
            try:
                actual = _chunk_hashes(group[array][:, record["start"]:record["stop"]])
            except Exception as e:  # a chunk that no longer decompresses is corrupt too
                problems.append(f"pool {key} shard {shard} array {array}: unreadable ({type(e).__name__}: {e})")
                continue
            chunks += len(actual)
            for variant, (want, got) in enumerate(zip(expected, actual)):
                if want != got:
                    problems.append(f"pool {key} shard {shard} array {array} variant {variant}: "
                                    f"sha256 {got[:12]}… does not match the commit record {want[:12]}…")
    return problems, chunks


@dataclass
class PoolReader:
    """Decoded uint8 views of a complete pool (or, when asked, of its committed shards)."""

    root: str
    key: str
    attrs: dict[str, Any]
    committed: dict[int, dict[str, Any]]
    complete: bool

    @classmethod
    def open(cls, root: str, key: str, allow_partial: bool = False) -> "PoolReader":
        manifest = read_manifest(root, key)
        if manifest is not None and manifest.get("complete"):
            return cls(root, key, manifest["attrs"], {s["shard"]: s for s in manifest["shards"]}, True)
        committed = committed_shards(root, key)
        if not allow_partial:
            raise RuntimeError(f"pool {key} is incomplete ({len(committed)} shards committed); "
                               f"run the pool stage to finish it, or read it with allow_partial=True")
        group = zarr.open_group(fs.zarr_store(pool_url(root, key), read_only=True), mode="r")
        return cls(root, key, dict(group.attrs), committed, False)

    @property
    def group(self) -> zarr.Group:
        return zarr.open_group(fs.zarr_store(pool_url(self.root, self.key), read_only=True), mode="r")

    @property
    def variants(self) -> int:
        return int(self.attrs["variants"])

    @property
    def encoding(self) -> str:
        return self.attrs["encoding"]["kind"]

    def sample_indices(self, start: int, stop: int) -> np.ndarray:
        """Indices in the dataset split of the pool's samples [start, stop): a pool of a seeded
        subset of the split (``attrs["indices"]``) holds them in that order."""
        indices = self.attrs.get("indices")
        return np.arange(start, stop) if indices is None else np.asarray(indices[start:stop], dtype=np.int64)

    def committed_ranges(self) -> list[tuple[int, int]]:
        return [(r["start"], r["stop"]) for _, r in sorted(self.committed.items())]

    def _check_committed(self, start: int, stop: int) -> None:
        if self.complete:
            return
        covered = sum(max(0, min(stop, hi) - max(start, lo)) for lo, hi in self.committed_ranges())
        if covered < stop - start:
            raise RuntimeError(f"pool {self.key}: samples [{start}, {stop}) are not all committed")

    def adv(self, variant: int, start: int, stop: int, clean_u8: np.ndarray | None = None) -> np.ndarray:
        """uint8 adversarial images of samples [start, stop); epoch e reads variant e mod K."""
        self._check_committed(start, stop)
        array = self.attrs["encoding"]["array"]
        stored = self.group[array][variant % self.variants, start:stop]
        if self.encoding == "int8_delta" and clean_u8 is None:
            dataset = DatasetReader.open(self.root, self.attrs["dataset_key"])
            clean_u8 = dataset.images(self.attrs["split"]).get_orthogonal_selection(
                (self.sample_indices(start, stop),))
        return decode(stored, clean_u8, self.encoding, self.attrs["encoding"].get("step", 1))
