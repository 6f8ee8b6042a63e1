"""FolderDataModule: your own image/mask folder (bgremover.data.folder) as Lightning dataloaders (`data=folder`).

Every image is scaled so its long side is `image_size` (labels by nearest neighbour), then goes through CamVid's
augmentation pipeline (random crop padded with void, flip, scale and brightness/contrast jitter) or, for
val/test, the one padding rule (centred reflection, void labels). The class list and the void index come from
the folder, and train.build hands them to the model (`label_info`), so the net gets the right number of outputs
and export writes the right classes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from bgremover.data import folder as fd
from bgremover.data.camvid import _seed_worker, build_transforms, seed_transform, seeded_index, select
from bgremover.data.classes import MEAN, STD
from bgremover.data.datamodule import ShuffleState, eval_generator, eval_sampler, padded_sizes, rank_and_world
from bgremover.errors import count

log = logging.getLogger("bgremover.train")


class FolderDataset:
    """(image float32 3×H×W normalized, label int64 H×W) pairs of one split, resized to the long side first."""

    def __init__(self, pairs, labels: fd.Labels, sizes: dict, long_side: int | None, transform=None):
        self.pairs, self.labels, self.long_side, self.transform = list(pairs), labels, long_side, transform
        self.shapes = [fd.resized_shape(*sizes[img], long_side) for img, _ in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int | tuple[int, int]):
        index = seeded_index(self, index)
        img, mask = self.pairs[index]
        image, label = fd.read_pair(img, mask, self.labels, draft_side=self.long_side)
        image, label = fd.resize_pair(image, label, self.shapes[index])
        out = self.transform(image=image, mask=label)
        return out["image"], out["mask"].long()

    def reseed(self, seed: int) -> None:
        seed_transform(self.transform, seed)


class FolderDataModule(ShuffleState, pl.LightningDataModule):
    def __init__(
        self,
        root: str,
        batch_size: int = 8,
        eval_batch_size: int | None = 1,
        num_workers: int = 1,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        image_size: int | None = 256,
        crop_size: Sequence[int] | None = (224, 224),
        hflip: float = 0.5,
        scale_jitter: float = 0.0,
        color_jitter: float = 0.0,
        pad_multiple: int = 32,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        void_value: int | None = None,
        foreground: Sequence[str] | None = None,
        class_weights: str | None = None,
        split_fractions: Sequence[float] = fd.DEFAULT_FRACTIONS,
        split_file: str | None = None,
        split_out: str | None = None,
        limit_images: int | None = None,
        limit_eval_images: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.folder = fd.scan(root, void_value)  # cached: checks.validate_train already decoded every file
        self.root = self.folder.root
        self.labels = self.folder.labels
        self.split_pairs = fd.splits(self.folder, split_fractions, seed, split_file)
        self.classes = self.labels.classes
        self.ignore_index = self.labels.void_index
        self.datasets: dict[str, FolderDataset] = {}
        self._split_said = False  # prepare_data runs again for the test stage

    def label_info(self) -> dict:
        """What the model must be built with: train.build writes these into cfg.model before instantiating it."""
        return {"class_names": list(self.classes), "ignore_index": self.ignore_index,
                "default_foreground": self.labels.foreground(self.hparams.foreground),
                "image_size": self.hparams.image_size}

    def split_size(self, split: str) -> int:
        return len(self.split_pairs[split])

    def prepare_data(self) -> None:  # rank zero only: the split is written once, beside the run's checkpoints
        hp = self.hparams
        if hp.split_out:
            doc = fd.split_document(self.folder, self.split_pairs, hp.split_fractions, hp.seed)
            fd.write_split(hp.split_out, doc)
        if self._split_said:
            return
        self._split_said = True
        # said once, before training: which of the user's images train and which are held out was nowhere but
        # in split.json (the plan's "1 step" per epoch, of 6 train images, did not say it)
        n = {s: len(self.split_pairs[s]) for s in fd.SPLITS}
        how = ("its train/val/test folders" if self.folder.fixed else f"data.split_file={hp.split_file}"
               if hp.split_file else f"drawn with seed {hp.seed}, shares {list(hp.split_fractions)}")
        trained = len(select(self.split_pairs["train"], hp.limit_images))
        log.info("split of %s: %d train%s, %d val, %d test images (%s)%s", self.root, n["train"],
                 f" (training on {trained}: data.limit_images={hp.limit_images})" if trained < n["train"] else "",
                 n["val"], n["test"], how, f", written to {hp.split_out}" if hp.split_out else "")

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, fd.SPLITS):
            if split in self.datasets:
                continue
            train = split == "train"
            transform = build_transforms(train, crop_size=hp.crop_size, hflip=hp.hflip if train else 0.0,
                                         scale_jitter=hp.scale_jitter, color_jitter=hp.color_jitter,
                                         pad_multiple=hp.pad_multiple, mean=hp.mean, std=hp.std,
                                         void=self.ignore_index)
            limit = hp.limit_images if train else hp.limit_eval_images
            ds = FolderDataset(select(self.split_pairs[split], limit), self.labels, self.folder.sizes,
                               hp.image_size, transform)
            ds.reseed(hp.seed)
            self.datasets[split] = ds

    def class_weights(self) -> torch.Tensor | None:
        mode = self.hparams.class_weights
        if not mode or mode == "none":
            return None
        if mode != "median_freq":
            raise fd.FolderDataError(f"unknown data.class_weights '{mode}' (use null or median_freq)")
        return torch.tensor(fd.class_pixel_weights(self.split_pairs["train"], self.labels), dtype=torch.float32)

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        hp, ds = self.hparams, self.datasets[split]
        batch = hp.batch_size if train else (hp.eval_batch_size or hp.batch_size)
        if not train and batch > 1 and len(padded_sizes(ds.shapes, hp.pad_multiple)) > 1:
            log.info("%s images differ in size: evaluated one at a time", split)  # whole images cannot be stacked
            batch = 1
        # under DDP, val/test frames each on one rank, once (CamVidDataModule's rule)
        sampler = self.train_shuffle(ds, hp.seed, batch) if train else eval_sampler(self.trainer, ds, split)
        if train and len(sampler) < fd.MIN_TRAIN:  # a DDP rank's share: one process has MIN_TRAIN (check_config)
            world = rank_and_world(self)[1]
            raise fd.FolderDataError(f"the train split holds {count(len(ds), 'image/mask pair')}: {world} DDP "
                                     f"processes get {len(sampler)} each, and BatchNorm cannot train on one image; "
                                     f"give at least {fd.MIN_TRAIN * world} train images or fewer trainer.devices")
        # a split smaller than a batch trains as one short batch (else no step at all), and so does a DDP rank's
        # share of it: each rank draws len(sampler) frames, and against the whole split 4 images on 2 ranks with
        # data.batch_size=3 trained no step ("training took no step", of a split that fills a batch)
        return DataLoader(ds, batch_size=batch, sampler=sampler,
                          drop_last=train and len(sampler) > hp.batch_size,
                          num_workers=hp.num_workers, pin_memory=hp.pin_memory,
                          persistent_workers=bool(hp.persistent_workers and hp.num_workers > 0),
                          worker_init_fn=_seed_worker if hp.num_workers > 0 else None,
                          generator=sampler.generator if train else eval_generator())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
