"""Make advertorch 0.2.3 (its last release) importable on current torch.

Two things break ``import advertorch``:
* ``fast_adaptive_boundary.py`` imports ``zero_gradients`` from ``torch.autograd.gradcheck``,
  removed in torch 1.9. We put an equivalent back on that *module*
  (``torch.autograd.gradcheck`` as an attribute is the function, hence importlib).
* ``functional.py`` imports torchvision and PIL for its JPEG defense, which this project
  never uses; where they are not importable we register inert stand-ins that raise if
  that defense is ever called.

Import this module before advertorch; ``workers.attacks`` does.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch


def zero_gradients(x) -> None:
    """The function torch removed: zero the .grad of a tensor or of every tensor in a collection."""
    if isinstance(x, torch.Tensor):
        if x.grad is not None:
            x.grad.detach_()
            x.grad.zero_()
    elif isinstance(x, (list, tuple)):
        for item in x:
            zero_gradients(item)


def _unavailable(name: str):
    def fail(*args, **kwargs):
        raise ImportError(f"{name} is not installed; advertorch's JPEG defense needs it")
    return fail


def _importable(module_name: str) -> bool:
    try:
        importlib.import_module(module_name)
        return True
    except Exception:  # absent, or present but broken (torchvision without its CUDA libs)
        sys.modules.pop(module_name, None)
        return False


def _stand_in(module_name: str) -> types.ModuleType:
    if module_name == "torchvision":
        transforms = types.ModuleType("torchvision.transforms")
        transforms.ToPILImage = lambda *a, **k: _unavailable("torchvision")
        transforms.ToTensor = lambda *a, **k: _unavailable("torchvision")
        module = types.ModuleType("torchvision")
        module.transforms = transforms
        sys.modules["torchvision.transforms"] = transforms
    else:
        image = types.ModuleType("PIL.Image")
        image.open = _unavailable("PIL")
        module = types.ModuleType("PIL")
        module.Image = image
        sys.modules["PIL.Image"] = image
    module.__advertorch_stand_in__ = True
    return module


def install() -> None:
    gradcheck_module = importlib.import_module("torch.autograd.gradcheck")
    if not hasattr(gradcheck_module, "zero_gradients"):
        gradcheck_module.zero_gradients = zero_gradients
    for module_name in ("torchvision", "PIL"):
        if not _importable(module_name):
            sys.modules[module_name] = _stand_in(module_name)


install()
