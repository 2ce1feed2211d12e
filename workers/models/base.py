"""What every backbone family shares: the model spec, in-model input normalisation, the
composite models built from an encoder E, a classifier C and a decoder D (docs/design.md §3.1), and
the small base class a family implements.

A family is one file in this package and one line in ``workers.models.ARCHITECTURES``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    in_channels: int
    image_size: int
    num_classes: int
    feature_dim: int = 84                    # lenet only; other families fix their own width
    mean: tuple[float, ...] | None = None    # per-channel input normalisation, inside the model
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
                if len(value) != self.in_channels:
                    raise ValueError(f"models.{name} has {len(value)} values but the images have "
                                     f"{self.in_channels} channel(s)")

    def as_dict(self) -> dict:
        """The spec as it enters cache keys; no normalisation leaves the keys of older specs as they were."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
                if not (k in ("mean", "std") and v is None)}


class Encoder(nn.Module):
    """Base of every encoder: maps pixels in [0, 1] to the feature z.

    Normalisation lives here, as non-persistent buffers, so attacks, pools and ε stay in
    pixel space and a torchvision / timm state dict has no extra keys to match.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        channels = spec.in_channels
        mean = torch.tensor(spec.mean if spec.mean is not None else [0.0] * channels).view(1, channels, 1, 1)
        std = torch.tensor(spec.std if spec.std is not None else [1.0] * channels).view(1, channels, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.normalizes = spec.mean is not None or spec.std is not None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.pixel_mean) / self.pixel_std if self.normalizes else x


class Backbone(ABC):
    """One family of networks. Subclasses build the encoder and the classifier for a spec,
    and the decoder where the family has one (``has_decoder``)."""

    has_decoder = True

    def check(self, spec: ModelSpec) -> None:
        """Raise ValueError naming what in the spec this family cannot build."""

    @abstractmethod
    def encoder(self, spec: ModelSpec) -> Encoder: ...

    @abstractmethod
    def classifier(self, spec: ModelSpec) -> nn.Module: ...

    def decoder(self, spec: ModelSpec) -> nn.Module:
        raise ValueError(f"{spec.arch} has no decoder (docs/design.md §3.1: ImageNet-scale backbones have none)")


class EncoderClassifier(nn.Module):
    """C ∘ E: the baseline, the teacher's classifier path, and the defended model C_t ∘ E_s."""

    def __init__(self, encoder: nn.Module, classifier: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


class Autoencoding(nn.Module):
    """The teacher: encoder, classifier and (where the family has one) decoder, trained
    together on clean data. Without a decoder the reconstruction is None."""

    def __init__(self, encoder: nn.Module, classifier: nn.Module, decoder: nn.Module | None):
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = self.encoder(x)
        return self.classifier(z), (self.decoder(z) if self.decoder is not None else None)
