"""The benchmarks/ scripts as a person runs them: tiny settings on a CPU, their exit codes and the lines they print.

What a machine measures is never asserted (speed and memory targets live in the scripts' output, not in tests);
what is checked is that they run, name the device they measured on, answer bad arguments in one line, and compute
each printed figure as its name says: with a clock that moves only when a step runs and memory readings given, a
script's img/s, ms, MiB and ratios are compared with values computed here (warm-up excluded, median or mean as
the header says, numerator over the right denominator). More of FC-DenseNet's speed table is in test_tiramisu.py.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench(name: str):
    """A benchmarks/ script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module, argv: list[str], monkeypatch) -> int:
    """A script's main() with these arguments (as sys.argv too: some parse it themselves); its exit status."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    takes_argv = bool(inspect.signature(module.main).parameters)
    try:
        code = module.main(argv) if takes_argv else module.main()
    except SystemExit as e:
        code = e.code
    return code or 0


@pytest.mark.parametrize("name, argv", [
    ("compile_cost", []),
    ("tiramisu_speed", ["--nets", "56", "--sizes", "224", "--modes", "fp32"]),
    ("train_throughput", ["--nets", "tiramisu56", "--sizes", "224"]),
    ("gpu_input_pipeline", ["--net", "tiny"]),
])
def test_a_device_torch_does_not_know_is_one_line(name, argv, monkeypatch, capsys):
    """`--device gpu` gave compile_cost and gpu_input_pipeline a RuntimeError traceback, and tiramisu_speed and
    train_throughput a table of failed cells with exit status 0: now one line and exit 2, before any work."""
    code = run_main(bench(name), [*argv, "--device", "gpu"], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "error: --device gpu: not a device (cpu, cuda or cuda:N)"


def test_input_pipeline_with_fewer_frames_than_a_batch_stops_in_one_line(tiny_camvid, monkeypatch, capsys):
    """`--paths dataloader --limit 2 --batch 4` hung for good: the DataLoader drops a short last batch, so it had
    none, and the endless batch iterator looped over empty epochs. Now one line and exit 1, as the resident path."""
    import threading

    argv = ["--device", "cpu", "--net", "tiny", "--paths", "dataloader", "--root", str(tiny_camvid), "--limit", "2",
            "--batch", "4", "--crop", "32", "32", "--steps", "1", "--warmup", "0", "--workers", "0"]
    module, codes = bench("gpu_input_pipeline"), []
    thread = threading.Thread(target=lambda: codes.append(module.main(argv)), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "gpu_input_pipeline hung on a DataLoader without a batch"
    assert codes == [1]
    assert capsys.readouterr().err.strip() == "error: --batch 4 is larger than the 2 training frames (--limit)"


@pytest.mark.parametrize("flag, says", [("--model", "error: cannot load ONNX model "),
                                        ("--ckpt", "error: not a PyTorch checkpoint: ")])
def test_predict_latency_of_a_file_that_is_no_model_is_one_line(flag, says, tmp_path, monkeypatch, capsys):
    """A --model that is not an ONNX file ended in protobuf's DecodeError traceback, a --ckpt that is not a
    checkpoint in ExportError's: now the predictor's and the exporter's own one-line errors, exit 1."""
    bad = tmp_path / "notes.txt"
    bad.write_text("not a model\n")
    code = run_main(bench("predict_latency"), [flag, str(bad)], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith(says) and str(bad) in err


@pytest.mark.slow
def test_finetune_vs_scratch_reports_the_numbers_make_remover_prints(tmp_path):
    """The table's test columns were summary.json's test stage, at the training scale (data.image_size): on images
    larger than that they were not the numbers the same run printed for its remover.onnx (here fg IoU 0.0065 in
    the table, 0.220 in the run's own report). Now the exported model is scored as the run scores it."""
    import re
    import subprocess

    from test_folder import FAST, write_folder

    data = write_folder(tmp_path / "data", size=(40, 64))  # wider than data.image_size=48: the test stage resizes
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(BENCH / "finetune_vs_scratch.py"), "--data", str(data), "--out",
                           str(out), "--arms", "scratch", "--budget", "600", *FAST, "trainer.max_epochs=1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "logical CPUs" in proc.stdout.splitlines()[0]  # the CPU it ran on
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| scratch |"))
    table = [float(v) for v in row.split("|")[5:9]]  # test fg IoU, boundary F, alpha MAE, mIoU
    said = (out / "scratch.log").read_text()
    held = re.search(r"held-out test set \(1 image.*: foreground IoU ([\d.]+), boundary F ([\d.]+) \(2 px\), "
                     r"alpha MAE ([\d.]+), mIoU ([\d.]+)", said)
    assert held, said[-2000:]
    assert table == pytest.approx([float(v) for v in held.groups()], abs=5e-4)


# --- smoke runs: the tiniest settings, the lines a person reads -------------------------------------------------
def test_compile_cost_eager_names_the_cpu_and_prints_its_line(monkeypatch, capsys):
    code = run_main(bench("compile_cost"), ["--net", "56", "--mode", "eager", "--size", "64", "--steps", "1"],
                    monkeypatch)
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith("cpu: ") and "logical CPUs" in out[0]
    assert re.fullmatch(r"fcdensenet56 eager on cpu, batch 1 of 64²: first step \d+\.\d s, next \d+\.\d{3} s, "
                        r"0 graph\(s\) compiled", out[1]), out


def test_cpu_kernels_speed_prints_a_row_per_layer_shape(monkeypatch, capsys):
    from bgremover.nets import cpu_kernels

    if cpu_kernels.library() is None:
        pytest.skip("the fused CPU kernels are not built here (no C compiler)")
    module = bench("cpu_kernels_speed")
    monkeypatch.setenv(cpu_kernels.ENV, "1")  # the script switches it per row: restored after the test
    assert run_main(module, ["--batch", "1", "--repeat", "1"], monkeypatch) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("cpu: ") and "threads=" in out[0]
    assert out[1].split() == ["layer", "|", "BN-ReLU", "ms", "x", "|", "statistics", "ms", "x", "|", "backward", "ms",
                              "x"]
    assert len(out) == 2 + len(module.SHAPES)
    for line in out[2:]:  # three "PyTorch vs kernel ratio" cells, the ratio the quotient of the two
        for cell in line.split("|")[1:]:
            slow, fast, ratio = (float(v) for v in cell.replace(" vs ", " ").split())
            # each printed to 0.01 ms, the ratio (of the unrounded times) to 0.1
            low, high = (slow - 0.005) / (fast + 0.005), (slow + 0.005) / max(fast - 0.005, 1e-9)
            assert low - 0.05 <= ratio <= high + 0.05, cell


def test_gpu_input_pipeline_dry_run_on_a_cpu_prints_the_three_paths(tiny_camvid, monkeypatch, capsys):
    code = run_main(bench("gpu_input_pipeline"), ["--device", "cpu", "--net", "tiny", "--batch", "2", "--crop", "32",
                                                  "32", "--steps", "1", "--warmup", "1", "--limit", "4", "--workers",
                                                  "0", "--root", str(tiny_camvid)], monkeypatch)
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^cpu: .*logical CPUs", out, re.M)
    lines = out.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("path ")))
    assert lines[head].split() == ["path", "ms/step", "img/s", "vs", "synthetic", "how"]
    rows = {line.split()[0]: line.split() for line in lines[head + 1:head + 4]}
    assert set(rows) == {"synthetic", "resident", "dataloader"}
    assert rows["synthetic"][3] == "1.000x"
    for cells in rows.values():  # ms/step and img/s describe the same step: img/s = batch / seconds per step
        assert float(cells[2]) == pytest.approx(2 / (float(cells[1]) / 1000), rel=0.02)
    assert re.search(r"^resident vs synthetic: \d+\.\d{3}x \(target <= 1\.10x\) (met|NOT met)$", out, re.M)


