"""Cut-out quality of an exported bgremover ONNX model on CamVid or your own image/mask folder: numbers for a
results table.
(Past 400 lines: one command over two dataset layouts with its report; the metrics live in cutout_metrics.py.)

    python -m bgremover.cutout_eval [--model M] [--data-root D] [--split test|val|train] [--classes A,B]
                                    [--threshold T] [--boundary-tol PX] [--limit N] [--threads N]
                                    [--max-side N] [--split-file S] [--void-value V] [--json PATH] [--quiet]

--data-root may be a data=folder folder (images/ + masks/, or train|val|test/{images,masks}): its masks are read
with the training's rule (bgremover.data.folder), and a folder without fixed splits needs the run's
--split-file (split.json, which also gives the void value) to know its held-out images.

Runs the predictor's own inference path (`BackgroundRemover.foreground_probability`, so what is measured is
what users get) at each image's full resolution — or, for a model that records the scale it was trained at
(a folder-trained remover), at that scale, as predict runs it — and reports, over the split, at full resolution:
  - segmentation: mIoU of the argmax over the model's classes, global pixel accuracy and per-class IoU, from
    one confusion matrix accumulated over all images. Void (label >= number of classes) is excluded; classes
    absent from both ground truth and prediction over the whole set are left out of the mean (as torchmetrics'
    MulticlassJaccardIndex does during training), so the figure can be checked against the metadata's test_mIoU.
  - cut-out, for the foreground classes (the model's default unless --classes): foreground IoU (alpha >= 0.5,
    pixels pooled over the set), boundary F-score (DAVIS, Perazzi et al. 2016: boundaries matched within
    --boundary-tol px, F per image, mean over images where GT or prediction has a boundary) and MAE of the
    soft alpha against the binary GT. With --threshold T the same three again for the hard mask P >= T.
  - timing: mean ms per image of `foreground_probability` (decoding excluded, after one warm-up call).
Exit codes: 0 ok; 1 no model / no data / unknown class / unreadable file; 2 bad option values.

Like predict.py this module imports no torch, lightning or hydra (a test enforces it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bgremover import errors
from bgremover.cutout_metrics import (  # noqa: F401  (re-exported: the metric functions lived here first)
    ALPHA_CUT,
    BOUNDARY_TOL,
    CutoutStats,
    _num,
    abs_error,
    binary_counts,
    boundary_f,
    boundary_map,
    dilate,
    iou_from_counts,
)
from bgremover.data.camvid import DEFAULT_ROOT, ROOT_ENV, resolve_root
from bgremover.data.classes import CLASSES, same_classes  # torch-free constants module
from bgremover.images import open_image, to_rgba_arrays
from bgremover.remover import BackgroundRemover, BgRemoverError, ImageError, UsageError, write_atomic

PROG = "python -m bgremover.cutout_eval"  # the command as run, in its usage line and messages (also make eval-cutout)
SPLITS = ("test", "val", "train")  # <root>/<split>/*.png with labels in <root>/<split>annot/
FULL_RES_SIDE = 1 << 20  # predictor max_side for the evaluation: never downscale, measure at full resolution


class EvalError(BgRemoverError):
    """Missing or inconsistent data: reported as one line, exit 1."""


# ----------------------------------------------------------------------------------------------------------
# Metric functions (pure numpy, each tested on hand-made arrays)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """num_classes^2 int64 counts, rows = ground truth, columns = prediction; gt outside 0..K-1 (void) ignored."""
    gt = np.asarray(gt).ravel().astype(np.int64)
    pred = np.asarray(pred).ravel().astype(np.int64)
    keep = (gt >= 0) & (gt < num_classes)
    idx = gt[keep] * num_classes + pred[keep]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_iou(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU from a confusion matrix; NaN for classes absent from both ground truth and prediction."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(cm: np.ndarray) -> tuple[float, int]:
    """(mIoU over the classes present in GT or prediction, how many classes that is); NaN if none."""
    iou = class_iou(cm)
    present = ~np.isnan(iou)
    return (float(iou[present].mean()) if present.any() else math.nan), int(present.sum())


def pixel_accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else math.nan


# ----------------------------------------------------------------------------------------------------------
# Data and the evaluation loop


def find_pairs(
    root: str | os.PathLike, split: str = "test", limit: int | None = None
) -> list[tuple[Path, Path]]:
    """(image, label) paths of a CamVid-layout split, sorted by name (`limit`: evenly spaced, the frames the test
    stage takes with data.limit_eval_images); EvalError if anything is missing."""
    from bgremover.data.camvid import CamVidError, list_pairs, select  # numpy + Pillow only, like this module

    try:
        return select(list_pairs(root, split), limit)
    except CamVidError as err:
        raise EvalError(str(err)) from None


def is_folder(root: str | os.PathLike) -> bool:
    """A data=folder layout rather than CamVid's."""
    return (Path(root) / "images").is_dir() or (Path(root) / "train" / "images").is_dir()


