"""The benchmarks/ scripts as a person runs them: tiny settings on a CPU, their exit codes and the lines they print.

Their figures are never asserted (speed and memory targets live in the scripts' output, not in tests); what is
checked is that they run, name the device they measured on, and answer bad arguments in one line. FC-DenseNet's
speed table has its own tests in test_tiramisu.py.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

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


def test_input_pipeline_with_fewer_frames_than_a_batch_stops_in_one_line(tiny_camvid):
    """`--paths dataloader --limit 2 --batch 4` hung for good: the DataLoader drops a short last batch, so it had
    none, and the endless batch iterator looped over empty epochs. Now one line and exit 1, as the resident path."""
    import subprocess

    cmd = [sys.executable, str(BENCH / "gpu_input_pipeline.py"), "--device", "cpu", "--net", "tiny", "--paths",
           "dataloader", "--root", str(tiny_camvid), "--limit", "2", "--batch", "4", "--crop", "32", "32",
           "--steps", "1", "--warmup", "0", "--workers", "0"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("gpu_input_pipeline hung on a DataLoader without a batch")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --batch 4 is larger than the 2 training frames (--limit)"


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
