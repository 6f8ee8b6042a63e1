"""FC-DenseNet ("The One Hundred Layers Tiramisu", Jégou et al. 2017): the architecture, readable in one sitting.

Stem 3x3 conv → dense blocks with transitions down (BN-ReLU-1x1 conv-dropout-maxpool) → bottleneck block →
transitions up (3x3 transposed conv, stride 2) concatenated with the skip and another dense block → 1x1
classifier. Only the new maps of an up-path block go up (the paper's trick against feature-map explosion).

The dense blocks are `bgremover.nets.dense_block.DenseBlock`: the same maths as a textbook block (each layer
BN → ReLU → 3x3 conv → dropout on the concatenation of everything before it), run as one autograd Function over
one buffer so that building a block costs linear, not quadratic, copying and memory. That file says how and why.
``dense_blocks="plain"`` trains the textbook block instead (same parameters); ``"auto"`` (the default) takes the
fused block on CPU and the plain one on a GPU, where it measured faster (H100, bf16, batch 32 at 224²: 186 vs
156 img/s, docs/gpu_measurements.md), and where ``torch.compile`` can fuse it.

Dropout is channel-wise (``Dropout2d``) with p=0.2: the paper uses element-wise dropout, but dropping whole
maps is the usual choice for conv features and its mask is N x g x 1 x 1, cheap to draw and to keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from bgremover.nets.dense_block import DROPOUT, Conv2d, ConvTranspose2d, DenseBlock  # noqa: F401 (re-exported)

FIRST_CONV_CHANNELS = 48  # filters of the stem 3x3 conv in all paper variants
# fused: each block one autograd Function over one buffer (dense_block.py); plain: the textbook torch.cat layers
# in training too, same parameters and checkpoints; auto: fused on CPU, plain on a GPU (faster there, measured),
# fused wherever memory_efficient is asked for (only the fused block has it)
DENSE_BLOCKS = {"auto": None, "fused": False, "plain": True}  # name -> DenseBlock(plain=...)

TIRAMISU_CONFIGS: dict[str, dict[str, Any]] = {
    "fcdensenet56": {
        "down_blocks": (4, 4, 4, 4, 4),
        "up_blocks": (4, 4, 4, 4, 4),
        "bottleneck_layers": 4,
        "growth_rate": 12,
    },
    "fcdensenet67": {
        "down_blocks": (5, 5, 5, 5, 5),
        "up_blocks": (5, 5, 5, 5, 5),
        "bottleneck_layers": 5,
        "growth_rate": 16,
    },
    "fcdensenet103": {
        "down_blocks": (4, 5, 7, 10, 12),
        "up_blocks": (12, 10, 7, 5, 4),
        "bottleneck_layers": 15,
        "growth_rate": 16,
    },
}


class TransitionDown(nn.Module):
    """BN -> ReLU -> 1x1 conv (same width) -> Dropout2d -> 2x2 max-pool.

    Run as BN -> ReLU -> 1x1 conv without its bias -> max-pool -> + bias -> Dropout2d: the same maths, since a
    per-channel constant and a per-channel factor >= 0 (Dropout2d's mask) commute with a max (in float64 the same
    numbers; in bf16 the bias is added after the conv's rounding instead of before). Both then touch a quarter of
    the pixels: the first transition of FC-DenseNet103 trains ~1.3x faster on CPU (bf16, batch 2 at 224²:
    66 vs 84 ms, forward and backward; docs/fast_tiramisu.md).
    """

    def __init__(self, channels: int, dropout: float = DROPOUT) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.conv = Conv2d(channels, channels, kernel_size=1, bias=True)
        self.drop = nn.Dropout2d(dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = F.max_pool2d(self.conv(F.relu(self.norm(x), inplace=True), bias=False), 2)
        # out of place: a backend whose max-pool saved its output for backward would refuse an in-place add
        return self.drop(y + self.conv.bias.to(y.dtype).view(1, -1, 1, 1))


class TransitionUp(nn.Module):
    """3x3 stride-2 transposed conv; output is cropped / zero-padded to the skip's spatial size."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = ConvTranspose2d(channels, channels, kernel_size=3, stride=2, padding=1, output_padding=1)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return match_size(self.conv(x), skip.shape[-2:])


def match_size(x: Tensor, size: Sequence[int]) -> Tensor:
    """Crop (top-left anchored) or zero-pad the bottom/right so odd sizes after pooling still line up."""
    h, w = size
    x = x[..., :h, :w]
    ph, pw = h - x.shape[-2], w - x.shape[-1]
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x


class FCDenseNet(nn.Module):
    """FC-DenseNet: stem conv, dense blocks with transitions down, bottleneck, transitions up, 1x1 classifier."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 11,
        down_blocks: Sequence[int] = (4, 4, 4, 4, 4),
        up_blocks: Sequence[int] = (4, 4, 4, 4, 4),
        bottleneck_layers: int = 4,
        growth_rate: int = 12,
        first_conv_channels: int = FIRST_CONV_CHANNELS,
        dropout: float = DROPOUT,
        memory_efficient: bool = False,
        dense_blocks: str = "auto",
    ) -> None:
        super().__init__()
        if len(down_blocks) != len(up_blocks):
            raise ValueError(f"down_blocks {tuple(down_blocks)} and up_blocks {tuple(up_blocks)} differ in length")
        if dense_blocks not in DENSE_BLOCKS:
            raise ValueError(f"dense_blocks must be one of {', '.join(DENSE_BLOCKS)}, got {dense_blocks!r}")
        block_kw = {"memory_efficient": memory_efficient, "plain": DENSE_BLOCKS[dense_blocks]}
        self.first_conv = Conv2d(in_channels, first_conv_channels, kernel_size=3, padding=1, bias=True)
        self.down_blocks = nn.ModuleList()
        self.trans_down = nn.ModuleList()
        skip_channels = []
        c = first_conv_channels
        for n_layers in down_blocks:
            block = DenseBlock(c, n_layers, growth_rate, dropout, **block_kw)
            c = block.out_channels
            skip_channels.append(c)
            self.down_blocks.append(block)
            self.trans_down.append(TransitionDown(c, dropout))
        self.bottleneck = DenseBlock(c, bottleneck_layers, growth_rate, dropout, **block_kw)
        new_maps = bottleneck_layers * growth_rate  # only the bottleneck's new maps are upsampled
        self.trans_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for n_layers, skip_c in zip(up_blocks, reversed(skip_channels), strict=True):
            self.trans_up.append(TransitionUp(new_maps))
            block = DenseBlock(new_maps + skip_c, n_layers, growth_rate, dropout, **block_kw)
            self.up_blocks.append(block)
            new_maps = n_layers * growth_rate
        self.final_conv = Conv2d(block.out_channels, num_classes, kernel_size=1, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """HeUniform weights and zero biases, as in the paper."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"FCDenseNet expects N x C x H x W input, got shape {tuple(x.shape)}")
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


def _make(name: str, **kw: Any) -> FCDenseNet:
    return FCDenseNet(**{**TIRAMISU_CONFIGS[name], **kw})


def fcdensenet56(**kw: Any) -> FCDenseNet:
    """FC-DenseNet56: 4 layers per block, growth 12 (about 1.4 M parameters for 11 classes)."""
    return _make("fcdensenet56", **kw)


def fcdensenet67(**kw: Any) -> FCDenseNet:
    """FC-DenseNet67: 5 layers per block, growth 16 (about 3.5 M parameters)."""
    return _make("fcdensenet67", **kw)


def fcdensenet103(**kw: Any) -> FCDenseNet:
    """FC-DenseNet103: down 4,5,7,10,12 / bottleneck 15 / up 12,10,7,5,4, growth 16 (about 9.3 M)."""
    return _make("fcdensenet103", **kw)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "TIRAMISU_CONFIGS", "DenseBlock", "FCDenseNet", "count_parameters", "fcdensenet56", "fcdensenet67",
    "fcdensenet103",
]
