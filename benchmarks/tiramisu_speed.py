"""Training-step speed and peak memory: project FC-DenseNet vs the torch.cat reference.
(Over 400 lines on purpose: the table's parent, the worker it re-runs this file as, and --parallel's turn-taking
between them are one protocol, read together.)

    python benchmarks/tiramisu_speed.py                       # full table: several hours on a 2-core CPU
    python benchmarks/tiramisu_speed.py --nets 103 --sizes 224 384x480 --modes bf16 memeff --steps 3
    python benchmarks/tiramisu_speed.py --malloc tuned ...    # glibc keeps freed memory (KEEP_MEMORY_ENV): speeds only
    python benchmarks/tiramisu_speed.py --malloc exact ...    # peak memory = live tensors (speeds not comparable)
    python benchmarks/tiramisu_speed.py --rounds 3 ...        # ref/ours alternate 3 times: medians (loaded CPU)
    python benchmarks/tiramisu_speed.py --device cuda --modes compiled --cell-timeout 200   # a cell over 200 s: "-"
    python benchmarks/tiramisu_speed.py --device cuda --nets 67 103 --modes compiled --parallel 4   # compile together

Img/s is from the median measured step. Every (net, size, implementation, mode) runs in a fresh subprocess so the peak memory of one does not hide
in another's. Peak memory is the activation peak of the measured steps: on CPU the process' peak RSS
(VmHWM, reset after warm-up via /proc/self/clear_refs) minus the RSS at that point; on CUDA
max_memory_allocated minus memory_allocated at that point. The project net's dense blocks keep their training
memory between steps on CPU (bgremover.nets.workspace); it is given back before that point, so the measured
steps allocate it again and their peak counts it. Compilation is part of warm-up, not measured; the first
warm-up step's time (compilation included, for the compiled modes) is printed on each cell's progress line.
Each cell starts with a line saying so: a run killed from outside still shows which cell it was in.

``--parallel K`` starts K cells at once: they warm up (compile) side by side, and once every started cell has
warmed up (or failed, or passed --cell-timeout) they measure one at a time, the others waiting on a lock, so no
measured step shares the device. For the compiled cells on a GPU: FC-DenseNet103's compile took over 250 s on
one CPU core of a 16-core host, and one device call cannot hold four of them in turn (the timings are the same
as in turn; only the warm-ups overlap, and the memory of every waiting cell stays held, so choose K to fit).
With --parallel, --cell-timeout bounds a cell's warm-up (from the start) and its measuring turn (from taking it).

"ours" is the project net with its hand-written (fused) dense blocks; in the compiled modes off the CPU it is the
net as ``trainer=gpu model.compile=true`` trains it (``dense_blocks=auto``: its textbook layers; see project_blocks).

Modes: fp32 (NCHW float32), cl (channels_last float32), bf16 (channels_last + bf16 autocast), compiled
(bf16 + torch.compile), compiled-fp32 (cl + torch.compile), memeff / memeff-cl / memeff-fp32 (project net
with memory_efficient=True under the bf16 / cl / fp32 flags, compared with the reference under those flags).
On CPUs without native bf16 (AVX2 only) the reference's bf16 convolutions are 10-50x slower than fp32:
expect its bf16 rows to take minutes per step there. The first lines say which CPU this is (model, whether it
has AVX-512-BF16 / AMX-BF16 units) and which bf16 route the project net takes: ``native`` (bf16 oneDNN
kernels) or ``emulated`` (bf16-rounded operands through fp32 kernels, the route for CPUs without bf16 units).
``--bf16-route emulated`` forces the latter on a bf16-capable CPU, to time the AVX2 route's code there.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bgremover.errors import OneLineParser
from bgremover.utils import KEEP_MEMORY_ENV

# glibc maps every block of 64 KiB or more on its own and returns it when freed: the process' RSS follows its live
# memory, so a peak is the tensors' (measured: FC-DenseNet103's bf16 step 841.5-841.8 MiB over four runs, where
# the default allocator gave 478-654 MiB for the same four)
EXACT_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

HERE = Path(__file__).resolve().parent
NETS = ("56", "67", "103")
SIZES = {"224": (224, 224, 2), "384x480": (384, 480, 1)}  # name -> (H, W, batch on a CPU)
GPU_BATCH = {"224": 32, "384x480": 8}  # --device cuda: the batches a GPU trains with (speed-runs: 32 crops)
MODES = ("fp32", "cl", "bf16", "compiled", "compiled-fp32", "memeff", "memeff-cl", "memeff-fp32")
WARMUP = 2  # eager warm-up steps (allocator, oneDNN primitive caches)
COMPILE_WARMUP = 3  # compiled warm-up steps (compilation, then recompilation-free steady state)
_TURN = None  # --parallel: this worker's measuring lock, once it holds it
_PARENT = os.getppid()  # a worker's parent as it started: if it changes, the parent was killed
SYNC_ENV = "TIRAMISU_SPEED_SYNC"  # --parallel: "<folder>:<cell id>", where a worker says it is warm and waits its turn
IGNORE_INDEX = 11  # CamVid void label


# mode -> (channels_last, bf16 autocast, torch.compile, memory_efficient [project net only])
MODE_FLAGS = {
    "fp32": (False, False, False, False),
    "cl": (True, False, False, False),
    "bf16": (True, True, False, False),
    "compiled": (True, True, True, False),
    "compiled-fp32": (True, False, True, False),
    "memeff": (True, True, False, True),
    "memeff-cl": (True, False, False, True),
    "memeff-fp32": (False, False, False, True),
}


def _ref_mode(mode: str) -> str:
    """Reference configuration a project mode is compared with (same flags, no memory-efficient mode)."""
    return {"memeff": "bf16", "memeff-cl": "cl", "memeff-fp32": "fp32"}.get(mode, mode)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("VmRSS missing from /proc/self/status")


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("VmHWM missing from /proc/self/status")


def cpu_kind() -> str:
    """One line: the CPU (bgremover.utils.cpu_kind), the bf16 route the project net takes on it, and whether its
    fused CPU kernels (bgremover.nets.cpu_kernels) are in use."""
    from bgremover.nets import cpu_kernels, dense_block
    from bgremover.utils import cpu_kind as cpu

    route = "native" if dense_block._CPU_NATIVE_BF16 else "emulated"
    fused = "on" if cpu_kernels.library() is not None else "off"
    return (f"cpu: {cpu()}; project net's CPU bf16 route: {route} (oneDNN bf16 supported: "
            f"{dense_block._CPU_NATIVE_BF16}); fused CPU kernels: {fused}")


def project_blocks(mode: str, device: str) -> str:
    """The project net's dense blocks in a cell: the hand-written (fused) ones, except compiled off the CPU.

    torch.compile recompiles the fused blocks for every layer width until dynamo's limit and then runs them eagerly
    (seen on an H100), so a compiled cell of them on a GPU spends minutes measuring the eager blocks. There "ours"
    is what ``trainer=gpu model.compile=true`` trains: ``dense_blocks=auto``, the textbook layers of the project net.
    """
    return "auto" if MODE_FLAGS[mode][2] and not device.startswith("cpu") else "fused"


def worker(net: str, impl: str, mode: str, size: str, steps: int, warmup: int, device: str,
           bf16_route: str = "auto", batch: int | None = None) -> dict[str, float]:
    """One configuration in this process; returns img/s and peak activation memory in MiB."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(HERE))
    from reference_tiramisu import ref_fcdensenet

    from bgremover.nets import dense_block
    from bgremover.nets.tiramisu import TIRAMISU_CONFIGS, FCDenseNet

    if bf16_route == "emulated":  # the route of CPUs without bf16 units (the reference has no such switch)
        dense_block._CPU_NATIVE_BF16 = False

    channels_last, bf16, compiled, mem_eff = MODE_FLAGS[mode]
    name = f"fcdensenet{net}"
    torch.manual_seed(0)
    if impl == "ref":
        model = ref_fcdensenet(name)
    else:
        blocks = project_blocks(mode, device)
        model = FCDenseNet(**TIRAMISU_CONFIGS[name], memory_efficient=mem_eff, dense_blocks=blocks)
    h, w, cpu_batch = SIZES[size]
    batch = batch or (GPU_BATCH[size] if device.startswith("cuda") else cpu_batch)
    model = model.to(device).train()
    x = torch.randn(batch, 3, h, w, device=device)
    y = torch.randint(0, 12, (batch, h, w), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, weight_decay=1e-4)
    fwd = torch.compile(model) if compiled else model
    dev_type = torch.device(device).type

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
            logits = fwd(x)
        loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX)
        loss.backward()
        opt.step()

    def sync() -> None:
        if dev_type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()  # compiles, for the compiled modes
    sync()
    first_s = time.perf_counter() - t0
    for _ in range((COMPILE_WARMUP if compiled else warmup) - 1):
        step()
    sync()
    for module in model.modules():  # the project's dense blocks keep training memory between steps (CPU):
        if hasattr(module, "workspace"):  # give it back, so the measured steps' peak counts it again
            module.workspace.clear()
    _wait_turn()
    if dev_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _rss_kib() * 1024
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev_type == "cuda" else _hwm_kib() * 1024
    step_s = statistics.median(times)  # a shared CPU has stray slow steps; the median ignores them
    return {"img_s": batch / step_s, "peak_mib": (peak - base) / 2**20, "step_s": step_s, "first_step_s": first_s}


