"""CamVidDataModule: the three CamVid splits as Lightning dataloaders, configured from conf/data/camvid.yaml."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from bgremover.data.camvid import (
    CamVidDataset,
    CamVidError,
    _seed_worker,
    build_transforms,
    list_pairs,
    median_frequency_weights,
    resolve_root,
    seed_of,
    train_splits,
)
from bgremover.data.classes import CLASSES, MEAN, STD, VOID

log = logging.getLogger("bgremover.train")


class ResumableShuffle(RandomSampler):
    """The train loaders' shuffling and augmentation seeds: each epoch's order is drawn from a seed of that epoch
    (`seed` itself at epoch 0), and each frame of it is yielded as (frame, seed) with a seed of its place in the
    epoch, from which the dataset draws the frame's augmentations (camvid.seeded_index). Nothing carries over from
    one epoch, or one frame, to the next, so a resumed run draws what an uninterrupted one draws: the generator and
    the augmentations had gone on across epochs in a run, and a resume, drawing from a seed, trained other crops,
    flips and jitters, at an epoch's end and inside one (and with num_workers > 0, whose workers each drew on from
    a seed of their own, others again). The epoch is read when iterating: Lightning builds the loader before the
    checkpoint's epoch is restored. With `trainer.reload_dataloaders_every_n_epochs`, each rebuilt loader draws its
    epoch's order.

    Under DDP (`world` ranks) every rank draws the same epoch and takes its stride of it, each rank the same number
    of frames (RankShuffle hands it to Lightning): together they train the frames and augmentations one process
    trains in that epoch (less the last `len % world`), so rank r's draws are its own, and the same however often
    the run is stopped and resumed. (Lightning had swapped the sampler for its DistributedSampler, whose plain
    indices drew augmentations on from the dataset's seed, and which began a resumed epoch over.)

    Resumed inside an epoch (a Ctrl-C's or SIGTERM's last.ckpt), Lightning runs the rest of it from a loader that
    starts over: the epoch's first batches were trained again and its last frames never. The `done_of()` batches
    trained are skipped: the rest of the epoch is the frames it had left, in its order. `resume` (the checkpoint's
    ShuffleState) brings back the generator as that epoch began it: a checkpoint written before the epochs were
    seeded each drew that epoch's order on from the ones before."""

    def __init__(self, data_source, seed: int, epoch_of: Callable[[], int | None], batch_size: int = 1,
                 resume: dict | None = None, done_of: Callable[[], int] = lambda: 0, rank: int = 0, world: int = 1):
        super().__init__(data_source, generator=torch.Generator().manual_seed(seed))
        self.seed, self.epoch_of, self.rank, self.world, self._next_epoch = seed, epoch_of, rank, world, 0
        self.batch_size, self._resume, self._done_of = batch_size, resume, done_of
        self.epoch_began: tuple[int, torch.Tensor] | None = None  # the running epoch, and the generator as it began it
        self._seed_epoch(self._epoch())  # already here: the DataLoader draws its workers' base seed from it first

    def __len__(self) -> int:
        return self.num_samples // self.world  # this rank's frames of an epoch

    def _epoch(self) -> int:
        epoch = self.epoch_of()
        return self._next_epoch if epoch is None else epoch

    def _seed_epoch(self, epoch: int) -> int:
        fresh = seed_of(self.seed, epoch) if epoch else self.seed
        self.generator.manual_seed(fresh)
        return fresh

    def __iter__(self):
        epoch = self._epoch()
        fresh = self._seed_epoch(epoch)
        resume, self._resume, skip = self._resume, None, 0
        if resume is not None and int(resume["epoch"]) == epoch:
            done = self._done_of() * self.batch_size
            if 0 < done < len(self):  # (all done: a validation-end checkpoint, whose epoch is over)
                self.generator.set_state(resume["generator"])
                skip = done
        self.epoch_began = (epoch, self.generator.get_state())
        self._next_epoch = epoch + 1
        seeded = ((i, seed_of(fresh, k, 2)) for k, i in enumerate(super().__iter__()))  # 2: never an epoch's seed
        mine = itertools.islice(seeded, self.rank, len(self) * self.world, self.world)
        return itertools.islice(mine, skip, None)


class RankShuffle(DistributedSampler):
    """A DDP rank's train sampler: ResumableShuffle's stride for this rank. A DistributedSampler so that Lightning
    keeps it (it swaps any other sampler for its own); the epoch is ResumableShuffle's, read from the trainer."""

    def __init__(self, shuffle: ResumableShuffle) -> None:
        super().__init__(shuffle.data_source, num_replicas=shuffle.world, rank=shuffle.rank, shuffle=False,
                         drop_last=True)
        self.shuffle, self.generator = shuffle, shuffle.generator

    def __iter__(self):
        return iter(self.shuffle)

    def __len__(self) -> int:
        return len(self.shuffle)


def batches_done(trainer) -> int:
    """Batches of its epoch a fit resumed inside it (a Ctrl-C's or SIGTERM's last.ckpt) had trained, which Lightning
    does not run again; 0 in any other epoch or run. A loader reads it when it is iterated: while the optimizers are
    set up (the checkpoint read, the loops not yet restored), as the fit starts (restored), or at the first batch
    (reset for the restart: the resident data, and num_workers=0 draw their first batch only then)."""
    loop = getattr(trainer, "fit_loop", None)
    if loop is None:
        return 0
    if loop.restarting:
        epochs, batches = loop.epoch_progress.current, loop.epoch_loop.batch_progress.current
        inside = loop.restarted_mid_epoch or epochs.started == epochs.processed + 1  # after the reset, or before it
        return int(batches.processed) if inside else 0
    loaded = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None) or {}
    fit = (loaded.get("loops") or {}).get("fit_loop") or {}
    epochs, batches = ((fit.get(key) or {}).get("current") or {} for key in ("epoch_progress",
                                                                              "epoch_loop.batch_progress"))
    inside = bool(epochs) and epochs.get("started") == epochs.get("processed", -2) + 1
    return int(batches.get("processed", 0)) if inside else 0


