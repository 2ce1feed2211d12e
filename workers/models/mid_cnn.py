"""The authors' MNIST network (their ``models/LeNet.py``; docs/design.md §3.1).

Encoder: conv 3×3 1→32, ReLU, max-pool 2, conv 3×3 32→64, ReLU, max-pool 2; the feature
is the 64×(s/4)×(s/4) map (64×7×7 on MNIST), so MID's KL terms take the softmax over
channels at each location. Classifier: Linear(3136, 200), ReLU, Linear(200, 10).

The decoder mirrors the encoder with transposed 3×3 convolutions. Where the authors
un-pool with the encoder's max-pool indices, this one up-samples with stride-2 transposed
convolutions: the cyclic-consistency term feeds the *teacher's* decoder the *student's*
features, so the decoder must be a function of z alone.

Like the authors', it has no output activation (docs/design.md §3.1). It ended in a
Sigmoid before, and under the teacher's L1 loss that collapsed to a blank image on MNIST,
where most pixels are 0: the loss pushes every output down, the Sigmoid saturates and the
stroke pixels lose their gradient, so the cyclic-consistency term was a constant
(tests/test_backbones.py trains this decoder beside a copy ending in a Sigmoid).
"""

from __future__ import annotations

import torch
from torch import nn

from workers.models.base import Backbone, Encoder, ModelSpec

CHANNELS = (32, 64)
HIDDEN = 200


class MidCNNEncoder(Encoder):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        self.features = nn.Sequential(
            nn.Conv2d(spec.in_channels, CHANNELS[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(CHANNELS[0], CHANNELS[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))


class MidCNNClassifier(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        side = spec.image_size // 4
        self.fc1 = nn.Linear(CHANNELS[1] * side * side, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, spec.num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(z.flatten(1))))


class MidCNNDecoder(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.features = nn.Sequential(
            nn.ConvTranspose2d(CHANNELS[1], CHANNELS[0], 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(CHANNELS[0], spec.in_channels, 3, stride=2, padding=1, output_padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.features(z)


class MidCNN(Backbone):
    def check(self, spec: ModelSpec) -> None:
        if spec.image_size % 4:
            raise ValueError(f"mid_cnn needs an image side divisible by 4, got {spec.image_size}")

    def encoder(self, spec):
        return MidCNNEncoder(spec)

    def classifier(self, spec):
        return MidCNNClassifier(spec)

    def decoder(self, spec):
        return MidCNNDecoder(spec)
