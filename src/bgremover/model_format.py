"""The exported model's contract: one ONNX file whose metadata says everything inference needs.

Torch-free: `bgremover.export` writes this document and `bgremover.remover` (onnxruntime + numpy + Pillow) reads
it, so both sides share one definition of the format instead of two copies that must be kept in step.
"""

from __future__ import annotations

import json
import math
from typing import Any

from bgremover.errors import count, one_line

FORMAT = "bgremover-onnx"  # value of metadata["format"]; the predictor refuses anything else
FORMAT_VERSION = 1  # bump when the metadata or the I/O contract changes incompatibly
METADATA_KEY = "bgremover"  # ONNX metadata_props key holding the JSON document
INPUT_NAME = "image"  # N x 3 x H x W float32, (rgb/255 - mean)/std
OUTPUT_NAME = "logits"  # N x K x H x W float32


class FormatError(ValueError):
    """The metadata is missing, from another format or version, or incomplete."""


def document(meta: dict[str, Any], exported_at: str, version: str) -> dict[str, Any]:
    """The JSON document stored under METADATA_KEY, from a checkpoint's description of its net and run."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "classes": [str(c) for c in meta["classes"]],
        "mean": [float(v) for v in meta["mean"]],
        "std": [float(v) for v in meta["std"]],
        "size_multiple": int(meta.get("size_multiple", 32)),
        "default_foreground": [str(c) for c in meta.get("default_foreground", [])],
        # long side (px) the net was trained at (an image/mask folder's data.image_size); the predictor scales
        # larger images down to it by default. None: trained on images at their own size (CamVid)
        "image_size": None if meta.get("image_size") is None else int(meta["image_size"]),
        "net": str(meta.get("net", "net")),
        "params": int(meta.get("params", 0)),
        "test_mIoU": meta.get("test_mIoU"),
        # frames the test mIoU covers, of the split's total: a partial test set is never "CamVid test"
        "test_frames": meta.get("test_frames"),
        "test_frames_of": meta.get("test_frames_of"),
        # where the weights came from (checkpoint.provenance): run, experiment, data, epochs, commit; optional,
        # as files exported before it was written have none
        **({"trained": dict(meta["trained"])} if meta.get("trained") else {}),
        "exported_at": exported_at,
        "bgremover_version": version,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
    }


def parse(raw: str | None) -> dict[str, Any]:
    """The checked document from the raw metadata string; FormatError says what is wrong in one line."""
    if raw is None:
        raise FormatError(f"not a bgremover model (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise FormatError("not a bgremover model (unreadable metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FormatError(f"not a bgremover model (format is not {FORMAT!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise FormatError(f"model uses {FORMAT} format v{meta.get('format_version')}; this version reads "
                          f"v{FORMAT_VERSION}: upgrade bgremover")
    for field, required, fits, what in _FIELDS:
        value = _at(meta, field)
        if value is _MISSING or value is None:
            if required:
                raise FormatError(f"bgremover metadata is incomplete: no {field}")
        elif not fits(value):
            # another tool's (or a hand edit's) metadata: mean ["a", 0, 0] ended a cut-out in "unexpected
            # ValueError" and make model-info in a traceback, neither naming the file's field
            raise FormatError(f"bgremover metadata is invalid: {field} is {one_line(json.dumps(value), 80)}, "
                              f"not {what}")
    return meta


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _score(v: Any) -> bool:  # a diverged run's test numbers are NaN: its model still loads and says so
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


_MISSING = object()
# (field, dotted inside the document; required; check; what it must be): what the predictor, `--info` and
# eval-cutout read from a model, as numbers, names and records. `trained` is free-form: `describe` shows an
# unreadable one as it is (the model still cuts out)
_FIELDS = (
    ("classes", True, lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) and c for c in v),
     "a list of 2 or more class names"),
    ("mean", True, lambda v: isinstance(v, list) and len(v) == 3 and all(map(_number, v)), "3 numbers (RGB)"),
    ("std", True, lambda v: isinstance(v, list) and len(v) == 3 and all(_number(x) and x > 0 for x in v),
     "3 numbers above 0 (RGB)"),
    ("size_multiple", True, lambda v: _whole(v) and v >= 1, "a whole number from 1"),
    ("image_size", False, lambda v: _whole(v) and v >= 1, "a whole number of pixels from 1"),
    ("default_foreground", False, lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
     "a list of class names"),
    ("params", False, _whole, "a whole number"),
    ("test_mIoU", False, _score, "a number"),
    ("test_frames", False, _whole, "a whole number"),
    ("test_frames_of", False, _whole, "a whole number"),
    ("quantization", False, lambda v: isinstance(v, dict), "a record"),
    ("quantization.calibration", False, lambda v: isinstance(v, dict), "a record"),
    ("quantization.calibration.frames", False, _whole, "a whole number"),
    ("quantization.eval", False, lambda v: isinstance(v, dict), "a record"),
    ("quantization.eval.frames", False, _whole, "a whole number"),
    ("quantization.eval.of", False, _whole, "a whole number"),
    *((f"quantization.eval.{kind}", False, lambda v: isinstance(v, dict), "a record") for kind in ("float", "int8")),
    *((f"quantization.eval.{kind}.mIoU", False, _score, "a number") for kind in ("float", "int8")),
)


def _at(meta: dict[str, Any], field: str) -> Any:
    """The document's value at a dotted field; _MISSING where it, or a record on the way, is not there (a record
    that is not one was refused before its fields are looked at: _FIELDS lists it first)."""
    value: Any = meta
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def describe(meta: dict[str, Any], test: tuple[float | None, int | None, int | None]) -> list[str]:
    """A model's description, a line each (`bgremover-predict --info`): what it segments, how its input is made,
    its test score (`test`: mIoU, frames, of the split's: an int8 copy's own) and where its weights came from."""
    k = len(meta["classes"])
    lines = [f"net: {meta.get('net', 'net')}, {int(meta.get('params') or 0) / 1e6:.2f} M parameters"
             + (", int8 (quantized)" if meta.get("quantization") else ", float"),
             f"classes ({k}): {', '.join(meta['classes'])}",
             f"foreground by default: {', '.join(meta.get('default_foreground') or []) or 'none'}",
             f"input: RGB/255 - mean {meta['mean']}, / std {meta['std']}, padded to a multiple of "
             f"{meta['size_multiple']}; " + (f"images scaled to a long side of {meta['image_size']} px"
                                             if meta.get("image_size") else "images at their own size")]
    miou, frames, of = test
    if miou is None:
        lines.append("test mIoU: not recorded")
    else:
        partial = "" if frames is None or of is None or frames == of else " (PARTIAL: not the split's)"
        # an int8 copy quantized before its record kept the split's size ("of") still says how many frames it is
        on = "" if frames is None else f" on {frames} of {count(of, 'frame')}" if of is not None else \
            f" on {count(frames, 'frame')}"
        lines.append(f"test mIoU: {100 * float(miou):.1f}{on}{partial}")
    quantized = meta.get("quantization")
    if isinstance(quantized, dict):  # the file is not the export: say what quantize made it from, and how
        calib, scored = quantized.get("calibration") or {}, quantized.get("eval") or {}
        said = [f"int8 copy of {quantized.get('source', 'a float model')}"
                + (f" (sha256 {str(quantized['source_sha256'])[:12]})" if quantized.get("source_sha256") else "")
                + (f" made {quantized['quantized_at']}" if quantized.get("quantized_at") else "")]
        if calib.get("frames"):
            said.append(f"calibrated on {count(int(calib['frames']), 'frame')} of {calib.get('split', '?')}")
        if (scored.get("float") or {}).get("mIoU") is not None and (scored.get("int8") or {}).get("mIoU") is not None:
            said.append(f"{scored.get('split', 'test')} mIoU {100 * scored['int8']['mIoU']:.1f} int8 vs "
                        f"{100 * scored['float']['mIoU']:.1f} float on the same frames")
        lines.append("quantized: " + "; ".join(said))
    trained = meta.get("trained")
    if not trained:
        lines.append("trained: not recorded (exported before models said where they came from)")
    else:
        try:
            lines.append("trained: " + _trained(trained))
        except (AttributeError, TypeError, ValueError):  # edited by hand or another tool: shown, not a traceback
            lines.append(f"trained: unreadable record: {one_line(json.dumps(trained, default=str), 200)}")
    lines.append(f"exported: {meta.get('exported_at', 'unknown')} by bgremover {meta.get('bgremover_version', '?')}")
    return lines


def _trained(trained: dict[str, Any]) -> str:
    """The `trained` record (checkpoint.provenance) as one line's text."""
    said = [f"{key} {trained[key]}" for key in ("experiment", "run", "seed") if trained.get(key) is not None]
    if trained.get("data"):
        split = [trained["train_split"]] if trained.get("train_split") else []
        if trained.get("train_limit"):
            split.append(f"at most {count(int(trained['train_limit']), 'image')}: data.limit_images")
        said.append(f"data {trained['data']}" + (f" ({', '.join(split)})" if split else ""))
    if trained.get("init"):
        said.append(f"fine-tuned from {trained['init']}")
    if trained.get("epochs") is not None:
        said.append(f"{count(int(trained['epochs']), 'epoch')}, {count(int(trained.get('global_step') or 0), 'step')}")
    if trained.get("run_wall_time_s") is not None:  # the whole run's, which may have gone on past this checkpoint
        run = [count(int(trained["run_epochs"]), "epoch")] if trained.get("run_epochs") is not None else []
        said.append("its run " + ", ".join([*run, f"{float(trained['run_wall_time_s']):.0f} s of training"])
                    + (f" on {trained['hardware']}" if trained.get("hardware") else ""))
    if trained.get("commit"):
        said.append(f"code {trained['commit']}")
    if trained.get("wandb"):
        run = trained["wandb"]
        said.append(f"W&B run {run.get('name') or run.get('id')} ({'/'.join(str(run[k]) for k in ('project', 'id') if run.get(k))}"
                    + (", logged offline" if run.get("offline") else "") + ")")
    if trained.get("checkpoint"):
        said.append(f"checkpoint {trained['checkpoint']}" + (f" via {trained['via']}" if trained.get("via") else ""))
    return "; ".join(said)


