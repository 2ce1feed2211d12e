"""Every failure of a command becomes one line on the terminal; its traceback goes to a log.

Expected faults (a data file that cannot be read, a store that refuses a write, missing
credentials, an endpoint that does not answer, a full disk) are recognised wherever they
happened: in the driver, or inside a Ray task, actor or Ray Train worker, where Ray wraps
them (``RayTaskError.cause``, Ray Train's ``worker_failures``). Anything else is reported
as unexpected, with the log that holds its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Iterator

from storage.readers.base import DataFileError
from storage.store import StoreError, one_line

LOG_FOLDER = "logs"


class PipelineError(RuntimeError):
    """A failure the user can act on; the CLI prints its message without a traceback."""


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and everything it wraps, breadth first, each once."""
    queue, seen = [error], set()
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        queue += [current.__cause__, current.__context__, getattr(current, "cause", None)]
        for name in ("worker_failures", "_worker_failures"):
            failures = getattr(current, name, None)
            if isinstance(failures, dict):
                queue += list(failures.values())
        for name in ("controller_failure", "training_failed_error"):
            queue.append(getattr(current, name, None))


def describe(error: BaseException, store: str | None = None) -> str | None:
    """One line for an expected fault, or None; ``store`` names the place when the fault does not."""
    for cause in causes(error):
        line = _describe_one(cause, store or "the store")
        if line:
            return line
    return None


def _describe_one(error: BaseException, store: str) -> str | None:
    if isinstance(error, (PipelineError, DataFileError, StoreError)):
        return one_line(error)
    name = type(error).__name__
    if name == "NoCredentialsError":
        return ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
                "(and FSSPEC_S3_ENDPOINT_URL for a non-AWS endpoint)")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionClosedError"):
        return f"cannot reach the storage endpoint ({one_line(error)}); check FSSPEC_S3_ENDPOINT_URL and the network"
    if isinstance(error, OSError):
        path = error.filename or ""
        if isinstance(error, PermissionError) or error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"permission denied: {path or one_line(error)}; fix its permissions or choose another --store/--out"
        if error.errno == errno.ENOSPC:
            return f"no space left on the device writing {path or store}; free space or choose another --store"
        if error.errno == errno.EDQUOT:
            return f"disk quota exceeded writing {path or store}; free space or choose another --store"
        if isinstance(error, FileNotFoundError) and path:
            return f"file not found: {path}"
    return None


def log_path(out_dir: Path | None) -> Path:
    """``OUT/logs/error-<time>.log``, or a new private folder (``mkdtemp``: mode 0700, a name no
    one can guess or plant a link at beforehand) when the run has none or it is unwritable."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"error-{stamp}-{os.getpid()}.log"
    if out_dir:
        try:
            (out_dir / LOG_FOLDER).mkdir(parents=True, exist_ok=True)
            path = out_dir / LOG_FOLDER / name
            path.touch()
            return path
        except OSError:
            pass
    try:
        path = Path(tempfile.mkdtemp(prefix="mid-logs-")) / name
        path.touch()
        return path
    except OSError:
        return Path(os.devnull)


def report(error: BaseException, out_dir: Path | None, debug: bool, store: str | None = None) -> int:
    """Print the one line (and with ``debug`` the traceback); returns the exit status."""
    text = "".join(traceback.format_exception(error))
    path = log_path(out_dir)
    try:
        path.write_text(text)
    except OSError:
        pass
    if debug:
        print(text, file=sys.stderr, end="")
    line = describe(error, store)
    if line is None:
        line = f"unexpected {type(error).__name__}: {one_line(error)}"
    print(f"error: {line} (traceback: {path})", file=sys.stderr)
    return 1
