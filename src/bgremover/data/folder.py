"""Your own images and masks → checked (image, label) pairs, the class list and the splits. numpy + Pillow only.

Layouts (pairs are matched by file stem: `images/cat.jpg` ↔ `masks/cat.png`):

    DIR/images/*  DIR/masks/*                 one pool: a seeded split (data.split_fractions) is drawn, written
                                              to the run folder (split.json) and reusable (data.split_file=...)
    DIR/{train,val,test}/{images,masks}/*     fixed splits, used as they are
    DIR/classes.txt                           optional: one class name per line, index = line number (from 0);
                                              masks then hold class indices. Without it the data is binary:
                                              background / foreground, mask values > 127 foreground (or 0/1 masks)

Images: JPEG, PNG or WebP of any size and kind (16-bit too), decoded as the predictor decodes them (EXIF
orientation applied); masks: 8-bit single-channel (L or P) of the same size, or for binary data also RGB (by its
brightest channel), or a cut-out whose alpha channel is the mask (RGBA or LA with transparency). A binary palette
mask is read as it looks when its palette is gray (white = foreground), as class indices when it is coloured (VOC's
palette: every class but index 0 is foreground; its 255 borders too, unless data.void_value=255). `void_value`
marks "unknown" pixels, excluded from loss and metrics. Every fault — an image without mask, a mask of another
size, an unreadable file, a label beyond the class list, an empty folder — is a FolderDataError whose one line
names the file; `scan` finds them all before training starts (checks.validate_train calls it). Over 400 lines on
purpose: reading, checking and splitting a user's folder is one job, and its rules (mask kinds, the 0/1 rule,
splits) sit together.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from bgremover.errors import UserError, count
from bgremover.images import (  # the predictor's decoding, opening (no PIL pixel ceiling) and output names
    PREDICTED_SUFFIXES,
    _open_unbounded,
    _recording,
    _report_metadata,
    resize_rgb,
    to_rgba_arrays,
)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MASK_SUFFIXES = (".png", ".webp", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")  # JPEG only sensible for binary
BINARY_CLASSES = ("background", "foreground")
CLASSES_FILE = "classes.txt"
SPLIT_FILE = "split.json"  # written into the run folder
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)  # train / val / test of a pooled folder
# files an operating system writes into folders of pictures (Windows Explorer's thumbnail cache and folder
# settings), skipped as dot files are (.DS_Store): "not a supported image file: images/Thumbs.db" stopped a run
SYSTEM_FILES = ("thumbs.db", "ehthumbs.db", "desktop.ini")
MIN_TRAIN = 2  # training pairs at least: BatchNorm cannot train on a batch of one (a 3-pair folder failed mid-run)


class FolderDataError(UserError):
    """Bad or missing data in an image/mask folder; one line naming the file."""


@dataclass(frozen=True)
class Labels:
    """How a mask file becomes a label map: class names, binary or indexed, which value is void."""

    classes: tuple[str, ...]
    binary: bool
    void_value: int | None = None
    # binary data: True when every mask of the folder holds only 0/1 (then 1 is foreground), False for 0/255 masks
    # (> 127 foreground); one rule for the whole folder (scan decides it): per mask, a 0/1/2 mask lost its 1s
    zero_one: bool | None = None

    @property
    def void_index(self) -> int:  # the label value ignored by loss and metrics (and used for padding)
        return len(self.classes)

    def foreground(self, names: Sequence[str] | None = None) -> list[str]:
        """The default foreground: the named classes, else every class but the first (line 0 = background)."""
        if not names:
            return list(self.classes[1:])
        lookup = {c.lower(): c for c in self.classes}
        unknown = [n for n in names if n.lower() not in lookup]
        if unknown:
            raise FolderDataError(f"data.foreground {unknown} not among the classes {list(self.classes)}")
        return [lookup[n.lower()] for n in names]

    def to_label(self, mask: np.ndarray, path: Path, indexed: bool = False) -> np.ndarray:
        """H×W uint8 label in 0..K-1, void = K; FolderDataError naming `path` for values beyond the class list.
        `indexed`: a binary mask of class indices (a coloured palette), whose every index but 0 is foreground."""
        void = (mask == self.void_value) if self.void_value is not None else None
        if self.binary:
            zero_one = self.zero_one
            if zero_one is None:  # a mask read outside a scanned folder
                zero_one = int((mask[~void] if void is not None else mask).max(initial=0)) <= 1
            # VOC's object indices (1-20) were read by the 0/255 rule its 255 borders chose: objects as background
            fg = mask != 0 if indexed else mask == 1 if zero_one else mask > 127  # 0/1, else 0/255 (soft edges)
            if void is not None:
                fg &= ~void
            label = fg.astype(np.uint8)
        else:
            bad = mask >= len(self.classes)
            if void is not None:
                bad &= ~void
            if bad.any():
                raise FolderDataError(
                    f"label beyond the class list: {path} contains {int(mask[bad].max())}, but {CLASSES_FILE} "
                    f"lists {len(self.classes)} classes (0-{len(self.classes) - 1})"
                    + ("" if self.void_value is not None else "; set data.void_value for an 'unknown' value"))
            label = mask.astype(np.uint8)
        if void is not None:
            label[void] = self.void_index
        return label


def read_labels(root: Path, void_value: int | None = None) -> Labels:
    """Binary unless DIR/classes.txt lists the classes (at least 2, unique, one per line)."""
    if void_value is not None and not (isinstance(void_value, int) and 0 <= void_value <= 255):
        raise FolderDataError(f"data.void_value must be a mask value 0-255 or null, got {void_value!r}")
    path = root / CLASSES_FILE
    if not path.is_file():
        if void_value is not None and void_value in (0, 1):  # 255: VOC's borders (scan refuses it for 0/255 masks)
            raise FolderDataError(f"data.void_value={void_value} is a binary mask's own value: use e.g. 128")
        return Labels(BINARY_CLASSES, binary=True, void_value=void_value)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise FolderDataError(f"unreadable class list: {path} ({type(e).__name__})") from None
    if len(names) < 2:
        raise FolderDataError(f"{path} lists {len(names)} class(es): a segmentation needs at least 2 (line 0 = background)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise FolderDataError(f"{path} lists {dupes[0]!r} twice")
    if void_value is not None and void_value < len(names):
        raise FolderDataError(f"data.void_value={void_value} is the index of class {names[void_value]!r} in {path}")
    return Labels(tuple(names), binary=False, void_value=void_value)


def layout(root: str | os.PathLike) -> dict[str, tuple[Path, Path]] | tuple[Path, Path]:
    """{split: (images dir, masks dir)} for fixed splits, or (images dir, masks dir) for one pool."""
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise FolderDataError(f"not a folder: {root} (a dataset folder holds images/ and masks/, or "
                              "train/, val/ and test/ with those two inside)")
    if not root.is_dir():
        raise FolderDataError(f"dataset folder not found: {root}")
    fixed = [s for s in SPLITS if (root / s).is_dir()]
    if fixed and any((root / sub).is_dir() for sub in ("images", "masks")):  # the pool was ignored without a word
        raise FolderDataError(f"{root} holds both layouts: images/ and masks/, and {fixed[0]}/; keep one (the "
                              "pool, or train/, val/ and test/)")
    if fixed:
        out = {}
        for split in SPLITS:
            for sub in ("images", "masks"):
                if not (root / split / sub).is_dir():
                    raise FolderDataError(f"split folder missing: {root / split / sub} (fixed splits need "
                                          f"train/, val/ and test/, each with images/ and masks/)")
            out[split] = (root / split / "images", root / split / "masks")
        return out
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise FolderDataError(f"folder missing: {root / sub} (expected {root}/images and {root}/masks, "
                                  f"or {root}/{{train,val,test}}/{{images,masks}})")
    return root / "images", root / "masks"


def _files(folder: Path, suffixes: Sequence[str], what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        # .DS_Store, swap files, Thumbs.db; cut-outs predict wrote beside their images (`bgremover-predict i
        # images/x.jpg`): "image has no mask"
        if p.name.startswith(".") or p.name.lower() in SYSTEM_FILES or p.name.endswith(PREDICTED_SUFFIXES):
            continue
        if p.is_dir():  # skipped without a word, its pairs were left out of training (35 of 40 trained)
            # images/train + images/val (many data sets' layout): moved up as told, the pairs lost their split
            split = p.name.lower() in (*SPLITS, "training", "validation")
            how = (f"fixed splits are laid out as {folder.parent}/train/images + train/masks, and the same for val/ "
                   "and test/" if split else "sub-folders are not read: move their files up")
            raise FolderDataError(f"a folder inside {folder}: {p} ({what}s sit directly in {folder.name}/; {how})")
        if p.suffix.lower() not in suffixes:
            raise FolderDataError(f"not a supported {what} file: {p} (use {', '.join(suffixes)})")
        if p.stem in out:
            raise FolderDataError(f"two {what}s named {p.stem!r}: {out[p.stem]} and {p}")
        out[p.stem] = p
    return out


def match(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs sorted by stem; every image needs a mask and every mask an image."""
    images = _files(images_dir, IMAGE_SUFFIXES, "image")
    masks = _files(masks_dir, MASK_SUFFIXES, "mask")
    if not images:
        raise FolderDataError(f"empty folder: no images in {images_dir}")
    unmasked = [stem for stem in images if stem not in masks]
    if unmasked:  # how many: a folder half-labelled by another tool was refused one image a run
        raise FolderDataError(f"image has no mask: {images[unmasked[0]]} (expected {masks_dir}/{unmasked[0]}.png; "
                              f"{count(len(unmasked), 'such image')} of {len(images)} in {images_dir})")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise FolderDataError(f"mask has no image: {masks[orphans[0]]} ({count(len(orphans), 'such mask')} in {masks_dir})")
    return [(images[s], masks[s]) for s in sorted(images)]


