"""Build a worked-example image/mask folder from CamVid: large-subject crops (or composites) with binary masks.

    python -m bgremover.data.make_folder OUT [--data-root DIR] [--classes Car] [--min-side 80] [--size 256]
    python -m bgremover.data.make_folder OUT --composite [--per-subject 2] [--seed 0]

For every connected region of the chosen classes (default Car) whose bounding box is at least `--min-side` px
on its long side and does not touch the frame's border (a whole subject, not the flat side of a bus cut off by
the frame edge; `--keep-truncated` keeps those too), a square crop around it (the box plus `--margin` on each side, shifted to stay inside the
frame) is resized to `--size`² and written as OUT/<split>/images/<frame>_<n>.jpg with its mask
OUT/<split>/masks/<frame>_<n>.png (255 = any pixel of the classes, 0 = the rest; CamVid's void pixels become
`--void-value`, default 0 = background). CamVid's own train/val/test split is kept, so the held-out crops come
from frames the net never saw (the later part of the 0001TP video and the Seq05VD video): consecutive CamVid
frames show the same cars, and a random split of the crops would put near-copies of test crops in train.

With the defaults: 176 train, 11 val, 76 test crops of cars (337, 28, 119 with --keep-truncated). The folder is built under a temporary name and
renamed into place; an existing OUT is never touched.

`--composite` builds the kind of set most cut-out data is (product shots, matting sets): each whole subject, cut
out along its label, is pasted `--per-subject` times at a random scale (long side 50-90 % of the image), place and
flip onto a random `--size`² window of a frame of the same split that holds none of the classes, with a
one-pixel soft edge; the mask is where the subject covers at least half a pixel. Subjects and backgrounds of the
test split come only from test frames, so both are unseen in training. Composites are easier than photos (the
subject's light need not match the background's): the README gives the numbers on both kinds.

CamVid (Brostow, Fauqueur, Cipolla) is CC BY-NC 4.0, and so are the crops and composites: research and personal
use.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bgremover.data.camvid import list_pairs, resolve_root
from bgremover.data.classes import CLASSES, VOID
from bgremover.errors import OneLineParser, UserError, count, report
from bgremover.files import Terminated, sigterm_raises, stop_of

PROG = "python -m bgremover.data.make_folder"  # the command as run: its usage line and every error line
SPLITS = ("train", "val", "test")



def subjects(label: np.ndarray, ids: list[int], min_side: int, whole: bool = True) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Each 8-connected region of the classes whose long side is at least min_side px (and, with `whole`, that does
    not touch the frame's border): its box (x, y, w, h) and the region's own pixels within the box (bool)."""
    import cv2

    mask = np.isin(label, ids).astype(np.uint8)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    h, w = label.shape
    found = []
    for k in range(1, n):
        x, y, bw, bh = (int(v) for v in stats[k, :4])
        if max(bw, bh) < min_side or (whole and not (x > 0 and y > 0 and x + bw < w and y + bh < h)):
            continue
        found.append(((x, y, bw, bh), comp[y:y + bh, x:x + bw] == k))
    return found


def square_crop(box: tuple[int, int, int, int], margin: float, frame_h: int, frame_w: int) -> tuple[int, int, int]:
    """(top, left, side) of a square around the box with `margin` × its long side added on each side,
    shifted (never shrunk below the frame's short side) to lie inside the frame."""
    x, y, w, h = box
    side = min(int(round(max(w, h) * (1 + 2 * margin))), frame_h, frame_w)
    cx, cy = x + w / 2, y + h / 2
    left = int(round(min(max(cx - side / 2, 0), frame_w - side)))
    top = int(round(min(max(cy - side / 2, 0), frame_h - side)))
    return top, left, side


def background_window(label: np.ndarray, ids: list[int], rng: np.random.Generator, tries: int = 30) -> tuple[int, int, int] | None:
    """(top, left, side) of a random square window (side 50-100 % of the frame's short side) with no pixel of the
    classes and at most 2 % void (void may hide one), or None when `tries` draws find none."""
    h, w = label.shape
    bad = np.isin(label, ids)
    void = label == VOID
    for _ in range(tries):
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        win = (slice(top, top + side), slice(left, left + side))
        if not bad[win].any() and void[win].mean() <= 0.02:
            return top, left, side
    return None


def paste(bg: Image.Image, subject: Image.Image, alpha: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """`subject` (RGB, its box) with `alpha` (L, 255 inside) scaled to a long side of 50-90 % of bg's side, flipped
    at random, blended at a random place with a one-pixel soft edge: (composite, mask 0/255)."""
    from PIL import ImageFilter

    size = bg.size[0]
    w, h = subject.size
    scale = rng.uniform(0.5, 0.9) * size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    subject = subject.resize((nw, nh), Image.Resampling.BICUBIC)
    alpha = alpha.resize((nw, nh), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(0.6))
    if rng.random() < 0.5:
        subject, alpha = (im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in (subject, alpha))
    x, y = int(rng.integers(0, size - nw + 1)), int(rng.integers(0, size - nh + 1))
    a = np.zeros((size, size), np.float32)
    a[y:y + nh, x:x + nw] = np.asarray(alpha, np.float32) / 255
    fg = np.zeros((size, size, 3), np.float32)
    fg[y:y + nh, x:x + nw] = np.asarray(subject, np.float32)
    out = a[..., None] * fg + (1 - a[..., None]) * np.asarray(bg, np.float32)
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8)), np.where(a >= 0.5, 255, 0).astype(np.uint8)


