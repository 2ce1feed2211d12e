"""Every use of a Ray internal, in one file: what the pipeline needs from Ray that Ray has no
public way to give. Each was read from Ray 2.60.0 (the version ``constraints.txt`` pins); a
Ray upgrade that moves one fails ``tests/test_ray_compat.py`` by name instead of breaking a
run quietly. Where the internal is only cosmetic (the console, log levels) a missing one
leaves Ray's own behaviour in place: louder, never broken.

In ``workers/`` because both layers use it: the driver (``pipeline.ray_runtime``,
``pipeline.console``) and the Ray workers' set-up (``workers.progress``).
"""

from __future__ import annotations

import importlib
import importlib.util
from contextlib import contextmanager
from typing import Callable, Iterator

# Ray Train v2's per-worker context logs every report() at INFO under its file's path, outside
# the "ray.train" logger hierarchy (ray/train/v2/_internal/execution/context.py, Ray 2.60.0).
TRAIN_CONTEXT_MODULE = "ray.train.v2._internal.execution.context"
# Ray Train v2's placement-group cleaner, whose logger warns once a second on an instance
# without a dashboard (ray/train/v2/_internal/execution/controller/placement_group_cleaner.py).
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


@contextmanager
def cluster_mode_off() -> Iterator[None]:
    """Ray's single-machine switch, in the driver's copy: Ray reads
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, at import, into
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` (Ray 2.60.0); off, ``ray.init`` keeps
    a loopback node address. The environment variable, set by the caller, reaches the
    processes Ray starts."""
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


def stop_auto_init() -> None:
    """No later Ray call in this driver may start a Ray instance of its own: Ray's public
    calls do when Ray is down (``ray._private.auto_init_hook.enable_auto_connect``, Ray
    2.60.0), and after Ctrl-C a Tune or Train thread made one between ``ray.shutdown`` and
    the driver's exit, leaving a second instance's dashboard behind."""
    from ray._private import auto_init_hook

    auto_init_hook.enable_auto_connect = False


def worker_bar_drawer() -> Callable[[str], None] | None:
    """The driver's function that draws a ``tqdm_ray`` bar from one line of worker output
    (``ray._private.worker.process_tqdm``, Ray 2.60.0), or None where this Ray has other
    internals."""
    try:
        from ray._private import worker as ray_worker

        return ray_worker.process_tqdm
    except (ImportError, AttributeError):
        return None


def replace_worker_print_handler(handle: Callable[[dict], None]) -> bool:
    """Put ``handle`` in place of the driver's printer of worker output; False (Ray's own
    printing stays) where this Ray has other internals. Ray has no public switch that drops
    the workers' lines but keeps tqdm_ray's bars: both travel on worker stdout
    (``ray._private.worker.global_worker_stdstream_dispatcher``, handler ``ray_print_logs``,
    Ray 2.60.0)."""
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
    except (ImportError, AttributeError):
        return False
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("mid_console", handle)
    return True


def train_context_logger_name() -> str | None:
    """The logger name of Ray Train's worker context (its file path), or None if it moved."""
    try:
        return importlib.import_module(TRAIN_CONTEXT_MODULE).__file__
    except ImportError:
        return None


def missing() -> list[str]:
    """The internals above that this Ray no longer has: what a Ray upgrade must fix here."""
    found = []
    checks = {
        "ray._private.ray_constants.ENABLE_RAY_CLUSTER": ("ray._private.ray_constants", "ENABLE_RAY_CLUSTER"),
        "ray._private.auto_init_hook.enable_auto_connect": ("ray._private.auto_init_hook", "enable_auto_connect"),
        "ray._private.worker.global_worker_stdstream_dispatcher": ("ray._private.worker",
                                                                   "global_worker_stdstream_dispatcher"),
        "ray._private.worker.process_tqdm": ("ray._private.worker", "process_tqdm"),
    }
    for name, (module, attribute) in checks.items():
        try:
            if not hasattr(importlib.import_module(module), attribute):
                found.append(name)
        except ImportError:
            found.append(name)
    for module in (TRAIN_CONTEXT_MODULE, PLACEMENT_GROUP_CLEANER_LOGGER):
        try:
            if importlib.util.find_spec(module) is None:
                found.append(module)
        except ImportError:
            found.append(module)
    return found
