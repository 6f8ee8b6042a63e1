"""`python -m bgremover.quantize`: a hand-built two-conv net on a synthetic CamVid-layout scene is calibrated,
quantized, scored against its float self and written only when the accuracy gate passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from bgremover import quantize as qz
from bgremover.data.classes import CLASSES
from bgremover.remover import BackgroundRemover, file_sha256, int8_path

H, W = 40, 60
GRAY, RED, GREEN = (128, 128, 128), (255, 0, 0), (0, 255, 0)
SKY, CAR, PED = CLASSES.index("Sky"), CLASSES.index("Car"), CLASSES.index("Pedestrian")


def build_net(path: Path) -> Path:
    """image -> 3x3 stride-2 Conv (+/- copies of RGB) -> Relu -> 3x3 depthwise Conv (identity) -> 1x1 Conv
    (class logits) -> 2x bilinear Resize. Red is Car, green Pedestrian, anything grayish Sky (margins of 50
    logits, so int8 keeps every decision)."""
    k = len(CLASSES)
    w1 = np.zeros((6, 3, 3, 3), np.float32)
    for c in range(3):
        w1[c, c, 1, 1], w1[3 + c, c, 1, 1] = 1.0, -1.0
    wd = np.zeros((6, 1, 3, 3), np.float32)
    wd[:, 0, 1, 1] = 1.0
    w2 = np.zeros((k, 6, 1, 1), np.float32)
    b2 = np.full(k, -100.0, np.float32)
    b2[SKY] = 0.0
    w2[CAR, :3, 0, 0], b2[CAR] = [100.0, -100.0, -100.0], -50.0
    w2[PED, :3, 0, 0], b2[PED] = [-100.0, 100.0, -100.0], -50.0
    nodes = [
        helper.make_node("Conv", ["image", "W1", "B1"], ["h"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "WD"], ["d"], pads=[1, 1, 1, 1], group=6),
        helper.make_node("Conv", ["d", "W2", "B2"], ["z"]),
        helper.make_node("Resize", ["z", "", "scales"], ["logits"], mode="linear"),
    ]
    graph = helper.make_graph(
        nodes, "two-conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k, "H2", "W2"])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(np.zeros(6, np.float32), "B1"),
                     numpy_helper.from_array(wd, "WD"), numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(b2, "B2"),
                     numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {
        "format": "bgremover-onnx", "format_version": 1, "classes": CLASSES, "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0], "size_multiple": 32, "default_foreground": ["Car", "Pedestrian"],
        "net": "two-conv", "params": 200, "test_mIoU": 0.9, "exported_at": "2025-01-01T00:00:00+00:00",
        "bgremover_version": "test", "input": "image", "output": "logits",
    }  # fmt: skip
    entry = model.metadata_props.add()
    entry.key, entry.value = "bgremover", json.dumps(meta)
    onnx.save(model, str(path))
    return path


def scene(shift: int) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.empty((H, W, 3), np.uint8)
    rgb[:] = GRAY
    label = np.full((H, W), SKY, np.uint8)
    rgb[8:24, 6 + shift : 26 + shift], label[8:24, 6 + shift : 26 + shift] = RED, CAR
    rgb[10:30, 40:48], label[10:30, 40:48] = GREEN, PED
    return rgb, label


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "CamVid"
    for split, n in (("train", 4), ("test", 3)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(n):
            rgb, label = scene(2 * i)
            Image.fromarray(rgb).save(root / split / f"{split}_{i}.png")
            Image.fromarray(label, mode="L").save(root / f"{split}annot" / f"{split}_{i}.png")
    return root


def test_quantize_writes_a_gated_int8_copy(tmp_path, data):
    model = build_net(tmp_path / "net.onnx")
    out = int8_path(model)
    proc = subprocess.run([sys.executable, "-m", "bgremover.quantize", "--model", str(model), "--data-root", str(data),
                           "--calib-frames", "3", "--threads", "1", "--quiet"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and f"wrote {out}" in proc.stdout
    assert not list(tmp_path.glob(".*.tmp"))

    q = onnx.load(str(out))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 4  # activations and weights
    producer = next(n for n in q.graph.node if "logits" in n.output)
    assert producer.op_type == "Resize"  # the full-resolution logits stay float: fed by a DequantizeLinear
    assert next(n for n in q.graph.node if producer.input[0] in n.output).op_type == "DequantizeLinear"
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    stem = convs[0]
    assert stem.input[0] == "image" and inits[stem.input[1]].dtype == np.float32  # the stem stays float
    weight_q = {n.output[0]: inits[n.input[0]] for n in q.graph.node
                if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4}  # fmt: skip
    depthwise, pointwise = (weight_q[c.input[1]] for c in convs[1:])
    assert depthwise.dtype == np.int8 and int(np.abs(depthwise).max()) == 127  # 8 bits: never a saturating GEMM
    assert pointwise.dtype == np.int8 and int(np.abs(pointwise).max()) == 64  # 7 bits: AVX2's 16-bit pairs can't saturate

    int8 = BackgroundRemover(out, threads=1)
    rec = int8.meta["quantization"]
    assert rec["source_sha256"] == file_sha256(model) and rec["source"] == "net.onnx"
    assert rec["calibration"] == {"split": "train", "frames": 3} and rec["float_nodes"] == [producer.name, stem.name]
    assert rec["seven_bit_weights"] == 1
    assert rec["eval"]["frames"] == 3 and rec["eval"]["float"]["mIoU"] == pytest.approx(rec["eval"]["int8"]["mIoU"])
    assert rec["eval"]["of"] == 3 and proc.stdout.rstrip().endswith(" (3 frames)")  # the whole split: no PARTIAL
    # IoU in points, each saying so (mIoU stood as "56.51" beside a cut-out IoU of 0.7123 in the same line)
    ev = rec["eval"]
    assert (f"test mIoU {100 * ev['int8']['mIoU']:.2f} % vs {100 * ev['float']['mIoU']:.2f} % float, cut-out IoU "
            f"{100 * ev['int8']['fg_iou']:.2f} % vs {100 * ev['float']['fg_iou']:.2f} %") in proc.stdout
    assert f"cut-out IoU {100 * ev['int8']['fg_iou']:.2f} %, boundary F {100 * ev['int8']['boundary_f']:.2f} %" in proc.stdout
    assert int8.meta["net"] == "two-conv" and int8.meta["test_mIoU"] == 0.9  # the float model's document kept

    rgb, label = scene(1)
    ref = BackgroundRemover(model, threads=1)
    a, b = ref.foreground_probability(rgb), int8.foreground_probability(rgb)
    assert np.abs(a - b).max() < 0.05 and np.array_equal(a >= 0.5, b >= 0.5)
    assert np.array_equal(ref.logits(rgb).argmax(0), int8.logits(rgb).argmax(0))


def test_gate_failure_writes_nothing(tmp_path, data, monkeypatch):
    model = build_net(tmp_path / "net.onnx")
    out = tmp_path / "q" / "net.int8.onnx"
    monkeypatch.setattr(qz, "MAX_MIOU_CHANGE", -1.0)  # nothing can pass: the refusal path
    code = qz.main(["--model", str(model), "--out", str(out), "--data-root", str(data), "--calib-frames", "2",
                    "--threads", "1", "--quiet"])  # fmt: skip
    assert code == 1 and not out.exists() and not (tmp_path / "q").exists()


def test_calibration_reads_train_frames_prepared_as_the_predictor_does(tmp_path, data, monkeypatch):
    """min/max calibration on test frames would tune the int8 copy to the frames that then score it; frames fed
    unpadded or unnormalized would calibrate ranges the net never sees. Per-channel weights: one scale per
    output channel of each quantized convolution."""
    seen: list[tuple[Path, np.ndarray]] = []

    class Spy(qz._CalibrationFrames):
        def get_next(self):
            path = self.images[self.pos] if self.pos < len(self.images) else None
            feed = super().get_next()
            if feed is not None:
                seen.append((path, feed["image"]))
            return feed

    monkeypatch.setattr(qz, "_CalibrationFrames", Spy)
    model = build_net(tmp_path / "net.onnx")
    assert qz.main(["--model", str(model), "--data-root", str(data), "--calib-frames", "2", "--threads", "1",
                    "--quiet"]) == 0  # fmt: skip
    assert seen and all(path.parent == data / "train" for path, _ in seen)
    for path, x in seen:
        rgb = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255  # mean 0, std 1: the net's input
        assert x.shape == (1, 3, 64, 64)  # 40x60 padded to multiples of 32, centred: rows 12.., columns 2..
        np.testing.assert_allclose(x[0, :, 12:52, 2:62], rgb.transpose(2, 0, 1), atol=1e-6)
    q = onnx.load(str(int8_path(model)))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    scales = [inits[n.input[1]] for n in q.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4]  # fmt: skip
    assert sorted(s.shape for s in scales) == [(6,), (11,)]  # the depthwise conv's 6 channels, the classifier's 11


@pytest.mark.parametrize("int8_miou, int8_fg, written", [
    (0.600, 0.700, True),  # the float model's own scores
    (0.604, 0.692, True),  # within 0.5 mIoU points and 0.01 cut-out IoU
    (0.590, 0.700, False),  # 1 mIoU point worse
    (0.607, 0.700, False),  # 0.7 points better: either direction is a different model
    (0.600, 0.680, False),  # cut-out IoU 0.02 worse, mIoU unchanged
    (0.600, 0.712, False),  # cut-out IoU 0.012 better
])
def test_the_gate_compares_the_int8_models_own_scores_with_the_floats(tmp_path, data, monkeypatch, int8_miou, int8_fg,
                                                                       written):
    """The scores each model gets are set here (the float file's, and any other file's: the int8 copy's): the copy
    is written exactly when |mIoU change| <= 0.005 and |cut-out IoU change| <= 0.01, as the module says."""
    model = build_net(tmp_path / "net.onnx")

    def scored(remover, pairs, progress=False):
        mine = remover.model_path == model
        miou, fg = (0.600, 0.700) if mine else (int8_miou, int8_fg)
        return {"mIoU": miou, "pixel_accuracy": 0.9, "ms_per_image": 1.0,
                "cutout": {"fg_iou": fg, "boundary_f": 0.5, "mae": 0.1}}  # fmt: skip

    monkeypatch.setattr(qz.cutout_eval, "evaluate", scored)
    out = tmp_path / "net.int8.onnx"
    code = qz.main(["--model", str(model), "--data-root", str(data), "--calib-frames", "2", "--threads", "1", "--quiet"])
    assert (code, out.exists()) == ((0, True) if written else (1, False))
    if written:
        ev = BackgroundRemover(out).meta["quantization"]["eval"]
        assert (ev["float"]["mIoU"], ev["int8"]["mIoU"], ev["int8"]["fg_iou"]) == (0.600, int8_miou, int8_fg)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--calib-frames", "0"], 2, "--calib-frames must be >= 1"),
        (["--eval-limit", "0"], 2, "--eval-limit must be >= 1"),
        (["--threads", "-1"], 2, "--threads must be >= 0"),
        (["--model", "nope.onnx"], 1, "model file not found: nope.onnx"),
        (["--model", "/dev/null"], 1, "model /dev/null is not a regular file, not an ONNX file"),  # "not found"
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, args, code, message, capsys):
    assert qz.main(args) == code
    err = capsys.readouterr().err
    assert err.startswith("python -m bgremover.quantize: error: ") and message in err and err.count("\n") == 1


def test_an_unwritable_out_is_refused_before_calibrating(tmp_path, capsys):
    """It calibrated, quantized and scored both models, then said "unexpected FileExistsError"."""
    model = build_net(tmp_path / "net.onnx")
    afile = tmp_path / "a.jpg"
    afile.write_text("x")
    for out, message in ((f"{afile}/x.onnx", "is a file, not a folder"), (str(tmp_path), "is a folder")):
        assert qz.main(["--model", str(model), "--out", out, "--data-root", str(tmp_path / "none"), "-q"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("python -m bgremover.quantize: error: --out") and message in err and err.count("\n") == 1, err


def test_refuses_to_overwrite_the_float_model_or_run_without_data(tmp_path, data, capsys):
    model = build_net(tmp_path / "net.onnx")
    before = model.read_bytes()
    assert qz.main(["--model", str(model), "--out", str(model), "--data-root", str(data)]) == 1
    assert "would overwrite the float model" in capsys.readouterr().err and model.read_bytes() == before
    import os

    os.link(model, tmp_path / "same.onnx")  # a hard link is the same file (its path differs)
    assert qz.main(["--model", str(model), "--out", str(tmp_path / "same.onnx"), "--data-root", str(data)]) == 1
    assert "would overwrite the float model" in capsys.readouterr().err and model.read_bytes() == before
    assert qz.main(["--model", str(model), "--data-root", str(tmp_path / "none")]) == 1
    assert "dataset folder not found" in capsys.readouterr().err and not int8_path(model).exists()


def test_quantize_imports_no_torch():
    code = ("import sys, bgremover.quantize, onnxruntime.quantization; "
            "print(sorted(m for m in ('torch', 'lightning', 'pytorch_lightning', 'hydra') if m in sys.modules))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]


def test_a_folder_as_model_is_named_a_folder(tmp_path, capsys):
    """It said "model file not found" of a folder that is there."""
    assert qz.main(["--model", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"python -m bgremover.quantize: error: model {tmp_path} is a folder, not an ONNX file\n"


def test_an_int8_copy_is_not_quantized_again(tmp_path, data, monkeypatch, capsys):
    """Re-quantizing an int8 copy (also the default while $BGREMOVER_MODEL names one) printed 61 onnxruntime
    warnings, then an error naming a temp file. Its metadata's quantization record says what it is."""
    model = build_net(tmp_path / "net.int8.onnx")
    m = onnx.load(str(model))
    doc = json.loads(m.metadata_props[0].value)
    m.metadata_props[0].value = json.dumps({**doc, "quantization": {"source": "net.onnx"}})
    onnx.save(m, str(model))
    message = f"python -m bgremover.quantize: error: model {model} is already an int8 copy (of net.onnx): give the float model as --model\n"
    assert qz.main(["--model", str(model), "--data-root", str(data), "--calib-frames", "2", "-q"]) == 1
    assert capsys.readouterr().err == message
    monkeypatch.setenv("BGREMOVER_MODEL", str(model))
    assert qz.main(["--data-root", str(data), "--calib-frames", "2", "-q"]) == 1
    assert capsys.readouterr().err == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CamVid", "net.int8.onnx"]  # nothing written


def test_an_eval_limit_is_recorded_and_flagged_partial(tmp_path, data, capsys):
    """--eval-limit 2 stored "frames": 2 without the split's size and printed "on 2 test frames": a score over
    part of the split read as the split's. Now as eval prints it: "(2 of 3 frames, PARTIAL)"."""
    model = build_net(tmp_path / "net.onnx")
    assert qz.main(["--model", str(model), "--data-root", str(data), "--calib-frames", "2", "--eval-limit", "2",
                    "--threads", "1", "-q"]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert [line.endswith("ms/image on test (2 of 3 frames, PARTIAL)") for line in out[1:3]] == [True, True], out
    assert out[3].startswith(f"wrote {int8_path(model)}") and out[3].endswith(" (2 of 3 frames, PARTIAL)")
    rec = BackgroundRemover(int8_path(model), threads=1).meta["quantization"]
    assert rec["eval"]["split"] == "test" and rec["eval"]["frames"] == 2 and rec["eval"]["of"] == 3


def test_an_out_that_is_some_other_file_is_not_replaced(tmp_path, data, capsys):
    """`--out models/bgremover-camvid.pt` (a slip for .onnx) or `--out notes.txt` calibrated, scored, and replaced
    that file with the int8 model, where export refuses the same --out; an earlier ONNX model is still replaced."""
    model = build_net(tmp_path / "net.onnx")
    for name, content in (("weights.pt", b"PK\x03\x04 torch weights"), ("notes.txt", b"my notes\n"), ("empty.onnx", b"")):
        other = tmp_path / name
        other.write_bytes(content)
        args = ["--model", str(model), "--out", str(other), "--data-root", str(data), "--calib-frames", "2", "-q"]
        assert qz.main(args) == 1
        assert capsys.readouterr().err == (f"python -m bgremover.quantize: error: --out {other} exists and is not an "
                                           "ONNX model: not replacing it (move it, or give another name)\n")
        assert other.read_bytes() == content
    earlier = tmp_path / "earlier.int8.onnx"
    earlier.write_bytes(model.read_bytes())
    assert qz.main(["--model", str(model), "--out", str(earlier), "--data-root", str(data), "--calib-frames", "2",
                    "-q"]) == 0
    assert "quantization" in BackgroundRemover(earlier).meta


def test_sigterm_during_quantize_removes_its_temp_folder(tmp_path, data):
    """`kill` during the calibration ended quantize outright: its temp folder (the preprocessed model, the
    calibration's files) stayed in $TMPDIR. It now unwinds as Ctrl-C does, exit 143, nothing written."""
    import signal

    model = build_net(tmp_path / "net.onnx")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code = ("import os, signal, sys, time\n"
            "import onnxruntime.quantization as q\n"
            "from bgremover import quantize\n"
            "def calibrate(*args, **kwargs):  # the temp folder holds the preprocessed model: a SIGTERM comes\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n"
            "q.quantize_static = calibrate\n"
            f"sys.exit(quantize.main(['--model', {str(model)!r}, '--data-root', {str(data)!r}, '-q']))\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(scratch)})
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert proc.stderr == "python -m bgremover.quantize: interrupted by SIGTERM\n"
    assert not list(scratch.glob("bgremover-quantize-*")) and not int8_path(model).exists()


def test_a_trial_does_not_replace_a_copy_scored_on_more_frames(tmp_path, data, capsys):
    """`make quantize ARGS="--eval-limit 20"` replaced the shipped int8 copy, whose record covered all 233 test
    frames, with one scored on 20 (its default --out): now refused before calibrating, unless --force; a copy of
    another float model (stale) is still replaced."""
    model = build_net(tmp_path / "net.onnx")
    base = ["--model", str(model), "--data-root", str(data), "--calib-frames", "2", "--threads", "1", "-q"]
    assert qz.main(base) == 0
    full = int8_path(model).read_bytes()
    capsys.readouterr()
    assert qz.main([*base, "--eval-limit", "2"]) == 1
    assert capsys.readouterr().err == (
        f"python -m bgremover.quantize: error: --out {int8_path(model)} is this model's int8 copy scored on 3 test "
        "frames, this trial scores 2 (2 of 3 frames, PARTIAL): not replacing it (give another --out, or --force)\n")
    assert int8_path(model).read_bytes() == full
    assert qz.main([*base, "--eval-limit", "2", "--force"]) == 0
    assert BackgroundRemover(int8_path(model), threads=1).meta["quantization"]["eval"]["frames"] == 2
    assert qz.main(base) == 0  # a full scoring replaces a partial one
    doc = onnx.load(str(int8_path(model)))
    props = {p.key: p for p in doc.metadata_props}
    meta = json.loads(props["bgremover"].value)
    meta["quantization"]["source_sha256"] = "0" * 64  # made from an earlier float model
    props["bgremover"].value = json.dumps(meta)
    onnx.save(doc, str(int8_path(model)))
    assert qz.main([*base, "--eval-limit", "2"]) == 0
    assert BackgroundRemover(int8_path(model), threads=1).meta["quantization"]["eval"]["frames"] == 2


def test_an_int8_copy_keeps_where_it_came_from_and_says_when_it_was_made(tmp_path, data, capsys):
    """The int8 copy's document is the float model's: its `trained` record travels (quantize did not change where
    the weights came from), and its only date was the float file's exported_at, so `make model-info` could not tell
    a copy quantized months later (another onnxruntime) from one made the same day. The record now dates the copy."""
    import datetime as dt

    from bgremover import predict

    model = build_net(tmp_path / "net.onnx")
    m = onnx.load(str(model))
    trained = {"checkpoint": "epoch_003.ckpt", "epochs": 4, "global_step": 8, "run": "r", "data": "CamVid"}
    for prop in m.metadata_props:
        if prop.key == "bgremover":
            prop.value = json.dumps({**json.loads(prop.value), "trained": trained})
    onnx.save(m, str(model))
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    qz.quantize(model, int8_path(model), data, calib_frames=3, threads=1, log=lambda *a: None)
    after = dt.datetime.now(dt.timezone.utc)
    meta = BackgroundRemover(int8_path(model), threads=1).meta
    assert meta["trained"] == trained and meta["exported_at"] == "2025-01-01T00:00:00+00:00"
    made = meta["quantization"]["quantized_at"]
    assert before <= dt.datetime.fromisoformat(made) <= after
    capsys.readouterr()
    assert predict.main(["--info", "-m", str(int8_path(model))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"quantized: int8 copy of net.onnx (sha256 {file_sha256(model)[:12]}) made {made}; calibrated on 3 frames " \
        "of train; test mIoU" in "\n".join(lines)
    assert "trained: run r; data CamVid; 4 epochs, 8 steps; checkpoint epoch_003.ckpt" in lines
