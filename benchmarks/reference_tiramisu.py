"""Straightforward FC-DenseNet: ``torch.cat`` before every dense layer, plain nn modules, autograd does the rest.

Same layer recipe, parameter names and parameter count as ``bgremover.nets.tiramisu.FCDenseNet`` (so a
state_dict loads across), used as the correctness oracle in tests and the baseline in the speed benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bgremover.nets.tiramisu import TIRAMISU_CONFIGS, match_size


class RefDenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth_rate: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=True)
        self.drop = nn.Dropout2d(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.conv(F.relu(self.norm(x))))


class RefDenseBlock(nn.Module):
    def __init__(self, in_channels: int, n_layers: int, growth_rate: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.layers = nn.ModuleList(
            RefDenseLayer(in_channels + i * growth_rate, growth_rate, dropout) for i in range(n_layers)
        )

    @property
    def out_channels(self) -> int:
        return self.in_channels + len(self.layers) * self.growth_rate

    def forward(self, *inputs: Tensor) -> Tensor:
        x = torch.cat(inputs, dim=1)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class TransitionDown(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, kernel_size=1, bias=True)
        self.drop = nn.Dropout2d(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(self.drop(self.conv(F.relu(self.norm(x)))), 2)


class TransitionUp(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, kernel_size=3, stride=2, padding=1, output_padding=1)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return match_size(self.conv(x), skip.shape[-2:])


class RefFCDenseNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 11,
        down_blocks: Sequence[int] = (4, 4, 4, 4, 4),
        up_blocks: Sequence[int] = (4, 4, 4, 4, 4),
        bottleneck_layers: int = 4,
        growth_rate: int = 12,
        first_conv_channels: int = 48,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.first_conv = nn.Conv2d(in_channels, first_conv_channels, kernel_size=3, padding=1, bias=True)
        self.down_blocks = nn.ModuleList()
        self.trans_down = nn.ModuleList()
        skip_channels = []
        c = first_conv_channels
        for n_layers in down_blocks:
            block = RefDenseBlock(c, n_layers, growth_rate, dropout)
            c = block.out_channels
            skip_channels.append(c)
            self.down_blocks.append(block)
            self.trans_down.append(TransitionDown(c, dropout))
        self.bottleneck = RefDenseBlock(c, bottleneck_layers, growth_rate, dropout)
        new_maps = bottleneck_layers * growth_rate
        self.trans_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for n_layers, skip_c in zip(up_blocks, reversed(skip_channels), strict=True):
            self.trans_up.append(TransitionUp(new_maps))
            block = RefDenseBlock(new_maps + skip_c, n_layers, growth_rate, dropout)
            self.up_blocks.append(block)
            new_maps = n_layers * growth_rate
        self.final_conv = nn.Conv2d(block.out_channels, num_classes, kernel_size=1, bias=True)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.first_conv(x)
        skips = []
        for block, down in zip(self.down_blocks, self.trans_down, strict=True):
            out = block(out)
            skips.append(out)
            out = down(out)
        out = self.bottleneck(out)
        new = out[:, self.bottleneck.in_channels :]
        for up, block in zip(self.trans_up, self.up_blocks, strict=True):
            skip = skips.pop()
            out = block(up(new, skip), skip)
            new = out[:, block.in_channels :]
        return self.final_conv(out)


def ref_fcdensenet(name: str, **kw: Any) -> RefFCDenseNet:
    """``name`` is a key of TIRAMISU_CONFIGS, e.g. "fcdensenet103"."""
    return RefFCDenseNet(**{**TIRAMISU_CONFIGS[name], **kw})