def find_folder_pairs(
    root: str | os.PathLike, split: str = "test", limit: int | None = None,
    split_file: str | os.PathLike | None = None, void_value: int | None = None,
) -> tuple[list[tuple[Path, Path]], Any, list[str]]:
    """(pairs of the split, a mask → label reader with the training's rule, the class names) of an image/mask
    folder; the held-out images of a pooled folder come from the run's split.json."""
    from bgremover.data import folder as fd  # numpy + Pillow only, like this module
    from bgremover.data.camvid import select

    try:
        if split_file is not None and void_value is None:
            void_value = fd.read_split(split_file).get("void_value")
        found = fd.scan(root, void_value)
        if not found.fixed and split_file is None:
            raise EvalError(f"{root} has no fixed train/val/test folders: give the training run's "
                            "--split-file <run>/split.json to score its held-out images")
        chosen = fd.splits(found, split_file=None if found.fixed else split_file)
        if found.fixed and split_file is not None:  # it was read for its void value and otherwise ignored
            chosen[split] = _as_trained(chosen[split], fd.read_split(split_file), split_file, root, split)
    except fd.FolderDataError as err:
        raise EvalError(str(err)) from None

    def read_label(path: Path) -> np.ndarray:
        try:
            return fd.read_mask(path, found.labels)
        except fd.FolderDataError as err:
            raise EvalError(str(err)) from None

    return select(chosen[split], limit), read_label, list(found.labels.classes)


def _as_trained(pairs: list, recorded: dict, split_file, root, split: str) -> list:
    """A fixed-split folder's `split` pairs as the training run recorded them (images added since stay out), or
    EvalError for a split file that is not this folder's."""
    if not recorded.get("fixed"):
        raise EvalError(f"{split_file} splits a pooled folder, but {root} has fixed train/val/test folders: drop "
                        "--split-file, or give the split.json of a run trained on this folder")
    by_stem = {img.stem: (img, mask) for img, mask in pairs}
    missing = [stem for stem in recorded[split] if stem not in by_stem]
    if missing:
        raise EvalError(f"{split_file} names {missing[0]!r} ({split}), which is not in {Path(root) / split / 'images'}")
    return [by_stem[stem] for stem in sorted(recorded[split])]


def load_label(path: Path) -> np.ndarray:
    """A CamVid label, read and checked as training reads it (values above void refused, not scored as void)."""
    from bgremover.data.camvid import CamVidError, read_label  # numpy + Pillow only, like this module

    try:
        return read_label(path)
    except CamVidError as err:
        raise EvalError(str(err)) from None


class _RecordingRemover(BackgroundRemover):
    """The product's predictor, keeping the last logits so the argmax needs no second inference."""

    last_logits: np.ndarray | None = None

    def logits(self, rgb: np.ndarray) -> np.ndarray:
        self.last_logits = super().logits(rgb)
        return self.last_logits


def load_remover(
    model: str | os.PathLike | None, classes: Sequence[str] | None = None, threads: int | None = None,
    expected: Sequence[str] | None = None, max_side: int | None = None,
) -> _RecordingRemover:
    """The predictor for `model`, refused unless its classes are the dataset's (`expected`, default CamVid's).
    max_side None: the scale the model was trained at (a folder-trained remover's image_size), else full resolution."""
    remover = _RecordingRemover(model, classes=classes, threads=threads, max_side=max_side)
    if max_side is None and not remover.upscale:  # else at the scale it was trained at, as predict runs it
        remover.max_side = FULL_RES_SIDE
    want = list(CLASSES if expected is None else expected)
    if not same_classes(remover.classes, want):
        whose = "CamVid's" if expected is None else "the dataset's"
        raise EvalError(
            f"model classes {', '.join(remover.classes)} are not {whose} ({', '.join(want)}): "
            "its argmax cannot be scored against these labels"
        )
    return remover