class ShuffleState:
    """What a datamodule whose train loader draws from ResumableShuffle keeps in a checkpoint (Lightning saves a
    datamodule's state_dict): the running epoch and the generator as it began it, so that a resume inside that
    epoch trains the frames it had left (CamVidDataModule, FolderDataModule)."""

    _shuffle: ResumableShuffle | None = None
    _shuffle_resume: dict | None = None

    def train_shuffle(self, dataset, seed: int, batch_size: int) -> ResumableShuffle | RankShuffle:
        # (every loader built gets the checkpoint's state: one rebuilt in the resumed epoch, reload_dataloaders_every_
        # n_epochs, goes on as the first would have; a later epoch's does not match it and draws as before)
        rank, world = rank_and_world(self)
        self._shuffle = ResumableShuffle(dataset, seed, current_epoch(self), batch_size, self._shuffle_resume,
                                         lambda: batches_done(self.trainer), rank, world)
        return RankShuffle(self._shuffle) if world > 1 else self._shuffle

    def state_dict(self) -> dict[str, Any]:
        began = self._shuffle.epoch_began if self._shuffle is not None else None
        return {} if began is None else {"train_shuffle": {"epoch": began[0], "generator": began[1]}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._shuffle_resume = state_dict.get("train_shuffle")


def current_epoch(dm: pl.LightningDataModule) -> Callable[[], int | None]:
    """The epoch of the trainer `dm` is attached to when called (None without one). A resume's loader is first
    iterated while the optimizers are set up (`estimated_stepping_batches`), after Lightning has read the checkpoint
    and before it restores the loops (current_epoch still 0); the checkpoint it holds says the epoch then (a
    private attribute of Lightning 2.6: tests/test_resume.py's resumed-batches test fails if it moves)."""
    from bgremover.checkpoint import epochs_trained

    def epoch() -> int | None:
        trainer = dm.trainer
        if trainer is None:
            return None
        loaded = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None)
        return max(trainer.current_epoch, epochs_trained(loaded) if loaded else 0)

    return epoch


def rank_and_world(dm: pl.LightningDataModule) -> tuple[int, int]:
    """The DDP rank of the process `dm`'s trainer runs in, and the number of ranks: (0, 1) in a single process, or
    without a trainer."""
    return (dm.trainer.global_rank, dm.trainer.world_size) if dm.trainer is not None else (0, 1)