def _open(path: Path) -> Image.Image:
    """Image.open as the predictor opens a file, without PIL's decompression-bomb ceiling: the folder is the user's
    own, and a 200 Mpx phone photo (16320x12240) was refused as "unreadable or truncated", 90-179 Mpx ones warned
    of a "decompression bomb DOS attack" in every worker."""
    opened, trouble = _recording(lambda: _open_unbounded(path))
    _report_metadata(str(path), trouble)
    return opened


def read_image(path: Path, draft_side: int | None = None) -> np.ndarray:
    """H×W×3 uint8 RGB, EXIF orientation applied; `draft_side` lets JPEG decode at a reduced scale (fast)."""
    try:
        with _open(path) as im:
            if draft_side and im.format == "JPEG":
                im.draft("RGB", (draft_side, draft_side))  # keeps at least this size; the caller resizes exactly
            im.load()  # a full decode: truncated files fail here, not in a DataLoader worker
            im = ImageOps.exif_transpose(im)
            # the predictor's decoding (convert("RGB") clipped 16-bit images to white); a writable copy (camvid._read)
            return np.array(to_rgba_arrays(im)[0])
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FolderDataError(f"unreadable or truncated image: {path} ({type(e).__name__})") from None


def read_mask(path: Path, labels: Labels) -> np.ndarray:
    """The mask file as an H×W label map (0..K-1, void K)."""
    raw, indexed = mask_values(path, labels)
    return labels.to_label(raw, path, indexed)


