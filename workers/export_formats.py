"""One trained classifier as one file, and that file read back as a function for predictions.

Every format maps a float32 batch N×C×H×W of pixels in [0, 1] to N×classes logits, the
input normalisation inside (as in ``workers.models.Encoder``), so attacks and ε stay in
pixel space for whoever loads the file:

* ``safetensors``: the weights of C ∘ E and, in the file's metadata, the ModelSpec that
  rebuilds it with ``workers.models.build_classifier_model`` (this project's code needed);
* ``torchscript``: a traced module, loadable with ``torch.jit.load`` alone;
* ``onnx``: a graph with a dynamic batch dimension, for ONNX Runtime and other engines
  (writing it needs ``onnx`` and ``onnxscript``, and the read-back check ``onnxruntime``:
  the ``export`` extra).

torch and onnx are imported inside the functions: ``mid export`` checks its input (run,
row, store) before paying for them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import uuid
import warnings
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from torch import nn

FILES = {"safetensors": "model.safetensors", "torchscript": "model.pt", "onnx": "model.onnx"}
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
# Logits of a file read back may differ from the module's by float rounding only (ONNX
# Runtime fuses and reorders operations: ~1e-6 on the registry's backbones).
TOLERANCE = 1e-4

Predict = Callable[[np.ndarray], np.ndarray]


def missing_onnx_packages() -> list[str]:
    """What torch's ONNX exporter (and the read-back check, ONNX Runtime) needs and this
    environment cannot import."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def write_safetensors(model: nn.Module, path: Path, example, spec: dict) -> None:
    from safetensors.torch import save_file

    # Normalisation buffers are not in the state dict (non-persistent): the spec rebuilds them.
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"spec": json.dumps(spec), "model": "EncoderClassifier"})


def write_torchscript(model: nn.Module, path: Path, example, spec: dict) -> None:
    import torch

    # Traced, not scripted: no backbone of the registry has data-dependent control flow for a
    # trace to lose (lenet, mid_cnn, resnet18 and vit_s16 checked against their modules).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, example), str(path))


def write_onnx(model: nn.Module, path: Path, example, spec: dict) -> None:
    import torch

    # The exporter narrates each step on stdout and warns about optional packages
    # (torchvision) this project does not use; the command's own output says what happened.
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                              dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                              external_data=False)  # one self-contained file (models under 2 GB)
    finally:
        onnx_logger.setLevel(level)


WRITERS = {"safetensors": write_safetensors, "torchscript": write_torchscript, "onnx": write_onnx}


def load_safetensors(path: str | Path) -> nn.Module:
    from safetensors import safe_open

    from workers.models import ModelSpec, build_classifier_model

    with safe_open(str(path), framework="pt") as f:
        spec = ModelSpec(**json.loads(f.metadata()["spec"]))
        state = {name: f.get_tensor(name) for name in f.keys()}
    model = build_classifier_model(spec)
    model.load_state_dict(state)
    return model.eval()


def load_torchscript(path: str | Path) -> nn.Module:
    import torch

    return torch.jit.load(str(path), map_location="cpu").eval()


def load_onnx(path: str | Path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def torch_predictor(model: nn.Module) -> Predict:
    import torch

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).numpy()
    return predict


def load_predictor(path: str | Path, fmt: str) -> Predict:
    """The file at ``path`` as a function: float32 images N×C×H×W in [0, 1] → logits."""
    if fmt == "onnx":
        session = load_onnx(path)
        return lambda images: session.run([ONNX_OUTPUT], {ONNX_INPUT: np.asarray(images, dtype=np.float32)})[0]
    return torch_predictor(load_safetensors(path) if fmt == "safetensors" else load_torchscript(path))


def save(model: nn.Module, fmt: str, path: Path, example, spec: dict) -> float:
    """Write ``model`` to ``path`` in ``fmt``; returns the largest logit difference between
    the file read back and the module on ``example`` (a float batch in [0, 1]).

    The file is written under a temporary name in the same folder and renamed only once it
    has been read back and predicts like the module: ``path`` holds the old file or the
    whole new one, never half of one or a wrong one.
    """
    model = model.eval().requires_grad_(False)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex}{path.suffix}")  # exporters may read the suffix
    try:
        WRITERS[fmt](model, tmp, example, spec)
        expected = torch_predictor(model)(example.numpy())
        got = load_predictor(tmp, fmt)(example.numpy())
        diff = float(np.abs(got - expected).max())
        if not diff <= TOLERANCE * max(1.0, float(np.abs(expected).max())):
            raise RuntimeError(f"the {fmt} file predicts differently from the model it was written from "
                               f"(largest logit difference {diff:.3g}); nothing written to {path}")
        os.replace(tmp, path)
        return diff
    finally:
        tmp.unlink(missing_ok=True)
