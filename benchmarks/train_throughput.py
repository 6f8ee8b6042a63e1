"""Training throughput (img/s) and peak memory per net, at 224² crops and full 384×480 frames, in one run.

    python benchmarks/train_throughput.py                       # every registered net, both sizes
    python benchmarks/train_throughput.py --nets tiramisu56 deeplabv3plus_mobilenet_v2 --sizes 224 --steps 4

Each (net, size) runs in a fresh subprocess, so peak memory (on CPU the process' peak RSS above what it held
before the first step; max_memory_allocated on GPU) belongs to that configuration alone. A step is forward + cross-entropy + backward + optimizer step, with the flags the
training configs use by default: channels_last and bf16 autocast where the machine has bf16 units (a GPU, an
AVX-512-BF16 or AMX CPU), fp32 elsewhere (`--precision` overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see Makefile: spinning OpenMP threads hurt on 2 cores

# name → ((H, W), batch size); 2 at full frames too: DeepLab's image-pooling branch has a BatchNorm over one value
# per channel at batch 1, which training refuses ("Expected more than 1 value per channel")
SIZES = {"224": ((224, 224), 2), "384x480": ((384, 480), 2)}
WARMUP = 1  # untimed steps (allocator and oneDNN kernel selection)


def _kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def worker(net_name: str, size: str, steps: int, device: str, precision: str) -> dict:
    import torch

    from bgremover.nets import build_net, count_parameters

    (h, w), batch = SIZES[size]
    torch.manual_seed(0)
    net = build_net(net_name).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.RMSprop(net.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, h, w, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 11, (batch, h, w), device=device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # by the device's type: `cuda:0` compared as a string skipped the clock's synchronisation (img/s too high) and
    # reported the CPU's memory for the GPU's
    cuda = torch.device(device).type == "cuda"
    # the baseline is what the process holds before the first step. Not ru_maxrss: a child starts with its parent's
    # peak there (kept across fork and exec), so a worker started by a large process (this script's parent, pytest)
    # reported that parent's peak as its own: 0 MB above it. VmHWM is this process' own, reset to VmRSS here.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _kib("VmRSS:")

    def step():
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y, ignore_index=11)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (_kib("VmHWM:") - rss0) / 1024
    return {"net": net_name, "size": size, "params_m": count_parameters(net) / 1e6,
            "img_s": steps * batch / seconds, "peak_mb": peak_mb}


def main() -> None:
    from bgremover.errors import OneLineParser
    from bgremover.nets import NETS

    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="auto: what training uses here, bf16 on a GPU or a CPU with bf16 units, else fp32 (emulated "
                         "bf16 on an AVX2-only CPU is many times slower)")
    ap.add_argument("--worker", nargs=2, metavar=("NET", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    from bgremover.errors import UserError, report
    from bgremover.utils import device_kind

    try:
        kind = device_kind(args.device)
    except UserError as e:
        sys.exit(report(e, code=2))
    if args.precision == "auto":
        import torch

        from bgremover.utils import cpu_precision

        gpu = torch.device(args.device).type != "cpu"  # (`cpu:0` is the CPU: it got bf16 on an AVX2-only one)
        args.precision = "bf16" if gpu or cpu_precision().startswith("bf16") else "fp32"
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.device, args.precision)))
        return

    print(kind)
    batch = {size: SIZES[size][1] for size in args.sizes}  # img/s depends on it: the figures name it
    print(f"device={args.device} precision={args.precision} channels_last batch={batch} steps={args.steps} "
          f"threads={_threads()}")
    print(f"{'net':<28} {'params':>8} " + " ".join(f"{s + ' img/s':>14} {s + ' MB':>12}" for s in args.sizes))
    for name in args.nets:
        cells, failures = [], []
        params = None
        for size in args.sizes:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", name, size, "--steps", str(args.steps),
                 "--device", args.device, "--precision", args.precision],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:  # the reason goes under the row: in a 12-wide cell it pushed the columns out
                failures.append(f"  {name} {size}: " + (proc.stderr.strip().splitlines() or ["failed"])[-1])
                cells.append(f"{'failed':>14} {'-':>12}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            params = r["params_m"]
            cells.append(f"{r['img_s']:>14.2f} {r['peak_mb']:>12.0f}")
        print(f"{name:<28} {(f'{params:.2f}M' if params else '?'):>8} " + " ".join(cells), flush=True)
        for line in failures:
            print(line, flush=True)


def _threads() -> int:
    """The intra-op threads a worker trains with: torch's (OMP_NUM_THREADS, else the physical cores), which is not
    os.cpu_count() on a CPU with two threads per core."""
    import torch

    return torch.get_num_threads()


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C in `make benchmark` (~12 min): one line, not a traceback
        from bgremover.errors import report

        sys.exit(report("interrupted", "benchmarks/train_throughput.py", 130))