def _gray_palette(im: Image.Image) -> bool:
    """A palette of grays only (a black/white mask saved as P). The whole palette, not the entries used: VOC's
    coloured palette has grays too (car = 128,128,128), and its car-only masks were read as gray levels."""
    palette = im.getpalette()
    if not palette:
        return False
    rgb = np.asarray(palette[: len(palette) // 3 * 3], np.int32).reshape(-1, 3)
    return bool((rgb == rgb[:, :1]).all())


def _class_indices(values: np.ndarray) -> bool:
    """Gray levels that are class indices with VOC's 255 borders ({0, 15, 255}): small values, mostly not 255.
    1 counts too: {0, 1, 255} (VOC's aeroplane, or a 0/1 mask whose 255s mark unknown pixels) trained with its
    border alone as foreground; an anti-aliased 0/255 mask's few 1s are outnumbered by its 255s."""
    counts = np.bincount(values.ravel(), minlength=256)
    present = np.flatnonzero(counts)
    low = present[(present >= 1) & (present <= 30)]
    only_small = bool(np.all((present <= 30) | (present == 255)))
    return only_small and low.size > 0 and counts[low].sum() > counts[255]


def mask_values(path: Path, labels: Labels) -> tuple[np.ndarray, bool]:
    """The H×W uint8 values a mask file holds (before the binary rule or the class check), and whether a binary
    mask holds class indices (a coloured palette, or a 1-bit mask's 0/1) rather than gray levels."""
    indexed = False
    try:
        with _open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("1", "L"):
                raw = np.array(im.convert("L") if mode == "1" else im)
            elif mode == "P":
                raw = np.array(im)  # class indices, unless a binary mask's gray palette says how it looks
                if labels.binary and _gray_palette(im):
                    raw = np.array(im.convert("L"))  # read as indices, a white-on-black mask was inverted
                else:
                    indexed = labels.binary
            elif labels.binary and mode in ("RGB", "RGBA", "LA"):
                alpha = np.array(im.getchannel("A")) if mode in ("RGBA", "LA") else None
                # a cut-out (rembg's output) is its alpha; its colours were read as the mask (IoU 0.002)
                if alpha is not None and alpha.min() < 255:
                    raw = alpha
                elif mode == "LA":
                    raw = np.array(im.convert("L"))
                else:  # as bright as its brightest channel: by luminance a labelling tool's red on black (76) or
                    # CVAT's (250, 50, 83) (114) was background, silently beside a green (150) instance
                    raw = np.asarray(im.convert("RGB")).max(axis=2)
            else:
                need = "8-bit single-channel (L or P)" + ("" if labels.binary else " class indices")
                raise FolderDataError(f"mask is {mode}, not {need}: {path}")
    except FolderDataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FolderDataError(f"unreadable or truncated mask: {path} ({type(e).__name__})") from None
    if mode == "1":  # black or white, nothing between: white is foreground whatever the folder's 0/1 or 0/255
        # rule (as a 0/1 mask, a 1-bit mask beside 0/255 ones was refused as "a 0/1 mask" mixed with them)
        raw, indexed = (raw > 0).astype(np.uint8), labels.binary
    return raw, indexed


def _same_size(img: Path, image: np.ndarray, mask: Path, label: np.ndarray) -> None:
    if image.shape[:2] != label.shape:
        with _open(img) as im:
            stored = im.size[::-1]  # (h, w) before the EXIF orientation turns it
        # a mask made from the pixels as stored (a script's Image.open ignores EXIF): "x is 72x96 but its mask is
        # 96x72" of two files that every tool but a photo viewer calls 96x72
        turned = label.shape == stored != image.shape[:2]
        raise FolderDataError(
            f"size mismatch: {img} is {image.shape[1]}x{image.shape[0]}"
            + (f" as shown (its EXIF orientation turns the stored {stored[1]}x{stored[0]})" if turned else "")
            + f" but its mask {mask} is {label.shape[1]}x{label.shape[0]}"
            + (": the mask was made from the unturned pixels; make it from the image as shown (as rembg does: "
               "PIL.ImageOps.exif_transpose)" if turned else ""))


def read_pair(img: Path, mask: Path, labels: Labels, draft_side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    label = read_mask(mask, labels)
    if draft_side is None:
        image = read_image(img)
        _same_size(img, image, mask, label)
        return image, label
    return read_image(img, draft_side), label  # sizes were checked by scan(); the caller resizes both


def resized_shape(h: int, w: int, long_side: int | None) -> tuple[int, int]:
    """(h, w) with the long side scaled to `long_side` (aspect kept); unchanged when None."""
    if not long_side:
        return h, w
    s = long_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def resize_pair(image: np.ndarray, label: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image (area-averaged down, bilinear up) and label (nearest) to shape (h, w)."""
    h, w = shape
    if image.shape[:2] != (h, w):
        image = resize_rgb(image, (w, h))  # the predictor scales images by the same rule
    if label.shape != (h, w):
        label = np.array(Image.fromarray(label).resize((w, h), Image.Resampling.NEAREST))
    return image, label


# --- the whole folder, checked once ------------------------------------------------------------------------------

@dataclass
class Folder:
    root: Path
    labels: Labels
    pairs: dict[str, list[tuple[Path, Path]]]  # split → pairs (fixed layout), or {"all": pairs}
    sizes: dict[Path, tuple[int, int]]  # image path → (h, w) as stored (EXIF applied)
    # masks without a foreground pixel (a background-only image): a val split of only these scores the foreground
    # IoU that picks the best epoch as 0 or undefined every epoch, and the first epoch was exported
    empty: frozenset[Path] = frozenset()

    @property
    def fixed(self) -> bool:
        return "all" not in self.pairs


_SCANNED: dict[tuple, Folder] = {}  # one decode of every file per process, however often the config is checked


def _fingerprint(root: Path) -> tuple:
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file())


def scan(root: str | os.PathLike, void_value: int | None = None) -> Folder:
    """Every pair of the folder decoded and checked (sizes, mask values, truncation); FolderDataError on the first fault."""
    where = layout(root)
    root = Path(root).expanduser().resolve()
    labels = read_labels(root, void_value)
    key = (str(root), void_value, _fingerprint(root))
    if key in _SCANNED:
        return _SCANNED[key]
    pairs = {s: match(*dirs) for s, dirs in where.items()} if isinstance(where, dict) else {"all": match(*where)}
    sizes = {}
    # per mask: whether it has foreground (multi-class, indexed), or its (1s, values > 127) until the rule is known
    marks: dict[Path, bool | tuple[bool, bool]] = {}
    zero_one, fg_one, fg_high, fg_indexed = True, False, False, False  # gray masks all 0/1 so far; foreground seen
    gray = False  # a gray-level mask seen (not a palette's class indices)
    first_01, first_high, first_low = None, None, None  # gray masks: max 1, max > 127, max 2-127 (top_low)
    for split_pairs in pairs.values():
        for img, mask in split_pairs:
            raw, indexed = mask_values(mask, labels)
            image = read_image(img)
            _same_size(img, image, mask, raw)
            sizes[img] = image.shape[:2]
            if not labels.binary:
                label = labels.to_label(raw, mask)  # a value beyond the class list: one line naming the file
                marks[mask] = bool(((label != 0) & (label != labels.void_index)).any())
                continue
            values = raw[raw != labels.void_value] if labels.void_value is not None else raw
            if indexed:  # class indices: their foreground is any index but 0, whatever the gray masks' rule
                marks[mask] = bool(values.any())
                fg_indexed = fg_indexed or marks[mask]
                continue
            gray, top = True, int(values.max(initial=0))
            if top == 255 and _class_indices(values):  # the 0/255 rule would make its borders the foreground
                held = np.unique(values)
                unknown = ("; a 0/1 mask whose 255s mark unknown pixels trains with data.void_value=255"
                           if set(held.tolist()) <= {0, 1, 255} else "")
                raise FolderDataError(f"{mask} holds {', '.join(map(str, held[:6]))}: class indices "
                                      "saved as gray levels (foreground > 127 would be its 255s alone); save them with "
                                      f"their palette, or list the classes in a classes.txt beside images/{unknown}")
            if labels.void_value == 255 and top > 1:  # the void would take a 0/255 mask's foreground, edges left
                raise FolderDataError(f"data.void_value=255 is the foreground of 0/255 masks such as {mask}: mark "
                                      "unknown pixels with another value (e.g. 128)")
            zero_one = zero_one and top <= 1
            marks[mask] = (bool((values == 1).any()), top > 127)
            fg_one = fg_one or bool((values == 1).any())
            fg_high = fg_high or top > 127
            first_01 = first_01 or (mask if top == 1 else None)
            first_high = first_high or (mask if top > 127 else None)
            if first_low is None and 1 < top <= 127:
                first_low, top_low = mask, top
    foreground = fg_indexed or (fg_one if zero_one else fg_high)
    if labels.binary and first_01 and first_high:  # the folder's 0/255 rule would read this mask as all background
        raise FolderDataError(f"{first_01} is a 0/1 mask (foreground 1) and {first_high} a 0/255 one (foreground > "
                              "127): a folder's masks follow one rule, or the 0/1 masks train as all background; "
                              "save them all as 0/255 (or all as 0/1)")
    if labels.binary and first_low and (fg_high or fg_one or fg_indexed):  # all background by either rule
        raise FolderDataError(f"{first_low} holds values 0-{top_low}, neither a 0/1 mask nor a 0/255 one (foreground "
                              "> 127), and would train as all background: save 0/1 masks as PNG (JPEG adds 2s and "
                              "3s), draw foreground white, or list class indices in a classes.txt beside images/")
    if labels.binary:
        labels = replace(labels, zero_one=zero_one)
    if labels.binary and not foreground and labels.void_value == 255 and gray:
        raise FolderDataError(f"data.void_value=255 is the foreground of 0/255 masks: no mask in {root} has "
                              "foreground left; mark unknown pixels with another value (e.g. 128)")
    if labels.binary and not foreground:  # masks of class indices (0/2...) read as binary: all background
        raise FolderDataError(f"no mask in {root} has foreground: binary masks mark it with values > 127 (or 1 in "
                              "0/1 masks, saved as PNG); masks holding class indices need a classes.txt beside "
                              "images/")
    empty = frozenset(m for m, fg in marks.items() if not (fg[not zero_one] if isinstance(fg, tuple) else fg))
    _SCANNED[key] = folder = Folder(root, labels, pairs, sizes, empty)
    return folder


def draw_split(stems: Sequence[str], fractions: Sequence[float], seed: int,
               empty: Collection[str] = ()) -> dict[str, list[str]]:
    """A seeded split of the pool: at least one stem in val and test, the rest (≥ 1) in train; val and test each
    hold a stem with foreground while train keeps one too (`empty`: the stems of background-only masks)."""
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 for f in fr) or sum(fr) <= 0 or fr[0] <= 0:
        raise FolderDataError(f"data.split_fractions must be three non-negative train/val/test shares with train > 0, got {list(fractions)}")
    n = len(stems)
    if n < MIN_TRAIN + 2:
        raise FolderDataError(f"{count(n, 'image/mask pair')}: a train/val/test split needs at least {MIN_TRAIN + 2} "
                              f"({MIN_TRAIN} to train on, 1 to validate, 1 to test)")
    total = sum(fr)
    n_val = max(1, round(n * fr[1] / total))
    n_test = max(1, round(n * fr[2] / total))
    if n - n_val - n_test < MIN_TRAIN:
        n_val, n_test = 1, 1
    order = np.random.default_rng(seed).permutation(n)
    ordered = sorted(stems)  # once: sorted per stem, a split of 20000 images took 2.7 s (run 2-3 times a run)
    chosen = [ordered[i] for i in order]
    # a val set of background-only images scores the IoU that picks the best epoch as 0 (or undefined) every
    # epoch, and the first epoch was exported: the first drawn train stem with foreground takes a place there
    for start, size in ((0, n_val), (n_val, n_test)):
        with_fg = [i for i in range(n_val + n_test, n) if chosen[i] not in empty]
        if all(c in empty for c in chosen[start:start + size]) and len(with_fg) > 1:
            chosen[start], chosen[with_fg[0]] = chosen[with_fg[0]], chosen[start]
    return {"val": sorted(chosen[:n_val]), "test": sorted(chosen[n_val:n_val + n_test]),
            "train": sorted(chosen[n_val + n_test:])}


def read_split(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():  # it said "not a split file (JSON with ...)" of a path that does not exist
        raise FolderDataError(f"split file {path} is a folder" if path.is_dir() else f"split file not found: {path}")
    try:
        split = json.loads(path.read_text())
        if not all(isinstance(split.get(s), list) for s in SPLITS):
            raise ValueError
    except (OSError, ValueError, AttributeError):
        raise FolderDataError(f"not a split file (JSON with train/val/test lists of file stems): {path}") from None
    return split


def splits(folder: Folder, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
           split_file: str | os.PathLike | None = None) -> dict[str, list[tuple[Path, Path]]]:
    """{train, val, test: pairs}: the fixed splits, the pairs named by `split_file`, or a seeded draw."""
    if folder.fixed:
        if split_file:
            raise FolderDataError(f"{folder.root} has fixed train/val/test folders: drop data.split_file")
        return folder.pairs
    pool = {img.stem: (img, mask) for img, mask in folder.pairs["all"]}
    if split_file:
        chosen = read_split(split_file)
        for s in SPLITS:
            missing = [stem for stem in chosen[s] if stem not in pool]
            if missing:
                raise FolderDataError(f"{split_file} names {missing[0]!r} ({s}), which is not in "
                                      f"{folder.root}/images")
        # a hand-edited file listing an image in train and test too: its test scores were of an image trained on
        first = {}
        for s in SPLITS:
            for stem in chosen[s]:
                if first.setdefault(stem, s) != s:
                    raise FolderDataError(f"{split_file} names {stem!r} in both {first[stem]} and {s}: each image "
                                          "belongs to one split (held-out images must not be trained on)")
    else:
        chosen = draw_split(list(pool), fractions, seed, {m.stem for m in folder.empty})
    out = {s: [pool[stem] for stem in chosen[s]] for s in SPLITS}
    for s in SPLITS:
        if not out[s]:
            raise FolderDataError(f"the {s} split of {split_file or folder.root} is empty")
    return out


def split_document(folder: Folder, chosen: dict[str, list[tuple[Path, Path]]], fractions, seed) -> dict:
    """What split.json holds: the stems per split and how they were drawn (and the labels, for eval-cutout)."""
    return {"root": str(folder.root), "seed": seed, "fractions": list(fractions) if not folder.fixed else None,
            "fixed": folder.fixed, "classes": list(folder.labels.classes), "void_value": folder.labels.void_value,
            **{s: [img.stem for img, _ in chosen[s]] for s in SPLITS}}


def write_split(path: str | os.PathLike, document: dict) -> None:
    from bgremover.files import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic((json.dumps(document, indent=1) + "\n").encode(), path)


def class_pixel_weights(pairs, labels: Labels) -> list[float]:
    """Median-frequency weights (as CamVid's data.class_weights=median_freq) over the train labels."""
    from bgremover.data.camvid import median_frequency

    return median_frequency((read_mask(mask, labels) for _, mask in pairs), len(labels.classes))


def check_config(data, splits_needed: Sequence[str] = SPLITS) -> Folder:
    """The checks checks.validate_train runs for data=folder: the whole folder, the split, the sizes."""
    folder = scan(data.get("root") or "", data.get("void_value"))
    chosen = splits(folder, data.get("split_fractions") or DEFAULT_FRACTIONS, int(data.get("seed") or 0),
                    data.get("split_file"))
    folder.labels.foreground(data.get("foreground"))
    limit = data.get("limit_images")  # what trains: the split, trimmed to the limit
    n_train = min(len(chosen["train"]), limit or len(chosen["train"]))
    if "train" in splits_needed and n_train < MIN_TRAIN:
        raise FolderDataError(f"the train split of {data.get('split_file') or folder.root} holds "
                              f"{count(n_train, 'image/mask pair')}{f' with data.limit_images={limit}' if limit else ''}"
                              f": training needs at least {MIN_TRAIN} (BatchNorm cannot train on one image)")
    if "train" in splits_needed and all(mask in folder.empty for _, mask in chosen["val"]):
        names = ", ".join(mask.name for _, mask in chosen["val"][:3]) + ("..." if len(chosen["val"]) > 3 else "")
        raise FolderDataError(f"the val split of {data.get('split_file') or folder.root} holds no foreground: its "
                              f"{count(len(chosen['val']), 'mask')} ({names}) {'is' if len(chosen['val']) == 1 else 'are'} all "
                              "background; the best epoch is "
                              "picked by the val foreground IoU, 0 or undefined there, so the first epoch would be "
                              "kept: give val an image with foreground")
    side = data.get("image_size")
    if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 8):
        raise FolderDataError(f"data.image_size must be a long side in pixels (>= 8) or null, got {side!r}")
    if data.get("crop_size") is None and "train" in splits_needed:
        shapes = {resized_shape(*folder.sizes[img], side) for img, _ in chosen["train"]}
        if len(shapes) > 1:
            raise FolderDataError(f"data.crop_size=null trains on whole images, which then must share one size; "
                                  f"{len(shapes)} sizes found: set data.crop_size=[H,W]")
    return folder