def test_serve_load_one_request_per_setting(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, str(BENCH / "serve_load.py"), "--clients", "2", "--requests", "1",
                           "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("CPU: ") and "logical CPUs" in lines[0]
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["server", "--threads"])
    assert lines[head].split() == ["server", "--threads", "requests", "wall", "s", "req/s", "p50", "ms", "p95", "ms",
                                   "errors"]
    threads, n, wall, rps, p50, p95, errors = lines[head + 1].split()
    assert (threads, n, errors) == ("1", "2", "0")
    assert float(rps) > 0 and float(p95) >= float(p50) > 0


@pytest.mark.slow
def test_train_throughput_one_net_one_size(monkeypatch, capsys):
    """Also: the MB column is the worker's own. It was ru_maxrss, which a child inherits from its parent (kept
    across fork and exec): started from a process whose peak is above the worker's, every cell said 0 MB."""
    import numpy as np

    ballast = np.ones(1536 * 2**20 // 8)  # this process' peak RSS now above what the worker will reach
    code = run_main(bench("train_throughput"), ["--nets", "deeplabv3plus_mobilenet_v2", "--sizes", "224", "--steps",
                                                "1", "--device", "cpu", "--precision", "fp32"], monkeypatch)
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith("cpu: ") and "logical CPUs" in out[0]
    assert out[1].startswith("device=cpu precision=fp32 ")
    assert out[2].split() == ["net", "params", "224", "img/s", "224", "MB"]
    name, params, img_s, mb = out[3].split()
    assert (name, params) == ("deeplabv3plus_mobilenet_v2", "4.38M")
    assert float(img_s) > 0
    assert float(mb) > 100  # batch 2 at 224² trains in ~300 MB of activations, gradients and optimizer state
    del ballast


@pytest.mark.slow
def test_predict_latency_prints_every_engine_and_the_stages(monkeypatch, capsys):
    code = run_main(bench("predict_latency"), ["--reps", "1", "--max-side", "64"], monkeypatch)
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith("CPU: ") and "logical CPUs" in out[0]
    head = next(i for i, line in enumerate(out) if line.split()[:3] == ["image", "infer", "at"])
    engines = ["onnxruntime fp32", "onnxruntime int8", "eager PyTorch"]
    assert all(e in out[head] for e in engines) and out[head].split()[-2:] == ["torch/fp32", "torch/int8"]
    for line, at in zip(out[head + 1:head + 3], ("64x48", "64x36"), strict=True):
        cells = line.split()
        assert cells[1] == at  # the inference size --max-side gives
        medians = [float(cells[i]) for i in (2, 4, 6)]
        assert float(cells[8].rstrip("x")) == pytest.approx(medians[2] / medians[0], abs=0.01)
    stages = ["decode PNG", "pad + normalize", "inference", "softmax -> alpha", "RGBA assembly", "PNG encode"]
    assert all(any(line.strip().startswith(s) for line in out) for s in stages)


def test_input_pipeline_checks_its_data_before_timing_anything(tmp_path, monkeypatch, capsys):
    """A --root without CamVid was reported only after the synthetic path had been timed (minutes at the default
    FC-DenseNet103 batch 32 on a CPU, for nothing): now the data is checked first."""
    code = run_main(bench("gpu_input_pipeline"), ["--device", "cpu", "--net", "tiny", "--batch", "2", "--crop", "32",
                                                  "32", "--steps", "1", "--warmup", "0", "--root",
                                                  str(tmp_path / "nowhere")], monkeypatch)
    captured = capsys.readouterr()
    assert code == 1
    assert "synthetic" not in captured.out  # nothing was timed
    assert captured.err.strip() == f"error: dataset folder not found: {tmp_path / 'nowhere'} (run `make data` or set DATA_DIR)"


def test_cpu_kernels_speed_times_the_pytorch_backward_without_a_copy_of_g():
    """The PyTorch side of the backward column cloned g inside the timed call (allocation, page faults and a copy
    of a whole layer's gradient) though the block masks the convolution's fresh g in place on either route: the
    ratio was overstated. Its route now masks the caller's g in place, as the block's does."""
    module = bench("cpu_kernels_speed")
    cl = torch.channels_last
    gen = torch.Generator().manual_seed(0)
    c, n = 8, 2
    x = (torch.randn(n, c, 6, 6, generator=gen)).bfloat16().contiguous(memory_format=cl)
    scale, mean, invstd = torch.rand(c, generator=gen) + 0.5, torch.zeros(c), torch.ones(c)
    act = x.relu()
    g = torch.randn(n, c, 6, 6, generator=gen).bfloat16().contiguous(memory_format=cl)
    want = torch.where(act > 0, g, torch.zeros_like(g))
    grad = torch.zeros_like(x)
    module.torch_backward(g, act, x, grad, scale, mean, invstd, torch.empty_like(x))
    assert torch.equal(g, want)  # the mask went into the caller's g: no copy was made
    torch.testing.assert_close(grad, (want.float() * scale.bfloat16().float().view(1, -1, 1, 1)).bfloat16())


def test_tiramisu_speed_with_malloc_tuned_prints_no_memory_figures(tmp_path, monkeypatch, capsys):
    """--malloc tuned keeps freed memory in the heap, so after the warm-up the measured steps' RSS hardly rises:
    the MiB columns showed 103 where the same cell peaks at 484, and the memory target was judged on them. With
    it the memory columns are "-" and the memory target is not judged; the speeds stay."""
    import subprocess

    module = bench("tiramisu_speed")

    def fake_run(cmd, **kw):  # every cell's worker: 2 img/s for ours, 1 for the reference, RSS barely moved
        img_s = 2.0 if "ours" in cmd else 1.0
        return subprocess.CompletedProcess(cmd, 0, "RESULT " + json.dumps(
            {"img_s": img_s, "peak_mib": 103.0, "step_s": 1 / img_s, "first_step_s": 1.0}) + "\n", "")

    monkeypatch.setattr(module.subprocess, "run", fake_run)  # subprocess.run itself, for everyone in this process:
    monkeypatch.setenv("BGREMOVER_CPU_KERNELS", "0")  # no kernel build through it (it wrote an empty library)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for rounds in ("1", "2"):
        code = module.main(["--nets", "103", "--sizes", "384x480", "--modes", "bf16", "memeff", "--malloc", "tuned",
                            "--rounds", rounds, "--steps", "1", "--warmup", "1"])
        out = capsys.readouterr().out
        assert code == 0
        table, targets = out.split("\nFC-DenseNet103 targets:\n")
        assert [line.split() for line in table.rstrip().splitlines()[-2:]] == [
            ["103", "384x480", "bf16", "1.000", "2.000", "2.00", "-", "-", "-"],
            ["103", "384x480", "memeff/bf16", "1.000", "2.000", "2.00", "-", "-", "-"]]
        assert "speed, channels_last + bf16, 384x480: 2.00 (target >= 1.5) met" in targets
        assert "peak memory" not in targets


@pytest.mark.slow
def test_tiramisu_infer_says_when_the_fused_route_runs_without_its_kernels(tmp_path, monkeypatch, capsys):
    """Without a C compiler (or with a failed build) the fused route runs PyTorch ops instead of its kernels, and
    the warning saying so went to the workers' discarded stderr: the table looked like the kernels' figures.
    (Also the script's smoke run: both routes side by side at the tiniest size.)"""
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no kernels built before either
    code = run_main(bench("tiramisu_infer"), ["--net", "fcdensenet56", "--size", "32", "32", "--reps", "1"],
                    monkeypatch)
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith("CPU: ") and "logical CPUs" in out[0]
    assert out[1].split() == ["precision", "textbook", "ms", "fused", "ms", "speed-up", "textbook", "MiB", "fused",
                              "MiB"]
    assert [line.split()[0] for line in out[2:4]] == ["fp32", "bf16"]
    for line in out[2:4]:
        _, textbook, fused, speedup, *_ = line.split()
        assert float(speedup.rstrip("x")) == pytest.approx(float(textbook) / float(fused), rel=0.5)  # ms are rounded
    assert out[4:] == ["fused route's CPU kernels (bgremover.nets.cpu_kernels): off"]


def test_train_throughput_reads_the_device_by_its_type(monkeypatch, capsys):
    """`--device cpu:0` is the CPU: its precision was chosen as a GPU's (bf16, emulated and many times slower on an
    AVX2-only CPU), as `cuda:0` skipped the clock's synchronisation the plain `cuda` gets."""
    import subprocess

    import bgremover.utils

    module = bench("train_throughput")
    monkeypatch.setattr(bgremover.utils, "cpu_precision", lambda: "32-true (no bf16 units)")
    workers = []

    def fake_worker(cmd, **_):
        workers.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, json.dumps({"params_m": 1.0, "img_s": 2.0, "peak_mb": 3.0}), "")

    monkeypatch.setattr(module.subprocess, "run", fake_worker)
    code = run_main(module, ["--nets", "deeplabv3plus_mobilenet_v2", "--sizes", "224", "--device", "cpu:0"],
                    monkeypatch)
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[1].startswith("device=cpu:0 precision=fp32 ")
    assert workers[0][workers[0].index("--precision") + 1] == "fp32"


