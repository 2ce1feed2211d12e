"""Progress bars from inside Ray workers, drawn by the driver (``tqdm_ray``)."""

from __future__ import annotations

import logging


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


def epoch_bar(desc: str, total: int, show: bool):
    """A bar on rank 0 only (one bar per run, not one per worker)."""
    if not show:
        return _NoBar()
    from ray.experimental.tqdm_ray import tqdm

    return tqdm(total=total, desc=desc, unit="epoch")


def quiet_ray_train() -> None:
    """Ray Train logs every report() at INFO; the epoch bar already says it."""
    from workers.ray_compat import train_context_logger_name

    # Ray Train's worker context logs under its file's path, outside the "ray.train" hierarchy.
    for name in ("ray.train", "ray.train.v2", train_context_logger_name()):
        if name is not None:
            logging.getLogger(name).setLevel(logging.WARNING)


def quiet_local_ray_worker() -> None:
    """Worker set-up hook of a local Ray instance (started without a dashboard).

    Ray Train's placement-group cleaner asks the State API, which needs the dashboard, once
    a second whether the training controller lives; without one it logs a warning each time
    (hundreds in the digits demo) and can do nothing else. On a local instance the driver's
    exit takes the whole instance down anyway, so its warnings are noise: errors only.
    """
    from workers.ray_compat import PLACEMENT_GROUP_CLEANER_LOGGER

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
