"""`python -m bgremover.quantize`: an int8 copy of an exported model, written only if it scores like the float one.

    python -m bgremover.quantize [--model models/bgremover-camvid.onnx] [--out <model>.int8.onnx]
                                 [--data-root D] [--calib-frames 50] [--eval-limit N] [--threads N] [--force]

Static int8 in ONNX's QDQ form (onnxruntime.quantization.quantize_static), which onnxruntime fuses into its
integer kernels: about a third of the float32 inference time on this project's AVX-512-VNNI CPU
(benchmarks/predict_latency.py prints the end-to-end figures). The choices, and why:
  - U8S8: uint8 asymmetric activations, int8 symmetric per-channel weights, min/max calibration: the operand
    pair of the x86 integer kernels (VNNI's vpdpbusd on AVX-512 machines, vpmaddubsw on AVX2-only ones).
  - The same answers on AVX2-only CPUs. vpmaddubsw adds two uint8 x int8 products in 16 bits and saturates: with
    8-bit weights the AVX2 kernels gave other cut-outs than VNNI's (measured under QEMU's AVX2-only CPU model,
    models/README.md). Weights of GEMM convolutions (all but depthwise) therefore get 7 bits (|w| <= 64, so
    2 x 255 x 64 < 2^15: no saturation possible); depthwise convolutions keep 8 bits (their kernel accumulates
    in 32 bits on every ISA). With both, AVX2 and VNNI results were bit-identical.
  - The stem (the first convolution, on normalized pixels) stays float: quantized with 7-bit weights it alone
    shrank the cut-outs systematically (foreground pixels 8.0 % -> 7.5 % of 3 test frames); float it costs ~1 ms.
  - The node that produces the logits (DeepLabV3+'s final 4x bilinear upsampling) stays float, so the
    full-resolution logits and the soft alpha are not cut into 256 levels.
  - Calibration: `--calib-frames` evenly spaced CamVid train frames (never test), turned into net input by
    the predictor itself (BackgroundRemover.prepare: the same padding and normalization as at inference).
Accuracy gate (the project's rule for shipping a quantised model): the float and the int8 model both go through
`cutout_eval` on CamVid test (all 233 frames unless --eval-limit); the file is written (temp name, then rename)
only if the test mIoU stays within 0.5 points and the cut-out (foreground) IoU within 0.01 of the float model's,
in either direction. Otherwise exit 1 and nothing is written. The copy's metadata is the float model's plus
`quantization`: the scheme, the calibration, both evaluations, the float file's sha256 (the predictor uses the
shipped copy only while it matches the float file beside it) and the date it was made.
An --eval-limit trial does not replace an int8 copy of the same float model scored on more test frames (the
default --out is the shipped copy, whose record covers the whole split) unless --force: as `make ship`, which
installs nothing scored on part of the split unless forced.
Exit codes: 0 written; 1 gate failed, data or model missing or unusable (an int8 copy included); 2 bad option
values; 130 interrupted, 143 terminated (SIGTERM).

Imports onnxruntime's quantization tools and onnx, never torch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bgremover import cutout_eval, errors, model_format
from bgremover.data.camvid import DEFAULT_ROOT, ROOT_ENV, resolve_root
from bgremover.files import Terminated, replacing, same_file, sigterm_raises, stop_of
from bgremover.images import open_image, to_rgba_arrays
from bgremover.remover import (
    BackgroundRemover,
    BgRemoverError,
    ModelError,
    default_model_path,
    file_sha256,
    int8_path,
)

PROG = "python -m bgremover.quantize"  # the command as run, in its usage line and messages
CALIB_FRAMES = 50  # evenly spaced CamVid train frames for min/max calibration (~1 min on 2 cores)
MAX_MIOU_CHANGE = 0.005  # |int8 - float| test mIoU (0.5 points) allowed, or the copy is not written
MAX_FG_IOU_CHANGE = 0.01  # |int8 - float| cut-out (foreground) IoU allowed
FLOAT_OPS_AT_OUTPUT = ("Resize", "Upsample")  # a final upsampling of the logits stays float (full-res alpha)


class QuantizeError(BgRemoverError):
    """The int8 copy cannot be made or failed the accuracy gate: one line, exit 1."""


class _CalibrationFrames:
    """onnxruntime's CalibrationDataReader protocol over CamVid frames, prepared exactly as the predictor does."""

    def __init__(self, remover: BackgroundRemover, images: Sequence[Path]) -> None:
        self.remover, self.images, self.pos = remover, list(images), 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.images):
            return None
        rgb = to_rgba_arrays(open_image(self.images[self.pos]))[0]
        self.pos += 1
        return {self.remover.input_name: self.remover.prepare(rgb)[0]}

    def rewind(self) -> None:
        self.pos = 0


