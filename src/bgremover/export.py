"""Turn a training checkpoint into ONE self-describing ONNX file that `bgremover.predict` can run without torch.

    python -m bgremover.export ckpt=runs/x/checkpoints/best.ckpt [out=model.onnx] [torchscript=true]
    python -m bgremover.export --ckpt runs/x/checkpoints/best.ckpt --out model.onnx --torchscript

The file carries everything the predictor needs (classes, normalization, size multiple, default foreground,
provenance) as JSON under the ONNX metadata key `bgremover`. Before anything is written, the same inputs go
through PyTorch and ONNX Runtime; the export is refused (no file left behind) when they disagree by more than
`tol`. Exit codes: 0 written, 1 bad checkpoint / failed export or verification, 2 usage error, 130 interrupted, 143
terminated (SIGTERM).

Exporter: the TorchScript-based one (`dynamo=False`): torch 2.14's default needs `onnxscript`, no dependency
here; it ships inside torch and says "any batch, any H, any W" with `dynamic_axes`, all a fully-convolutional
net needs. Its DeprecationWarning is silenced on purpose.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch loads inside the functions that use it: a bad option, or a Ctrl-C while it loads
    from torch import nn  # (seconds), is then one line, not a traceback printed before main() could run

from bgremover.errors import OneLineParser, UserError, check_writable, report
from bgremover.files import Terminated, replacing, same_file, sigterm_raises, stop_of
from bgremover.model_format import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAME,
    is_onnx_model,
    is_torchscript,
)

PROG = "python -m bgremover.export"
OPSET = 17  # supported by every onnxruntime >= 1.14 and by the TorchScript exporter
# The opsets --opset takes: from the first with align_corners bilinear resizing (DeepLab's decoder; below it the
# exporter printed its whole ~600-line graph before refusing) to the TorchScript exporter's newest.
MIN_OPSET, MAX_OPSET = 11, 20
TOLERANCE = 1e-4  # max |torch - onnxruntime| on logits before we refuse to write the file
REL_TOLERANCE = 0.1  # or tol × this × the largest |logit| when more (float32 rounding grows with the values)
SHIPPED = Path(__file__).resolve().parents[2] / "models" / "bgremover-camvid.onnx"  # where predict looks
# Verification shapes as multiples of size_multiple: (batch, h, w). Two different shapes, one with batch 2,
# prove the dynamic axes really are dynamic rather than frozen at the tracing shape.
VERIFY_SHAPES = ((1, 3, 4), (2, 2, 3))


class ExportError(UserError):
    """A user-facing failure: bad checkpoint, failed export or failed verification (one line for the CLI)."""


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("bgremover")
    except Exception:  # not installed (e.g. run from a source tree): provenance is best-effort
        return "0+unknown"


def _read_test_result(ckpt_path: Path) -> dict[str, Any]:
    """The run's test mIoU and the frames it covers, from its summary.json (``checkpoint.run_summary``)."""
    from bgremover import checkpoint

    summary = checkpoint.run_summary(ckpt_path)
    if summary is None:
        return {}
    try:
        s = json.loads(summary.read_text())
        value = s["metrics"]["test/mIoU"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no summary (run without test) or an unexpected one: the metric is optional provenance
    # the run's test numbers are its best checkpoint's: another checkpoint of the run (a resumed run's last.ckpt,
    # an earlier epoch) was stamped with them
    if not checkpoint.is_runs_best(ckpt_path, s):
        return {}
    split = s.get("test_split") or {}
    return {"test_mIoU": None if value is None else float(value), "test_frames": split.get("frames"),
            "test_frames_of": split.get("of")}


def load_checkpoint_net(ckpt_path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained net (eval mode, fp32, CPU) and its deployment metadata from a bgremover checkpoint."""
    from bgremover import checkpoint

    path = Path(ckpt_path)
    try:
        net, info, ckpt = checkpoint.load_net(path)
    except UserError as err:
        raise ExportError(str(err)) from None
    net_config = dict(info["net_config"])

    classes = [str(c) for c in info["classes"]]
    meta = {
        "classes": classes,
        "mean": [float(v) for v in info["mean"]],
        "std": [float(v) for v in info["std"]],
        "size_multiple": int(info.get("size_multiple", 32)),
        "default_foreground": [str(c) for c in info.get("default_foreground", [])],
        "image_size": info.get("image_size"),
        "net": str(info.get("net_name") or str(net_config.get("_target_", "net")).rsplit(".", 1)[-1]),
        "params": sum(p.numel() for p in net.parameters()),
        **{"test_mIoU": None, **_read_test_result(path)},
        "ignore_index": info.get("ignore_index"),
        "net_config": net_config,
        "trained": checkpoint.provenance(path, ckpt),  # where the weights came from: the checkpoint, its run
    }
    if len(meta["mean"]) != 3 or len(meta["std"]) != 3:
        raise ExportError(f"checkpoint {path}: mean/std must have 3 values (RGB)")
    unknown = [c for c in meta["default_foreground"] if c not in classes]
    if unknown:
        raise ExportError(f"checkpoint {path}: default_foreground {unknown} not among classes {classes}")
    return net, meta


def onnx_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON document stored under the `bgremover` ONNX metadata key (the predictor's whole contract)."""
    from bgremover import model_format

    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return model_format.document(meta, exported_at=now, version=_package_version())


def _ort_forward(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    """Run the exported file exactly as the predictor will (CPU provider, full graph optimization)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def _verify(net: nn.Module, onnx_path: Path, num_classes: int, multiple: int, tol: float) -> tuple[float, float]:
    """(max |torch - onnxruntime|, max |logit|) over VERIFY_SHAPES; raises ExportError above max(tol, tol ×
    REL_TOLERANCE × the largest |logit|), or when shapes disagree."""
    import torch

    gen = torch.Generator().manual_seed(0)
    worst = top = 0.0
    for n, hm, wm in VERIFY_SHAPES:
        x = torch.randn(n, 3, hm * multiple, wm * multiple, generator=gen)
        with torch.inference_mode():
            ref = net(x).float().numpy()
        if ref.shape != (n, num_classes, x.shape[2], x.shape[3]):
            raise ExportError(f"net output shape {ref.shape} != expected {(n, num_classes, *x.shape[2:])}")
        got = _ort_forward(onnx_path, x.numpy())
        if got.shape != ref.shape:
            raise ExportError(f"onnxruntime output shape {got.shape} != PyTorch {ref.shape}")
        diff = float(np.max(np.abs(got.astype(np.float64) - ref)))
        if not np.isfinite(diff):
            raise ExportError("onnxruntime output is not finite where PyTorch's is")
        worst = max(worst, diff)
        # float32 rounding grows with the size of the values summed, so with the largest |logit|, not each one (a
        # logit that cancels out of terms of 1e7 keeps their rounding): a short run's logits reached 1.1e7, a diff
        # of 16 was refused as a disagreement. A smaller --tol tightens both terms.
        largest = float(np.max(np.abs(ref)))
        top = max(top, largest)
        allowed = max(tol, tol * REL_TOLERANCE * largest)
        if diff > allowed:
            why = f"--tol {tol:g}" if allowed == tol else f"--tol {tol:g} × {REL_TOLERANCE:g} × the largest |logit| {largest:.3g}"
            raise ExportError(
                f"ONNX Runtime disagrees with PyTorch: max abs diff {diff:.3g} > {allowed:.3g} ({why}) at input "
                f"{tuple(x.shape)}; refusing to write the model"
            )
    return worst, top


def export_onnx(
    net: nn.Module,
    meta: dict[str, Any],
    out: str | os.PathLike,
    *,
    tol: float = TOLERANCE,
    opset: int = OPSET,
    torchscript: bool = False,
) -> dict[str, Any]:
    """Export `net` to `out` (+ `out.pt` TorchScript if asked), verified against PyTorch, written atomically.

    Returns {"path", "max_abs_diff", "max_abs_logit", "agreement" (both in words), "metadata", "torchscript"}.
    On any failure (Ctrl-C too) no file is left at `out`, an existing one is kept, and the folders made for it
    are removed again.
    """
    out = Path(out)
    missing = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _export_onnx(net, meta, out, tol=tol, opset=opset, torchscript=torchscript)
    except BaseException:
        for folder in missing:  # a failed export left /tmp/a/n1/n2 behind; rmdir keeps anything written since
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _export_onnx(net: nn.Module, meta: dict[str, Any], out: Path, *, tol: float, opset: int,
                 torchscript: bool) -> dict[str, Any]:
    net, metadata = net.float().eval(), onnx_metadata(meta)
    try:
        with replacing(out) as tmp:  # renamed over `out` once written and verified
            (diff, top), ts_path = _write_onnx(net, metadata, tmp, out, tol=tol, opset=opset, torchscript=torchscript)
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"export failed: {type(err).__name__}: {' '.join(str(err).split())[:300]}") from err
    # with the scale: "max abs diff 1.97e+05" alone read as broken (a 2-second net's logits reached 6.7e11)
    agreement = f"torch vs onnxruntime max abs diff {diff:.2e} on logits up to {top:.3g}"
    return {"path": out, "max_abs_diff": diff, "max_abs_logit": top, "agreement": agreement, "metadata": metadata,
            "torchscript": ts_path}


def _write_onnx(net: nn.Module, metadata: dict[str, Any], tmp: Path, out: Path, *, tol: float, opset: int,
                torchscript: bool) -> tuple[tuple[float, float], Path | None]:
    """The model into `tmp`, verified against PyTorch; the TorchScript copy beside `out` if asked."""
    import onnx
    import torch

    num_classes, multiple = len(metadata["classes"]), int(metadata.get("size_multiple", 32))
    dummy = torch.zeros(1, 3, 2 * multiple, 2 * multiple)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's own DeprecationWarning/TracerWarnings: see docstring
        torch.onnx.export(
            net,
            (dummy,),
            str(tmp),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"},
            },
            opset_version=opset,
        )
    model = onnx.load(str(tmp))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    model.doc_string = f"bgremover background remover ({metadata['net']}); see metadata key '{METADATA_KEY}'"
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp))
    diff = _verify(net, tmp, num_classes, multiple, tol)
    ts_path = None
    if torchscript:
        ts_path = torchscript_path(out)
        with replacing(ts_path) as ts_tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(net, dummy)
            torch.jit.save(traced, str(ts_tmp), _extra_files={"bgremover.json": json.dumps(metadata)})
    return diff, ts_path


def read_metadata(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """The `bgremover` metadata of an exported file (ExportError if absent)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise ExportError(f"not a bgremover model (no '{METADATA_KEY}' metadata): {onnx_path}")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _tol(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):  # -1 refused every export with a false "disagrees"; nan none
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _opset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not MIN_OPSET <= value <= MAX_OPSET:  # a usage error (exit 2), found before any work
        raise argparse.ArgumentTypeError(f"the nets export with opsets {MIN_OPSET} to {MAX_OPSET}, got {text!r}")
    return value


KEYS = ("ckpt", "out", "torchscript", "tol", "opset")  # the options a `key=value` word may name
VALUE_FLAGS = ("--ckpt", "--out", "--tol", "--opset")  # those whose next word is their value


def _normalize_argv(argv: list[str]) -> list[str]:
    """Accept the Makefile's Hydra-like `key=value` words as well as `--key value` flags. Only a word naming one
    of our options, and not a flag's value: paths hold `=` too (Lightning's `epoch=3-step=10.ckpt`), and
    `--ckpt <that>` became `--ckpt --epoch 3-step=10.ckpt`."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        prev = argv[i - 1] if i else ""  # argparse takes any unique prefix of a flag: --ck for --ckpt
        after_flag = len(prev) > 2 and "=" not in prev and any(f.startswith(prev) for f in VALUE_FLAGS)
        if eq and key.replace("_", "-") in KEYS and not after_flag:
            out += [f"--{key.replace('_', '-')}", value]
        else:
            out.append(arg)
    return out


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Export a bgremover training checkpoint to one verified, self-describing ONNX file.",
    )
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) written by bgremover training")
    p.add_argument("--out", default=None,
                   help="output .onnx path (default: <run dir>/<net>.onnx beside the checkpoint's run; "
                        f"the predictor's default model is {SHIPPED})")
    p.add_argument(
        "--torchscript",
        nargs="?",
        const=True,
        default=False,
        type=_bool,
        help="also write a TorchScript .pt next to the .onnx",
    )
    p.add_argument("--tol", type=_tol, default=TOLERANCE,
                   help="max abs logit diff torch vs onnxruntime (or this × 0.1 × the largest |logit|, when more)")
    p.add_argument("--opset", type=_opset, default=OPSET, help=f"ONNX opset version ({MIN_OPSET} to {MAX_OPSET})")
    return p


def torchscript_path(out: Path) -> Path:
    return out.with_suffix(".pt")


def check_outputs(ckpt: Path, out: str | Path, torchscript: bool) -> None:
    """Before any work: the files to write can be written, neither is the checkpoint being read, --out replaces
    only an earlier ONNX model and the TorchScript file (named after --out: `--out X.onnx` writes X.pt, the name
    of a checkpoint or of the shipped weights) only an earlier TorchScript file, never some other file of the
    user's (a mistyped --out replaced a text file, or other weights, with a model)."""
    check_writable(out, "--out")  # as typed: `--out new/` names a folder
    out = Path(out)
    if same_file(out, ckpt):
        raise ExportError(f"--out {out} would overwrite the checkpoint")
    if out.is_file() and not is_onnx_model(out):
        raise ExportError(f"--out {out} exists and is not an ONNX model: not replacing it (move it, or give "
                          "another name)")
    if not torchscript:
        return
    ts = torchscript_path(out)
    check_writable(ts, "--torchscript")
    if same_file(ts, ckpt):
        raise ExportError(f"--torchscript writes {ts}, which would overwrite the checkpoint: give --out another name")
    if same_file(ts, out):
        raise ExportError(f"--torchscript writes {ts}, the --out file itself: give --out an .onnx name")
    if ts.exists() and not is_torchscript(ts):
        raise ExportError(f"--torchscript writes {ts}, which exists and is not a TorchScript file: not replacing it "
                          "(move it, or give --out another name)")


def default_out(ckpt: Path, meta: dict) -> Path:
    """Beside the run that made the checkpoint, never over the shipped model unless asked for by --out."""
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir / f"{meta.get('net') or meta.get('net_name') or 'model'}.onnx"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(_normalize_argv(list(sys.argv[1:] if argv is None else argv)))
    try:
        if args.out:  # before the checkpoint is read and the net exported
            check_outputs(Path(args.ckpt), args.out, args.torchscript)
        net, meta = load_checkpoint_net(args.ckpt)
        out = args.out or default_out(Path(args.ckpt), meta)
        if not args.out:  # the default, beside the run: known only from the checkpoint
            check_outputs(Path(args.ckpt), out, args.torchscript)
        with sigterm_raises():  # `kill`, `timeout`: as Ctrl-C (it left the 17 MB temp file and its folders)
            result = export_onnx(
                net, meta, out, tol=args.tol, opset=args.opset, torchscript=args.torchscript
            )
    except UserError as err:
        return report(err, PROG)  # the prefix argparse's errors carry
    except (KeyboardInterrupt, Terminated) as e:  # export_onnx removed its temp files and folders; an earlier
        how, code = stop_of(e)  # --out is untouched
        print(f"{PROG}: {how}: nothing written", file=sys.stderr)
        return code
    md = result["metadata"]
    miou = "n/a" if md["test_mIoU"] is None else f"{md['test_mIoU']:.4f}"
    if md["test_mIoU"] is not None:
        from bgremover.utils import frames_note

        of = md.get("test_frames_of")
        miou += frames_note({"frames": md.get("test_frames"), "of": of,
                             "complete": None if of is None else md.get("test_frames") == of})
    print(
        f"wrote {result['path']} ({md['net']}, {md['params']:,} params, {len(md['classes'])} classes, "
        f"test mIoU {miou}; {result['agreement']})"
    )
    if result["torchscript"]:
        print(f"wrote {result['torchscript']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