class CamVidDataModule(ShuffleState, pl.LightningDataModule):
    classes = CLASSES
    ignore_index = VOID

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        crop_size: Sequence[int] | None = (224, 224),
        hflip: float = 0.5,
        scale_jitter: float = 0.0,
        color_jitter: float = 0.0,
        pad_multiple: int = 32,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        class_weights: str | None = None,
        download: bool = False,
        limit_images: int | None = None,
        limit_eval_images: int | None = None,
        seed: int = 0,
        train_split: str = "train",
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = resolve_root(root)
        if self.trains_on_val:  # a bad value fails here, before any decoding
            rank_zero_warn(f"data.train_split={train_split}: the net trains on the val frames, so val/mIoU (and the "
                           "checkpoint it picks) is not held out; the test split is")
        self.datasets: dict[str, CamVidDataset] = {}

    @property
    def trains_on_val(self) -> bool:
        """data.train_split=train+val: val/mIoU is then no held-out score (the speed-run's lines say so too)."""
        return "val" in train_splits(self.hparams.train_split)

    def prepare_data(self) -> None:
        if not self.root.is_dir() and self.hparams.download:
            from bgremover.data.download import download_camvid

            download_camvid(self.root)
        # no whole-dataset check here: setup() checks each split it loads, so `eval` never needs the train split

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, ("train", "val", "test")):
            if split in self.datasets:
                continue
            train = split == "train"
            transform = build_transforms(
                train,
                crop_size=hp.crop_size,
                hflip=hp.hflip if train else 0.0,
                scale_jitter=hp.scale_jitter,
                color_jitter=hp.color_jitter,
                pad_multiple=hp.pad_multiple,
                mean=hp.mean,
                std=hp.std,
            )
            # limit_images trims only what the net learns from; val/test stay whole unless limit_eval_images says
            # otherwise, and every test number is reported with its frame count (test/frames)
            limit = hp.limit_images if train else hp.limit_eval_images
            ds = CamVidDataset(self.root, hp.train_split if train else split, transform, limit=limit)
            ds.reseed(hp.seed)  # covers num_workers=0; workers reseed themselves in _seed_worker
            self.datasets[split] = ds

    def split_size(self, split: str) -> int:
        """Frames in the whole split on disk (not limited): what a test number's frame count is out of."""
        return len(list_pairs(self.root, split))

    def class_weights(self) -> torch.Tensor | None:
        """Loss weights per class, or None for plain cross-entropy (`data.class_weights: median_freq`)."""
        mode = self.hparams.class_weights
        if not mode or mode == "none":
            return None
        if mode != "median_freq":
            raise CamVidError(f"unknown data.class_weights '{mode}' (use null or median_freq)")
        # over what the net trains on: with train+val, val's labels count too
        return torch.tensor(median_frequency_weights(self.root, split=self.hparams.train_split), dtype=torch.float32)

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        hp = self.hparams
        workers = hp.num_workers
        batch = hp.batch_size if train else (hp.eval_batch_size or hp.batch_size)
        whole = not train or not hp.crop_size  # whole frames, padded: those of different padded sizes cannot stack
        sizes = padded_sizes(self.datasets[split].frame_sizes(), hp.pad_multiple) if whole and batch > 1 else ()
        if len(sizes) > 1 and train:
            listed = ", ".join(f"{h}x{w}" for h, w in sorted(sizes))
            raise CamVidError(f"data.crop_size=null trains on whole frames, but the {hp.train_split} frames in "
                              f"{self.root} pad to {len(sizes)} sizes ({listed}), which a batch of {batch} cannot "
                              "stack: set data.crop_size=[H,W] or data.batch_size=1")
        if len(sizes) > 1:  # as data=folder evaluates such a split
            log.info("%s frames differ in size: evaluated one at a time", split)
            batch = 1
        sampler = self.train_shuffle(self.datasets[split], hp.seed, batch) if train else self._eval_sampler(split)
        return DataLoader(
            self.datasets[split],
            batch_size=batch,
            sampler=sampler,
            # DeepLab's ASPP pooling BatchNorm cannot train on a batch of one; a short last batch can be that.
            drop_last=train,
            num_workers=workers,
            pin_memory=hp.pin_memory,
            persistent_workers=bool(hp.persistent_workers and workers > 0),
            worker_init_fn=_seed_worker if workers > 0 else None,
            generator=sampler.generator if train else eval_generator(),  # the workers' seeds: as the order, per epoch
        )

    def _eval_sampler(self, split: str) -> Sampler | None:
        return eval_sampler(self.trainer, self.datasets[split], split)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", False)


def padded_sizes(sizes, multiple: int | None) -> set[tuple[int, int]]:
    """The distinct sizes frames of these (H, W) have once padded to `multiple` (bgremover.padding's rule)."""
    m = max(1, multiple or 1)
    return {(-(-h // m) * m, -(-w // m) * m) for h, w in sizes}


def eval_generator() -> torch.Generator:
    """An eval loader's own generator (any datamodule's): each iterator draws its workers' base seed from the loader's
    generator, the global one without, so every validation moved the dropout masks of the steps after it, and a
    validation a resumed run runs again (or a stop inside an epoch adds) made it train other numbers."""
    return torch.Generator()


def eval_sampler(trainer, dataset, split: str) -> Sampler | None:
    """Under DDP, every val/test frame on exactly one rank; None in a single process (any datamodule's loaders).

    Lightning's default DistributedSampler pads the ranks to equal length with repeated frames, which would
    then count twice in the epoch's mIoU. Unpadded, a rank may run one batch fewer than another: fine in
    evaluation, where metrics sync once at the epoch's end (DDP syncs buffers only at the first batch, and
    each rank gets at least one frame).
    """
    if trainer is None or trainer.world_size <= 1:
        return None
    from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

    if len(dataset) < trainer.world_size:  # a rank without a single batch would stall the others
        raise CamVidError(f"the {split} split has {len(dataset)} frames, fewer than the {trainer.world_size} "
                          "DDP processes: evaluate on fewer devices")
    return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                        shuffle=False)
