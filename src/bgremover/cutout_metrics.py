"""Cut-out metrics on numpy masks, shared by `make eval-cutout` (cutout_eval) and training (lit/cutout.py).

Foreground IoU (pixels pooled over a set), boundary F-score (DAVIS, Perazzi et al. 2016: boundaries matched within
a pixel tolerance, F per image, mean over images that have a boundary; edges are looked for inside the box of
labelled pixels, so the void border the test stage pads frames with lies outside the frame, like the frame's own
edge) and the MAE of the soft alpha P(foreground) against the binary ground truth. numpy only: the
predictor-side evaluation imports no torch, and training computes exactly the same numbers.
"""

from __future__ import annotations

import math

import numpy as np

ALPHA_CUT = 0.5  # soft alpha at or above which a pixel counts as foreground for IoU and boundaries
BOUNDARY_TOL = 2  # px; boundary pixels this close (Euclidean) to the other mask's boundary count as matched


def binary_counts(gt: np.ndarray, pred: np.ndarray, valid: np.ndarray | None = None) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of two boolean masks over the valid pixels."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if valid is not None:
        gt, pred = gt & valid, pred & valid
    tp = int(np.count_nonzero(gt & pred))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(gt)) - tp


def iou_from_counts(tp: int, fp: int, fn: int) -> float:
    """tp / (tp + fp + fn); NaN when both masks are empty (nothing to get right or wrong)."""
    union = tp + fp + fn
    return tp / union if union else math.nan


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Inner boundary: mask pixels with a 4-neighbour outside the mask. The image frame is not an edge."""
    m = np.asarray(mask, bool)
    edge = np.zeros_like(m)
    edge[:-1] |= m[:-1] & ~m[1:]
    edge[1:] |= m[1:] & ~m[:-1]
    edge[:, :-1] |= m[:, :-1] & ~m[:, 1:]
    edge[:, 1:] |= m[:, 1:] & ~m[:, :-1]
    return edge


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disk of `radius` px (Euclidean), as an OR of shifted copies: no scipy needed."""
    m = np.asarray(mask, bool)
    if radius <= 0:
        return m.copy()
    h, w = m.shape
    padded = np.pad(m, radius)
    out = np.zeros_like(m)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
    return out


def boundary_f(
    gt: np.ndarray, pred: np.ndarray, tol: int = BOUNDARY_TOL, ignore: np.ndarray | None = None
) -> tuple[float, float, float] | None:
    """(precision, recall, F) of pred's boundary against gt's within `tol` px; None if neither has a boundary.

    Predicted boundary pixels on `ignore` (void) pixels are not counted for precision (nobody knows where the
    edge is there) but may still match ground-truth boundary pixels. One side without boundary gives F = 0,
    with DAVIS's convention for the other terms (empty side's precision or recall = 1).
    """
    gt_b = boundary_map(gt)
    pred_b = boundary_map(pred)
    pred_counted = pred_b & ~ignore if ignore is not None else pred_b
    n_gt, n_pred = int(gt_b.sum()), int(pred_counted.sum())
    if n_gt == 0 and n_pred == 0:
        return None
    if n_pred == 0:
        return 1.0, 0.0, 0.0
    if n_gt == 0:
        return 0.0, 1.0, 0.0
    precision = float(np.count_nonzero(pred_counted & dilate(gt_b, tol))) / n_pred
    recall = float(np.count_nonzero(gt_b & dilate(pred_b, tol))) / n_gt
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f


def abs_error(alpha: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, int]:
    """(sum of |alpha - gt| over valid pixels, number of valid pixels): pool these, then divide, for MAE."""
    diff = np.abs(np.asarray(alpha, np.float64) - np.asarray(gt, np.float64))
    if valid is not None:
        diff = diff[valid]
    return float(diff.sum()), int(diff.size)


def labelled_box(valid: np.ndarray) -> tuple[slice, slice] | None:
    """(rows, columns) slices of the smallest box holding every valid pixel; None when none is valid."""
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    if not len(rows):
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


class CutoutStats:
    """Accumulates foreground IoU, boundary F and MAE of one kind of alpha (soft or thresholded) over images."""

    def __init__(self, tol: int = BOUNDARY_TOL) -> None:
        self.tol = tol
        self.tp = self.fp = self.fn = 0
        self.abs_sum, self.count = 0.0, 0
        self.boundary: list[tuple[float, float, float]] = []

    def update(self, alpha: np.ndarray, gt_fg: np.ndarray, valid: np.ndarray) -> dict[str, float | None]:
        """Add one image; returns its own numbers (None where undefined) for the per-image listing."""
        pred_fg = alpha >= ALPHA_CUT
        tp, fp, fn = binary_counts(gt_fg, pred_fg, valid)
        self.tp, self.fp, self.fn = self.tp + tp, self.fp + fp, self.fn + fn
        s, n = abs_error(alpha, gt_fg, valid)
        self.abs_sum, self.count = self.abs_sum + s, self.count + n
        # Boundaries inside the box of labelled pixels: a border band with no label at all is outside the frame.
        # The test stage scores frames padded to the size multiple with void labels; without this crop, a
        # foreground object touching the frame's edge had a ground-truth edge there (its neighbour, the padding, is
        # not foreground) that eval-cutout, at the frame's own size, does not have: the two disagreed.
        box = labelled_box(valid)
        bf = None if box is None else boundary_f(gt_fg[box], pred_fg[box], self.tol, ignore=~valid[box])
        if bf is not None:
            self.boundary.append(bf)
        return {
            "fg_iou": _num(iou_from_counts(tp, fp, fn)),
            "boundary_f": None if bf is None else bf[2],
            "mae": _num(s / n if n else math.nan),
        }

    def summary(self) -> dict[str, float | int | None]:
        b = np.asarray(self.boundary, np.float64).reshape(-1, 3)
        mean = b.mean(axis=0) if len(b) else np.full(3, math.nan)
        return {
            "fg_iou": _num(iou_from_counts(self.tp, self.fp, self.fn)),
            "boundary_f": _num(mean[2]),
            "boundary_precision": _num(mean[0]),
            "boundary_recall": _num(mean[1]),
            "boundary_images": len(b),
            "mae": _num(self.abs_sum / self.count if self.count else math.nan),
        }


def _num(x: float) -> float | None:
    """JSON has no NaN: undefined numbers become null."""
    return None if x is None or not math.isfinite(float(x)) else float(x)
