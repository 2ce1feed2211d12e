"""The checkpoint store: safetensors weights plus a JSON manifest holding their sha256.

Pool keys and downstream stage keys use that sha256, so a retrained model with different
weights can never be mistaken for the one a pool was generated against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from storage import fs
from storage.keys import sha256_bytes

if TYPE_CHECKING:  # torch is imported where weights are read or written: `mid cache ls` needs none
    import torch

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
CARRIED_FOLDER = "carried"
OPTIMIZER_FILE = "optimizer.safetensors"  # only where the manifest has "optimizer"


def train_runs_url(root: str) -> str:
    """Ray Train's storage: per-epoch resume state of training stages still in progress.

    A stage's run folder is named after its content key, so a rerun finds its state; it is
    removed once the stage's final checkpoint is committed under ``checkpoints/``.
    """
    return fs.join(root, "train")


def checkpoint_url(root: str, key: str) -> str:
    return fs.join(root, "checkpoints", key)


def save_checkpoint(root: str, key: str, state: dict[str, torch.Tensor], meta: dict[str, Any],
                    optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write weights (and the optimizer's state, if given), then the manifest; a checkpoint
    without manifest is not committed."""
    from safetensors.torch import save as save_safetensors

    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    data = save_safetensors(tensors)
    url = checkpoint_url(root, key)
    fs.write_bytes_atomic(fs.join(url, WEIGHTS_FILE), data)
    if optimizer is not None:
        # A round of a refreshed row goes on with the same optimizer (pipeline/stages/refresh.py).
        moments = save_safetensors({f"{index}.{name}": t.detach().cpu().contiguous()
                                    for index, values in optimizer["state"].items() for name, t in values.items()})
        fs.write_bytes_atomic(fs.join(url, OPTIMIZER_FILE), moments)
        meta = {**meta, "optimizer": {"sha256": sha256_bytes(moments), "param_groups": optimizer["param_groups"]}}
    manifest = {"key": key, "sha256": sha256_bytes(data), "bytes": len(data), **meta}
    fs.write_json_atomic(fs.join(url, MANIFEST_FILE), manifest)
    return manifest


def carried_url(root: str, key: str, rank: int) -> str:
    return fs.join(checkpoint_url(root, key), CARRIED_FOLDER, f"rank-{rank:05d}.npz")


def write_carried(root: str, key: str, rank: int, arrays: dict[str, Any]) -> None:
    """A refreshed row's round, at staleness zero: one worker's carried views (its rows'
    "index" and one uint8 array per refreshed attack), written before the round's manifest
    commits it (workers/refresh_in_step.py)."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    fs.write_bytes_atomic(carried_url(root, key, rank), buffer.getvalue())


def read_carried(root: str, key: str) -> dict[str, Any]:
    """Every worker's carried views of a committed round, joined: {"index", attack: views}."""
    import io

    import numpy as np

    manifest = read_manifest(root, key)
    if manifest is None or "carried" not in manifest:
        raise FileNotFoundError(f"checkpoint {key} carries no refreshed views")
    parts = []
    for rank in range(manifest["carried"]["ranks"]):
        with np.load(io.BytesIO(fs.read_bytes(carried_url(root, key, rank)))) as data:
            parts.append({name: data[name] for name in data.files})
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def read_manifest(root: str, key: str) -> dict[str, Any] | None:
    return fs.read_json(fs.join(checkpoint_url(root, key), MANIFEST_FILE))


def load_checkpoint(root: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load as load_safetensors

    manifest = read_manifest(root, key)
    if manifest is None:
        raise FileNotFoundError(f"checkpoint {key} is not in store {root}")
    data = fs.read_bytes(fs.join(checkpoint_url(root, key), WEIGHTS_FILE))
    if sha256_bytes(data) != manifest["sha256"]:
        raise ValueError(f"checkpoint {key}: weights do not match the sha256 in its manifest")
    return load_safetensors(data), manifest


def verify_checkpoint(root: str, key: str) -> dict[str, Any] | None:
    """The manifest when the checkpoint is committed and its weights hash right, else None."""
    try:
        return load_checkpoint(root, key)[1]
    except (FileNotFoundError, ValueError):
        return None


def load_optimizer_state(root: str, key: str) -> dict[str, Any] | None:
    """The optimizer's state dict saved with checkpoint ``key`` (None if it has none)."""
    from safetensors.torch import load as load_safetensors

    saved = (read_manifest(root, key) or {}).get("optimizer")
    if saved is None:
        return None
    data = fs.read_bytes(fs.join(checkpoint_url(root, key), OPTIMIZER_FILE))
    if sha256_bytes(data) != saved["sha256"]:
        raise ValueError(f"checkpoint {key}: optimizer state does not match the sha256 in its manifest")
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in load_safetensors(data).items():
        index, _, field = name.partition(".")
        state.setdefault(int(index), {})[field] = tensor
    return {"state": state, "param_groups": saved["param_groups"]}
