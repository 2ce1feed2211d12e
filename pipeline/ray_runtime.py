"""Where the pipeline meets Ray: starting a laptop's own instance (loopback only) or
joining a cluster, a Ray fit that leaves Ctrl-C to the pipeline, and the Ray Data glue that
feeds the training workers. Running one Ray Train stage is ``pipeline.training``."""

from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.config import RunConfig

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
    from workers.ray_compat import cluster_mode_off

    with cluster_mode_off(), _ray_env(**{_RAY_CLUSTER_MODE_ENV: "0"}):
        yield


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


def connect(cfg: RunConfig, out_dir: Path, verbose: bool, say: Callable[[str], None]) -> None:
    """Start this run's own Ray instance, or join the cluster of ``ray.address`` (or of
    ``RAY_ADDRESS``, which `ray job submit` sets); Ray's own output goes to the run's log."""
    import ray

    if not verbose:
        from pipeline.console import LOG_NAME, route_ray_output

        route_ray_output(out_dir / "logs" / LOG_NAME)
        say(f"Ray's own output goes to {out_dir / 'logs' / LOG_NAME} (--verbose shows it here)")
    # `ray job submit` sets RAY_ADDRESS: join that cluster instead of starting one.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address is None:
        say("starting a local Ray instance")
        start_local_ray(cfg.ray.num_cpus)
    else:
        say(f"joining Ray at {address}")
        ray.init(address=address, log_to_driver=True)
    # Once connected, nothing in this driver may start a Ray instance of its own. Ray's
    # public calls start one (with the full dashboard) when Ray is down, and after Ctrl-C a
    # Tune or Train thread still running here made such a call between ``ray.shutdown`` and
    # the driver's exit: a sweep left that second instance's dashboard processes behind it.
    from workers.ray_compat import stop_auto_init

    stop_auto_init()
    if not verbose:
        from pipeline.console import route_worker_lines

        route_worker_lines()


def fit_off_the_main_thread(trainer, on_interrupt: Callable[[], None] | None = None) -> Any:
    """``trainer.fit()``, with Ctrl-C left to the pipeline.

    On the main thread, Ray Train replaces the SIGINT handler with its own, which aborts the
    run and then exits the process with a status that says nothing (and is never restored).
    Off the main thread it registers none, so Ctrl-C reaches this thread as
    KeyboardInterrupt: the run records itself as interrupted, keeps its last epoch
    checkpoint for the next run to resume from, and stops Ray. ``on_interrupt`` runs first
    (a Tune sweep parks its controller thread there, see ``pipeline.sweep.TuneThreadPark``).
    """
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread as is
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        if on_interrupt is not None:
            on_interrupt()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


OBJECT_STORE_SHARE = 0.25  # at most this share of the object store holds a cached dataset
READ_TASK_BYTES = 256 << 20  # bytes of rows per read task of a streamed dataset


def read_views(source):
    """A Ray Dataset over ``source``, kept in the object store when it fits comfortably.

    Streaming restarts the read pipeline every epoch, and the first batches of each epoch
    wait for it (14-24% of MID's step time on digits); a small dataset is read once and
    materialized instead. Larger ones keep streaming from the store, in read tasks of about
    ``READ_TASK_BYTES`` each so that a cluster reads in parallel, and in blocks that fit a
    small object store (``storage.datasource.TARGET_BLOCK_BYTES``).
    """
    import ray
    import ray.data

    from storage.datasource import TARGET_BLOCK_BYTES

    size = source.estimate_inmemory_data_size()
    budget = OBJECT_STORE_SHARE * ray.cluster_resources().get("object_store_memory", 0)
    # Ray Data joins a read task's output into blocks of up to target_max_block_size (128 MiB
    # by default): with a few large blocks in flight a pool larger than the object store
    # spills whole. The datasets of this driver take the datasource's block size instead.
    context = ray.data.DataContext.get_current()
    context.target_max_block_size = TARGET_BLOCK_BYTES
    # Blocks in read order, to every training worker by size alone: the same rows reach the
    # same worker on every run (workers.reproducible). Ray Train copies this setting into
    # each split dataset's execution options when the trainer is made.
    context.execution_options.preserve_order = True
    if size <= budget:
        return ray.data.read_datasource(source, override_num_blocks=4).materialize()
    return ray.data.read_datasource(source, override_num_blocks=max(4, size // READ_TASK_BYTES))