def _scores(report: dict[str, Any]) -> dict[str, Any]:
    cut = report["cutout"]
    return {"mIoU": report["mIoU"], "fg_iou": cut["fg_iou"], "boundary_f": cut["boundary_f"], "mae": cut["mae"],
            "pixel_accuracy": report["pixel_accuracy"], "ms_per_image": report["ms_per_image"]}  # fmt: skip


def _output_node(model, output_name: str):
    return next((n for n in model.graph.node if output_name in n.output), None)


def _stem_conv(model, input_name: str):
    """The first Conv reading the net's input itself (None if the input goes elsewhere first)."""
    return next((n for n in model.graph.node if n.op_type == "Conv" and n.input[0] == input_name), None)


def _gemm_conv_weights(model, exclude: Sequence[str]) -> list[str]:
    """Weight names of the Convs onnxruntime runs as a GEMM: all but depthwise ones (one input channel per
    group), i.e. those whose uint8 x int8 products AVX2 sums in saturating 16-bit pairs."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name in exclude or node.input[1] not in shapes:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if not (group > 1 and shapes[node.input[1]][1] == 1):
            names.append(node.input[1])
    return names


class _PerTensorNotice(logging.Filter):
    """onnxruntime warns once per rank-1 weight (FC-DenseNet's BatchNormalization scales: BN comes before its conv
    there, so it is not folded) that per-channel does not apply, and quantizes it per tensor, which is right for
    a vector: hundreds of lines that say nothing, dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("is out-of-range for weight" in message and message.endswith("with rank 1"))


def _copy_scored_on(out: Path, model_path: Path) -> int:
    """How many test frames scored the int8 copy of `model_path` (the same bytes) at `out`; 0 if `out` is no such
    copy (none, another file, or a copy of another float model: stale, so any new copy is better)."""
    import onnx

    try:
        props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
        record = json.loads(props[model_format.METADATA_KEY])["quantization"]
        frames = int(record["eval"]["frames"])
        same = record["source_sha256"] == file_sha256(model_path)
    except Exception:  # not there, not a model, no record: nothing worth keeping
        return 0
    return frames if same else 0