def _at_size(logits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """K x h x w logits of a downscaled inference (max_side) bilinearly resized to the label's H x W, as the
    predictor resizes its alpha; unchanged when they already match."""
    import cv2

    if logits.shape[1:] == tuple(shape):
        return logits
    hwk = cv2.resize(np.ascontiguousarray(logits.transpose(1, 2, 0)), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return hwk.reshape(shape[0], shape[1], -1).transpose(2, 0, 1)


def evaluate(
    remover: _RecordingRemover,
    pairs: Sequence[tuple[Path, Path]],
    threshold: float | None = None,
    tol: int = BOUNDARY_TOL,
    progress: bool = False,
    read_label=load_label,
) -> dict[str, Any]:
    """Run the predictor over (image, label) pairs and return every number of the report as a JSON-able dict."""
    k = len(remover.classes)
    cm = np.zeros((k, k), np.int64)
    soft, hard = CutoutStats(tol), CutoutStats(tol) if threshold is not None else None
    per_image: list[dict[str, Any]] = []
    seconds = 0.0
    bar = _progress(len(pairs)) if progress else None
    for i, (img_path, lbl_path) in enumerate(pairs):
        # no pixel limit: the data set's own images (the predictor's 64 Mpx guard is for what a service is sent);
        # `make remover` trained on a 108 Mpx photo, then failed to score it, naming an option this has not
        rgb = to_rgba_arrays(open_image(img_path, sys.maxsize))[0]
        label = read_label(lbl_path)
        if label.shape != rgb.shape[:2]:
            lh, lw = label.shape
            raise EvalError(f"{lbl_path}: label is {lw}x{lh} but image is {rgb.shape[1]}x{rgb.shape[0]}")
        if i == 0:
            remover.foreground_probability(rgb)  # warm-up: onnxruntime allocates and tunes on the first run
        start = time.perf_counter()
        prob = remover.foreground_probability(rgb)
        seconds += time.perf_counter() - start
        pred = np.argmax(_at_size(remover.last_logits, label.shape), axis=0)
        cm += confusion_matrix(label, pred, k)

        valid = label < k
        gt_fg = np.isin(label, remover.foreground) & valid
        row: dict[str, Any] = {"image": img_path.name, **soft.update(prob, gt_fg, valid)}
        if hard is not None:
            hard_alpha = (prob >= threshold).astype(np.float32)
            row["threshold"] = hard.update(hard_alpha, gt_fg, valid)
        per_image.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    miou, counted = mean_iou(cm)
    ious = class_iou(cm)
    meta_miou = remover.test_miou  # the file's own (an int8 copy's from its quantization record)
    return {
        "model": str(remover.model_path),
        "net": remover.meta.get("net"),
        "metadata_test_mIoU": meta_miou,
        "metadata_test_frames": remover.test_frames[0],
        "metadata_test_frames_of": remover.test_frames[1],
        "n_images": len(pairs),
        "classes": list(remover.classes),
        "foreground": [remover.classes[i] for i in remover.foreground],
        "mIoU": _num(miou),
        "mIoU_classes": [c for c, v in zip(remover.classes, ious, strict=True) if not math.isnan(v)],
        "mIoU_note": "void excluded; classes absent from both GT and prediction over the set are not averaged",
        "pixel_accuracy": _num(pixel_accuracy(cm)),
        "class_iou": {c: _num(v) for c, v in zip(remover.classes, ious, strict=True)},
        "confusion_matrix": cm.tolist(),
        "boundary_tol": tol,
        "alpha_cut": ALPHA_CUT,
        "cutout": soft.summary(),
        "threshold": threshold,
        "cutout_threshold": hard.summary() if hard is not None else None,
        "ms_per_image": _num(1000.0 * seconds / len(pairs)) if pairs else None,
        "max_side": remover.max_side if remover.max_side < FULL_RES_SIDE else None,
        "trained_scale": remover.upscale,  # every image inferred at max_side, smaller ones scaled up too
        "per_image": per_image,
    }


def _progress(total: int):
    # only on a terminal: in a log file (make ship > ship.log, CI) every update would be another line of noise
    if total < 2 or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # a nicety, not a requirement
        return None
    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------------------------------------
# Report and CLI


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _partial(frames: dict | None) -> str:
    if not frames or frames["complete"]:
        return ""
    return f" of {frames['of']} ({errors.PARTIAL})"


def format_report(r: dict[str, Any], data_root: str, split: str, threads: int | None) -> str:
    meta = r.get("metadata_test_mIoU")
    frames = r.get("metadata_test_frames")
    meta_note = f"; metadata test_mIoU {_fmt(meta)}" if meta is not None else ""
    if meta is not None and frames:
        of = r.get("metadata_test_frames_of")
        meta_note += f" on {frames} of {of} frames ({errors.PARTIAL})" if of and frames < of else f" on {frames} frames"
    lines = [
        f"model {r['model']} ({r.get('net') or 'unknown net'}) on {data_root} {split}: {r['n_images']} images"
        + _partial(r.get("split_frames")) + f", foreground classes: {', '.join(r['foreground'])}",
        "",
        f"segmentation (argmax of {len(r['classes'])} classes, void excluded)",
        f"  mIoU            {_fmt(r['mIoU'])}   over the {len(r['mIoU_classes'])} classes present in GT or "
        f"prediction{meta_note}",
        f"  pixel accuracy  {_fmt(r['pixel_accuracy'])}",
        "  class IoU",
    ]
    lines += [f"    {c:<12}  {_fmt(v) if v is not None else 'absent'}" for c, v in r["class_iou"].items()]
    lines.append("")
    cols = [("soft", r["cutout"])]
    if r["cutout_threshold"] is not None:
        cols.append((f"threshold {r['threshold']:g}", r["cutout_threshold"]))
    head = f"cut-out (alpha >= {r['alpha_cut']:g} for IoU/boundary)"
    lines.append(f"{head:<36}" + "".join(f"{name:>16}" for name, _ in cols))
    rows = [
        ("foreground IoU", "fg_iou"),
        (f"boundary F (tol {r['boundary_tol']} px)", "boundary_f"),
        ("  precision", "boundary_precision"),
        ("  recall", "boundary_recall"),
        ("MAE of alpha", "mae"),
    ]
    for label, key in rows:
        lines.append(f"  {label:<34}" + "".join(f"{_fmt(c[key]):>16}" for _, c in cols))
    n_b = r["cutout"]["boundary_images"]
    # which statistic: on CamVid test the pooled IoU is 0.714 and the mean of the per-image ones 0.614
    lines.append(f"  (foreground IoU and MAE over the pixels of all {r['n_images']} images pooled, not a mean of "
                 "per-image scores: --json has those)")
    lines.append(f"  (boundary F averaged over {n_b} images where GT or prediction has a boundary)")
    lines.append("")
    lines.append(
        f"predictor {_fmt(r['ms_per_image'], 1)} ms/image "
        + (f"inferred at {r['max_side']} px long side (the scale it was trained at) " if r.get("trained_scale")
           else f"inferred at <= {r['max_side']} px long side " if r.get("max_side") else "at full resolution ")
        + f"(onnxruntime threads: {threads or 'default'}; decoding excluded, after one warm-up)"
    )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = errors.OneLineParser(
        prog=PROG,
        description="Cut-out quality (mIoU, foreground IoU, boundary F, MAE) of a bgremover ONNX model on CamVid "
                    "or an image/mask folder.",
        epilog="Exit codes: 0 ok, 1 no model / no data / unknown class / unreadable file, 2 bad option value.",
    )
    p.add_argument(
        "--model", "-m", help="ONNX model (default $BGREMOVER_MODEL, else models/bgremover-camvid.int8.onnx when "
        "made from the float file beside it, else models/bgremover-camvid.onnx: what bgremover-predict uses)"
    )
    p.add_argument("--data-root", help=f"CamVid folder (default ${ROOT_ENV}, else {DEFAULT_ROOT}) or an "
                                       "image/mask folder (data=folder's layouts)")
    p.add_argument("--split-file", help="image/mask folder: the training run's split.json (needed without fixed "
                                        "splits; with them, it keeps images added since the training out)")
    p.add_argument("--void-value", type=int, help="image/mask folder: the mask value meaning unknown (default: "
                                                  "the split file's, else none)")
    p.add_argument("--max-side", type=int, help="infer at most at this long side, like predict --max-side (default: "
                                                "the size the model was trained at, else full resolution)")
    p.add_argument("--split", choices=SPLITS, default="test", help="which split to score (default test)")
    p.add_argument("--classes", "-c", help="comma-separated foreground classes (default: the model's)")
    p.add_argument("--threshold", "-t", type=float, help="also score the hard mask P(foreground) >= T")
    tol_help = f"boundary match tolerance in px (default {BOUNDARY_TOL})"
    p.add_argument("--boundary-tol", type=int, default=BOUNDARY_TOL, help=tol_help)
    p.add_argument("--limit", type=int, help="evaluate N evenly spaced images (the test stage's data.limit_eval_images frames)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--json", help="also write every number (and per-image ones) to this JSON file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def _own_folder(model: str | None, data_root: Path) -> str | None:
    """A make remover run's model scored on CamVid (no --data-root) said "dataset folder not found: data/CamVid (run
    `make data` ...)" where CamVid is absent, else "model classes background, foreground are not CamVid's": its run
    folder (the model's, as make remover leaves it) says where it trained, and the line gives its scoring command."""
    if model is None or is_folder(data_root):
        return None
    from bgremover.run_dirs import folder_root, run_data, run_summary  # omegaconf, only on this error path
    from bgremover.train_remover import score_command

    if not (root := folder_root(run_data(model))):
        return None
    return (f"{model} was trained on the image/mask folder {root}, not CamVid: score it there, "
            f"{score_command(run_summary(model).parent, Path(root), Path(model))}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # exits 2 with argparse's message on bad syntax

    def fail(msg: str, code: int) -> int:
        return errors.report(msg, PROG, code)

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        return fail(f"--threshold must be within 0..1, got {args.threshold}", 2)
    if (code := errors.below_minimum(args, {"boundary_tol": 0, "limit": 1, "threads": 0, "max_side": 1}, PROG)) is not None:
        return code
    if args.void_value is not None and not 0 <= args.void_value <= 255:
        return fail(f"--void-value must be a mask value 0-255, got {args.void_value}", 2)
    if args.json is not None:
        try:  # before the evaluation: 233 frames of work were lost to an unwritable --json path
            errors.check_writable(args.json, "--json")
        except errors.UserError as e:
            return fail(str(e), 2)

    data_root = resolve_root(args.data_root)
    if (args.split_file or args.void_value is not None) and not is_folder(data_root):
        # CamVid has fixed splits and void 11: both were ignored there without a word
        return fail(f"--split-file and --void-value are for an image/mask folder, not CamVid ({data_root})", 2)
    try:
        read_label, expected = load_label, None
        # the whole split once, then the --limit subset of it (the split's size flags a partial score below)
        if is_folder(data_root):
            every, read_label, expected = find_folder_pairs(data_root, args.split, None, args.split_file,
                                                            args.void_value)
        else:
            every = find_pairs(data_root, args.split)
        from bgremover.data.camvid import select

        pairs, whole = select(every, args.limit), len(every)
        classes = args.classes.split(",") if args.classes is not None else None
        remover = load_remover(args.model, classes, args.threads, expected, args.max_side)
        if args.json is not None:  # the report was renamed over the model (or the run's split.json) it read
            from bgremover.files import same_file

            for path, what in ((remover.model_path, "the model"), (args.split_file, "the split file")):
                if path is not None and same_file(args.json, path):
                    return fail(f"--json {args.json} would overwrite {what} being evaluated: give another name", 2)
        report = evaluate(remover, pairs, args.threshold, args.boundary_tol, progress=not args.quiet,
                          read_label=read_label)
        # as `make eval` and the exporter record a test set: a --limit subset is not the split's score
        report.update(data_root=str(data_root), split=args.split,
                      split_frames={"frames": len(pairs), "of": whole, "complete": len(pairs) == whole})
        print(format_report(report, str(data_root), args.split, args.threads))
        if args.json is not None:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic((json.dumps(report, indent=1) + "\n").encode(), path)
            print(f"wrote {path}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ImageError, BgRemoverError) as e:  # unknown class, bad model, missing data, bad file
        return fail((isinstance(e, EvalError) and _own_folder(args.model, data_root)) or str(e), 1)
    except OSError as e:  # e.g. the JSON's folder is not writable
        return fail(errors.one_line(e, 200), 1)
    except Exception as e:  # a bug, not bad input: still one line, never a traceback
        return fail(f"unexpected {type(e).__name__}: {errors.one_line(e, 200)}", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
