"""The pool store: one Zarr group per (attack, source model, dataset split, settings) key.

Layout under ``<store>/pools/<key>/``::

    adv       uint8 (K, N, C, H, W)  K random-start variants; chunk = (1, shard_size, C, H, W)
    target    int64 (K, N)           target labels of a targeted attack, -1 when untargeted
    commits/shard-00003.json         one record per committed shard (range, sha256, stats)
    manifest.json                    written once every shard is committed (= complete)

A shard is a contiguous range of samples aligned to chunk boundaries; its arrays are
written first and its commit record last, so a reader never trusts a half-written shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from storage import fs
from storage.keys import sha256_bytes

FORMAT_VERSION = 1
ENCODING = {"kind": "uint8", "decode": "x = adv / 255.0 (float in [0, 1])"}
COMPRESSORS = ("zstd", "blosc", "none")


def pool_url(root: str, key: str) -> str:
    return fs.join(root, "pools", key)


def _commit_url(root: str, key: str, shard: int) -> str:
    return fs.join(pool_url(root, key), "commits", f"shard-{shard:05d}.json")


def _codec(compressor: str):
    if compressor == "zstd":
        return [zarr.codecs.ZstdCodec(level=3)]
    if compressor == "blosc":
        return [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]
    if compressor == "none":
        return None
    raise ValueError(f"unknown compressor {compressor!r} (allowed: {', '.join(COMPRESSORS)})")


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def quantize(adv: np.ndarray, clean_u8: np.ndarray, eps: float) -> np.ndarray:
    """Round an adversarial float image to uint8 and project it back into the ε-ball.

    Rounding alone can leave the ball (ε = 0.3 is 76.5/255), so the delta is clipped to the
    largest whole number of grey levels inside it, then to the valid pixel range.
    """
    radius = int(np.floor(eps * 255 + 1e-6))
    delta = np.rint(adv.astype(np.float64) * 255.0) - clean_u8.astype(np.int32)
    delta = np.clip(delta, -radius, radius)
    return np.clip(clean_u8.astype(np.int32) + delta, 0, 255).astype(np.uint8)


def check_invariants(adv_u8: np.ndarray, clean_u8: np.ndarray, eps: float) -> None:
    """Every stored sample lies in the ε-ball around its clean image (uint8 keeps [0, 255])."""
    if adv_u8.dtype != np.uint8:
        raise TypeError(f"stored adversarial views must be uint8, got {adv_u8.dtype}")
    radius = int(np.floor(eps * 255 + 1e-6))
    worst = np.abs(adv_u8.astype(np.int32) - clean_u8.astype(np.int32)).max(initial=0)
    if worst > radius:
        raise ValueError(f"adversarial view leaves the ε-ball: {worst}/255 > {radius}/255")


def create_pool(root: str, key: str, *, num_samples: int, image_shape: tuple[int, ...],
                variants: int, shard_size: int, compressor: str, attrs: dict[str, Any]) -> None:
    """Create the pool's arrays once; an existing pool with the same key is kept as it is."""
    url = pool_url(root, key)
    group = zarr.open_group(fs.zarr_store(url), mode="a")
    if "adv" in group and "target" in group:
        return
    group.attrs.update({"format_version": FORMAT_VERSION, "encoding": ENCODING,
                        "shard_size": shard_size, "variants": variants, **attrs})
    group.create_array("adv", shape=(variants, num_samples, *image_shape), dtype="uint8",
                       chunks=(1, shard_size, *image_shape), compressors=_codec(compressor),
                       fill_value=0, overwrite=True)
    group.create_array("target", shape=(variants, num_samples), dtype="int64",
                       chunks=(1, shard_size), compressors=_codec(compressor),
                       fill_value=-1, overwrite=True)


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


def write_shard(root: str, key: str, *, shard: int, start: int, stop: int, eps: float,
                adv_u8: np.ndarray, clean_u8: np.ndarray, targets: np.ndarray,
                stats: dict[str, Any]) -> dict[str, Any]:
    """Write one shard (all variants), check it, then commit it. Returns the commit record."""
    if adv_u8.shape[1] != stop - start:
        raise ValueError(f"shard {shard}: {adv_u8.shape[1]} samples for range [{start}, {stop})")
    for variant in adv_u8:
        check_invariants(variant, clean_u8, eps)
    group = zarr.open_group(fs.zarr_store(pool_url(root, key)), mode="r+")
    group["adv"][:, start:stop] = adv_u8
    group["target"][:, start:stop] = targets.astype(np.int64)
    record = {
        "shard": shard, "start": start, "stop": stop,
        "sha256": {"adv": sha256_bytes(np.ascontiguousarray(adv_u8).tobytes()),
                   "target": sha256_bytes(np.ascontiguousarray(targets.astype(np.int64)).tobytes())},
        "stats": stats,
    }
    fs.write_json_atomic(_commit_url(root, key, shard), record)
    return record


def read_manifest(root: str, key: str) -> dict[str, Any] | None:
    return fs.read_json(fs.join(pool_url(root, key), "manifest.json"))


def finalize_pool(root: str, key: str, num_shards: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Mark the pool complete once every shard has a commit record."""
    records = committed_shards(root, key)
    missing = sorted(set(range(num_shards)) - set(records))
    if missing:
        raise RuntimeError(f"pool {key}: shards {missing[:10]} are not committed")
    group = zarr.open_group(fs.zarr_store(pool_url(root, key)), mode="r")
    manifest = {"key": key, "complete": True, "num_shards": num_shards,
                "attrs": dict(group.attrs), **extra,
                "shards": [records[i] for i in range(num_shards)]}
    fs.write_json_atomic(fs.join(pool_url(root, key), "manifest.json"), manifest)
    return manifest


@dataclass
class PoolReader:
    root: str
    key: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: str, key: str) -> "PoolReader":
        manifest = read_manifest(root, key)
        if manifest is None or not manifest.get("complete"):
            done = len(committed_shards(root, key))
            raise RuntimeError(f"pool {key} is incomplete ({done} shards committed); "
                               f"run the pool stage to finish it")
        return cls(root, key, manifest)

    @property
    def group(self) -> zarr.Group:
        return zarr.open_group(fs.zarr_store(pool_url(self.root, self.key), read_only=True), mode="r")

    @property
    def variants(self) -> int:
        return int(self.manifest["attrs"]["variants"])

    def adv(self, variant: int, start: int, stop: int) -> np.ndarray:
        return self.group["adv"][variant % self.variants, start:stop]