# --- the figures themselves: each script's arithmetic against values computed here -----------------------------
class StepClock:
    """Time that passes only while a training step runs: each optimizer step takes the next of `durations`
    seconds, and `log` records the steps beside whatever else a test notes, in order."""

    def __init__(self, durations):
        self.now, self.durations, self.log = 0.0, list(durations), []

    def perf_counter(self) -> float:
        return self.now

    def optimizer(self, base):
        clock = self

        class Timed(base):
            def step(self, *a, **k):
                clock.now += clock.durations.pop(0)
                clock.log.append("step")
                return super().step(*a, **k)

        return Timed


TINY_TIRAMISU = {"down_blocks": (1, 1), "up_blocks": (1, 1), "bottleneck_layers": 1, "growth_rate": 4,
                 "first_conv_channels": 8}


@pytest.mark.parametrize("impl", ["ref", "ours"])
def test_tiramisu_speed_worker_img_s_is_the_batch_over_the_median_measured_step(impl, monkeypatch):
    """The figures the README and docs/fast_tiramisu.md quote: img/s = batch / the median measured step (warm-up
    steps excluded), peak MiB = VmHWM after the measured steps minus the RSS once warm (clear_refs written then)."""
    import types

    from bgremover.nets import tiramisu
    from bgremover.nets.workspace import Workspace

    module = bench("tiramisu_speed")
    monkeypatch.setitem(tiramisu.TIRAMISU_CONFIGS, "fcdensenet56", TINY_TIRAMISU)
    monkeypatch.setitem(module.SIZES, "224", (32, 32, 3))  # batch 3 on a CPU
    # warm-up: 2 steps of 100 s each; measured: 0.5, 0.2, 0.9 s (median 0.5)
    clock = StepClock([100.0, 100.0, 0.5, 0.2, 0.9])
    monkeypatch.setattr(torch.optim, "RMSprop", clock.optimizer(torch.optim.RMSprop))
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    batches = []
    real_ce = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda logits, y, **k: batches.append(len(logits)) or real_ce(logits, y, **k))

    class Proc:  # /proc/self: RSS 1000 KiB once warm, a high-water mark 5 MiB above it after the measured steps
        def __init__(self, path):
            self.path = str(path)

        def write_text(self, text):
            clock.log.append(f"{self.path} {text}")

    workspaces = []  # the project net's: what its blocks keep between steps must be given back before the base
    real_init = Workspace.__init__
    monkeypatch.setattr(Workspace, "__init__", lambda self: workspaces.append(self) or real_init(self))

    def rss() -> int:
        clock.log.append(f"rss, {sum(w.nbytes() for w in workspaces)} bytes held")
        return 1000

    monkeypatch.setattr(module, "Path", Proc)
    monkeypatch.setattr(module, "_rss_kib", rss)
    monkeypatch.setattr(module, "_hwm_kib", lambda: clock.log.append("hwm") or 1000 + 5 * 1024)
    result = module.worker("56", impl, "cl", "224", steps=3, warmup=2, device="cpu")
    assert result == {"img_s": pytest.approx(3 / 0.5), "peak_mib": pytest.approx(5.0),
                      "step_s": pytest.approx(0.5), "first_step_s": pytest.approx(100.0)}
    assert clock.log == ["step", "step", "/proc/self/clear_refs 5", "rss, 0 bytes held", "step", "step", "step", "hwm"]
    assert (sum(w.nbytes() for w in workspaces) > 0) == (impl == "ours")  # (the blocks did use them)
    assert batches == [3] * 5  # the batch img/s is computed with is the one trained on


