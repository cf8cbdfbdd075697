"""A DeepLabV3+-style network in plain torch (no torchvision), 2-D or 3-D, for ``raymask train``.

An encoder of residual blocks that halves the resolution once per level after the first; at the
lowest level an atrous spatial pyramid (rates 1, 2 and 3, a 1x1 branch) beside **image pooling**, the
global average of the features broadcast back over the image (DeepLabV3's context branch); a decoder
that upsamples the pyramid's output to the first level and joins it with the first level's features
(DeepLabV3+'s skip), then one output per class at the input's size.

The image pooling makes every output pixel depend on the whole input: tiles cannot equal the whole
image, so its card says ``stitch: blend`` (``raymask model check`` measures it so). It scripts
(TorchScript), exports (``torch.export``) and converts to ONNX with free batch and spatial sizes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _norm(kind: str, dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(channels, affine=True)
    return nn.GroupNorm(1, channels)


class _Block(nn.Module):
    """Two 3x3 convolutions with a residual path; the first may stride by 2."""

    def __init__(self, dims: int, inputs: int, outputs: int, stride: int, norm: str) -> None:
        super().__init__()
        conv = _conv(dims)
        self.first = conv(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, dims, outputs)
        self.second = conv(outputs, outputs, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, dims, outputs)
        self.skip = conv(inputs, outputs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.first(x)))
        return F.relu(self.norm2(self.second(y)) + self.skip(x))


class _Pyramid(nn.Module):
    """Atrous spatial pyramid pooling with the image-pooling branch."""

    def __init__(self, dims: int, inputs: int, outputs: int, rates: Sequence[int], norm: str) -> None:
        super().__init__()
        conv = _conv(dims)
        branches = [nn.Sequential(conv(inputs, outputs, 1, bias=False), _norm(norm, dims, outputs), nn.ReLU())]
        for rate in rates:
            branches.append(
                nn.Sequential(
                    conv(inputs, outputs, 3, padding=rate, dilation=rate, bias=False),
                    _norm(norm, dims, outputs),
                    nn.ReLU(),
                )
            )
        self.branches = nn.ModuleList(branches)
        self.pooled = conv(inputs, outputs, 1)  # no norm: one value per channel and image
        self.project = nn.Sequential(
            conv(outputs * (len(branches) + 1), outputs, 1, bias=False), _norm(norm, dims, outputs), nn.ReLU()
        )
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [branch(x) for branch in self.branches]
        spatial = list(range(2, 2 + self.dims))
        context = F.relu(self.pooled(x.mean(dim=spatial, keepdim=True)))
        parts.append(context + torch.zeros_like(parts[0][:, :1]))  # broadcast over the image
        return self.project(torch.cat(parts, 1))


class DeepLabV3(nn.Module):
    def __init__(
        self, dims: int, bands: int, classes: int, channels: Sequence[int] = (16, 32, 64), norm: str = "batch",
        rates: Sequence[int] = (1, 2, 3),
    ) -> None:  # fmt: skip
        super().__init__()
        levels = list(channels)
        blocks = [_Block(dims, bands, levels[0], 1, norm)]
        for before, after in itertools.pairwise(levels):
            blocks.append(_Block(dims, before, after, 2, norm))
        self.encoder = nn.ModuleList(blocks)
        self.pyramid = _Pyramid(dims, levels[-1], levels[-1], rates, norm)
        conv = _conv(dims)
        self.decoder = nn.Sequential(
            conv(levels[-1] + levels[0], levels[0], 3, padding=1, bias=False), _norm(norm, dims, levels[0]), nn.ReLU()
        )
        self.head = conv(levels[0], classes, 1)
        self.mode = "trilinear" if dims == 3 else "bilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.encoder[0](x)
        y = first
        for index, block in enumerate(self.encoder):
            if index > 0:
                y = block(y)
        y = self.pyramid(y)
        y = F.interpolate(y, size=first.shape[2:], mode=self.mode, align_corners=False)
        return self.head(self.decoder(torch.cat([y, first], 1)))
