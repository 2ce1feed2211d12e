"""LeNet-5 (the classic 6/16-channel network), for the digits demo: small enough to train
in seconds. Inputs whose side is a multiple of 4; the feature is an 84-d vector
(``models.feature_dim``). The decoder mirrors the encoder with transposed convolutions and
a Sigmoid output, matching pixel values in [0, 1]."""

from __future__ import annotations

import torch
from torch import nn

from workers.models.base import Backbone, Encoder, ModelSpec


class LeNetEncoder(Encoder):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        side = spec.image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(spec.in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * side * side, 120), nn.ReLU(),
            nn.Linear(120, spec.feature_dim), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


class LeNetDecoder(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.side = spec.image_size // 4
        self.head = nn.Sequential(
            nn.Linear(spec.feature_dim, 120), nn.ReLU(),
            nn.Linear(120, 16 * self.side * self.side), nn.ReLU(),
        )
        self.features = nn.Sequential(
            nn.ConvTranspose2d(16, 6, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(6, spec.in_channels, 4, stride=2, padding=1), nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.features(self.head(z).view(-1, 16, self.side, self.side))


class LinearClassifier(nn.Module):
    """One linear layer on the feature vector, named ``fc`` as in torchvision."""

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z)


class LeNet(Backbone):
    def check(self, spec: ModelSpec) -> None:
        if spec.image_size % 4:
            raise ValueError(f"lenet needs an image side divisible by 4, got {spec.image_size}")

    def encoder(self, spec):
        return LeNetEncoder(spec)

    def classifier(self, spec):
        return LinearClassifier(spec.feature_dim, spec.num_classes)

    def decoder(self, spec):
        return LeNetDecoder(spec)
