"""What every stage of a run shares: the config, the store, the output folder, a lazily
started Ray, and the record of each stage's key, cache hit and seconds."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline.config import RunConfig
from storage import checkpoints, fs


class PipelineError(RuntimeError):
    """A failure the user can act on; the CLI prints its message without a traceback."""


@dataclass
class StageRecord:
    key: str
    cache_hit: bool
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "cache_hit": self.cache_hit, "seconds": round(self.seconds, 3), **self.details}


class RunContext:
    def __init__(self, cfg: RunConfig, out_dir: Path):
        self.cfg = cfg
        self.out_dir = out_dir
        # Ray workers do not share the driver's working directory: a relative local store
        # path must be made absolute before any worker sees it.
        url = cfg.store.url.rstrip("/")
        self.root = os.path.abspath(url) if "://" not in url else url
        self.stages: dict[str, StageRecord] = {}
        self._ray_started = False

    def say(self, message: str) -> None:
        print(f"[mid] {message}", file=sys.stderr, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a stage; the body fills ``record['key']`` and ``record['cache_hit']``."""
        record: dict[str, Any] = {"details": {}}
        start = time.perf_counter()
        yield record
        self.stages[name] = StageRecord(record["key"], record["cache_hit"], time.perf_counter() - start,
                                        record["details"])
        verb = "reused cached" if record["cache_hit"] else "built"
        self.say(f"{name}: {verb} {record['key']} ({self.stages[name].seconds:.1f} s)")

    def ensure_ray(self) -> None:
        """Start (or join) Ray only when a stage has real work: a fully cached run needs none."""
        if self._ray_started:
            return
        import ray
        import ray.data

        if not ray.is_initialized():
            # `ray job submit` sets RAY_ADDRESS: join that cluster instead of starting one.
            address = self.cfg.ray.address or os.environ.get("RAY_ADDRESS")
            if address is None:
                self.say("starting a local Ray instance")
                # A laptop run: loopback only, no dashboard.
                ray.init(num_cpus=self.cfg.ray.num_cpus, include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=True)
            else:
                self.say(f"joining Ray at {address}")
                ray.init(address=address, log_to_driver=True)
        ray.data.DataContext.get_current().enable_progress_bars = False
        self._ray_started = True

    def ray_train_storage(self) -> tuple[str, Any]:
        """(storage_path, storage_filesystem) for Ray Train: the store's ``train/`` folder.

        Ray Train reads and writes through pyarrow; a remote store's fsspec file system is
        handed to it through pyarrow's FSSpecHandler, so the same credentials and endpoint
        serve checkpoints and data.
        """
        url = checkpoints.train_runs_url(self.root)
        if fs.is_local(url):
            path = url.removeprefix("file://")
            os.makedirs(path, exist_ok=True)
            return path, None
        import pyarrow.fs

        filesystem, path = fs.filesystem(url)
        return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem))
