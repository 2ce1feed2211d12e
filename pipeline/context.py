"""What every stage of a run shares: the config, the store, the output folder, a lazily
started Ray, the record of each stage's key, cache hit and seconds, and the run's claims
on the store: its ref and lease (what gc keeps) and the per-key build locks (what keeps
two runs on one store from building the same thing twice)."""

from __future__ import annotations

import os
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from pipeline.config import RunConfig
from storage import checkpoints, fs, locks, runs
from storage import store as store_location

T = TypeVar("T")
N = TypeVar("N")  # what names an entry within a stage: a model kind, an attack, a table cell


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


LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on the loopback interface (a local run's Ray listens there only)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# Ray's switch between "a single machine" and "a node of a cluster". Off (Ray's default on
# macOS and Windows), Ray keeps a loopback node address; on (its default on Linux),
# ``ray.init`` replaces ``_node_ip_address="127.0.0.1"`` by the machine's own address
# (ray/_private/worker.py, services.resolve_ip_for_localhost and get_node_ip_address),
# and every Ray process then listens on all interfaces or that address.
_RAY_CLUSTER_MODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _ray_env(**values: str) -> Iterator[None]:
    """Set environment variables for the Ray processes started inside, then restore them."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def single_machine_ray() -> Iterator[None]:
    """Ray started inside keeps the loopback node address, so all its processes listen on
    127.0.0.1 only.

    Ray reads the setting from the environment once, when it is imported, so the driver's
    copy is switched here too; the environment variable reaches the processes Ray starts
    (GCS, raylet, and through the raylet the agents and workers), which read it themselves.
    """
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _ray_env(**{_RAY_CLUSTER_MODE_ENV: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


# Ray Train's controller checks on its workers every 2 s by default, and a stage waits for
# those checks as it starts, reports epochs and finishes. A local run's stages are short, so
# it checks every 0.2 s: `mid pool` on 512 digits with 3-epoch baseline and teacher took
# 62-66 s at 2 s and 49-50 s at 0.2 s (baseline 28-32 -> 23 s, teacher 22-23 -> 15 s; two
# runs each, alternating). Large runs on a cluster keep Ray's default (it is set per worker
# environment, and their epochs are minutes).
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_INTERVAL_S = "0.2"


def start_local_ray(num_cpus: int | None) -> None:
    """A laptop run's own Ray instance, which its workers can always find again, reachable
    from this machine only.

    With two Ray instances on one machine, code inside a worker that looks Ray up without an
    address (Ray Train's placement-group cleaner does) finds both and fails with "Found
    multiple active Ray instances". So the GCS port is chosen here, and every worker of the
    job gets that address in ``RAY_ADDRESS``.

    Every listening socket of the instance (GCS, raylet, core workers, dashboard and runtime
    env agents, metrics servers) is bound to 127.0.0.1; see ``single_machine_ray``. Its
    workers inherit that setting from the raylet, which is also what keeps the loopback
    ``RAY_ADDRESS`` they are given from being rewritten to the machine's address. Training
    stages keep torch.distributed's sockets on loopback too (``workers.loopback_torch``).
    """
    import ray

    port = free_port()
    address = f"{LOOPBACK}:{port}"
    # RAY_GCS_SERVER_PORT is read once, when the head node starts; the raylet passes the
    # rest of this environment on to every worker, Ray Train's controller included.
    train_poll = {TRAIN_POLL_ENV: TRAIN_POLL_INTERVAL_S} if TRAIN_POLL_ENV not in os.environ else {}
    with single_machine_ray(), _ray_env(RAY_GCS_SERVER_PORT=str(port), **train_poll):
        # address="local": a new instance, always. Without an address Ray joins the instance
        # named in /tmp/ray/ray_current_cluster, and a killed instance leaves that file behind:
        # the run then retried a dead GCS for ever instead of starting its own.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK,
                 log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_ADDRESS": address},
                              "worker_process_setup_hook": "workers.progress.quiet_local_ray_worker"})


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

        if not ray.is_initialized():
            if not self.verbose:
                from pipeline.console import LOG_NAME, route_ray_output

                route_ray_output(self.out_dir / "logs" / LOG_NAME)
                self.say(f"Ray's own output goes to {self.out_dir / 'logs' / LOG_NAME} (--verbose shows it here)")
            # `ray job submit` sets RAY_ADDRESS: join that cluster instead of starting one.
            address = self.cfg.ray.address or os.environ.get("RAY_ADDRESS")
            if address is None:
                self.say("starting a local Ray instance")
                start_local_ray(self.cfg.ray.num_cpus)
            else:
                self.say(f"joining Ray at {address}")
                ray.init(address=address, log_to_driver=True)
            if not self.verbose:
                from pipeline.console import route_worker_lines

                route_worker_lines()
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
