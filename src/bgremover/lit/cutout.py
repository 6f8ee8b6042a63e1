"""CutoutMetric: the numbers a cut-out is judged by, logged per validation and test epoch for any class list.

Foreground = the model's default foreground classes; the soft alpha is P(foreground), the summed softmax of those
classes, exactly as the predictor computes it. Per image, bgremover.cutout_metrics.CutoutStats (the functions
`make eval-cutout` uses) counts foreground-IoU pixels, the boundary F-score within `tol` px and the alpha's
absolute error; the sums live in torchmetrics states, so under DDP they are added over ranks before `compute`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import Metric

from bgremover.cutout_metrics import BOUNDARY_TOL, CutoutStats, iou_from_counts

NAMES = ("fg_iou", "boundary_f", "alpha_mae")  # logged as <stage>/<name>


class CutoutMetric(Metric):
    full_state_update = False

    def __init__(self, foreground: Sequence[int], ignore_index: int, tol: int = BOUNDARY_TOL) -> None:
        super().__init__()
        self.foreground, self.ignore_index, self.tol = list(foreground), int(ignore_index), int(tol)
        for name in ("tp", "fp", "fn", "abs_sum", "pixels", "f_sum", "f_images"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """logits N×K×H×W, target N×H×W (ignore_index and values ≥ K are void)."""
        prob = logits.detach().float().softmax(1)[:, self.foreground].sum(1).cpu().numpy()
        labels = target.detach().cpu().numpy()
        stats = CutoutStats(self.tol)
        fg = np.asarray(self.foreground)
        for alpha, label in zip(prob, labels, strict=True):
            valid = (label != self.ignore_index) & (label < logits.shape[1])
            stats.update(alpha, np.isin(label, fg) & valid, valid)
        f = [b[2] for b in stats.boundary]
        for name, value in (("tp", stats.tp), ("fp", stats.fp), ("fn", stats.fn), ("abs_sum", stats.abs_sum),
                            ("pixels", stats.count), ("f_sum", sum(f)), ("f_images", len(f))):
            setattr(self, name, getattr(self, name) + float(value))

    def compute(self) -> dict[str, torch.Tensor]:
        """Pooled foreground IoU, mean boundary F over images with a boundary, alpha MAE; NaN where undefined."""
        nan = float("nan")
        iou = iou_from_counts(int(self.tp), int(self.fp), int(self.fn))
        bf = float(self.f_sum / self.f_images) if self.f_images > 0 else nan
        mae = float(self.abs_sum / self.pixels) if self.pixels > 0 else nan
        return {n: torch.tensor(v, dtype=torch.float32) for n, v in zip(NAMES, (iou, bf, mae), strict=True)}
