"""Per-epoch training metrics of a run: ``<out>/metrics/<stage>.jsonl`` and TensorBoard
event files in ``<out>/tensorboard/<stage>/`` (``tensorboard --logdir <out>/tensorboard``).

The history comes from the stage's checkpoint manifest, so a cached stage writes the same
files as a freshly trained one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def write_history(out_dir: Path, stage: str, history: list[dict[str, Any]]) -> None:
    folder = out_dir / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{stage}.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    write_tensorboard(out_dir / "tensorboard" / stage, history)


def write_tensorboard(folder: Path, history: list[dict[str, Any]]) -> None:
    from tensorboardX import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)  # a rerun replaces the curves, never appends to them
    with SummaryWriter(str(folder)) as writer:
        for row in history:
            for name, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "epoch":
                    writer.add_scalar(name, value, global_step=row["epoch"])
