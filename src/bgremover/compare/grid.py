"""The qualitative grid: the same test frames through every net's best checkpoint, with their cut-outs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bgremover.compare.dataset import folders, table_classes
from bgremover.compare.runs import (
    CHECKER_PX,
    CHECKER_RGB,
    HEADER_H,
    TILE_W,
    NetStats,
    Run,
)
from bgremover.data.classes import CLASSES, DEFAULT_FOREGROUND, colorize

LINE_H = 15  # px between title lines


def _wrap(text: str, fits) -> list[str]:
    """`text` in lines that fit (by `fits`), broken at spaces, and inside a word too long for one line."""
    lines: list[str] = []
    for word in text.split(" "):
        line = f"{lines[-1]} {word}" if lines else word
        if lines and fits(line):
            lines[-1] = line
            continue
        while len(word) > 1 and not fits(word):
            cut = next(n for n in range(len(word) - 1, 0, -1) if fits(word[:n]) or n == 1)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines


def _load_checkpoint(path: Path):
    """(net in eval mode, meta) via the export module; imported lazily because it pulls in torch."""
    from bgremover.export import load_checkpoint_net

    return load_checkpoint_net(path)


def resolve_data_root(arg: str | Path | None, runs: list[Run]) -> Path | None:
    """--data-root, else $DATA_DIR, else the data.root of a run's resolved config — the first that exists
    (the Makefile always exports a DATA_DIR, possibly the not-yet-downloaded default). Runs trained on an
    image/mask folder: their folder, never $DATA_DIR (CamVid's: its frames were no test images of theirs)."""
    if arg:
        return Path(arg)
    if own := folders(runs):
        return Path(own[0])
    candidates = [os.environ.get("DATA_DIR")]
    candidates += [((r.summary.get("config") or {}).get("data") or {}).get("root") for r in runs]
    roots = [Path(c) for c in candidates if isinstance(c, str) and c]
    return next((r for r in roots if (r / "test").is_dir()), roots[0] if roots else None)


def pick_images(files: list[Path], n: int) -> list[Path]:
    """n evenly spaced test images: deterministic, and spread over the split's different sequences."""
    if n <= 0 or not files:
        return []
    if n >= len(files):
        return files
    if n == 1:
        return [files[len(files) // 2]]
    idx = sorted({round(i * (len(files) - 1) / (n - 1)) for i in range(n)})
    return [files[i] for i in idx]


def _checker(w: int, h: int):
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w]
    sq = ((yy // CHECKER_PX + xx // CHECKER_PX) % 2).astype(bool)
    out = np.empty((h, w, 3), dtype=np.uint8)
    out[~sq], out[sq] = CHECKER_RGB
    return out


def _predict(net, meta: dict[str, Any], rgb, device: str):
    """(HxW class ids, HxW foreground probability) for one HxWx3 uint8 image."""
    import numpy as np
    import torch

    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1)
    # np.array copies: torch warns about (and must not write into) a read-only PIL buffer
    from bgremover.padding import crop, pad_image

    padded, box = pad_image(np.asarray(rgb, dtype=np.uint8), int(meta.get("size_multiple") or 1))
    x = torch.from_numpy(np.ascontiguousarray(padded)).permute(2, 0, 1)[None].float() / 255.0
    x = (x - mean) / std
    h, w = box[2], box[3]
    with torch.no_grad():
        logits = net(x.to(device))
        if isinstance(logits, dict):
            logits = logits["out"]
        logits = crop(logits.float().cpu(), box)
    classes = list(meta.get("classes") or CLASSES)
    fg_names = meta.get("default_foreground") or DEFAULT_FOREGROUND
    fg = [classes.index(c) for c in fg_names if c in classes]
    prob = logits.softmax(1)[0]
    alpha = prob[fg].sum(0) if fg else torch.zeros(h, w)
    return logits.argmax(1)[0].numpy(), alpha.numpy()


def _font(size: int = 13):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _test_frames(data_root: Path, runs: list[Run], n_images: int) -> tuple[list, list] | str:
    """(RGB images, label maps) of n test frames as the runs' data lays them out — CamVid's test/ + testannot/, or
    an image/mask folder's (bgremover.data.folder: test/{images,masks}, or a pooled folder's held-out images named
    by the run's split.json), at the size they trained at — or a one-line reason why there are none."""
    import numpy as np
    from PIL import Image

    from bgremover.cutout_eval import EvalError, find_folder_pairs, is_folder

    if is_folder(data_root):
        from bgremover.data import folder as fd

        split_file = next((r.dir / fd.SPLIT_FILE for r in runs if (r.dir / fd.SPLIT_FILE).is_file()), None)
        if split_file is None and not (data_root / "test" / "images").is_dir():  # a pooled folder: its split drawn
            return f"grid skipped: {data_root} has no test/ folder and no run has the {fd.SPLIT_FILE} naming its test images"
        try:
            pairs, read_label, _ = find_folder_pairs(data_root, "test", None, split_file)
            chosen = pick_images(pairs, n_images)
            frames = [(fd.read_image(img), read_label(mask)) for img, mask in chosen]
        except (EvalError, fd.FolderDataError) as err:
            return f"grid skipped: {err}"
        if not frames:
            return f"grid skipped: no test images in {data_root}"
        long_side = ((runs[0].summary.get("config") or {}).get("data") or {}).get("image_size")
        frames = [fd.resize_pair(img, lab, fd.resized_shape(*img.shape[:2], long_side)) for img, lab in frames]
        return [img for img, _ in frames], [lab for _, lab in frames]
    test_dir, annot_dir = data_root / "test", data_root / "testannot"
    files = sorted(test_dir.glob("*.png")) if test_dir.is_dir() else []
    if not files:
        return f"grid skipped: no test images in {test_dir}"
    chosen = pick_images(files, n_images)
    images = [np.asarray(Image.open(f).convert("RGB")) for f in chosen]
    labels = []
    for f, img in zip(chosen, images, strict=True):
        a = annot_dir / f.name
        labels.append(np.asarray(Image.open(a)) if a.is_file() else np.full(img.shape[:2], 255, np.uint8))
    return images, labels


def make_grid(stats: list[NetStats], data_root: Path | None, n_images: int, path: Path) -> str | None:
    """Write grid.png; return None on success or a one-line reason why it was skipped."""
    if n_images <= 0:
        return "grid skipped: --grid-images 0"
    picks: list[tuple[NetStats, Run]] = []
    for s in stats:
        with_ckpt = [r for r in s.runs if r.best_ckpt is not None]
        if with_ckpt:
            picks.append((s, max(with_ckpt, key=lambda r: r.metric("test/mIoU") or -1.0)))
    if not picks:
        return "grid skipped: no run has an existing best_ckpt"
    if data_root is None:
        return "grid skipped: no data root (use --data-root or DATA_DIR)"
    frames = _test_frames(data_root, [r for _, r in picks], n_images)
    if isinstance(frames, str):
        return frames
    images, labels = frames

    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    device = "cuda" if torch.cuda.is_available() else "cpu"

    nets, errors = [], []
    for s, r in picks:
        try:
            net, meta = _load_checkpoint(r.best_ckpt)
            nets.append((s.net, net.to(device).eval(), meta))
        except Exception as e:  # one broken checkpoint must not cost the others their column
            errors.append(f"{s.net}: {type(e).__name__}: {e}")
    if not nets:
        return "grid skipped: no checkpoint could be loaded (" + "; ".join(errors) + ")"

    h0, w0 = images[0].shape[:2]
    tile_h = max(1, round(TILE_W * h0 / w0))
    checker = _checker(TILE_W, tile_h)
    titles = [
        "input",
        "ground truth",
        *(f"{n} prediction" for n, _, _ in nets),
        *(f"{n} cut-out" for n, _, _ in nets),
    ]
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # whole titles, wrapped: cut to one line, every column of a sweep read "deeplabv3plus_mobilenet_v2 (model…"
    lines = [_wrap(t, lambda text: measure.textlength(text, font=font) <= TILE_W - 8) for t in titles]
    header = HEADER_H + (max(map(len, lines)) - 1) * LINE_H
    canvas = Image.new("RGB", (TILE_W * len(titles), header + tile_h * len(images)), "white")
    draw = ImageDraw.Draw(canvas)
    for col, wrapped in enumerate(lines):
        for i, line in enumerate(wrapped):
            draw.text((col * TILE_W + 4, 5 + i * LINE_H), line, fill="black", font=font)

    def tile(arr, resample) -> Image.Image:
        return Image.fromarray(arr).resize((TILE_W, tile_h), resample)

    void = len(table_classes(stats))  # a folder's own class list has its own void index
    for row, (img, lab) in enumerate(zip(images, labels, strict=True)):
        preds, cuts = [], []
        for _, net, meta in nets:
            cls, alpha = _predict(net, meta, img, device)
            preds.append(tile(colorize(cls, void), Image.Resampling.NEAREST))
            a = np.asarray(
                Image.fromarray(alpha.astype(np.float32)).resize((TILE_W, tile_h), Image.Resampling.BILINEAR)
            )
            a = np.clip(a, 0.0, 1.0)[..., None]
            rgb = np.asarray(tile(img, Image.Resampling.BILINEAR), dtype=np.float32)
            cuts.append(Image.fromarray((a * rgb + (1 - a) * checker).round().astype(np.uint8)))
        gt = colorize(lab, void) if lab.max() <= void else np.full((*lab.shape, 3), 128, np.uint8)
        for col, im in enumerate(
            [tile(img, Image.Resampling.BILINEAR), tile(gt, Image.Resampling.NEAREST), *preds, *cuts]
        ):
            canvas.paste(im, (col * TILE_W, header + row * tile_h))
    canvas.save(path)
    return ("grid: some checkpoints failed to load: " + "; ".join(errors)) if errors else None
