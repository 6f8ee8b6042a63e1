"""The scripts outside the package that the README and `make benchmark` run: tools/cutout_sheet.py (the README's
cut-out pictures: a bad argument is one error line, not a traceback, and the picture it replaces, tracked under
docs/, is written whole or not at all) and the benchmarks (Ctrl-C is one line and exit 130)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

MODEL = REPO / "models" / "bgremover-camvid.onnx"


def make_folder(root: Path, n: int = 3) -> Path:
    for kind in ("images", "masks"):
        (root / "test" / kind).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / "test" / "images" / f"f{i}.jpg")
        Image.fromarray(np.eye(32, dtype=np.uint8) * 255).save(root / "test" / "masks" / f"f{i}.png")
    return root


def sheet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "cutout_sheet.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_cutout_sheet_draws_the_picture(tmp_path):
    folder = make_folder(tmp_path / "cars")
    out = tmp_path / "docs" / "sheet.jpg"
    out.parent.mkdir()
    proc = sheet(str(MODEL), str(folder), str(out), "--n", "2", "--side", "40")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (2 * 40, 3 * 40)


def test_cutout_sheet_bad_arguments_are_one_line_and_write_nothing(tmp_path):
    """Each was a traceback: a missing folder or split (FileNotFoundError), --n 0 (Pillow's "cannot write empty
    image", after loading the model), an OUT in a missing folder or without an extension (after every image was
    inferred), a missing model (ModelError)."""
    folder = make_folder(tmp_path / "cars")
    old = tmp_path / "old.jpg"
    old.write_bytes(b"the picture the docs show")
    cases = [
        ((str(MODEL), str(tmp_path / "nope"), str(old)), 1, "folder missing"),
        ((str(MODEL), str(folder), str(old), "--split", "val"), 1, "folder missing"),
        ((str(MODEL), str(folder), str(old), "--n", "0"), 2, "--n must be >= 1"),
        ((str(MODEL), str(folder), str(tmp_path / "no" / "dir" / "s.jpg")), 1, "its folder does not exist"),
        ((str(MODEL), str(folder), str(tmp_path / "sheet")), 2, "name a .jpg or .png"),
        ((str(tmp_path / "nope.onnx"), str(folder), str(old)), 1, "model file not found"),
    ]
    for args, code, says in cases:
        proc = sheet(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code and len(lines) == 1 and says in lines[0], (args, proc.stderr)
        assert lines[0].startswith("python tools/cutout_sheet.py: error:")
    assert old.read_bytes() == b"the picture the docs show"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cars", "old.jpg"]


@pytest.mark.parametrize("script", ["train_throughput", "tiramisu_speed", "tiramisu_infer", "predict_latency"])
def test_ctrl_c_in_make_benchmark_is_one_line_and_130(script):
    """`make benchmark` takes ~12 min; Ctrl-C in it ended in a KeyboardInterrupt traceback (from inside
    subprocess.communicate). Each of its scripts now says it was interrupted, in one line, exit 130."""
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / f"{script}.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        proc.stdout.readline()  # started: its first line is out (imports done, measuring)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)  # the whole group, as a terminal's Ctrl-C
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"benchmarks/{script}.py: error: interrupted"