def _wait_turn() -> None:
    """--parallel: say this cell is warm, wait until the parent says every cell is, then hold the measuring lock
    until the process ends (its measured steps run alone)."""
    sync = os.environ.get(SYNC_ENV)
    if not sync:
        return
    folder, cell = sync.rsplit(":", 1)
    Path(folder, f"ready-{cell}").touch()
    while not Path(folder, "go").exists():
        if os.getppid() != _PARENT:  # the parent was killed (this worker was handed to init): do not wait forever
            sys.exit("tiramisu_speed --parallel: the parent process ended; stopping")
        time.sleep(0.2)
    global _TURN  # the lock is held while its file is open: a local would be closed (and the lock freed) on return
    _TURN = open(Path(folder, "measure.lock"), "w")  # noqa: SIM115 - held until exit, released by the OS
    fcntl.flock(_TURN, fcntl.LOCK_EX)
    Path(folder, f"turn-{cell}").touch()  # the parent times its measuring from here (--cell-timeout)


def _worker_cmd(net: str, impl: str, mode: str, size: str, args: argparse.Namespace) -> tuple[list[str], dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", net, impl, mode, size,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--bf16-route", args.bf16_route] + (["--batch", str(args.batch)] if args.batch else [])
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall on a shared 2-core CPU
    if args.malloc == "tuned":
        env.update(KEEP_MEMORY_ENV)  # what `make train` runs CPU training with
    elif args.malloc == "exact":
        env.update(EXACT_MEMORY_ENV)
    return cmd, env


