"""What `torch.compile` costs before the first fast step: the first training step of the textbook FC-DenseNet
(benchmarks/reference_tiramisu.py, what `trainer=gpu` trains) compiled whole, or one dense block at a time
(regional compilation: smaller graphs, the usual cure for long compiles of repeated blocks).

    python benchmarks/compile_cost.py --net 103 --mode whole            # the CPU figure in docs/gpu_measurements.md
    python benchmarks/compile_cost.py --net 103 --mode blocks --device cuda

The compile depends on the graph, not on the batch: a small input keeps the measured time compile time. Run each
mode in a fresh process (inductor caches what it compiled). Prints one line: net, mode, device, first step (s),
the next step (s) and how many graphs dynamo compiled.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", choices=("56", "67", "103"), default="103")
    p.add_argument("--mode", choices=("whole", "blocks"), default="whole")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=64, help="square input side (a multiple of 32)")
    args = p.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from reference_tiramisu import RefDenseBlock, ref_fcdensenet
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = ref_fcdensenet(f"fcdensenet{args.net}").to(args.device).train()
    if args.mode == "whole":
        step_net = torch.compile(net)
    else:  # each block's forward on its own; the rest runs eagerly
        for block in (m for m in net.modules() if isinstance(m, RefDenseBlock)):
            block.forward = torch.compile(block.forward)
        step_net = net
    x = torch.randn(1, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, 11, (1, args.size, args.size), device=args.device)

    def step() -> float:
        t = time.perf_counter()
        torch.nn.functional.cross_entropy(step_net(x), y).backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    first, second = step(), step()
    graphs = counters["stats"]["unique_graphs"]
    print(f"fcdensenet{args.net} {args.mode} on {args.device}: first step {first:.1f} s, next {second:.3f} s, "
          f"{graphs} graph(s) compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