def test_tiramisu_speed_table_ratios_and_round_medians(tmp_path, monkeypatch, capsys):
    """The table (rounds' medians), its ratios (ours over the reference), the per-round ratios, the best-config line
    and the targets, from known cell results; memory figures on (default allocator)."""
    import subprocess

    module = bench("tiramisu_speed")
    # per (impl, mode): img/s and peak MiB of rounds 1, 2, 3
    cells = {("ref", "fp32"): ([1.0, 0.5, 2.0], [400, 420, 380]), ("ours", "fp32"): ([1.5, 1.0, 2.0], [300] * 3),
             ("ref", "bf16"): ([2.0] * 3, [800] * 3), ("ours", "memeff"): ([5.0, 1.0, 6.0], [100, 200, 300])}
    calls = {}

    def fake_run(cmd, **kw):
        cell = (cmd[cmd.index("--worker") + 2], cmd[cmd.index("--worker") + 3])
        i = calls[cell] = calls.get(cell, -1) + 1
        img_s, mib = cells[cell][0][i], cells[cell][1][i]
        return subprocess.CompletedProcess(cmd, 0, "RESULT " + json.dumps(
            {"img_s": img_s, "peak_mib": mib, "step_s": 1 / img_s, "first_step_s": 1.0}) + "\n", "")

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    monkeypatch.setenv("BGREMOVER_CPU_KERNELS", "0")  # no kernel build through the fake subprocess.run
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code = module.main(["--nets", "103", "--sizes", "384x480", "--modes", "fp32", "memeff", "--rounds", "3",
                        "--steps", "1", "--warmup", "1"])
    out = capsys.readouterr().out
    assert code == 0 and all(n == 2 for n in calls.values())
    assert "  .. rounds' speed ratios fp32: 1.50 2.00 1.00" in out
    assert "  .. rounds' speed ratios memeff: 2.50 0.50 3.00" in out
    assert "  FC-DenseNet103 384x480: best project config (memeff) = 5.00x the plain fp32 reference" in out
    table, targets = out.split("\nFC-DenseNet103 targets:\n")
    assert [line.split() for line in table.rstrip().splitlines()[-2:]] == [
        ["103", "384x480", "fp32", "1.000", "1.500", "1.50", "400", "300", "0.75"],
        ["103", "384x480", "memeff/bf16", "2.000", "5.000", "2.50", "800", "200", "0.25"]]
    assert targets.splitlines() == [
        "  peak memory, memory-efficient, 384x480: 0.25 (target <= 0.6) met",
        "  best project config vs plain fp32 reference, 384x480: 5.00 (target >= 5.0) met"]


def test_train_throughput_worker_img_s_and_peak_are_the_timed_steps(monkeypatch):
    """The README's "CPU vs GPU" table: img/s = timed steps x batch / their seconds (the warm-up step untimed), peak
    MB = VmHWM after them minus the RSS before the first step, params in millions."""
    import types

    import bgremover.nets

    module = bench("train_throughput")
    monkeypatch.setitem(module.SIZES, "224", ((8, 8), 3))  # batch 3
    monkeypatch.setattr(bgremover.nets, "build_net", lambda name: torch.nn.Conv2d(3, 11, 1))  # 3 x 11 + 11 params
    clock = StepClock([100.0, 0.25, 0.75])  # the warm-up step, then the two timed ones: 1 s in all
    monkeypatch.setattr(torch.optim, "RMSprop", clock.optimizer(torch.optim.RMSprop))
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))

    def kib(key: str) -> int:  # 1000 KiB before the first step, a high-water mark 3 MiB above it at the end
        clock.log.append(key)
        return {"VmRSS:": 1000, "VmHWM:": 1000 + 3 * 1024}[key]

    class Proc:  # /proc/self/clear_refs: resets VmHWM to the RSS
        def __init__(self, path, mode):
            self.path = path

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            clock.log.append(f"{self.path} {text}")

    monkeypatch.setattr(module, "_kib", kib)
    monkeypatch.setattr(module, "open", Proc, raising=False)
    result = module.worker("deeplabv3plus_mobilenet_v2", "224", 2, "cpu", "fp32")
    assert result == {"net": "deeplabv3plus_mobilenet_v2", "size": "224", "params_m": pytest.approx(44e-6),
                      "img_s": pytest.approx(2 * 3 / 1.0), "peak_mb": pytest.approx(3.0)}
    assert clock.log == ["/proc/self/clear_refs 5", "VmRSS:", "step", "step", "step", "VmHWM:"]