def is_onnx_model(path) -> bool:
    """Whether the file at `path` holds an ONNX model, i.e. one an `--out` may replace (export's and quantize's:
    any other file of the user's is refused). A graph with nodes: protobuf reads an empty file as an empty model."""
    import onnx

    try:
        return len(onnx.load(str(path), load_external_data=False).graph.node) > 0
    except Exception:  # onnx raises protobuf's DecodeError, ValueError, OSError... for what is not a model
        return False


def is_torchscript(path) -> bool:
    """Whether the file at `path` is a TorchScript model (export's --torchscript copy): torch.jit.save's zip holds
    a code/ folder; torch.save's (a checkpoint, the shipped .pt weights) does not."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def missing_model_problem(path) -> str | None:
    """What stands where a model file is named and is no file (absent, a folder, a device or pipe), in the
    predictor's and quantize's words; None for a regular file."""
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        return None
    if path.is_dir():
        return f"model {path} is a folder, not an ONNX file"
    if path.exists():  # /dev/null, a pipe: "not found" of a path that is there misled
        return f"model {path} is not a regular file, not an ONNX file"
    return f"model file not found: {path}"


def not_a_model_problem(path) -> str | None:
    """What a file onnxruntime cannot load is instead (a PyTorch file, an image), and what to give instead; None
    for other files: onnxruntime's own "INVALID_PROTOBUF" said nothing of the mix-up."""
    import os
    import zipfile

    from bgremover.images import image_format

    if os.path.getsize(path) == 0:  # an interrupted copy or download: onnxruntime said "No graph was found"
        return f"model {path} is empty (0 bytes), not an ONNX model: copy or export it again"
    if is_torchscript(path):  # export's --torchscript copy: "export it first" (below) could not work
        return f"model {path} is a TorchScript model (export's --torchscript copy), not an ONNX model: give the " \
               ".onnx file exported with it"
    if zipfile.is_zipfile(path):  # torch.save's zip: a run's .ckpt, the shipped .pt weights
        return f"model {path} is a PyTorch checkpoint, not an ONNX model: export it first (make export CKPT={path})"
    if kind := image_format(path):  # `-m photo.jpg`, the image where the model goes
        return f"model {path} is an image ({kind}), not an ONNX model: -m/--model names the model; give the image " \
               "as an input"
    return None
