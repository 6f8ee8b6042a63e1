"""The exported model's contract: one ONNX file whose metadata says everything inference needs.

Torch-free: `bgremover.export` writes this document and `bgremover.remover` (onnxruntime + numpy + Pillow) reads
it, so both sides share one definition of the format instead of two copies that must be kept in step.
"""

from __future__ import annotations

import json
from typing import Any

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
    try:
        ok = (len(meta["classes"]) >= 2 and len(meta["mean"]) == 3 and len(meta["std"]) == 3
              and all(float(s) > 0 for s in meta["std"]) and int(meta["size_multiple"]) >= 1
              and (meta.get("image_size") is None or int(meta["image_size"]) >= 1))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise FormatError("bgremover metadata is incomplete or invalid")
    return meta


def is_onnx_model(path) -> bool:
    """Whether the file at `path` holds an ONNX model, i.e. one an `--out` may replace (export's and quantize's:
    any other file of the user's is refused). A graph with nodes: protobuf reads an empty file as an empty model."""
    import onnx

    try:
        return len(onnx.load(str(path), load_external_data=False).graph.node) > 0
    except Exception:  # onnx raises protobuf's DecodeError, ValueError, OSError... for what is not a model
        return False