def test_train_throughput_row_prints_each_figure_in_its_column(monkeypatch, capsys):
    import subprocess

    module = bench("train_throughput")

    def fake_worker(cmd, **_):
        size = cmd[cmd.index("--worker") + 2]
        figures = {"224": (2.81, 313.4), "384x480": (0.52, 1222.6)}[size]
        return subprocess.CompletedProcess(cmd, 0, json.dumps(
            {"params_m": 4.38, "img_s": figures[0], "peak_mb": figures[1]}), "")

    monkeypatch.setattr(module.subprocess, "run", fake_worker)
    assert run_main(module, ["--nets", "deeplabv3plus_mobilenet_v2", "--device", "cpu", "--precision", "fp32"],
                    monkeypatch) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].split() == ["net", "params", "224", "img/s", "224", "MB", "384x480", "img/s", "384x480", "MB"]
    assert out[3].split() == ["deeplabv3plus_mobilenet_v2", "4.38M", "2.81", "313", "0.52", "1223"]


def test_train_throughput_a_failed_cell_keeps_the_columns_and_says_why_below(monkeypatch, capsys):
    """A failed worker's reason (its last stderr line, cut to 40 characters) sat in a 12-wide column and pushed the
    next size's figures out from under their headers; the cell says failed and -, the reason comes under the row."""
    import subprocess

    module = bench("train_throughput")

    def fake_worker(cmd, **_):
        if cmd[cmd.index("--worker") + 2] == "224":
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback...\nRuntimeError: CUDA out of memory. Tried "
                                                          "to allocate 2.00 GiB")
        return subprocess.CompletedProcess(cmd, 0, json.dumps({"params_m": 4.38, "img_s": 0.52, "peak_mb": 1222.6}), "")

    monkeypatch.setattr(module.subprocess, "run", fake_worker)
    assert run_main(module, ["--nets", "deeplabv3plus_mobilenet_v2", "--device", "cpu", "--precision", "fp32"],
                    monkeypatch) == 0
    out = capsys.readouterr().out.splitlines()
    header, row = out[2], out[3]
    assert len(row) == len(header) and row.split() == ["deeplabv3plus_mobilenet_v2", "4.38M", "failed", "-", "0.52",
                                                       "1223"]
    assert row.index("0.52") + len("0.52") == header.index("384x480 img/s") + len("384x480 img/s")
    assert out[4] == "  deeplabv3plus_mobilenet_v2 224: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_input_pipeline_step_time_is_the_mean_of_the_timed_steps(monkeypatch):
    """ms/step is the mean over --steps after --warmup untimed steps, with the device drained before the clock
    starts and before it stops."""
    import types

    module = bench("gpu_input_pipeline")
    clock = StepClock([100.0, 100.0, 0.1, 0.2, 0.6])
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))

    def step(x, y):
        clock.now += clock.durations.pop(0)
        clock.log.append("step")

    seconds = module.timed_steps(step, iter([(None, None)] * 5), 3, 2, lambda: clock.log.append("sync"))
    assert seconds == pytest.approx(0.3)
    assert clock.log == ["step", "step", "sync", "step", "step", "step", "sync"]


def test_input_pipeline_table_ratios_are_each_path_over_synthetic(tiny_camvid, monkeypatch, capsys):
    module = bench("gpu_input_pipeline")
    seconds = iter([0.1, 0.125, 0.2])  # synthetic, resident, dataloader (the order they run in)
    monkeypatch.setattr(module, "timed_steps", lambda *a: next(seconds))
    code = module.main(["--device", "cpu", "--net", "tiny", "--batch", "2", "--crop", "32", "32", "--steps", "1",
                        "--warmup", "0", "--limit", "4", "--workers", "0", "--root", str(tiny_camvid)])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("path "))
    rows = {line.split()[0]: line.split()[1:4] for line in lines[head + 1:head + 4]}
    assert rows == {"synthetic": ["100.0", "20.0", "1.000x"], "resident": ["125.0", "16.0", "1.250x"],
                    "dataloader": ["200.0", "10.0", "2.000x"]}
    assert "\nresident vs synthetic: 1.250x (target <= 1.10x) NOT met\n" in out


def test_predict_latency_times_each_engine_in_ms_without_its_warm_up(monkeypatch):
    """round_robin: ms per call of each function, its own calls only, the warm-up call untimed."""
    import types

    module = bench("predict_latency")
    clock = StepClock([])
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    seconds = {"a": iter([9.0, 0.010, 0.030, 0.020]), "b": iter([9.0, 0.005, 0.004, 0.006])}  # warm-up first

    def call(name):
        clock.now += next(seconds[name])

    times = module.round_robin({"a": lambda: call("a"), "b": lambda: call("b")}, reps=3)
    assert times == {"a": pytest.approx([10.0, 30.0, 20.0]), "b": pytest.approx([5.0, 4.0, 6.0])}


@pytest.mark.slow
def test_predict_latency_row_is_medians_fastest_and_ratios_of_medians(monkeypatch, capsys):
    """The README's "int8 41.2 ms median (40.8 fastest), float32 69.8 ms, eager PyTorch 155.5 ms, i.e. 3.8x and 2.2x
    eager": each cell the median (the fastest in brackets) of its engine's repetitions, each ratio eager's median
    over that engine's. The repetitions are given here; the engines, stages and encoders run as the script runs them."""
    module = bench("predict_latency")
    given = {"onnxruntime fp32": [70.0, 60.0, 90.0], "onnxruntime int8": [41.0, 40.0, 39.0],
             "eager PyTorch": [150.0, 160.0, 140.0]}

    def round_robin(fns, reps, warmup=1):
        for fn in fns.values():  # the work itself still runs (once), so the script's own checks do too
            fn()
        return {k: given.get(k, [4.0, 1.0, 2.0]) for k in fns}  # median 2, mean 2.33

    monkeypatch.setattr(module, "round_robin", round_robin)
    assert run_main(module, ["--reps", "3", "--max-side", "64"], monkeypatch) == 0
    out = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(out) if line.split()[:3] == ["image", "infer", "at"])
    for line, at in zip(out[head + 1:head + 3], ("64x48", "64x36"), strict=True):
        assert line.split()[1:] == [at, "70.0", "(60.0)", "40.0", "(39.0)", "150.0", "(140.0)", "2.14x", "3.75x"]
    stages = [line.split() for line in out if line.startswith("  ") and "(" in line]
    assert ["decode", "PNG", "2.00", "(1.00)"] in stages


