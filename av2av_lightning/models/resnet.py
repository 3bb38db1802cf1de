"""AV-HuBERT visual front-end: a 3D-conv stem over time followed by a per-frame ResNet-18 trunk.

Module names follow fairseq's AV-HuBERT (``frontend3D.{0,1,2}``, ``trunk.layer{i}.{j}.conv1`` ...) so that a
checkpoint converter only has to rename the prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block with PReLU activations (as in the lip-reading ResNets AV-HuBERT builds on)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.PReLU(num_parameters=channels)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.PReLU(num_parameters=channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + residual)


class ResNetTrunk(nn.Module):
    """Four stages of basic blocks (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2) and global average pooling."""

    def __init__(self, width: int = 64, blocks: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"resnet_layers needs 4 stages, got {list(blocks)}")
        in_channels = width
        for index, (count, stride) in enumerate(zip(blocks, (1, 2, 2, 2))):
            channels = width * 2**index
            stage = [
                BasicBlock(in_channels if i == 0 else channels, channels, stride if i == 0 else 1) for i in range(count)
            ]
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
            in_channels = channels
        self.out_channels = in_channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


class ResEncoder(nn.Module):
    """Lip video [B, 1, T, H, W] -> per-frame embeddings [B, T, 8 * width]; the stem sees 5 frames of context."""

    def __init__(self, width: int = 64, blocks: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.frontend3D = nn.Sequential(
            nn.Conv3d(1, width, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False),
            nn.BatchNorm3d(width),
            nn.PReLU(num_parameters=width),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )
        self.trunk = ResNetTrunk(width, blocks)
        self.out_channels = self.trunk.out_channels
        self._init_weights()

    def _init_weights(self) -> None:
        """He init for convolutions, identity BatchNorm: the usual ResNet start."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, video: Tensor) -> Tensor:
        batch, _, frames = video.shape[:3]
        x = self.frontend3D(video)  # [B, C, T, H', W']
        x = x.transpose(1, 2).flatten(0, 1)  # every frame through the 2D trunk independently
        return self.trunk(x).view(batch, frames, -1)
