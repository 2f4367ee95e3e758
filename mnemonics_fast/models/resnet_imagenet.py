"""ResNet-18 for ImageNet-size inputs, LUCIR's variant: the last block of layer4 has no final ReLU (SPEC §2)."""
from __future__ import annotations

import torch
from torch import nn

from .resnet_cifar import BasicBlock, init_weights


class ResNet18(nn.Module):
    """Feature extractor: [B, 3, 224, 224] -> [B, 512]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers, cin = [], 64
        for s, (w, stride) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
            is_last_stage = s == 3
            layers.append(nn.Sequential(
                BasicBlock(cin, w, stride),
                BasicBlock(w, w, 1, last_relu=not is_last_stage),
            ))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 512
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def resnet18() -> ResNet18:
    return ResNet18()
