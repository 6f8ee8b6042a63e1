"""What `torch.compile` costs before the first fast step: the first training step of the textbook FC-DenseNet
(benchmarks/reference_tiramisu.py, what `trainer=gpu` trains) compiled whole, one dense block at a time
(regional compilation: smaller graphs, the usual cure for long compiles of repeated blocks), or only each
layer's BN-ReLU, one graph with symbolic sizes for all of them (`bnrelu`: every layer's BN-ReLU has a different
width, so only a dynamic graph can serve them all; the convolutions stay eager because inductor's convolution
lowering fixes the weight's shape, which made a dynamic whole-layer graph recompile for every width).

    python benchmarks/compile_cost.py --net 103 --mode whole            # the CPU figure in docs/gpu_measurements.md
    python benchmarks/compile_cost.py --net 103 --mode blocks --device cuda
    python benchmarks/compile_cost.py --net 103 --mode bnrelu --device cuda --size 224 --batch 32

The compile depends on the graph, not on the batch: a small input keeps the measured time compile time. Run each
mode in a fresh process (inductor caches what it compiled). Prints the device (the GPU's name, or the CPU's kind),
then one line: net, mode, device, first step (s),
the mean of the next steps (s), the eager step for comparison (`--mode eager`: nothing compiled) and how many
graphs dynamo compiled.
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from bgremover.errors import OneLineParser, UserError, report
from bgremover.utils import device_kind

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", choices=("56", "67", "103"), default="103")
    p.add_argument("--mode", choices=("eager", "whole", "blocks", "bnrelu"), default="whole")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=64, help="square input side (a multiple of 32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="steps timed after the first")
    args = p.parse_args(argv)
    if args.steps < 1:  # "next" is their mean: 0 steps timed one anyway and printed it as theirs
        p.error("--steps must be >= 1")
    if args.size < 32 or args.size % 32 or args.batch < 1 or args.batch * (args.size // 32) ** 2 < 2:
        p.error("--size must be a multiple of 32 and --batch >= 1, with batch x (size/32)² >= 2 (the bottleneck's "
                "BatchNorm needs two values per channel: --size 64 at --batch 1)")
    try:
        kind = device_kind(args.device)
    except UserError as e:
        return report(e, code=2)
    print(kind, flush=True)

    sys.path.insert(0, str(HERE))
    from reference_tiramisu import RefDenseBlock, RefDenseLayer, ref_fcdensenet
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = ref_fcdensenet(f"fcdensenet{args.net}").to(args.device).train()
    step_net = net
    if args.mode == "whole":
        step_net = torch.compile(net)
    elif args.mode == "blocks":  # each block's forward on its own; the rest runs eagerly
        for block in (m for m in net.modules() if isinstance(m, RefDenseBlock)):
            block.forward = torch.compile(block.forward)
    elif args.mode == "bnrelu":
        from torch._dynamo import config as dynamo_config

        dynamo_config.force_parameter_static_shapes = False  # the BN weights' widths are symbolic too
        bn_relu = torch.compile(_bn_relu, dynamic=True)
        for layer in (m for m in net.modules() if isinstance(m, RefDenseLayer)):
            layer.forward = _layer_forward(layer, bn_relu)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, 11, (args.batch, args.size, args.size), device=args.device)

    def step() -> float:
        t = time.perf_counter()
        torch.nn.functional.cross_entropy(step_net(x), y).backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    ctx = torch.autocast(args.device.split(":")[0], torch.bfloat16) if args.device.startswith("cuda") else nullcontext()
    with ctx:  # on a GPU as trainer=gpu trains (bf16 autocast)
        first = step()
        nxt = statistics.mean(step() for _ in range(args.steps))
    graphs = counters["stats"]["unique_graphs"]
    print(f"fcdensenet{args.net} {args.mode} on {args.device}, batch {args.batch} of {args.size}²: first step "
          f"{first:.1f} s, next {nxt:.3f} s, {graphs} graph(s) compiled")
    return 0


def _bn_relu(x, weight, bias, mean, var, training: bool, momentum: float, eps: float):
    return torch.nn.functional.relu(torch.nn.functional.batch_norm(x, mean, var, weight, bias, training, momentum, eps))


def _layer_forward(layer, bn_relu):
    """The layer's BN-ReLU through the one compiled graph; its convolution and dropout eager."""
    norm = layer.norm

    def forward(x):
        y = bn_relu(x, norm.weight, norm.bias, norm.running_mean, norm.running_var, layer.training, norm.momentum,
                    norm.eps)
        return layer.drop(layer.conv(y))

    return forward


if __name__ == "__main__":
    sys.exit(main())
