"""ResNet-18 / ResNet-50 with torchvision's parameter names (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0``, …, ``fc``), so a torchvision state dict
loads into encoder + classifier unchanged.

Inputs up to 64 pixels get the CIFAR stem (3×3 ``conv1`` at stride 1, no max-pool);
larger ones the ImageNet stem (7×7 at stride 2, then a max-pool). The feature is the
pooled vector (512 for ResNet-18, 2048 for ResNet-50); the classifier is ``fc``.

The decoder maps z back to an image: a linear layer to a small map, then stride-2
transposed convolutions with BatchNorm + ReLU, and a Sigmoid output in pixel space.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.models.base import Backbone, Encoder, ModelSpec
from workers.models.lenet import LinearClassifier

CIFAR_STEM_MAX_SIDE = 64


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3×3, as torchvision
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNetEncoder(Encoder):
    def __init__(self, spec: ModelSpec, block: type[nn.Module], layers: tuple[int, ...], width: int):
        super().__init__(spec)
        cifar = spec.image_size <= CIFAR_STEM_MAX_SIDE
        self.inplanes = width
        self.conv1 = (nn.Conv2d(spec.in_channels, width, 3, 1, 1, bias=False) if cifar
                      else nn.Conv2d(spec.in_channels, width, 7, 2, 3, bias=False))
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def decoder_start_side(image_size: int) -> int:
    """The side the decoder starts from: halve the image side while it stays even and above 7."""
    side = image_size
    while side > 7 and side % 2 == 0:
        side //= 2
    return side


class ConvTransposeDecoder(nn.Module):
    def __init__(self, spec: ModelSpec, feature_dim: int, channels: int):
        super().__init__()
        self.side = decoder_start_side(spec.image_size)
        self.channels = channels
        self.fc = nn.Linear(feature_dim, channels * self.side * self.side)
        ups, side = [], self.side
        while side < spec.image_size:
            out = max(channels // 2, 16)
            ups += [nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(out), nn.ReLU()]
            channels, side = out, side * 2
        self.up = nn.Sequential(*ups)
        self.out = nn.Sequential(nn.Conv2d(channels, spec.in_channels, 3, padding=1), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc(z)).view(-1, self.channels, self.side, self.side)
        return self.out(self.up(x))


class ResNet(Backbone):
    def __init__(self, block: type[nn.Module], layers: tuple[int, ...], width: int = 64):
        self.block, self.layers, self.width = block, layers, width

    @property
    def feature_dim(self) -> int:
        return self.width * 8 * self.block.expansion

    def check(self, spec: ModelSpec) -> None:
        if spec.image_size < 8:
            raise ValueError(f"resnet needs images of at least 8 pixels, got {spec.image_size}")

    def encoder(self, spec):
        return ResNetEncoder(spec, self.block, self.layers, self.width)

    def classifier(self, spec):
        return LinearClassifier(self.feature_dim, spec.num_classes)

    def decoder(self, spec):
        return ConvTransposeDecoder(spec, self.feature_dim, self.width * 8)


def resnet18() -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2))


def resnet50() -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3))
