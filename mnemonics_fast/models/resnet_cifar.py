"""ResNet-32 for 32x32 inputs, as LUCIR modified it (SPEC §2).

conv3x3(3->16)+BN+ReLU, three stages of 5 BasicBlocks (16/32/64 channels, strides 1/2/2), 1x1 conv + BN projection
shortcuts where the shape changes, and NO ReLU after the residual add of the very last block: LUCIR feeds the raw
(signed) feature to the cosine classifier, which is why the last ReLU is dropped.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, last_relu: bool = True):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.last_relu = last_relu
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + identity
        return self.relu(out) if self.last_relu else out


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs, BN gamma=1 beta=0: LUCIR's initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetCifar(nn.Module):
    """Feature extractor: [B, 3, H, W] -> [B, 64] (global average pool; works for any H, W >= 4)."""

    def __init__(self, blocks_per_stage: int = 5, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], widths[0]
        for s, (w, stride) in enumerate(zip(widths, (1, 2, 2))):
            blocks = []
            for b in range(blocks_per_stage):
                is_last = s == len(widths) - 1 and b == blocks_per_stage - 1
                blocks.append(BasicBlock(cin, w, stride if b == 0 else 1, last_relu=not is_last))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = widths[-1]
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


def resnet32() -> ResNetCifar:
    return ResNetCifar(blocks_per_stage=5)
