"""ResidentCamVidDataModule: CamVid decoded once, kept on the training device, augmented there in whole batches.

airbench's recipe for a GPU that never waits on a CPU: the 367 train frames (190 MB as uint8) live in GPU memory,
and each batch is cut out of them by a few batched tensor ops — gather, one `grid_sample` that does the random
scale, crop and flip of every sample at once (bilinear for images, nearest for labels, void outside the frame),
brightness/contrast, normalisation. No DataLoader, no worker, no host-device copy in the training loop. Decoding
happens once per file list: the arrays are cached as .npz under $BGREMOVER_CACHE (~/.cache/bgremover).

Val/test are the full frames padded to `pad_multiple` by the project's one rule (bgremover.padding: centred
reflection, void labels), exactly what CamVidDataModule feeds, so metrics are comparable. Under DDP every rank
takes its stride of one shared permutation (train) or of the frame list (val/test: no duplicates, so metrics
stay exact). Training on full frames (crop_size null) places each frame in a void-padded canvas instead of the
CPU path's reflection padding. The albumentations DataLoader (CamVidDataModule, data=camvid) stays the CPU path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bgremover.data.camvid import CamVidDataset, CamVidError, read_pair, seed_of
from bgremover.data.classes import VOID
from bgremover.data.datamodule import CamVidDataModule, batches_done, eval_sampler, rank_and_world
from bgremover.files import cache_dir

CACHE_VERSION = 1  # bump when the cached array layout changes
COLOR_JITTER_P = 0.5  # albumentations RandomBrightnessContrast's default probability, kept for parity


def decode_split(root: str | os.PathLike, split: str, limit: int | None = None, workers: int = 4,
                 cache: bool = True) -> dict[str, np.ndarray]:
    """One split as arrays: images N×H×W×3 uint8, labels N×H×W uint8, sizes N×2 (each frame's true H, W).

    Frames of different sizes are padded bottom/right to the largest (image 0, label void); `sizes` keeps the
    real extent, so the augmentation never samples the padding as if it were image. Cached by the file list.
    """
    pairs = CamVidDataset(root, split, limit=limit).pairs  # the same frames CamVidDataModule would use
    # names, sizes and times: a label redrawn in place to the same PNG size trained on the cached old labels
    # (a copied dataset decodes once more; camvid.py's class-weight cache keys the same way)
    listing = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for pair in pairs for f in pair]
    key = hashlib.sha1(json.dumps([CACHE_VERSION, split, listing]).encode()).hexdigest()[:16]
    path = cache_dir() / f"camvid_resident_{split}_{key}.npz"
    if cache and path.is_file():
        # a damaged file is decoded again and rewritten, as a missing one: np.load raises BadZipFile, EOFError,
        # tokenize's TokenError, ValueError... for it, not only OSError (each was a traceback at every start)
        with contextlib.suppress(Exception), np.load(path) as z:
            return {k: z[k] for k in ("images", "labels", "sizes")}
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL releases the GIL while decoding
        decoded = list(pool.map(lambda p: read_pair(*p), pairs))
    h = max(img.shape[0] for img, _ in decoded)
    w = max(img.shape[1] for img, _ in decoded)
    images = np.zeros((len(decoded), h, w, 3), np.uint8)
    labels = np.full((len(decoded), h, w), VOID, np.uint8)
    sizes = np.zeros((len(decoded), 2), np.int64)
    for k, (img, lbl) in enumerate(decoded):
        images[k, : img.shape[0], : img.shape[1]] = img
        labels[k, : lbl.shape[0], : lbl.shape[1]] = lbl
        sizes[k] = img.shape[:2]
    arrays = {"images": images, "labels": labels, "sizes": sizes}
    if cache:
        from bgremover.files import replacing

        # a read-only or full cache only costs decoding again next time; what was half-written goes (replacing)
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            with replacing(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez adds no ".npz" to it
                np.savez(fh, **arrays)
    return arrays


def augment(images: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor, crop: Sequence[int],
            scale: torch.Tensor, offset: torch.Tensor, flip: torch.Tensor, alpha: torch.Tensor,
            beta: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scale-crop + flip + brightness/contrast + normalisation of a batch, all as batched tensor ops.

    images B×H×W×3 uint8, labels B×H×W uint8, sizes B×2 (true H, W inside the padded H×W). Per sample: `scale`
    resizes the frame, `offset` ∈ [0,1]² places the crop at whole pixels of the scaled frame (0: top/left, 1:
    bottom/right; a frame smaller than the crop sits inside it, void around), `flip` mirrors the crop,
    x ↦ clamp(alpha·x + 255·beta, 0, 255).
    Returns x B×3×h×w float32 normalised, y B×h×w int64.
    """
    b, ht, wt = labels.shape
    h, w = crop
    dev = images.device
    # Output pixel j of the crop samples the scaled frame at ox + j + 0.5, i.e. the source at (ox + j + 0.5)/s.
    # In grid_sample's normalised coordinates (align_corners=False) that is affine in affine_grid's u ∈ (-1, 1).
    sh, sw = sizes[:, 0].to(scale.dtype) * scale, sizes[:, 1].to(scale.dtype) * scale
    oy, ox = _whole_pixels(offset[:, 0], sh - h), _whole_pixels(offset[:, 1], sw - w)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=torch.float32)
    sign = 1.0 - 2.0 * flip.to(torch.float32)
    theta[:, 0, 0] = sign * w / (scale * wt)
    theta[:, 0, 2] = (2 * ox + w) / (scale * wt) - 1
    theta[:, 1, 1] = h / (scale * ht)
    theta[:, 1, 2] = (2 * oy + h) / (scale * ht) - 1
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    # Outside the frame: image 0 and label void, as PadIfNeeded fills. Border sampling inside it, so the frame's
    # edge pixels are not blended with that fill (cv2.resize, which the CPU path uses, replicates the border).
    px = ((grid[..., 0] + 1) * wt - 1) / 2  # source pixel coordinates (pixel k spans k-0.5 .. k+0.5)
    py = ((grid[..., 1] + 1) * ht - 1) / 2
    fh = sizes[:, 0].view(-1, 1, 1).to(px.dtype)
    fw = sizes[:, 1].view(-1, 1, 1).to(px.dtype)
    inside = (px >= -0.5) & (px <= fw - 0.5) & (py >= -0.5) & (py <= fh - 0.5)
    x = images.permute(0, 3, 1, 2).float()
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x * inside.unsqueeze(1)
    y = F.grid_sample(labels.unsqueeze(1).float(), grid, mode="nearest", padding_mode="border",
                      align_corners=False)
    y = torch.where(inside, y.squeeze(1).round(), float(VOID)).long()
    x = (x * alpha.view(-1, 1, 1, 1) + 255.0 * beta.view(-1, 1, 1, 1)).clamp_(0, 255)
    x = (x / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return x, y


def _whole_pixels(u: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """The crop's offset in the scaled frame, u ∈ [0, 1] of the room there is (negative: a frame smaller than the
    crop), in whole pixels, as albumentations' RandomCrop draws it: a fractional offset made grid_sample blend
    every pixel of an unscaled crop with its neighbours, a random blur that val/test frames never have."""
    n = room.abs().floor()
    return room.sign() * torch.minimum((u * (n + 1)).floor(), n)


class ResidentTrainLoader:
    """Iterable of augmented batches; each `iter()` is one epoch of `len()` batches (last partial one dropped)."""

    def __init__(self, dm: ResidentCamVidDataModule, tensors: dict[str, torch.Tensor]):
        self.dm, self.t = dm, tensors
        self._epochs_started = 0  # epoch counter when no trainer is attached

    def __len__(self) -> int:
        _, world = rank_and_world(self.dm)
        return (len(self.t["labels"]) * self.dm.hparams.epoch_repeats // world) // self.dm.hparams.batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's frame indices for `epoch`: its stride of one permutation shared by every rank. Drawn on
        the device: a host-to-device copy from pageable memory would wait for the GPU's queue to drain."""
        rank, world = rank_and_world(self.dm)
        labels = self.t["labels"]
        g = torch.Generator(device=labels.device).manual_seed(seed_of(self.dm.hparams.seed, epoch))
        perm = torch.cat([torch.randperm(len(labels), generator=g, device=labels.device)
                          for _ in range(self.dm.hparams.epoch_repeats)])
        return perm[rank::world][: len(perm) // world]

    def __iter__(self):
        hp, t = self.dm.hparams, self.t
        rank, _ = rank_and_world(self.dm)
        trainer = self.dm.trainer
        epoch = trainer.current_epoch if trainer is not None else self._epochs_started
        self._epochs_started += 1
        if trainer is not None and getattr(trainer, "overfit_batches", 0):
            # Lightning turns a DataLoader's shuffling off for overfit_batches; this loader replays its first
            # epoch (order and augmentation draws), so the overfitted batches are the same every epoch
            epoch = 0
        order, dev = self.epoch_order(epoch), t["labels"].device
        # Augmentation draws come from a generator on the device too: no copy, no sync per batch.
        ga = torch.Generator(device=dev).manual_seed(seed_of(hp.seed, epoch, rank, 1))

        def rand(*shape):
            return torch.rand(*shape, generator=ga, device=dev)

        lo, hi = self.dm.scale_bounds()
        crop, bs, cj = self.dm.train_crop(), hp.batch_size, hp.color_jitter
        done = batches_done(trainer)  # resumed inside this epoch: those batches are trained, the rest follow
        for k in range(len(self)):
            idx = order[k * bs:(k + 1) * bs]
            scale = lo + (hi - lo) * rand(bs)
            offset = rand(bs, 2)
            flip = rand(bs) < hp.hflip
            jitter = rand(bs) < (COLOR_JITTER_P if cj > 0 else 0.0)
            alpha = torch.where(jitter, 1 + cj * (2 * rand(bs) - 1), 1.0)
            beta = torch.where(jitter, cj * (2 * rand(bs) - 1), 0.0)
            if k < done:  # drawn all the same: the batches after them get the draws of an uninterrupted run
                continue
            x, y = augment(t["images"][idx], t["labels"][idx], t["sizes"][idx], crop, scale, offset, flip,
                           alpha, beta, t["mean"], t["std"])
            if hp.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


class ResidentEvalLoader:
    """Full frames in file order, padded as CamVidDataModule pads them; each rank its stride of the frames."""

    def __init__(self, dm: ResidentCamVidDataModule, tensors: dict[str, torch.Tensor], split: str):
        self.dm, self.t = dm, tensors
        # the DataLoader path's DDP sampler: each frame on exactly one rank, and a rank left without a frame refused
        # in one line (it failed the run on Lightning's "`ResidentEvalLoader` within local rank has zero length")
        n = len(tensors["labels"])
        sampler = eval_sampler(dm.trainer, range(n), split)
        self.idx = torch.tensor(list(sampler if sampler is not None else range(n)), dtype=torch.long,
                                device=tensors["labels"].device)

    def __len__(self) -> int:
        bs = self.dm.hparams.eval_batch_size or self.dm.hparams.batch_size
        return -(-len(self.idx) // bs)

    def __iter__(self):
        t, idx = self.t, self.idx
        bs = self.dm.hparams.eval_batch_size or self.dm.hparams.batch_size
        for k in range(0, len(idx), bs):
            i = idx[k:k + bs]
            x = t["images"][i].permute(0, 3, 1, 2).float()
            x = (x / 255.0 - t["mean"].view(1, 3, 1, 1)) / t["std"].view(1, 3, 1, 1)
            yield x, t["labels"][i].long()


class ResidentCamVidDataModule(CamVidDataModule):
    """CamVidDataModule's splits held as device tensors (conf/data/camvid_resident.yaml); same keys, plus:

    scale_range: [lo, hi] random scale per sample (uniform), overriding scale_jitter's [1-j, 1+j]
    epoch_repeats: passes over the train set per epoch (fewer epoch ends and validations per image seen)
    channels_last: train batches in channels_last memory format (what the nets train in)
    cache: keep the decoded arrays in $BGREMOVER_CACHE so later runs skip decoding
    device: where the tensors live without a trainer (with one: the trainer's root device)
    num_workers: threads that decode the PNGs once (no DataLoader workers exist here)
    """

    def __init__(
        self,
        *,
        scale_range: Sequence[float] | None = None,
        epoch_repeats: int = 1,
        channels_last: bool = True,
        cache: bool = True,
        device: str = "cpu",
        **camvid_options: Any,  # CamVidDataModule's keys, with its defaults
    ):
        super().__init__(**camvid_options)  # save_hyperparameters there records this class's keys too
        # checked for type too: scale_range=1.5 said "TypeError: object of type 'float' has no len()", and
        # epoch_repeats=1.5 built everything, ran the sanity check and failed on "'float' object cannot be
        # interpreted as an integer"
        pair = list(scale_range) if isinstance(scale_range, Sequence) and not isinstance(scale_range, str) else []
        numbers = len(pair) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair)
        if scale_range is not None and not (numbers and 0 < pair[0] <= pair[1]):
            raise CamVidError(f"data.scale_range must be [lo, hi] with 0 < lo <= hi, not {scale_range}")
        if isinstance(epoch_repeats, bool) or not isinstance(epoch_repeats, int) or epoch_repeats < 1:
            raise CamVidError(f"data.epoch_repeats must be a whole number >= 1, not {epoch_repeats}")
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}

    def scale_bounds(self) -> tuple[float, float]:
        hp = self.hparams
        if hp.scale_range is not None:
            return float(hp.scale_range[0]), float(hp.scale_range[1])
        return 1.0 - hp.scale_jitter, 1.0 + hp.scale_jitter

    def train_crop(self) -> tuple[int, int]:
        """The crop size, or the padded full frame when crop_size is null (as CamVidDataModule pads it)."""
        if self.hparams.crop_size:
            return int(self.hparams.crop_size[0]), int(self.hparams.crop_size[1])
        _, h, w = self.tensors["train"]["labels"].shape
        m = max(1, self.hparams.pad_multiple or 1)
        return -(-h // m) * m, -(-w // m) * m

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device(self.hparams.device)

    def _arrays(self, split: str) -> dict[str, np.ndarray]:
        hp = self.hparams
        # as CamVidDataModule: limit_images trims the train split only, limit_eval_images val/test
        limit = hp.limit_images if split == "train" else hp.limit_eval_images
        return decode_split(self.root, hp.train_split if split == "train" else split, limit, hp.num_workers, hp.cache)

    def _pad_whole_frames(self, split: str, a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Val/test frames padded by the project's one rule (bgremover.padding: centred reflection, void labels),
        exactly as CamVidDataModule pads them, so both paths score the same."""
        from bgremover.padding import pad_image, pad_label

        m = max(1, self.hparams.pad_multiple or 1)
        images, labels = [], []
        for k, (h, w) in enumerate(a["sizes"].tolist()):
            images.append(pad_image(a["images"][k, :h, :w], m)[0])
            labels.append(pad_label(a["labels"][k, :h, :w], m, VOID))
        if len({i.shape for i in images}) > 1:
            raise CamVidError(f"the {split} frames differ in size: the resident pipeline batches one size "
                              f"(data=camvid evaluates such frames one at a time)")
        return {"images": np.stack(images), "labels": np.stack(labels), "sizes": a["sizes"]}

    STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}

    def prepare_data(self) -> None:
        super().prepare_data()
        if self.hparams.cache:  # local rank 0 fills the cache; setup() on every rank then only loads it
            # the splits the trainer's stage loads: `make eval` (and a run's test stage) decoded or read train and
            # val too, and failed on a copy that holds only the test split, which data=camvid evaluates
            fn = getattr(getattr(self.trainer, "state", None), "fn", None)
            for split in self.STAGE_SPLITS.get(getattr(fn, "value", fn), ("train", "val")):
                self._arrays(split)

    def setup(self, stage: str | None = None) -> None:
        device = self._device()
        for split in self.STAGE_SPLITS.get(stage, ("train", "val", "test")):
            if split in self.tensors and self.tensors[split]["labels"].device == device:
                continue
            a = self._arrays(split)
            if split != "train":
                a = self._pad_whole_frames(split, a)
            t = {k: torch.from_numpy(v).to(device) for k, v in a.items()}
            t["mean"] = torch.tensor(self.hparams.mean, dtype=torch.float32, device=device)
            t["std"] = torch.tensor(self.hparams.std, dtype=torch.float32, device=device)
            self.tensors[split] = t

    def _split(self, split: str) -> dict[str, torch.Tensor]:
        if split not in self.tensors:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return self.tensors[split]

    def train_dataloader(self) -> ResidentTrainLoader:
        loader = ResidentTrainLoader(self, self._split("train"))
        if len(loader) == 0:
            raise CamVidError(f"data.batch_size={self.hparams.batch_size} is larger than the "
                              f"{len(self.tensors['train']['labels'])} training frames per device")
        return loader

    def val_dataloader(self) -> ResidentEvalLoader:
        return ResidentEvalLoader(self, self._split("val"), "val")

    def test_dataloader(self) -> ResidentEvalLoader:
        return ResidentEvalLoader(self, self._split("test"), "test")

    def predict_dataloader(self) -> ResidentEvalLoader:
        return self.test_dataloader()
