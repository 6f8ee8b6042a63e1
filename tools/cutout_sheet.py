"""A picture of a remover at work for the docs: one column per image, rows input / true mask / cut-out (over a
checkerboard).

    python tools/cutout_sheet.py MODEL FOLDER OUT.jpg [--split test] [--n 6] [--side 192]

FOLDER has the fixed-split layout (FOLDER/<split>/{images,masks}) that `bgremover.data.make_folder` writes;
the N images are evenly spaced over the split (the same every time), inferred with the model's defaults.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bgremover import errors
from bgremover.files import write_atomic
from bgremover.remover import BackgroundRemover

PROG = "python tools/cutout_sheet.py"


def checkerboard(w: int, h: int, cell: int = 12) -> Image.Image:
    yy, xx = np.mgrid[:h, :w] // cell
    return Image.fromarray(np.where((yy + xx) % 2, 205, 245).astype(np.uint8)).convert("RGB")


def sheet(model: str, folder: Path, split: str, n: int, side: int) -> tuple[Image.Image, int]:
    images_dir, masks_dir = folder / split / "images", folder / split / "masks"
    for d in (images_dir, masks_dir):  # a wrong FOLDER or --split was a FileNotFoundError traceback
        if not d.is_dir():
            raise errors.UserError(f"folder missing: {d} (FOLDER/<split>/images and masks, as make_folder writes)")
    images = sorted(p for p in images_dir.iterdir() if not p.name.startswith("."))
    if not images:
        raise errors.UserError(f"no images in {images_dir}")
    picks = [images[round(i * (len(images) - 1) / max(1, n - 1))] for i in range(min(n, len(images)))]
    remover = BackgroundRemover(model)
    out = Image.new("RGB", (len(picks) * side, 3 * side), "white")
    for col, path in enumerate(picks):
        truth_path = masks_dir / f"{path.stem}.png"
        if not truth_path.is_file():
            raise errors.UserError(f"{path.name} has no mask {truth_path}")
        image = Image.open(path).convert("RGB")
        truth = Image.open(truth_path).convert("L")
        cut = checkerboard(*image.size)
        cut.paste(image, mask=remover.mask(image))
        for row, im in enumerate((image, truth.convert("RGB"), cut)):
            out.paste(im.resize((side, side), Image.Resampling.BILINEAR), (col * side, row * side))
    return out, len(picks)


def main(argv: list[str] | None = None) -> int:
    p = errors.OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("folder", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--side", type=int, default=192)
    args = p.parse_args(argv)
    if (code := errors.below_minimum(args, {"n": 1, "side": 1}, PROG)) is not None:
        return code
    fmt = Image.registered_extensions().get(args.out.suffix.lower())
    if fmt is None:  # Pillow's "unknown file extension" traceback came after every image was inferred
        return errors.report(f"OUT {args.out}: name a .jpg or .png file", PROG, 2)
    try:
        errors.check_writable(args.out, "OUT")
        picture, count = sheet(args.model, args.folder, args.split, args.n, args.side)
        data = io.BytesIO()
        picture.save(data, format=fmt, quality=85)
        write_atomic(data.getvalue(), args.out)  # the docs' tracked pictures are replaced whole or not at all
    except (errors.UserError, OSError) as e:
        return errors.report(e, PROG)
    except KeyboardInterrupt:
        return errors.report(f"interrupted: {args.out} was not written", PROG, 130)
    print(f"wrote {args.out}: {count} {args.split} images of {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
