"""The one padding rule for whole frames: numpy only, so the predictor (no torch) uses it too.

A net whose input must be a multiple of 32 sees every whole frame — validation, the test stage, `make eval`,
`make eval-cutout`, the predictor, the comparison grid — padded the same way: centred, by reflection (zeros would
look like a black frame to the net), with the label padded as void so padding never counts. Before this rule
existed, the test stage padded bottom/right with black and the predictor reflected, and the same checkpoint
scored 39.2 and 39.7 mIoU.
"""

from __future__ import annotations

import numpy as np

Box = tuple[int, int, int, int]  # (top, left, height, width) of the original frame inside the padded one


def pad_amounts(size: int, multiple: int) -> tuple[int, int]:
    """(before, after) to reach the next multiple, split as evenly as possible."""
    total = (-size) % max(1, multiple)
    return total // 2, total - total // 2


def pad_image(image: np.ndarray, multiple: int) -> tuple[np.ndarray, Box]:
    """H×W×C (or H×W) image padded to multiples of `multiple` by reflection; returns (padded, box)."""
    h, w = image.shape[:2]
    top, bottom = pad_amounts(h, multiple)
    left, right = pad_amounts(w, multiple)
    box = (top, left, h, w)
    if not (top or bottom or left or right):
        return image, box
    # a pad as wide as the image (tiny images): the edge repeated, not its few pixels reflected over and over
    mode = "reflect" if max(top, bottom) < h and max(left, right) < w else "edge"
    widths = ((top, bottom), (left, right)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, widths, mode=mode), box


def pad_label(label: np.ndarray, multiple: int, fill: int) -> np.ndarray:
    """H×W label padded like `pad_image` pads its image, with `fill` (the void class) in the border."""
    h, w = label.shape[:2]
    top, bottom = pad_amounts(h, multiple)
    left, right = pad_amounts(w, multiple)
    if not (top or bottom or left or right):
        return label
    return np.pad(label, ((top, bottom), (left, right)), mode="constant", constant_values=fill)


def crop(x: np.ndarray, box: Box) -> np.ndarray:
    """The original frame back out of a padded ...×H×W array (e.g. logits K×H×W)."""
    top, left, h, w = box
    return x[..., top : top + h, left : left + w]
