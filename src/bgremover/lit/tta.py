"""Test-time augmentation for `make eval`: the class probabilities averaged over rescaled and mirrored copies.

    make eval CKPT=... ARGS="tta=flip"        # the frame and its mirror image: 2 passes
    make eval CKPT=... ARGS="tta=multiscale"  # scales 0.5-1.75, each mirrored too: 12 passes (mmseg's aug-test)

Not the published number: a run's own test stage, `make compare`, the README's rows and the exported model are
single-scale, one pass. Evaluation writes which TTA it used into eval.json and does not attach TTA numbers to
the run. The probabilities are averaged (not the logits, whose scale differs between copies), in log space so a
class no copy believes in stays finite for the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from bgremover.errors import UserError


class TTA:
    def __init__(self, scales: Sequence[float] = (1.0,), flip: bool = True):
        scales = [float(s) for s in scales]
        if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
            raise UserError(f"tta.scales must be positive numbers, not {scales}")
        self.scales = scales
        self.flip = bool(flip)

    @property
    def passes(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    def describe(self) -> dict:
        return {"scales": self.scales, "flip": self.flip, "passes": self.passes}

    def __call__(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, multiple: int) -> torch.Tensor:
        """Log of the mean softmax over the copies of N×C×H×W `x`, as N×K×H×W "logits" (argmax and softmax of
        them are the averaged prediction). Each scaled size is rounded to the net's size multiple."""
        h, w = x.shape[-2:]
        m = max(1, int(multiple))
        total = None
        for s in self.scales:
            size = (max(m, round(h * s / m) * m), max(m, round(w * s / m) * m))
            xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for mirror in (False, True) if self.flip else (False,):
                out = forward(xs.flip(-1) if mirror else xs).float()
                if mirror:
                    out = out.flip(-1)
                if out.shape[-2:] != (h, w):
                    out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
                out = out.log_softmax(1)
                total = out if total is None else torch.logaddexp(total, out)
        return total - math.log(self.passes)