@pytest.mark.parametrize("route", ["textbook", "fused"])
def test_tiramisu_infer_worker_ms_is_the_median_frame_after_the_warm_up(route, monkeypatch):
    """docs/fast_tiramisu.md's inference figures: ms = the median of --reps timed frames after one untimed one, peak
    MiB = VmHWM after them minus the RSS once warm; the route the row names is the one that ran."""
    import types

    from bgremover.nets import tiramisu

    module = bench("tiramisu_infer")
    clock = StepClock([9.0, 0.5, 0.2, 0.9])  # the warm-up frame, then three timed ones (median 0.5 s)
    routes, inputs = [], []

    class Timed(tiramisu.FCDenseNet):
        def forward(self, x):
            clock.now += clock.durations.pop(0)
            routes.append({m.plain for m in self.modules() if isinstance(m, tiramisu.DenseBlock)})
            inputs.append(tuple(x.shape))
            return super().forward(x)

    monkeypatch.setitem(tiramisu.TIRAMISU_CONFIGS, "fcdensenet56", TINY_TIRAMISU)
    monkeypatch.setattr(tiramisu, "FCDenseNet", Timed)
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))

    def kib(key: str) -> int:  # 1000 KiB once warm, a high-water mark 2 MiB above it after the timed frames
        clock.log.append(key)
        return {"VmRSS": 1000, "VmHWM": 1000 + 2 * 1024}[key]

    monkeypatch.setattr(module, "_kib", kib)
    result = module.worker(route, "fp32", None, "fcdensenet56", (32, 32), reps=3)
    assert (result["ms"], result["peak_mib"]) == (pytest.approx(500.0), pytest.approx(2.0))
    assert clock.log == ["VmRSS", "VmHWM"] and not clock.durations
    assert routes == [{route == "textbook"}] * 4
    assert inputs == [(1, 3, 32, 32)] * 4  # one frame at a time, as the header's 1x3xHxW says


def test_tiramisu_infer_row_puts_each_route_in_its_column(monkeypatch, capsys):
    import subprocess

    module = bench("tiramisu_infer")
    figures = {("textbook", "fp32"): (2383.4, 780.2), ("fused", "fp32"): (1460.0, 538.0),
               ("textbook", "bf16"): (1252.0, 398.0), ("fused", "bf16"): (818.0, 285.0)}

    def fake_run(cmd, **_):
        ms, mib = figures[tuple(cmd[cmd.index("--worker") + 1:cmd.index("--worker") + 3])]
        return subprocess.CompletedProcess(cmd, 0, "RESULT " + json.dumps(
            {"ms": ms, "peak_mib": mib, "kernels": True}) + "\n", "")

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    assert module.main(["--reps", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split() for line in out[2:4]] == [["fp32", "2383", "1460", "1.63x", "780", "538"],
                                                   ["bf16", "1252", "818", "1.53x", "398", "285"]]
    assert out[4] == "fused route's CPU kernels (bgremover.nets.cpu_kernels): on"


@pytest.mark.parametrize("batch", ["0", "-1"])
def test_tiramisu_speed_batch_below_one_is_refused_before_any_cell(batch, tmp_path, monkeypatch, capsys):
    """`--batch 0` measured the default batch (0 read as "not given"), `--batch -1` printed a row of failed cells
    with exit status 0: now a usage error (exit 2) before any cell starts."""
    import subprocess

    module = bench("tiramisu_speed")
    started = []
    monkeypatch.setattr(module.subprocess, "run", lambda cmd, **k: started.append(cmd) or subprocess.CompletedProcess(
        cmd, 1, "", "RuntimeError: Trying to create tensor with negative dimension -1"))
    monkeypatch.setenv("BGREMOVER_CPU_KERNELS", "0")  # no kernel build through the fake subprocess.run
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code = run_main(module, ["--nets", "56", "--sizes", "224", "--modes", "fp32", "--batch", batch], monkeypatch)
    assert (code, started) == (2, [])
    assert capsys.readouterr().err == "bench_tiramisu_speed.py: error: --batch must be >= 1 (see --help)\n"


def test_train_throughput_names_the_batch_its_img_s_is_measured_at(monkeypatch, capsys):
    """img/s depends on the batch, and the header named none (the README quoted the table without one): it names
    the batch each size trains at, the one the worker uses (SIZES; 2 at both sizes)."""
    import subprocess

    module = bench("train_throughput")
    monkeypatch.setattr(module.subprocess, "run", lambda cmd, **_: subprocess.CompletedProcess(
        cmd, 0, json.dumps({"params_m": 1.0, "img_s": 2.0, "peak_mb": 3.0}), ""))
    assert run_main(module, ["--nets", "tiramisu56", "--device", "cpu", "--precision", "fp32"], monkeypatch) == 0
    header = capsys.readouterr().out.splitlines()[1]
    assert " batch={'224': 2, '384x480': 2} " in header


def test_train_throughput_names_the_threads_torch_trains_with(monkeypatch, capsys):
    """The header said threads=os.cpu_count(): the logical CPUs, twice the threads torch trains with on a CPU with
    two threads per core. It now says torch's own count, which a worker (same environment) starts with."""
    import os
    import subprocess

    module = bench("train_throughput")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2 * torch.get_num_threads())  # logical CPUs: two per core
    monkeypatch.setattr(module.subprocess, "run", lambda cmd, **_: subprocess.CompletedProcess(
        cmd, 0, json.dumps({"params_m": 1.0, "img_s": 2.0, "peak_mb": 3.0}), ""))
    assert run_main(module, ["--nets", "tiramisu56", "--sizes", "224", "--device", "cpu", "--precision", "fp32"],
                    monkeypatch) == 0
    header = capsys.readouterr().out.splitlines()[1]
    assert header.split()[-1] == f"threads={torch.get_num_threads()}"


def test_finetune_vs_scratch_refuses_an_arm_named_twice(tmp_path, monkeypatch, capsys):
    """`--arms finetune,finetune` trained the first arm for its whole budget (30 min), then the second found that
    run's folder and failed: no table, exit 1. Now a usage error (exit 2) before anything runs or is written."""
    module = bench("finetune_vs_scratch")
    started = []
    monkeypatch.setattr(module.subprocess, "call", lambda cmd, **_: started.append(cmd) or 1)
    code = run_main(module, ["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--arms", "finetune,finetune"],
                    monkeypatch)
    assert (code, started, (tmp_path / "out").exists()) == (2, [], False)
    assert capsys.readouterr().err == ("bench_finetune_vs_scratch.py: error: --arms: a comma list of finetune, "
                                       "scratch, each at most once (got 'finetune,finetune') (see --help)\n")


