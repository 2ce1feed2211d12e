"""What every stage of a run shares: the config, the store, the output folder, a lazily
started Ray, the record of each stage's key, cache hit and seconds, and the run's claims
on the store: its ref and lease (what gc keeps) and the per-key build locks (what keeps
two runs on one store from building the same thing twice)."""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from pipeline.config import RunConfig
from pipeline.errors import PipelineError
from storage import locks, runs
from storage import store as store_location

T = TypeVar("T")
N = TypeVar("N")  # what names an entry within a stage: a model kind, an attack, a table cell


@dataclass
class StageRecord:
    key: str
    cache_hit: bool
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "cache_hit": self.cache_hit, "seconds": round(self.seconds, 3), **self.details}


def run_ref_id(cfg: RunConfig, name: str | None = None) -> str:
    """The ref of a run of ``cfg``: one per run of a config (another --set is another ref,
    never a replacement). Where it runs (store, Ray) is not part of what it computes."""
    return runs.ref_id(name or cfg.name, cfg.model_dump(mode="json", exclude={"store", "ray"}))


class RunContext:
    """One run on one store; use it as a context manager so its ref and lease are closed."""

    def __init__(self, cfg: RunConfig, out_dir: Path, ref_name: str | None = None, verbose: bool = False):
        self.cfg = cfg
        self.out_dir = out_dir
        self.verbose = verbose  # Ray's own output on the terminal, not only in OUT/logs/ray.log
        # A relative local path becomes absolute: Ray workers do not share the driver's
        # working directory. Nothing is touched until the run opens the store.
        self.root = store_location.check_url(cfg.store.url)
        self.ref_name = ref_name or cfg.name
        self.ref_id = run_ref_id(cfg, self.ref_name)
        self.stages: dict[str, StageRecord] = {}
        self.claims: dict[str, Any] = {}
        self._ray_started = False
        self.lease: runs.Lease | None = None
        self.label = ""  # before each console line: a sweep's trial says which it is

    def open(self) -> "RunContext":
        """Open (or create) the store, refusing a location that is not one; start the run's
        lease and write its ref."""
        store_location.open_or_create(self.root)
        self.lease = runs.Lease(self.root, self.ref_id, on_wait=lambda: self.say(
            f"waiting: mid cache gc is cleaning the store {self.root}")).start()
        self.say(f"ref {self.ref_id} in {self.root}")
        runs.write_ref(self.root, self.ref_id, {}, "running", self.lease.run_id, name=self.ref_name)
        return self

    def close(self, status: str) -> None:
        try:
            runs.write_ref(self.root, self.ref_id, self.claims, status, self.lease.run_id, name=self.ref_name)
        finally:
            self.lease.release()

    def __enter__(self) -> "RunContext":
        return self.open()

    def __exit__(self, kind, error, tb) -> None:
        self.close("finished" if kind is None else
                   "interrupted" if issubclass(kind, KeyboardInterrupt) else "failed")

    def claim(self, label: str, key: Any) -> None:
        """Name ``key`` (a key, or a dict of them) in the run's ref and lease before using it,
        so gc keeps it while the run lives and, if the run is interrupted, until its ref goes."""
        self.claims[label] = key
        if self.lease is not None:  # an opened run (benchmarks and tests may use stages without one)
            runs.write_ref(self.root, self.ref_id, self.claims, "running", self.lease.run_id, name=self.ref_name)
            self.lease.claim(label, key)

    def reuse_or_build(self, label: str, key: str, find: Callable[[], T | None],
                       build: Callable[[], T]) -> tuple[T, bool]:
        """(the entry, whether it was reused): ``reuse_or_build_many`` of one key."""
        found, built = self.reuse_or_build_many({label: key}, {label: key}, lambda _: find(),
                                                lambda _: {label: build()})
        return found[label], not built

    def reuse_or_build_many(self, claims: dict[str, Any], keys: dict[N, str], find: Callable[[str], T | None],
                            build: Callable[[list[N]], dict[N, T]],
                            on_found: Callable[[list[N]], None] | None = None) -> tuple[dict[N, T], list[N]]:
        """(every entry by name, the names built): every stage's one way to the store.

        Claim ``claims`` (label: key or dict of keys) in the run's ref and lease, ``find`` each
        of ``keys``, then take the build locks of the missing ones and find them again:
        another run may have built some while this one waited. ``on_found`` hears which were
        found in the store; ``build(names)`` builds and commits the rest, returning their
        entries. Nothing is committed here: a stage commits its own kind of entry.
        """
        for label, claimed in claims.items():
            self.claim(label, claimed)
        entries = {name: find(key) for name, key in keys.items()}
        missing = [name for name, entry in entries.items() if entry is None]
        built: list[N] = []
        with self.build_locks([keys[name] for name in missing]):
            entries.update({name: find(keys[name]) for name in missing})
            found = [name for name, entry in entries.items() if entry is not None]
            if on_found is not None and found:
                on_found(found)
            built = [name for name in missing if entries[name] is None]
            if built:
                made = build(built)
                entries.update({name: made[name] for name in built})
        return entries, built

    @contextmanager
    def build_locks(self, keys: list[str]) -> Iterator[None]:
        """Hold the build locks of ``keys`` (taken in sorted order: two runs never deadlock)."""
        with ExitStack() as held:
            for key in sorted(keys):
                held.enter_context(locks.build_lock(self.root, key, on_wait=lambda key=key: self.say(
                    f"waiting: another run is building {key} on this store; it will be reused")))
            yield

    def say(self, message: str) -> None:
        print(f"[mid] {self.label}{message}", file=sys.stderr, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a stage; the body fills ``record['key']`` and ``record['cache_hit']``."""
        record: dict[str, Any] = {"details": {}}
        start = time.perf_counter()
        yield record
        self.record_stage(name, record["key"], record["cache_hit"], time.perf_counter() - start, record["details"])

    def record_stage(self, name: str, key: str, cache_hit: bool, seconds: float, details: dict[str, Any]) -> None:
        """Record (and say) a stage timed elsewhere, e.g. one of several models trained together."""
        self.stages[name] = StageRecord(key, cache_hit, seconds, details)
        verb = "reused cached" if cache_hit else "built"
        self.say(f"{name}: {verb} {key} ({seconds:.1f} s)")

    def ensure_ray(self) -> None:
        """Start (or join) Ray only when a stage has real work: a fully cached run needs none."""
        if self._ray_started:
            return
        import ray
        import ray.data

        from pipeline.ray_runtime import connect

        if not ray.is_initialized():
            connect(self.cfg, self.out_dir, self.verbose, self.say)
        ray.data.DataContext.get_current().enable_progress_bars = False
        self._ray_started = True
        self.check_gpus(ray.cluster_resources().get("GPU", 0))

    def check_gpus(self, available: float) -> None:
        """GPU settings the cluster cannot meet would leave actors and workers waiting forever."""
        r = self.cfg.ray
        wanted = {"ray.use_gpu": 1.0 if r.use_gpu else 0.0, "ray.gpus_per_actor": r.gpus_per_actor}
        for setting, gpus in wanted.items():
            if gpus > available:
                raise PipelineError(f"{setting}: asks for {gpus:g} GPU(s) per worker, but the Ray cluster has "
                                    f"{available:g}; set {setting} to {'false' if setting == 'ray.use_gpu' else 0} "
                                    f"or run on a cluster with GPUs")

    def actor_options(self) -> dict[str, Any]:
        """Ray options of a stage's pool or evaluation actors.

        Scheduled by the cluster, not inside the placement group of whatever runs the stage:
        in ``mid sweep`` that is a Ray Tune trial, whose group holds no CPU for them, and Ray
        would otherwise put them there (Tune captures its trials' child tasks)."""
        r = self.cfg.ray
        return {"num_cpus": r.cpus_per_actor, "num_gpus": r.gpus_per_actor, "scheduling_strategy": "DEFAULT"}
