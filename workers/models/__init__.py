"""The backbone registry (``models.arch``): adding a family is one file in this package and
one line here. docs/design.md §3.1: an encoder E producing the feature z, a classifier C reading z,
and a decoder D mapping z back to an image.

The registry names each family's factory by module and imports it (with torch) only when a
model is built: validating a config needs the names alone and stays quick.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# arch -> ("module:factory" in this package, whether it has a decoder)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "lenet": ("lenet:LeNet", True),          # classic 6/16-channel LeNet-5: the digits demo
    "mid_cnn": ("mid_cnn:MidCNN", True),     # the authors' MNIST network, a 64×7×7 feature map
    "resnet18": ("resnet:resnet18", True),   # torchvision's names; CIFAR stem up to 64 pixels
    "resnet50": ("resnet:resnet50", True),
    "vit_s16": ("vit:vit_s16", False),       # timm's names; no decoder
    "vit_b16": ("vit:vit_b16", False),
}

_BUILD = ("LAYOUT", "backbone", "build_classifier_model", "build_decoder", "build_encoder", "build_teacher",
          "to_float")
_BASE = ("Autoencoding", "Backbone", "Encoder", "EncoderClassifier", "ModelSpec")

__all__ = ["ARCHITECTURES", "has_decoder", *_BUILD, *_BASE]


def has_decoder(arch: str) -> bool:
    return ARCHITECTURES[arch][1]


def __getattr__(name: str) -> Any:
    if name in _BUILD:  # the torch-side names, imported on first use
        return getattr(import_module(f"{__name__}.build"), name)
    if name in _BASE:
        return getattr(import_module(f"{__name__}.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