@pytest.mark.slow
def test_predict_latency_times_a_folder_trained_remover_at_its_training_scale(tmp_path, monkeypatch, capsys):
    """bgremover-predict and bgremover-serve infer a remover trained on an image folder at its data.image_size
    (smaller images scaled up too); the benchmark forced --max-side 1024 on every model, so one trained at 64 px
    was timed at 480x360 and 1024x576, not the 64x48 and 64x36 a user's cut-outs run at. It now takes the
    predictor's own scale unless --max-side is given, and the "infer at" column is the size that ran."""
    import onnx

    from bgremover import model_format
    from bgremover import remover as lib

    model = onnx.load(str(BENCH.parent / "models" / "bgremover-camvid.onnx"))
    prop = next(p for p in model.metadata_props if p.key == model_format.METADATA_KEY)
    prop.value = json.dumps({**json.loads(prop.value), "image_size": 64})  # what make remover's export writes
    onnx.save(model, str(tmp_path / "remover.onnx"))
    module = bench("predict_latency")
    shapes, ran = [], []  # the size of each image the net is given (prepare: pad + normalize, before inference)
    real_prepare = lib.BackgroundRemover.prepare
    monkeypatch.setattr(lib.BackgroundRemover, "prepare", lambda self, rgb: shapes.append(rgb.shape[:2])
                        or real_prepare(self, rgb))

    def round_robin(fns, reps, warmup=1):  # each function once: the sizes it infers at, not its time
        for name, fn in fns.items():
            shapes.clear()
            fn()
            ran.append((name, shapes[:]))
        return {k: [1.0] for k in fns}

    monkeypatch.setattr(module, "round_robin", round_robin)
    assert run_main(module, ["--model", str(tmp_path / "remover.onnx"), "--reps", "1"], monkeypatch) == 0
    out = capsys.readouterr().out.splitlines()
    assert "max_side=64 (the training scale)" in next(line for line in out if line.startswith("model: "))
    head = next(i for i, line in enumerate(out) if line.split()[:3] == ["image", "infer", "at"])
    assert [line.split()[:2] for line in out[head + 1:head + 3]] == [["480x360", "64x48"], ["1920x1080", "64x36"]]
    engines = [shapes for name, shapes in ran if name in ("onnxruntime fp32", "eager PyTorch")]
    assert engines == [[(48, 64)]] * 2 + [[(36, 64)]] * 2  # both, at each image size
    stages = dict(ran[4:])  # of one 480x360 image: scaled to the training scale, and its alpha back
    assert list(stages)[:3] == ["decode PNG", "scale to 64x48", "pad + normalize"] and "alpha to 480x360" in stages
    assert stages["pad + normalize"] == [(48, 64)]


def test_serve_load_req_s_and_percentiles_are_over_the_timed_requests(monkeypatch):
    """The README's load-test table: req/s = requests / wall seconds of the concurrent phase (the 3 warm-up requests
    neither timed nor counted), p50 / p95 the 50th / 95th percentiles of the requests' latencies (linear
    interpolation), errors the requests that failed, by kind."""
    import threading
    import types

    import numpy as np

    module = bench("serve_load")
    wall = iter([100.0, 110.0])  # the concurrent phase: 10 s
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: next(wall)))

    class Server:
        def terminate(self):
            return None

        def wait(self, timeout):
            return 0

    monkeypatch.setattr(module, "start_server", lambda args, threads: (Server(), 1))
    latencies = list(np.linspace(0.1, 2.0, 20) ** 2)  # s, uneven: 4 clients x 5 requests
    answers = [(s, True, 200) for s in latencies[:18]] + [(latencies[18], False, 503),
                                                           (latencies[19], False, "ConnectionResetError")]
    lock = threading.Lock()

    def client(port, body, path, n, timeout, out):
        if n == 3:  # the warm-up
            out.extend([(99.0, True, 200)] * 3)
            return
        with lock:
            out.extend(answers.pop() for _ in range(n))

    monkeypatch.setattr(module, "client", client)
    args = types.SimpleNamespace(clients=4, requests=5, timeout=60.0, query="")
    row = module.run_load(args, 2, b"image")
    assert row == {"threads": 2, "n": 20, "wall": pytest.approx(10.0), "rps": pytest.approx(2.0),
                   "p50": pytest.approx(1000 * np.percentile(latencies, 50)),
                   "p95": pytest.approx(1000 * np.percentile(latencies, 95)), "errors": 2,
                   "kinds": ["503", "ConnectionResetError"]}


