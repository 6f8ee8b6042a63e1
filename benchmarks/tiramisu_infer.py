"""CPU inference of FC-DenseNet in PyTorch: the fused dense block vs the textbook torch.cat layers, side by side.

    python benchmarks/tiramisu_infer.py                                   # FC-DenseNet103, one 384x480 frame
    python benchmarks/tiramisu_infer.py --ckpt RUN/best.ckpt --reps 5     # a trained checkpoint's weights

What `make eval`, validation and the comparison report's grid run (eval mode, no autograd, channels_last).
Each (route, precision) cell runs in a fresh process so its peak memory is its own: median time per frame over
--reps after one warm-up, and the peak resident memory above the warmed-up process (VmHWM after clear_refs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROUTES = ("textbook", "fused")
PRECISIONS = ("fp32", "bf16")


def _kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def worker(route: str, precision: str, ckpt: str | None, net_name: str, size: tuple[int, int], reps: int) -> dict:
    import torch

    from bgremover import checkpoint
    from bgremover.nets import cpu_kernels
    from bgremover.nets.tiramisu import TIRAMISU_CONFIGS, DenseBlock, FCDenseNet

    net = checkpoint.load_net(ckpt)[0] if ckpt else FCDenseNet(num_classes=11, **TIRAMISU_CONFIGS[net_name])
    net = net.eval().to(memory_format=torch.channels_last)
    blocks = [m for m in net.modules() if isinstance(m, DenseBlock)]
    if not blocks:  # both routes would time the same net: a "speed-up" of noise
        raise SystemExit(f"error: {ckpt} is not an FC-DenseNet (no dense blocks to compare)")
    for m in blocks:
        m.plain = route == "textbook"
    x = torch.randn(1, 3, *size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        net(x)
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
        base = _kib("VmRSS")
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t0)
    return {"ms": 1000 * statistics.median(times), "peak_mib": (_kib("VmHWM") - base) / 1024,
            "kernels": cpu_kernels.library() is not None}


def main(argv: list[str] | None = None) -> int:
    from bgremover.errors import OneLineParser

    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="a bgremover checkpoint (default: a freshly initialised net)")
    p.add_argument("--net", default="fcdensenet103", choices=("fcdensenet56", "fcdensenet67", "fcdensenet103"))
    p.add_argument("--size", type=int, nargs=2, default=(384, 480), metavar=("H", "W"))
    p.add_argument("--reps", type=int, default=5, help="timed frames per cell (median)")
    p.add_argument("--worker", nargs=2, metavar=("ROUTE", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args.ckpt, args.net, tuple(args.size), args.reps)))
        return 0
    if args.ckpt and not Path(args.ckpt).is_file():
        print(f"error: checkpoint not found: {args.ckpt}", file=sys.stderr)
        return 2
    if args.reps < 1:
        print(f"error: --reps must be >= 1, got {args.reps}", file=sys.stderr)
        return 2
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    from bgremover.utils import cpu_kind

    print(f"CPU: {cpu_kind()}; "
          f"{args.ckpt or args.net}, 1x3x{args.size[0]}x{args.size[1]}, channels_last, median of {args.reps}")
    print(f"{'precision':<10}{'textbook ms':>12}{'fused ms':>10}{'speed-up':>10}{'textbook MiB':>14}{'fused MiB':>11}")
    kernels = set()
    for precision in PRECISIONS:
        r = {}
        for route in ROUTES:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", route, precision, "--net", args.net,
                   "--size", *map(str, args.size), "--reps", str(args.reps)] + (["--ckpt", args.ckpt] if args.ckpt else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"error: {route} {precision} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
                return 1
            r[route] = json.loads(line[7:])
        t, f = r["textbook"], r["fused"]
        kernels.add(f["kernels"])
        print(f"{precision:<10}{t['ms']:>12.0f}{f['ms']:>10.0f}{t['ms'] / f['ms']:>9.2f}x{t['peak_mib']:>14.0f}{f['peak_mib']:>11.0f}")
    # the fused route without its C kernels (no compiler, a failed build: a warning the worker's stderr swallowed)
    # is much slower; the table must say which one it timed
    print(f"fused route's CPU kernels (bgremover.nets.cpu_kernels): {'on' if kernels == {True} else 'off'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C in `make benchmark` (~12 min): one line, not a traceback
        from bgremover.errors import report

        sys.exit(report("interrupted", "benchmarks/tiramisu_infer.py", 130))
