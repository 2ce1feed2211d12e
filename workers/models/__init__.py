"""The backbone registry (``models.arch``): adding a family is one file in this package and
one line here. docs/design.md §3.1: an encoder E producing the feature z, a classifier C reading z,
and a decoder D mapping z back to an image.

The registry names each family's factory by module and imports it (with torch) only when a
model is built: validating a config needs the names alone and stays quick.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, NamedTuple


class Architecture(NamedTuple):
    factory: str  # "module:factory" in this package
    description: str  # for models.arch's help
    has_decoder: bool  # the teacher's reconstruction loss applies
    max_side: int  # the largest image side it is run at: past it a model does not fit a worker's memory
    # Raised when a change to the family's decoder changes what a teacher trained with it
    # holds: it enters the teacher's key (pipeline/keys.py), so the store retrains it.
    decoder_revision: int = 0


ARCHITECTURES: dict[str, Architecture] = {
    # LeNet and the authors' CNN flatten a (side/4)² feature map into dense layers.
    "lenet": Architecture("lenet:LeNet", "classic 6/16-channel LeNet-5, the digits demo", True, 256),
    "mid_cnn": Architecture("mid_cnn:MidCNN", "the authors' MNIST network, a 64×7×7 feature map", True, 256,
                            decoder_revision=1),  # 1: no output Sigmoid (a blank image before)
    # CIFAR stem up to 64 pixels; used up to ImageNet scale
    "resnet18": Architecture("resnet:resnet18", "torchvision names", True, 1024),
    "resnet50": Architecture("resnet:resnet50", "torchvision names", True, 1024),
    # attention grows with (side/16)⁴
    "vit_s16": Architecture("vit:vit_s16", "timm names, no decoder", False, 512),
    "vit_b16": Architecture("vit:vit_b16", "timm names, no decoder", False, 512),
}

_BUILD = ("LAYOUT", "backbone", "build_classifier_model", "build_decoder", "build_encoder", "build_teacher",
          "to_float")
_BASE = ("Autoencoding", "Backbone", "Encoder", "EncoderClassifier", "ModelSpec")

__all__ = ["ARCHITECTURES", "Architecture", "has_decoder", *_BUILD, *_BASE]


def has_decoder(arch: str) -> bool:
    return ARCHITECTURES[arch].has_decoder


def __getattr__(name: str) -> Any:
    if name in _BUILD:  # the torch-side names, imported on first use
        return getattr(import_module(f"{__name__}.build"), name)
    if name in _BASE:
        return getattr(import_module(f"{__name__}.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
