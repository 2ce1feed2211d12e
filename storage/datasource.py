"""A Ray Data datasource over the Zarr stores: rows of one dataset split, with the
adversarial views of any number of pools aligned to them by sample index.

Columns: ``index`` (int64), ``label`` (int64), ``clean`` (uint8 C×H×W) and one uint8 column
per pool, named by its attack (``PGD_N``, ...). Every view of a row is the same sample.

Written by hand because Ray's ``read_zarr`` reads one array per dataset (and targets Zarr
format 2): aligned multi-array rows need one read task to open all the arrays of a range.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from storage.datasets import DatasetReader
from storage.pools import PoolReader

MIN_ROWS_PER_TASK = 256
# A block holds whole rows up to this many bytes (and at most MAX_BLOCK_ROWS rows): a fixed
# row count would make a 1,024-row block of 224-pixel images with four views 770 MB, more
# than a small object store holds; digits' rows still fill 1,024-row blocks.
TARGET_BLOCK_BYTES = 8 << 20
MAX_BLOCK_ROWS = 1024


class AlignedViewsDatasource(Datasource):
    def __init__(self, root: str, dataset_key: str, split: str,
                 pools: dict[str, str] | None = None, variant: int = 0,
                 block_rows: int | None = None, rows: tuple[int, int] | None = None):
        """``rows``: only the samples [start, stop) of the split (a worker's own range)."""
        super().__init__()
        self.root, self.dataset_key, self.split = root, dataset_key, split
        self.pools = dict(pools or {})
        self.variant = variant
        dataset = DatasetReader.open(root, dataset_key)
        for key in self.pools.values():
            PoolReader.open(root, key)  # refuse incomplete pools before any read task runs
        self.first, last = rows if rows is not None else (0, dataset.num_samples(split))
        self.num_rows = last - self.first
        self.row_bytes = int(np.prod(dataset.image_shape())) * (1 + len(self.pools)) + 16
        self.block_rows = block_rows or max(1, min(MAX_BLOCK_ROWS, TARGET_BLOCK_BYTES // self.row_bytes))

    def estimate_inmemory_data_size(self) -> int:
        return self.num_rows * self.row_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        tasks = max(1, min(parallelism, self.num_rows // MIN_ROWS_PER_TASK))
        bounds = np.linspace(0, self.num_rows, tasks + 1).astype(int)
        read_tasks = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            meta = BlockMetadata(num_rows=int(stop - start), size_bytes=int((stop - start) * self.row_bytes),
                                 exec_stats=None, input_files=None)
            read_tasks.append(ReadTask(self._reader(self.first + int(start), self.first + int(stop)), meta,
                                       per_task_row_limit=per_task_row_limit))
        return read_tasks

    def _reader(self, start: int, stop: int):
        root, dataset_key, split, pools = self.root, self.dataset_key, self.split, self.pools
        variant, block_rows = self.variant, self.block_rows

        def read() -> Iterator:
            dataset = DatasetReader.open(root, dataset_key)
            readers = {name: PoolReader.open(root, key) for name, key in pools.items()}
            for lo in range(start, stop, block_rows):
                hi = min(lo + block_rows, stop)
                images, labels = dataset.load(split, lo, hi)
                batch = {"index": np.arange(lo, hi, dtype=np.int64), "label": labels.astype(np.int64),
                         "clean": images}
                for name, reader in readers.items():
                    batch[name] = reader.adv(variant, lo, hi, clean_u8=images)
                yield BlockAccessor.batch_to_block(batch)

        return read
