"""The dense block's fused bf16 CPU kernels (bgremover.nets.cpu_kernels) against the PyTorch ops they replace.

    python benchmarks/cpu_kernels_speed.py                      # FC-DenseNet103-sized layers, batch 2
    python benchmarks/cpu_kernels_speed.py --repeat 10

Each row is one dense-layer shape: a channel prefix of a channels_last bf16 block buffer, as the block reads it.
Columns: milliseconds (min over --repeat calls) of the forward BN-ReLU, the batch statistics and the BN-ReLU
backward (mask, BN sums, input-gradient update), PyTorch ops vs fused kernel, and their ratio. The PyTorch
backward is the block's route without the kernels: ReLU mask in place, dense copy of the input, PyTorch's BN
backward for the sums, scaled add into the gradient buffer. The first line names the CPU.
"""

from __future__ import annotations

import os
import time

import torch

from bgremover.errors import OneLineParser
from bgremover.nets import cpu_kernels, dense_block
from bgremover.utils import cpu_kind

# (channels read, buffer channels, side): layers of FC-DenseNet103 at 224² (first down block, last up blocks) and
# lower resolutions
SHAPES = ((48, 112, 224), (160, 256, 224), (240, 256, 224), (368, 384, 112), (464, 480, 56))


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def torch_backward(g, act, x, grad, scale, mean, invstd, x_dense):
    # g masked in place, as the block does: a copy here (allocation, page faults, copy) was timed on this side only,
    # though the block's g comes fresh from the convolution's backward on either route. Masking an already masked
    # g again costs the same, so the repeats time the same work.
    torch.ops.aten.threshold_backward.grad_input(g, act, 0, grad_input=g)
    x_dense.copy_(x)
    sums = torch.ops.aten.native_batch_norm_backward(g, x_dense, scale, None, None, mean, invstd, True, 1e-5,
                                                     [False, True, True])
    grad.addcmul_(g, scale.bfloat16().view(1, -1, 1, 1))
    return sums


def main() -> None:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    if args.batch < 1 or args.repeat < 1:
        p.error("--batch and --repeat must be >= 1")
    print(f"cpu: {cpu_kind()}; threads={torch.get_num_threads()}")
    if cpu_kernels.library() is None:
        raise SystemExit("error: the fused kernels are not available here (no C compiler, or turned off)")
    print(f"{'layer':>14} | {'BN-ReLU ms':>19} {'x':>5} | {'statistics ms':>19} {'x':>5} | {'backward ms':>19} {'x':>5}")
    for c, total, side in SHAPES:
        print(f"{args.batch}x{c:>3}/{total:>3}x{side:>3}² | " + " | ".join(layer_row(args.batch, c, total, side,
                                                                                  args.repeat)))


def layer_row(batch: int, c: int, total: int, side: int, repeat: int) -> list[str]:
    """PyTorch ops vs kernel, for each of the three kernels, at one layer shape."""
    cl = torch.channels_last
    gen = torch.Generator().manual_seed(0)
    shape = (batch, c, side, side)
    buf = (torch.randn(batch, total, side, side, generator=gen) + 2).bfloat16().contiguous(memory_format=cl)
    x = buf[:, :c]
    scale, shift = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    mean, invstd = torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5
    act = torch.empty(shape, dtype=torch.bfloat16).contiguous(memory_format=cl)
    g = torch.randn(shape, generator=gen).bfloat16().contiguous(memory_format=cl)
    g_torch = g.clone()  # the PyTorch route masks its g in place; the kernel's g stays as drawn
    grad = torch.zeros_like(buf)[:, :c]
    x_dense = torch.empty_like(act)
    row = []
    for kernel, fallback in (
        (lambda: cpu_kernels.bn_relu(x, scale, shift, act), lambda: dense_block._bn_relu(x, scale, shift, act)),
        (lambda: cpu_kernels.channel_stats(x), lambda: dense_block._batch_stats(x)),
        (lambda: cpu_kernels.bn_relu_backward(g, x, grad, scale, shift, mean, invstd),
         lambda: torch_backward(g_torch, act, x, grad, scale, mean, invstd, x_dense)),
    ):
        os.environ[cpu_kernels.ENV] = "0"  # dense_block's own route: PyTorch ops
        slow = best_ms(fallback, repeat)
        os.environ[cpu_kernels.ENV] = "1"
        fast = best_ms(kernel, repeat)
        row.append(f"{slow:8.2f} vs {fast:7.2f} {slow / fast:5.1f}")
    return row


if __name__ == "__main__":
    main()
