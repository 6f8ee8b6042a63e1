"""Build a worked-example image/mask folder from CamVid: large-subject crops with binary masks.

    python -m bgremover.data.make_folder OUT [--data-root DIR] [--classes Car] [--min-side 80] [--size 256]

For every connected region of the chosen classes (default Car) whose bounding box is at least `--min-side` px
on its long side and does not touch the frame's border (a whole subject, not the flat side of a bus cut off by
the frame edge; `--keep-truncated` keeps those too), a square crop around it (the box plus `--margin` on each side, shifted to stay inside the
frame) is resized to `--size`² and written as OUT/<split>/images/<frame>_<n>.jpg with its mask
OUT/<split>/masks/<frame>_<n>.png (255 = any pixel of the classes, 0 = the rest; CamVid's void pixels become
`--void-value`, default 0 = background). CamVid's own train/val/test split is kept, so the held-out crops come
from frames the net never saw (the later part of the 0001TP video and the Seq05VD video): consecutive CamVid
frames show the same cars, and a random split of the crops would put near-copies of test crops in train.

With the defaults: 176 train, 11 val, 76 test crops of cars (337, 28, 119 with --keep-truncated). The folder is built under a temporary name and
renamed into place; an existing OUT is never touched. CamVid (Brostow, Fauqueur, Cipolla) is CC BY-NC 4.0, so
are the crops: research and personal use.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bgremover.data.camvid import list_pairs, resolve_root
from bgremover.data.classes import CLASSES, VOID
from bgremover.errors import UserError, report

SPLITS = ("train", "val", "test")


def subject_boxes(label: np.ndarray, ids: list[int], min_side: int, whole: bool = True) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) of each 8-connected region of the classes whose long side is at least min_side px (and, with
    `whole`, that does not touch the frame's border)."""
    import cv2

    mask = np.isin(label, ids).astype(np.uint8)
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    h, w = label.shape
    boxes = [tuple(int(v) for v in s[:4]) for s in stats[1:] if max(s[2], s[3]) >= min_side]
    if whole:
        boxes = [(x, y, bw, bh) for x, y, bw, bh in boxes if x > 0 and y > 0 and x + bw < w and y + bh < h]
    return boxes


def square_crop(box: tuple[int, int, int, int], margin: float, frame_h: int, frame_w: int) -> tuple[int, int, int]:
    """(top, left, side) of a square around the box with `margin` × its long side added on each side,
    shifted (never shrunk below the frame's short side) to lie inside the frame."""
    x, y, w, h = box
    side = min(int(round(max(w, h) * (1 + 2 * margin))), frame_h, frame_w)
    cx, cy = x + w / 2, y + h / 2
    left = int(round(min(max(cx - side / 2, 0), frame_w - side)))
    top = int(round(min(max(cy - side / 2, 0), frame_h - side)))
    return top, left, side


def build(root: Path, out: Path, classes: list[str], min_side: int, size: int, margin: float,
          void_value: int, whole: bool = True) -> dict[str, int]:
    ids = [CLASSES.index(c) for c in classes]
    counts = {}
    for split in SPLITS:
        for sub in ("images", "masks"):
            (out / split / sub).mkdir(parents=True, exist_ok=True)
        n = 0
        for img_path, lbl_path in list_pairs(root, split):
            label = np.asarray(Image.open(lbl_path))
            boxes = subject_boxes(label, ids, min_side, whole)
            if not boxes:
                continue
            image = Image.open(img_path).convert("RGB")
            mask = np.where(np.isin(label, ids), 255, 0).astype(np.uint8)
            mask[label == VOID] = void_value
            for k, box in enumerate(boxes):
                top, left, side = square_crop(box, margin, *label.shape)
                name = f"{img_path.stem}_{k}"
                crop = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
                crop.save(out / split / "images" / f"{name}.jpg", quality=95)
                m = Image.fromarray(mask[top:top + side, left:left + side]).resize((size, size), Image.Resampling.NEAREST)
                m.save(out / split / "masks" / f"{name}.png")
                n += 1
        counts[split] = n
    (out / "SOURCE.txt").write_text(
        f"Built by `python -m bgremover.data.make_folder` from CamVid ({root}): classes {', '.join(classes)}, regions "
        f"with a long side >= {min_side} px{', not touching the frame border' if whole else ''}, square crops with {margin:g} margin resized to {size}x{size}. "
        f"Masks: 255 = {'/'.join(classes)}, 0 = the rest" + (f", {void_value} = CamVid void" if void_value else "")
        + ". CamVid: Brostow, Fauqueur and Cipolla, CC BY-NC 4.0 (research and personal use).\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bgremover.data.make_folder", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to create (must not exist)")
    p.add_argument("--data-root", help="CamVid folder (default $DATA_DIR, else data/CamVid)")
    p.add_argument("--classes", default="Car", help=f"comma list of the foreground classes ({', '.join(CLASSES)})")
    p.add_argument("--min-side", type=int, default=80, help="smallest long side of a subject's box, px (default 80)")
    p.add_argument("--size", type=int, default=256, help="side of the square crops written, px (default 256)")
    p.add_argument("--margin", type=float, default=0.15, help="context around the box, × its long side (default 0.15)")
    p.add_argument("--keep-truncated", action="store_true",
                   help="also subjects that touch the frame's border (cut off by it)")
    p.add_argument("--void-value", type=int, default=0, help="mask value of CamVid's void pixels (default 0; "
                   "e.g. 128 with data.void_value=128 to leave them out of loss and metrics)")
    args = p.parse_args(argv)
    try:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        unknown = [c for c in classes if c not in CLASSES]
        if unknown or not classes:
            raise UserError(f"unknown class(es) {unknown}: choose from {', '.join(CLASSES)}")
        if args.min_side < 1 or args.size < 8 or args.margin < 0 or not 0 <= args.void_value <= 255:
            raise UserError("--min-side >= 1, --size >= 8, --margin >= 0 and --void-value 0-255, please")
        if args.out.exists():
            raise UserError(f"{args.out} exists: choose a new folder (nothing was written)")
        root = resolve_root(args.data_root)
        tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
        try:
            counts = build(root, tmp, classes, args.min_side, args.size, args.margin, args.void_value,
                           whole=not args.keep_truncated)
            if counts["train"] < 1 or counts["val"] < 1 or counts["test"] < 1:
                raise UserError(f"too few subjects for a split ({counts}): lower --min-side")
            os.replace(tmp, args.out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except UserError as e:  # CamVidError is one
        return report(e)
    print(f"wrote {args.out}: " + ", ".join(f"{counts[s]} {s}" for s in SPLITS) + f" crops of {'/'.join(classes)}"
          f" ({args.size}x{args.size}); train a remover on it: make remover DATA={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