def _result(cell: str, stdout: str, stderr: str, seconds: float, malloc: str) -> dict[str, float] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            if malloc == "tuned":  # the heap keeps what the warm-up freed, so the measured steps' RSS hardly rises
                result["peak_mib"] = None  # (measured: 103 MiB where the same cell peaks at 484): no figure, "-"
            print(f"  .. {cell}: {seconds:.0f} s in all, first step {result['first_step_s']:.1f} s, "
                  f"then {result['step_s'] * 1000:.0f} ms per step", flush=True)
            return result
    err = (stderr.strip().splitlines() or ["no output"])[-1]
    print(f"  ! {cell} failed: {err}", file=sys.stderr, flush=True)
    return None


def run_together(cells: list[tuple[str, str, str, str]], args: argparse.Namespace) -> dict[tuple, dict | None]:
    """--parallel: the cells K at a time, warming up side by side and measuring in turn (see the docstring)."""
    results: dict[tuple, dict | None] = {}
    for start in range(0, len(cells), args.parallel):
        batch = cells[start:start + args.parallel]
        with tempfile.TemporaryDirectory(prefix="tiramisu_speed_") as folder:
            procs, t0 = [], time.time()
            for i, cell in enumerate(batch):
                cmd, env = _worker_cmd(*cell, args)
                env[SYNC_ENV] = f"{folder}:{i}"
                out, err = Path(folder, f"{i}.out").open("w+"), Path(folder, f"{i}.err").open("w+")
                print(f"  .. {' '.join(cell)}: started (with {len(batch) - 1} more)", flush=True)
                procs.append((cell, subprocess.Popen(cmd, stdout=out, stderr=err, env=env), out, err))
            go, ended, killed, turns = Path(folder, "go"), {}, set(), {}
            while any(p.poll() is None for _, p, _, _ in procs):
                now = time.time()
                ended |= {i: now for i, (_, p, _, _) in enumerate(procs) if p.poll() is not None and i not in ended}
                turns |= {i: now for i, (_, p, _, _) in enumerate(procs)
                          if i not in turns and p.poll() is None and Path(folder, f"turn-{i}").exists()}
                waiting = [i for i, (_, p, _, _) in enumerate(procs)
                           if i not in killed and p.poll() is None and not Path(folder, f"ready-{i}").exists()]
                over = args.cell_timeout is not None and now - t0 > args.cell_timeout
                # still warming up past the limit, or measuring for longer than it (hung, holding the lock every
                # other cell waits on): its cell shows "-"
                stuck = [i for i, since in turns.items() if i not in killed and procs[i][1].poll() is None
                         and args.cell_timeout is not None and now - since > args.cell_timeout]
                for i in (waiting if over else []) + stuck:
                    procs[i][1].kill()
                    killed.add(i)
                    print(f"  ! {' '.join(procs[i][0])}: over --cell-timeout {args.cell_timeout:g} s, skipped",
                          file=sys.stderr, flush=True)
                if not waiting or over:
                    if not go.exists():
                        print(f"  .. {len(batch)} cells warm or stopped after {time.time() - t0:.0f} s: measuring in "
                              "turn", flush=True)
                    go.touch()
                time.sleep(0.5)
            for i, (cell, _, out, err) in enumerate(procs):
                out.seek(0), err.seek(0)
                results[cell] = None if i in killed else _result(" ".join(cell), out.read(), err.read(),
                                                                  ended.get(i, time.time()) - t0, args.malloc)
                out.close(), err.close()
    return results


