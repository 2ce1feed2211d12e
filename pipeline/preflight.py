"""Checks of a run's inputs before Ray starts: `mid validate` prints them, `mid run` and
`mid pool` refuse to start while any fails.

The config itself is already valid here (pydantic); this looks at what it points to: the
data files (present, headers parse, lengths match what the headers promise), and the store
(a store or a new location, writable; for object stores, credentials and a bucket that
answers). Each problem is one line naming the file or URL and what to do.
"""

from __future__ import annotations

import os

from pipeline.config import RunConfig
from storage.readers import reader
from storage import store as store_location


def problems(cfg: RunConfig) -> list[str]:
    found = [f"data.path: {p}" for p in data_problems(cfg)]
    pretrained = cfg.models.pretrained
    if pretrained and not os.path.isfile(pretrained):
        found.append(f"models.pretrained: {pretrained}: no such file")
    found += store_location.probe_problems(cfg.store.url)  # each names the store already
    return found


def data_problems(cfg: RunConfig) -> list[str]:
    return reader(cfg.data.source).problems(cfg.data.path)
