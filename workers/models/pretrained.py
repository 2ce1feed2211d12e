"""Load a torchvision / timm state dict from a file into encoder + classifier.

The backbones use those libraries' parameter names, so the file's keys are matched one to
one: encoder keys (``conv1.weight``, ``blocks.0.attn.qkv.weight``, …) into the encoder,
head keys (``fc.*``, ``head.*``) into the classifier. A head of another size (ImageNet's
1,000 classes into a 10-class model) is left at its initialisation and reported; any
other missing key or shape mismatch is an error naming the first offending key. Nothing is
downloaded: the file is the user's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

WRAPPER_KEYS = ("state_dict", "model", "module")  # checkpoints that nest the state dict
PREFIXES = ("module.", "model.")                  # DataParallel / Lightning-style prefixes


class PretrainedError(ValueError):
    """A pretrained file that does not fit the model; the message is one line naming it."""


@dataclass
class PretrainedReport:
    path: str
    loaded: int = 0
    head: str = "loaded"
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.loaded} tensors loaded from {self.path}; head {self.head}"
        if self.ignored:
            text += f"; {len(self.ignored)} keys not used ({', '.join(self.ignored[:3])}{', …' if len(self.ignored) > 3 else ''})"
        return text


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise PretrainedError(f"models.pretrained: {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one line naming it
        raise PretrainedError(f"models.pretrained: {path}: not a readable state dict "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"models.pretrained: {path}: expected a mapping of parameter names to tensors")
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_pretrained(encoder: nn.Module, classifier: nn.Module, path: str) -> PretrainedReport:
    """Copy the file's tensors into ``encoder`` and ``classifier`` (in place)."""
    state = read_state_dict(path)
    report = PretrainedReport(path)
    parts = {"encoder": (encoder, encoder.state_dict()), "classifier": (classifier, classifier.state_dict())}
    loadable: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "classifier": {}}
    for part, (_, own) in parts.items():
        for key, target in own.items():
            if key not in state:
                raise PretrainedError(f"models.pretrained: {path}: missing key {key!r} (the file has "
                                      f"{len(state)} keys; is it a checkpoint of this architecture?)")
            if state[key].shape != target.shape:
                if part == "classifier":
                    report.head = (f"re-initialised (the file's {key} is {tuple(state[key].shape)}, "
                                   f"this model's {tuple(target.shape)})")
                    loadable["classifier"] = {}
                    break
                raise PretrainedError(f"models.pretrained: {path}: {key!r} has shape {tuple(state[key].shape)}, "
                                      f"this model needs {tuple(target.shape)} (image size, stem or width differ)")
            loadable[part][key] = state[key]
    for part, (module, _) in parts.items():
        if loadable[part]:
            module.load_state_dict(loadable[part], strict=part == "encoder")
    report.loaded = sum(len(v) for v in loadable.values())
    used = set(parts["encoder"][1]) | set(parts["classifier"][1])
    report.ignored = sorted(k for k in state if k not in used)
    return report


def file_digest(path: str) -> str:
    """sha256 of the pretrained file: it is part of the keys of the models trained from it."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