def run_config(
    net: str, impl: str, mode: str, size: str, args: argparse.Namespace
) -> dict[str, float] | None:
    done = getattr(args, "done", {})  # measured by run_together
    if (net, impl, mode, size) in done:
        return done[(net, impl, mode, size)]
    cmd, env = _worker_cmd(net, impl, mode, size, args)
    cell = f"{net} {impl} {mode} {size}"
    print(f"  .. {cell}: started", flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.cell_timeout)
    except subprocess.TimeoutExpired:  # the child is killed; the table shows "-" for this cell
        print(f"  ! {cell}: over --cell-timeout {args.cell_timeout:g} s, skipped", file=sys.stderr, flush=True)
        return None
    return _result(cell, proc.stdout, proc.stderr, time.time() - t0, args.malloc)


def _median(results: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Per-figure median of the rounds that ran."""
    ok = [r for r in results if r is not None]
    if not ok:
        return None
    return {k: None if any(r[k] is None for r in ok) else statistics.median(r[k] for r in ok) for k in ok[0]}


def _fmt(v: float | None, spec: str) -> str:
    # "-" (a failed or skipped cell) takes the figure's width, or the row's later figures slide under the wrong
    # headers of a table that is pasted into docs
    return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=[*MODES, "auto"],
                   help="auto: what trainer=cpu trains with on this CPU (bf16 where it has bf16 units, else cl)")
    p.add_argument("--steps", type=int, default=3, help="measured training steps per configuration")
    p.add_argument("--warmup", type=int, default=WARMUP, help="unmeasured eager steps before measuring")
    p.add_argument("--rounds", type=int, default=1,
                   help="run reference and ours alternately this many times per mode and report medians "
                        "(on a shared, loaded CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch size for every size (default: {SIZES['224'][2]}/{SIZES['384x480'][2]} on CPU, "
                        f"{GPU_BATCH['224']}/{GPU_BATCH['384x480']} on CUDA for 224/384x480)")
    p.add_argument("--malloc", choices=("default", "tuned", "exact"), default="default",
                   help="glibc allocator: default; tuned (no mmap, no trim) so freed activations are reused (no "
                        "memory figures then: the RSS peak stays where the warm-up left it); exact "
                        "(every block >= 64 KiB mapped and unmapped) so peak RSS is the live tensors' peak, which "
                        "with the default moves by 50-90 MiB with allocation order alone (speeds: slower, and "
                        "not comparable)")
    p.add_argument("--bf16-route", choices=("auto", "emulated"), default="auto",
                   help="project net's bf16 route on CPU: auto (native where the CPU has bf16 units) or emulated")
    p.add_argument("--cell-timeout", type=float, default=None,
                   help="seconds one cell (a configuration's subprocess) may take; one over it shows as '-' "
                        "(a compile that outlasts a time-limited GPU call then costs only its cell)")
    p.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="start K cells at once: they warm up (compile) together and measure in turn")
    p.add_argument("--worker", nargs=4, metavar=("NET", "IMPL", "MODE", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if "auto" in args.modes:
        from bgremover.utils import cpu_precision

        picked = "bf16" if cpu_precision().startswith("bf16") else "cl"
        args.modes = list(dict.fromkeys(picked if m == "auto" else m for m in args.modes))
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        p.error("--steps, --warmup and --rounds must be >= 1")
    if args.batch is not None and args.batch < 1:  # 0 read as "not given" (the default batch, labelled 0 nowhere)
        p.error("--batch must be >= 1")
    if args.cell_timeout is not None and args.cell_timeout <= 0:
        p.error("--cell-timeout must be > 0 seconds")
    if args.parallel < 1 or (args.parallel > 1 and args.rounds > 1):
        p.error("--parallel must be >= 1, and --rounds 1 with it (rounds alternate cells in turn)")
    args.done = {}
    if args.worker:
        net, impl, mode, size = args.worker
        result = worker(net, impl, mode, size, args.steps, args.warmup, args.device, args.bf16_route, args.batch)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    from bgremover.errors import UserError, report
    from bgremover.utils import device_kind

    try:
        device = device_kind(args.device)
    except UserError as e:
        return report(e, code=2)
    kind = cpu_kind() + (f"\n{device}" if device.startswith("gpu:") else "")  # the CPU line also says the bf16 route
    if args.bf16_route == "emulated":
        kind = kind.replace("route: native", "route: emulated (forced by --bf16-route)")
    print(kind, flush=True)
    load0 = os.getloadavg()
    t_start = time.time()
    ref_cache: dict[tuple[str, str, str], dict[str, float] | None] = {}
    rows = []
    if args.parallel > 1:
        cells = [(net, impl, m, size) for net in args.nets for size in args.sizes for mode in args.modes
                 for impl, m in (("ref", _ref_mode(mode)), ("ours", mode))]
        args.done = run_together(list(dict.fromkeys(cells)), args)
    for net in args.nets:
        for size in args.sizes:
            best_ours = None
            for mode in args.modes:
                rmode = _ref_mode(mode)
                key = (net, size, rmode)
                if args.rounds > 1:  # reference and ours alternate, so a change in the CPU's load hits both
                    pairs = [(run_config(net, "ref", rmode, size, args), run_config(net, "ours", mode, size, args))
                             for _ in range(args.rounds)]
                    ref_cache[key] = _median([r for r, _ in pairs])
                    ours = _median([o for _, o in pairs])
                    ratios = [_ratio((o or {}).get("img_s"), (r or {}).get("img_s")) for r, o in pairs]
                    print(f"  .. rounds' speed ratios {mode}: {' '.join(_fmt(x, '.2f') for x in ratios)}")
                elif key not in ref_cache:
                    ref_cache[key] = run_config(net, "ref", rmode, size, args)
                ref = ref_cache[key]
                if args.rounds == 1:
                    ours = run_config(net, "ours", mode, size, args)
                if ours is not None and (best_ours is None or ours["img_s"] > best_ours[1]["img_s"]):
                    best_ours = (mode, ours)
                row = (net, size, mode, rmode, ref, ours)
                rows.append(row)
                _print_row(row)
            fp32_ref = ref_cache.get((net, size, "fp32"))
            if best_ours is not None and fp32_ref is not None:
                r = _ratio(best_ours[1]["img_s"], fp32_ref["img_s"])
                print(f"  FC-DenseNet{net} {size}: best project config ({best_ours[0]}) = {_fmt(r, '.2f')}x "
                      f"the plain fp32 reference", flush=True)
    print()
    print(kind)
    batches = {k: args.batch or (GPU_BATCH[k] if args.device.startswith("cuda") else v[2]) for k, v in SIZES.items()}
    # a compiled cell warms up COMPILE_WARMUP steps whatever --warmup says (the compile, then a steady state)
    compiled = any(MODE_FLAGS[m][2] for m in args.modes)
    warmup = f"{args.warmup}" + (f" (compiled: {COMPILE_WARMUP})" if compiled else "")
    print(f"device={args.device} batch={batches} threads={_threads()} steps={args.steps} (median) warmup={warmup} "
          f"rounds={args.rounds} parallel={args.parallel} malloc={args.malloc} bf16-route={args.bf16_route} loadavg before={load0[0]:.2f} after={os.getloadavg()[0]:.2f} "
          f"wall={time.time() - t_start:.0f}s")
    print(_HEADER)
    for row in rows:
        print(_line(row))
    _print_targets(rows, ref_cache)
    return 0


def _print_targets(rows: list[tuple], ref_cache: dict) -> None:
    """The issue's three FC-DenseNet103 targets, from the rows this run measured."""
    by = {(net, size, mode): (ref, ours) for net, size, mode, _, ref, ours in rows}

    def speed(mode: str, size: str) -> float | None:
        ref, ours = by.get(("103", size, mode), (None, None))
        return _ratio((ours or {}).get("img_s"), (ref or {}).get("img_s"))

    checks = []
    for size in SIZES:
        checks.append((f"speed, channels_last + bf16, {size}", speed("bf16", size), ">=", 1.5))
        checks.append((f"speed, channels_last fp32, {size} (stand-in where bf16 is emulated)",
                       speed("cl", size), ">=", 1.5))
    ref, ours = by.get(("103", "384x480", "memeff"), None) or by.get(("103", "384x480", "memeff-cl"), (None, None))
    checks.append(("peak memory, memory-efficient, 384x480", _ratio((ours or {}).get("peak_mib"),
                                                                    (ref or {}).get("peak_mib")), "<=", 0.6))
    for size in SIZES:
        fp32 = (ref_cache.get(("103", size, "fp32")) or {}).get("img_s")
        best = max(((ours or {}).get("img_s") or 0.0 for net, sz, _, _, _, ours in rows
                    if net == "103" and sz == size), default=0.0)
        checks.append((f"best project config vs plain fp32 reference, {size}", _ratio(best or None, fp32), ">=", 5.0))
    measured = [c for c in checks if c[1] is not None]
    if not measured:
        return
    print("\nFC-DenseNet103 targets:")
    for name, value, op, goal in measured:
        ok = value >= goal if op == ">=" else value <= goal
        print(f"  {name}: {value:.2f} (target {op} {goal}) {'met' if ok else 'NOT met'}")


_HEADER = (f"{'net':>6} {'size':>8} {'mode':>12} {'ref img/s':>10} {'ours img/s':>10} {'speedup':>8} "
           f"{'ref MiB':>9} {'ours MiB':>9} {'mem ratio':>9}")


def _line(row: tuple) -> str:
    net, size, mode, rmode, ref, ours = row
    ri, oi = (ref or {}).get("img_s"), (ours or {}).get("img_s")
    rm, om = (ref or {}).get("peak_mib"), (ours or {}).get("peak_mib")
    label = mode if mode == rmode else f"{mode}/{rmode}"
    return (f"{net:>6} {size:>8} {label:>12} {_fmt(ri, '10.3f')} {_fmt(oi, '10.3f')} "
            f"{_fmt(_ratio(oi, ri), '8.2f')} {_fmt(rm, '9.0f')} {_fmt(om, '9.0f')} {_fmt(_ratio(om, rm), '9.2f')}")


def _print_row(row: tuple) -> None:
    print("  .. " + _line(row), flush=True)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C in `make benchmark` (~12 min): one line, not a traceback
        from bgremover.errors import report

        sys.exit(report("interrupted", "benchmarks/tiramisu_speed.py", 130))