def test_serve_load_counts_an_answer_that_is_not_a_png_as_an_error():
    """An error is any answer but a 200 with a PNG body, or a failed connection; each request's latency is timed."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    module = bench("serve_load")
    answers = iter([(200, b"\x89PNG\r\n\x1a\n" + b"0" * 8), (200, b'{"error": "x"}'), (404, b"not found")])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as bgremover-serve

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            status, body = next(answers)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = []
    try:
        module.client(server.server_address[1], b"image", "/remove", 3, 10.0, out)
    finally:
        server.shutdown()
        server.server_close()
    assert [(ok, status) for _, ok, status in out] == [(True, 200), (False, 200), (False, 404)]
    assert all(seconds > 0 for seconds, _, _ in out)


def test_cpu_kernels_speed_is_the_fastest_timed_call_in_ms_after_an_untimed_one(monkeypatch):
    """docs/fast_tiramisu.md's per-kernel figures, "ms, min of 5": the fastest of --repeat timed calls, in ms, after
    one untimed call."""
    import types

    module = bench("cpu_kernels_speed")
    clock = StepClock([9.0, 0.003, 0.001, 0.002])
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))

    def call():
        clock.now += clock.durations.pop(0)

    assert module.best_ms(call, 3) == pytest.approx(1.0)
    assert not clock.durations


def test_cpu_kernels_speed_times_pytorch_with_the_kernels_off_and_the_kernel_with_them_on(monkeypatch):
    import os

    from bgremover.nets import cpu_kernels

    if cpu_kernels.library() is None:
        pytest.skip("the fused CPU kernels are not built here (no C compiler)")
    module = bench("cpu_kernels_speed")
    monkeypatch.setenv(cpu_kernels.ENV, "1")  # the script switches it per cell: restored after the test
    seen = []

    def best_ms(fn, repeat):
        seen.append(os.environ[cpu_kernels.ENV])
        fn()
        return 2.0 if seen[-1] == "0" else 1.0

    monkeypatch.setattr(module, "best_ms", best_ms)
    assert module.layer_row(1, 8, 16, 8, 1) == ["    2.00 vs    1.00   2.0"] * 3
    assert seen == ["0", "1"] * 3  # each cell: PyTorch's ops (kernels off), then the kernel


def test_compile_cost_prints_the_first_step_and_the_mean_of_the_next(monkeypatch, capsys):
    """gpu_measurements.md's compile costs: "first step" is the first step's seconds (the compile), "next" the mean
    of the --steps after it."""
    import types

    module = bench("compile_cost")
    ticks = iter([0.0, 50.0, 50.0, 50.1, 50.1, 50.6, 50.6, 50.8])  # steps of 50, then 0.1, 0.5 and 0.2 s
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert run_main(module, ["--net", "56", "--mode", "eager", "--size", "64", "--steps", "3"], monkeypatch) == 0
    out = capsys.readouterr().out.splitlines()
    assert "first step 50.0 s, next 0.267 s" in out[1]


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_compile_cost_refuses_steps_below_one(steps, monkeypatch, capsys):
    """`--steps 0` timed one step anyway and printed it as the mean of the next steps: now a usage error (exit 2)
    before any work."""
    code = run_main(bench("compile_cost"), ["--net", "56", "--mode", "eager", "--steps", steps], monkeypatch)
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, "")
    assert captured.err == "bench_compile_cost.py: error: --steps must be >= 1 (see --help)\n"


def test_tiramisu_speed_names_the_warm_up_compiled_cells_ran(tmp_path, monkeypatch, capsys):
    """A compiled cell warms up COMPILE_WARMUP (3) steps whatever --warmup says, and the header said warmup=1 for
    it (docs/fast_tiramisu.md quotes such runs): it now names both."""
    import subprocess

    module = bench("tiramisu_speed")
    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 0, "RESULT " + json.dumps(
            {"img_s": 1.0, "peak_mib": 1.0, "step_s": 1.0, "first_step_s": 1.0}) + "\n", "")

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    monkeypatch.setenv("BGREMOVER_CPU_KERNELS", "0")  # no kernel build through the fake subprocess.run
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compiled = f" warmup=1 (compiled: {module.COMPILE_WARMUP}) "
    for modes, says in ((["cl"], " warmup=1 "), (["cl", "compiled-fp32"], compiled)):
        assert module.main(["--nets", "56", "--sizes", "224", "--modes", *modes, "--warmup", "1"]) == 0
        assert says in next(line for line in capsys.readouterr().out.splitlines() if line.startswith("device="))


@pytest.mark.parametrize("name", ["compile_cost", "cpu_kernels_speed", "finetune_vs_scratch", "gpu_input_pipeline",
                                  "predict_latency", "serve_load", "tiramisu_infer", "tiramisu_speed",
                                  "train_throughput"])
def test_a_bad_option_is_one_line(name, monkeypatch, capsys):
    """A misspelt option or a value out of range printed argparse's usage block (up to 12 lines for tiramisu_speed)
    above its error: now the one `prog: error: ... (see --help)` line bgremover-predict and bgremover-serve print
    (bgremover.errors.OneLineParser), exit 2, before any work."""
    code = run_main(bench(name), ["--no-such-option"], monkeypatch)
    err = capsys.readouterr().err
    assert code == 2
    assert re.fullmatch(rf"bench_{name}\.py: error: [^\n]*(unrecognized arguments: --no-such-option|required: --data)"
                        r"[^\n]* \(see --help\)\n", err), err


def test_tiramisu_speed_on_a_gpu_names_the_gpu_batches(tmp_path, monkeypatch, capsys):
    """The README's H100 table quotes "224², 32" and "384×480, 8": the batches `--device cuda` trains at, which the
    summary line names (and --batch overrides for every size)."""
    import subprocess

    import bgremover.utils

    module = bench("tiramisu_speed")
    monkeypatch.setattr(bgremover.utils, "device_kind", lambda device: "gpu: a test's stand-in")
    monkeypatch.setattr(module.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 0, "RESULT " + json.dumps({"img_s": 1.0, "peak_mib": 1.0, "step_s": 1.0, "first_step_s": 1.0}) + "\n", ""))
    monkeypatch.setenv("BGREMOVER_CPU_KERNELS", "0")  # no kernel build through the fake subprocess.run
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for extra, says in (([], "batch={'224': 32, '384x480': 8}"), (["--batch", "4"], "batch={'224': 4, '384x480': 4}")):
        assert module.main(["--device", "cuda", "--nets", "56", "--modes", "fp32", *extra]) == 0
        out = capsys.readouterr().out
        assert "gpu: a test's stand-in" in out
        assert f"device=cuda {says} " in out


def test_tiramisu_speed_a_skipped_cell_keeps_the_table_columns(tmp_path, monkeypatch, capsys):
    """A cell over --cell-timeout printed an unpadded "-" in each of its columns, so the row's figures slid left
    under the wrong headers (the tables are pasted into docs): each "-" now ends where its header does."""
    import subprocess

    module = bench("tiramisu_speed")

    def fake_run(cmd, **kw):  # the reference measures; the project's net runs over the cell timeout
        if "ours" in cmd:
            raise subprocess.TimeoutExpired(cmd, kw["timeout"])
        return subprocess.CompletedProcess(cmd, 0, "RESULT " + json.dumps(
            {"img_s": 1.0, "peak_mib": 400.0, "step_s": 1.0, "first_step_s": 1.0}) + "\n", "")

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    monkeypatch.setenv("BGREMOVER_CPU_KERNELS", "0")  # no kernel build through the fake subprocess.run
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code = module.main(["--nets", "56", "--sizes", "224", "--modes", "fp32", "--steps", "1", "--warmup", "1",
                        "--cell-timeout", "5"])
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert code == 0
    header, row = lines[-2:]
    names = ["net", "size", "mode", "ref img/s", "ours img/s", "speedup", "ref MiB", "ours MiB", "mem ratio"]
    ends, at = [], 0
    for name in names:  # each column is right-aligned: its header's last character is its figure's
        at = header.index(name, at) + len(name)
        ends.append(at)
    cells = {name: row[:end].rsplit(" ", 1)[-1] for name, end in zip(names, ends, strict=True)}
    assert len(row) == len(header)
    assert cells == {"net": "56", "size": "224", "mode": "fp32", "ref img/s": "1.000", "ours img/s": "-",
                     "speedup": "-", "ref MiB": "400", "ours MiB": "-", "mem ratio": "-"}
