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
    for name in ("ray.train", "ray.train.v2"):
        logging.getLogger(name).setLevel(logging.WARNING)