def quantize(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    data_root: str | os.PathLike,
    calib_frames: int = CALIB_FRAMES,
    eval_limit: int | None = None,
    threads: int | None = None,
    progress: bool = False,
    log=print,
    force: bool = False,
) -> dict[str, Any]:
    """Calibrate, quantize, evaluate both models, write `out` if the gate passes; returns the `quantization`
    record (QuantizeError, with nothing written, when the gate fails)."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model_path, out = Path(model_path), Path(out)
    if same_file(out, model_path):  # a hard link too
        raise QuantizeError(f"--out {out} would overwrite the float model")
    float_remover = cutout_eval.load_remover(model_path, threads=threads)
    if isinstance(done := float_remover.meta.get("quantization"), dict):  # ($BGREMOVER_MODEL at the int8 copy)
        # quantizing it again printed 61 onnxruntime warnings, then failed naming a temp file
        raise QuantizeError(f"model {model_path} is already an int8 copy (of {done.get('source') or 'a float model'}): "
                            "give the float model as --model")
    from bgremover.data.camvid import select
    from bgremover.utils import frames_note

    train = cutout_eval.find_pairs(data_root, "train", calib_frames)
    every = cutout_eval.find_pairs(data_root, "test")
    test = select(every, eval_limit)  # the split's size kept: a --eval-limit score is flagged PARTIAL
    note = frames_note({"frames": len(test), "of": len(every), "complete": len(test) == len(every)})
    kept = _copy_scored_on(out, model_path)
    if kept > len(test) and not force:  # before the calibration and two scorings, not after
        # `make quantize ARGS="--eval-limit 20"` replaced the shipped copy, scored on all 233 test frames, with one
        # scored on 20: the full record was gone (as eval never lets fewer test frames replace a run's numbers)
        raise QuantizeError(f"--out {out} is this model's int8 copy scored on {kept} test frames, this trial scores "
                            f"{len(test)}{note}: not replacing it (give another --out, or --force)")

    with tempfile.TemporaryDirectory(prefix="bgremover-quantize-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        t0 = time.perf_counter()
        # shape inference + onnxruntime's basic graph optimizations, as onnxruntime's docs ask before quantizing
        quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre))
        for i, node in enumerate(graph.graph.node):  # quantize_static selects nodes by name: none may be blank
            node.name = node.name or f"{node.op_type}_{i}"
        onnx.save(graph, str(pre))
        last = _output_node(graph, float_remover.output_name)
        keep_float = [last.name] if last is not None and last.op_type in FLOAT_OPS_AT_OUTPUT else []
        stem = _stem_conv(graph, float_remover.input_name)
        keep_float += [stem.name] if stem is not None else []
        seven_bit = _gemm_conv_weights(graph, exclude=keep_float)
        notice = _PerTensorNotice()
        logging.getLogger().addFilter(notice)  # onnxruntime.quantization logs through the root logger
        try:
            quantize_static(
                str(pre), str(q), _CalibrationFrames(float_remover, [img for img, _ in train]),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                per_channel=True, reduce_range=False, calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=keep_float,
                extra_options={"TensorQuantOverrides": {w: [{"axis": 0, "reduce_range": True}] for w in seven_bit}},
            )  # fmt: skip
        finally:
            logging.getLogger().removeFilter(notice)
        log(f"calibrated on {len(train)} train frames and quantized in {time.perf_counter() - t0:.0f}s")

        int8_remover = cutout_eval.load_remover(q, threads=threads)
        scores = {}
        for name, remover in (("float", float_remover), ("int8", int8_remover)):
            scores[name] = _scores(cutout_eval.evaluate(remover, test, progress=progress))
            log(f"{name:>5}: test mIoU {100 * scores[name]['mIoU']:.2f} %, cut-out IoU {100 * scores[name]['fg_iou']:.2f} "
                f"%, boundary F {100 * scores[name]['boundary_f']:.2f} %, alpha MAE {scores[name]['mae']:.4f}, "
                f"{scores[name]['ms_per_image']:.0f} ms/image on test{note}")  # fmt: skip
        d_miou = scores["int8"]["mIoU"] - scores["float"]["mIoU"]
        d_fg = scores["int8"]["fg_iou"] - scores["float"]["fg_iou"]
        if abs(d_miou) > MAX_MIOU_CHANGE or abs(d_fg) > MAX_FG_IOU_CHANGE:
            raise QuantizeError(
                f"int8 model changes test mIoU by {100 * d_miou:+.2f} points (limit ±{100 * MAX_MIOU_CHANGE:.1f}) and "
                f"cut-out IoU by {100 * d_fg:+.2f} points (limit ±{100 * MAX_FG_IOU_CHANGE:.1f}): not written"
            )

        record = {
            "scheme": "onnxruntime static int8, QDQ: uint8 asymmetric activations (min/max calibration), int8 "
                      "symmetric per-channel weights, 7-bit for GEMM convolutions and 8-bit for depthwise ones",
            "seven_bit_weights": len(seven_bit),
            "float_nodes": keep_float,
            "calibration": {"split": "train", "frames": len(train)},
            "source": model_path.name,
            "source_sha256": file_sha256(model_path),
            # the copy's own date: its document is the float model's, whose exported_at it keeps
            "quantized_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "onnxruntime": onnxruntime.__version__,
            "eval": {"split": "test", "frames": len(test), "of": len(every), **scores},  # records before: no "of"
            "gate": {"max_mIoU_change": MAX_MIOU_CHANGE, "max_fg_iou_change": MAX_FG_IOU_CHANGE},
        }  # fmt: skip
        quantized = onnx.load(str(q))
        props = {p.key: p for p in quantized.metadata_props}
        doc = json.loads(props[model_format.METADATA_KEY].value)  # quantize_static keeps the float model's props
        doc["quantization"] = record
        props[model_format.METADATA_KEY].value = json.dumps(doc)
        out.parent.mkdir(parents=True, exist_ok=True)
        with replacing(out) as tmp_out:
            onnx.save(quantized, str(tmp_out))
    return record


def _parser() -> argparse.ArgumentParser:
    p = errors.OneLineParser(
        prog=PROG,
        description="Write an int8 copy of a bgremover ONNX model if it keeps the float model's CamVid accuracy.",
        epilog="Exit codes: 0 written, 1 accuracy gate failed or data/model unusable, 2 bad option value.",
    )
    p.add_argument("--model", "-m", help="float ONNX model (default $BGREMOVER_MODEL or models/bgremover-camvid.onnx)")
    p.add_argument("--out", "-o", help="int8 model to write (default <model>.int8.onnx beside it)")
    p.add_argument("--data-root", help=f"CamVid folder (default ${ROOT_ENV}, else {DEFAULT_ROOT})")
    p.add_argument("--calib-frames", type=int, default=CALIB_FRAMES, help=f"train frames for calibration ({CALIB_FRAMES})")
    p.add_argument("--eval-limit", type=int, help="score N evenly spaced test frames instead of all (quick trials only)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads for the evaluation (default: all cores)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it is this model's int8 copy scored on more test frames")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (code := errors.below_minimum(args, {"calib_frames": 1, "eval_limit": 1, "threads": 0}, PROG)) is not None:
        return code
    model = Path(args.model) if args.model else default_model_path()
    out = Path(args.out) if args.out else int8_path(model)
    data_root = resolve_root(args.data_root)
    try:
        if problem := model_format.missing_model_problem(model):  # the predictor's words
            raise ModelError(problem)
        errors.check_writable(args.out or out, "--out")  # before the calibration and two scorings, not after
        if out.is_file() and not model_format.is_onnx_model(out):  # a mistyped --out (the .pt weights, notes.txt)
            raise QuantizeError(f"--out {out} exists and is not an ONNX model: not replacing it (move it, or give "
                                "another name)")
        with sigterm_raises():  # `kill`, `timeout`: as Ctrl-C, its temp folder and file removed
            record = quantize(model, out, data_root, args.calib_frames, args.eval_limit, args.threads,
                              progress=not args.quiet, force=args.force)  # fmt: skip
    except (KeyboardInterrupt, Terminated) as e:
        how, code = stop_of(e)
        print(f"{PROG}: {how}", file=sys.stderr)
        return code
    except errors.UserError as e:
        return errors.report(e, PROG, 1)
    except Exception as e:  # a bug or an onnxruntime failure: still one line, never a traceback
        return errors.report(f"unexpected {type(e).__name__}: {errors.one_line(e)}", PROG, 1)
    from bgremover.utils import frames_note

    ev = record["eval"]
    note = frames_note({"frames": ev["frames"], "of": ev["of"], "complete": ev["frames"] == ev["of"]})
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): test mIoU {100 * ev['int8']['mIoU']:.2f} % vs "
          f"{100 * ev['float']['mIoU']:.2f} % float, cut-out IoU {100 * ev['int8']['fg_iou']:.2f} % vs "
          f"{100 * ev['float']['fg_iou']:.2f} %"
          f"{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