def build_composites(root: Path, out: Path, classes: list[str], min_side: int, size: int, per_subject: int,
                     seed: int) -> dict[str, int]:
    ids = [CLASSES.index(c) for c in classes]
    counts = {}
    for s_i, split in enumerate(SPLITS):
        for sub in ("images", "masks"):
            (out / split / sub).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, s_i])
        pairs = list_pairs(root, split)
        backgrounds = []  # (image path, window) of this split only
        for img_path, lbl_path in pairs:
            win = background_window(np.asarray(Image.open(lbl_path)), ids, rng)
            if win is not None:
                backgrounds.append((img_path, win))
        if not backgrounds:
            raise UserError(f"no {split} frame has a window free of {'/'.join(classes)} to paste onto")
        n = 0
        for img_path, lbl_path in pairs:
            found = subjects(np.asarray(Image.open(lbl_path)), ids, min_side)
            image = Image.open(img_path).convert("RGB") if found else None
            for k, ((x, y, bw, bh), region) in enumerate(found):
                subject = image.crop((x, y, x + bw, y + bh))
                alpha = Image.fromarray(np.where(region, 255, 0).astype(np.uint8))
                for j in range(per_subject):
                    bg_path, (top, left, side) = backgrounds[int(rng.integers(len(backgrounds)))]
                    bg = Image.open(bg_path).convert("RGB").crop((left, top, left + side, top + side))
                    comp_img, comp_mask = paste(bg.resize((size, size), Image.Resampling.BICUBIC), subject, alpha, rng)
                    name = f"{img_path.stem}_{k}_{j}"
                    comp_img.save(out / split / "images" / f"{name}.jpg", quality=95)
                    Image.fromarray(comp_mask).save(out / split / "masks" / f"{name}.png")
                    n += 1
        counts[split] = n
    (out / "SOURCE.txt").write_text(
        f"Built by `python -m bgremover.data.make_folder --composite` from CamVid ({root}): every region of "
        f"{', '.join(classes)} with a long side >= {min_side} px not touching the frame border, cut out along its "
        f"label and pasted {count(per_subject, 'time')} (long side 50-90 %, random place and flip, seed {seed}) onto "
        f"{size}x{size} windows of frames of the same split free of those classes. Masks: 255 = subject, 0 = the "
        "rest. CamVid: Brostow, Fauqueur and Cipolla, CC BY-NC 4.0 (research and personal use).\n")
    return counts


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
            boxes = [box for box, _ in subjects(label, ids, min_side, whole)]
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
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to create (must not exist)")
    p.add_argument("--data-root", help="CamVid folder (default $DATA_DIR, else data/CamVid)")
    p.add_argument("--classes", default="Car", help=f"comma list of the foreground classes ({', '.join(CLASSES)})")
    p.add_argument("--min-side", type=int, default=80, help="smallest long side of a subject's box, px (default 80)")
    p.add_argument("--size", type=int, default=256, help="side of the square crops written, px (default 256)")
    p.add_argument("--margin", type=float, default=0.15, help="context around the box, × its long side (default 0.15)")
    p.add_argument("--keep-truncated", action="store_true",
                   help="also subjects that touch the frame's border (cut off by it)")
    p.add_argument("--composite", action="store_true",
                   help="paste each subject onto windows of subject-free frames instead of cropping it in place")
    p.add_argument("--per-subject", type=int, default=2, help="composites per subject with --composite (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the composites' draws (default 0)")
    p.add_argument("--void-value", type=int, default=0, help="mask value of CamVid's void pixels (default 0; "
                   "e.g. 128 with data.void_value=128 to leave them out of loss and metrics)")
    args = p.parse_args(argv)
    try:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        unknown = [c for c in classes if c not in CLASSES]
        if unknown or not classes:
            raise UserError(f"unknown class(es) {unknown}: choose from {', '.join(CLASSES)}")
        # `not 0 <= margin < inf`: nan and inf (which argparse's float takes) were a traceback in the crop's rounding
        if (args.min_side < 1 or args.size < 8 or not 0 <= args.margin < float("inf")
                or not 0 <= args.void_value <= 255 or args.per_subject < 1):
            raise UserError("--min-side >= 1, --size >= 8, --margin >= 0, --void-value 0-255 and --per-subject >= 1, please")
        if args.out.exists():
            raise UserError(f"{args.out} exists: choose a new folder (nothing was written)")
        root = resolve_root(args.data_root)
        tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
        try:
            # SIGTERM (kill, timeout) as an exception: its default ended the process and left the hidden tmp folder
            with sigterm_raises():
                if args.composite:
                    counts = build_composites(root, tmp, classes, args.min_side, args.size, args.per_subject, args.seed)
                else:
                    counts = build(root, tmp, classes, args.min_side, args.size, args.margin, args.void_value,
                                   whole=not args.keep_truncated)
                if counts["train"] < 1 or counts["val"] < 1 or counts["test"] < 1:
                    raise UserError(f"too few subjects for a split ({counts}): lower --min-side")
                os.replace(tmp, args.out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except UserError as e:  # CamVidError is one
        return report(e, PROG)
    except (KeyboardInterrupt, Terminated) as e:  # was a bare traceback; the half-built folder is already gone
        how, code = stop_of(e)
        return report(f"{how}: {args.out} was not written", PROG, code)
    except OSError as e:  # an output under a file, a full disk, a read-only folder: was a traceback
        return report(f"cannot write {args.out}: {e.strerror or e}", PROG)  # (its temp folder's name said nothing)
    kind = "composites" if args.composite else "crops"
    print(f"wrote {args.out}: " + ", ".join(f"{counts[s]} {s}" for s in SPLITS) + f" {kind} of {'/'.join(classes)}"
          f" ({args.size}x{args.size}); train a remover on it: make remover DATA={shlex.quote(str(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
