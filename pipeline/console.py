"""What a person sees during a run: stage lines, progress bars and the final tables.

Ray's own output goes to ``OUT/logs/ray.log`` instead: the workers' lines (Ray Train's
per-epoch reports, the Train controller's State API warnings, Ray Data's per-dataset
lines from its split coordinator) and the driver's ``ray*`` loggers. ``--verbose`` leaves
Ray's console output as it is.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

LOG_NAME = "ray.log"
STAGE_LINE = "[mid] "  # how the pipeline's own console lines start


def route_ray_output(log_path: Path) -> None:
    """Send the driver's Ray log records to ``log_path``; call before ``ray.init`` (which
    logs), then ``route_worker_lines`` after it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    quiet_driver_loggers(open(log_path, "a", buffering=1))  # noqa: SIM115 (lives as long as the driver)


def route_worker_lines() -> None:
    """Send the workers' lines to the log file too, keeping the progress bars that workers
    draw through ``ray.experimental.tqdm_ray``."""
    stream = _log_stream
    if stream is None:
        return
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    from workers.ray_compat import replace_worker_print_handler, worker_bar_drawer

    process_bar = worker_bar_drawer() if sys.stderr.isatty() else PlainBarLines(sys.stderr).draw
    if process_bar is None:  # Ray's own printing stays: louder, never broken
        return

    def handle(data: dict) -> None:
        source = data.get("actor_name") or data.get("task_name") or ""
        for line in data.get("lines", []):
            if RAY_TQDM_MAGIC in line:
                process_bar(line)
            elif line.startswith(STAGE_LINE):  # a stage line of a run inside a worker (a sweep's trial)
                print(line, file=sys.stderr, flush=True)
            else:
                stream.write(f"({source} pid={data.get('pid')}) {line}\n")

    replace_worker_print_handler(handle)


def progress(iterable=None, **kwargs):
    """A driver-side progress bar: tqdm's on a terminal; elsewhere (a log file, CI, `ray job
    logs`) a plain line at most every 10 s and one at the end, instead of tqdm's carriage
    returns, which a file keeps as one ever longer line."""
    from tqdm import tqdm

    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return tqdm(iterable, file=_PlainLines(sys.stderr), mininterval=10, ascii=True, ncols=100, **kwargs)


class _PlainLines:
    """A stream for tqdm that turns each redraw into one line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip("\n")
        if text.strip():
            self.stream.write(text.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


class PlainBarLines:
    """Worker bars for output that is not a terminal (a log file, CI, `ray job logs`): one
    line each time a bar advances or closes, instead of tqdm's redraws, which a file keeps
    as whole lines, several per update."""

    def __init__(self, stream):
        self.stream, self.shown = stream, {}  # bar uuid -> the count last printed

    def draw(self, line: str) -> None:
        try:
            state = json.loads(line[line.index("{"):])
        except ValueError:
            return  # not a whole bar state: nothing worth a line
        uuid, count = state.get("uuid"), state.get("x", 0)
        if uuid in self.shown and (self.shown[uuid] == count or self.shown[uuid] is None):
            return
        total = f"/{state['total']}" if state.get("total") else ""
        print(f"  {state.get('desc', '')}: {count}{total} {state.get('unit', '')}".rstrip(),
              file=self.stream, flush=True)
        self.shown[uuid] = None if state.get("closed") else count


def quiet_driver_loggers(stream=None) -> None:
    """Point every ``ray*`` logger that writes to the terminal at the log file instead.

    Ray Data and Ray Train configure their loggers when first imported, so a stage calls
    this again after importing them; it is idempotent."""
    global _log_stream
    _log_stream = stream or _log_stream
    if _log_stream is None:
        return
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not (name == "ray" or name.startswith("ray.")) or not isinstance(logger, logging.Logger):
            continue
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stderr,
                                                                                                sys.stdout):
                logger.removeHandler(handler)
                replacement = logging.StreamHandler(_log_stream)
                replacement.setFormatter(handler.formatter)
                replacement.setLevel(handler.level)
                logger.addHandler(replacement)


_log_stream = None


def close_worker_bars() -> None:
    """Close the bars of workers that have finished.

    A worker's last bar update (its close) travels on its stdout; when the worker exits
    before that line is shipped (seen on a busy machine), the driver keeps redrawing a
    stale bar under every later line. A stage that knows its workers are done clears them.
    """
    try:
        from ray.experimental import tqdm_ray

        manager = tqdm_ray.instance()
        if not manager.lock.acquire(timeout=1.0):  # the log thread is drawing: leave the bars be
            return
        try:
            for group in manager.bar_groups.values():
                for bar in group.bars_by_uuid.values():
                    bar.close()
                group.bars_by_uuid.clear()
        finally:
            manager.lock.release()
    except (ImportError, AttributeError):
        pass  # another Ray release: its own bar handling stays
