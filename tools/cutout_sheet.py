"""A picture of a remover at work for the docs: one column per image, rows input / true mask / cut-out (over a
checkerboard).

    python tools/cutout_sheet.py MODEL FOLDER OUT.jpg [--split test] [--n 6] [--side 192]

FOLDER has the fixed-split layout (FOLDER/<split>/{images,masks}) that `bgremover.data.make_folder` writes;
the N images are evenly spaced over the split (the same every time), inferred with the model's defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bgremover.remover import BackgroundRemover


def checkerboard(w: int, h: int, cell: int = 12) -> Image.Image:
    yy, xx = np.mgrid[:h, :w] // cell
    return Image.fromarray(np.where((yy + xx) % 2, 205, 245).astype(np.uint8)).convert("RGB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("folder", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--side", type=int, default=192)
    args = p.parse_args(argv)
    images = sorted((args.folder / args.split / "images").iterdir())
    picks = [images[round(i * (len(images) - 1) / max(1, args.n - 1))] for i in range(args.n)]
    remover = BackgroundRemover(args.model)
    s = args.side
    sheet = Image.new("RGB", (len(picks) * s, 3 * s), "white")
    for col, path in enumerate(picks):
        image = Image.open(path).convert("RGB")
        truth = Image.open(args.folder / args.split / "masks" / f"{path.stem}.png").convert("L")
        cut = checkerboard(*image.size)
        cut.paste(image, mask=remover.mask(image))
        for row, im in enumerate((image, truth.convert("RGB"), cut)):
            sheet.paste(im.resize((s, s), Image.Resampling.BILINEAR), (col * s, row * s))
    sheet.save(args.out, quality=85)
    print(f"wrote {args.out}: {len(picks)} {args.split} images of {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
