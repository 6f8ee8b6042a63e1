"""The device-resident CamVid pipeline: decode cache, batched scale-crop/flip/colour against hand computations,
void fill, determinism, DDP shards, full-frame val/test equal to the DataLoader path, and training through Hydra;
plus the speed-run schedule and time-to-mIoU callback it is used with. At the end: what the train loader draws
(flip share, scale range, jitter share and range, crop windows, epoch orders) measured on its batches' pixels, and
the val loader's frames against their PNGs."""

from __future__ import annotations

import csv
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONF_DIR, compose_cfg, write_camvid
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from bgremover.data import CamVidDataModule, ResidentCamVidDataModule
from bgremover.data.camvid import read_pair
from bgremover.data.classes import MEAN, STD, VOID
from bgremover.data.resident import augment, decode_split
from bgremover.lit.speedrun import WarmupCosineLR

MEAN_T, STD_T = torch.tensor(MEAN), torch.tensor(STD)
TINY_TIRAMISU = ["model=tiramisu56", "model.net.down_blocks=[2,2]", "model.net.up_blocks=[2,2]",
                 "model.net.bottleneck_layers=2", "model.net.growth_rate=8", "model.net.first_conv_channels=16"]


def _norm(raw: torch.Tensor) -> torch.Tensor:
    """H×W×3 uint8 → 3×H×W normalised, the way both pipelines normalise."""
    return (raw.permute(2, 0, 1).float() / 255.0 - MEAN_T.view(3, 1, 1)) / STD_T.view(3, 1, 1)


def _one(images, labels, crop, scale=1.0, offset=(0.0, 0.0), flip=False, alpha=1.0, beta=0.0, sizes=None):
    """augment() on a batch of one with the given draws."""
    b = len(labels)
    sizes = sizes if sizes is not None else torch.tensor([labels.shape[1:]] * b)
    return augment(images, labels, sizes, crop, torch.full((b,), float(scale)), torch.tensor([offset] * b),
                   torch.tensor([flip] * b), torch.full((b,), float(alpha)), torch.full((b,), float(beta)),
                   MEAN_T, STD_T)


def _frame(h=12, w=16, seed=0, values=None):
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (1, h, w, 3), generator=g, dtype=torch.uint8)
    vals = torch.tensor(values if values is not None else list(range(12)), dtype=torch.uint8)
    lbl = vals[torch.randint(0, len(vals), (1, h, w), generator=g)]
    return img, lbl


# --- decode + cache --------------------------------------------------------------------------------------------
def test_decode_split_matches_files_and_is_cached(tiny_camvid, tmp_path, monkeypatch):
    # a cache of its own: the session's shared one also holds the resume tests' resident caches of other tiny sets
    monkeypatch.setenv("BGREMOVER_CACHE", str(tmp_path / "cache"))
    a = decode_split(tiny_camvid, "train")
    assert a["images"].shape == (4, 48, 64, 3) and a["images"].dtype == np.uint8
    assert a["labels"].shape == (4, 48, 64) and a["labels"].dtype == np.uint8
    assert a["sizes"].tolist() == [[48, 64]] * 4
    img, lbl = read_pair(tiny_camvid / "train" / "train_002.png", tiny_camvid / "trainannot" / "train_002.png")
    assert np.array_equal(a["images"][2], img) and np.array_equal(a["labels"][2], lbl)
    cached = list((tmp_path / "cache").glob("camvid_resident_train_*.npz"))
    assert len(cached) == 1
    assert len(decode_split(tiny_camvid, "train", limit=2, cache=False)["labels"]) == 2

    def no_decoding(*_):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr("bgremover.data.resident.read_pair", no_decoding)
    again = decode_split(tiny_camvid, "train")
    assert all(np.array_equal(a[k], again[k]) for k in a)


def test_a_failed_cache_write_leaves_no_partial_file(tiny_camvid, tmp_path, monkeypatch):
    """The cache (hundreds of MB for CamVid's train split) is written through bgremover.files: a write that fails
    (a full disk, Ctrl-C) costs only the cache, and leaves no temporary file behind (each run left one, its own)."""
    import os

    monkeypatch.setenv("BGREMOVER_CACHE", str(tmp_path / "cache"))

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    a = decode_split(tiny_camvid, "train")
    assert a["images"].shape == (4, 48, 64, 3)  # the run goes on with what it decoded
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncated", "empty", "scrambled header"])
def test_a_damaged_cache_file_is_decoded_again_and_rewritten(tiny_camvid, tmp_path, monkeypatch, damage):
    """A cache file cut short (a copied ~/.cache, a disk fault) stopped every later run on a traceback
    (zipfile.BadZipFile, EOFError, tokenize.TokenError) until the file was found and deleted by hand."""
    monkeypatch.setenv("BGREMOVER_CACHE", str(tmp_path / "cache"))
    first = decode_split(tiny_camvid, "train")
    (path,) = (tmp_path / "cache").glob("camvid_resident_train_*.npz")
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                      "scrambled header": data[:100] + b"x" * 50 + data[150:]}[damage])
    again = decode_split(tiny_camvid, "train")
    assert all(np.array_equal(first[k], again[k]) for k in first)
    with np.load(path) as z:  # rewritten whole
        assert np.array_equal(z["labels"], first["labels"])

def test_frames_of_different_sizes_are_padded_with_void(tmp_path):
    root = write_camvid(tmp_path / "CamVid", {"train": 2})
    Image.fromarray(np.full((40, 70, 3), 9, np.uint8)).save(root / "train" / "train_big.png")
    Image.fromarray(np.full((40, 70), 3, np.uint8), mode="L").save(root / "trainannot" / "train_big.png")
    a = decode_split(root, "train", cache=False)
    assert a["images"].shape == (3, 48, 70, 3)
    assert a["sizes"].tolist() == [[48, 64], [48, 64], [40, 70]]
    assert (a["labels"][0][:, 64:] == VOID).all() and (a["images"][0][:, 64:] == 0).all()
    assert (a["labels"][2][40:] == VOID).all() and (a["labels"][2][:40] == 3).all()


# --- augment() against hand computations ----------------------------------------------------------------------
@pytest.mark.parametrize("flip", [False, True])
def test_unscaled_crop_is_a_slice(flip):
    img, lbl = _frame(12, 16)
    oy, ox, h, w = 3, 5, 6, 8
    x, y = _one(img, lbl, (h, w), offset=(oy / (12 - h), ox / (16 - w)), flip=flip)
    want_x, want_y = _norm(img[0])[:, oy:oy + h, ox:ox + w], lbl[0, oy:oy + h, ox:ox + w].long()
    if flip:
        want_x, want_y = want_x.flip(-1), want_y.flip(-1)
    assert x.shape == (1, 3, h, w) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x[0], want_x, atol=1e-4, rtol=0)
    assert torch.equal(y[0], want_y)


@pytest.mark.parametrize("offset", [(0.13, 0.71), (0.37, 0.05), (0.99, 0.42), (0.58, 0.9)])
def test_unscaled_crops_at_any_drawn_offset_are_exact_windows(offset):
    """With no scale jitter (camvid_resident.yaml's default) every crop is a window of whole pixels, as
    albumentations' RandomCrop cuts it: a drawn offset fell between pixels, and grid_sample blended each crop's
    image with its neighbours (a random sub-pixel blur that val/test frames never have)."""
    img, lbl = _frame(12, 16, seed=6)
    h, w = 6, 8
    x, y = _one(img, lbl, (h, w), offset=offset)
    frame = _norm(img[0])
    found = [(oy, ox) for oy in range(12 - h + 1) for ox in range(16 - w + 1)
             if (x[0] - frame[:, oy:oy + h, ox:ox + w]).abs().max() < 1e-4]
    assert len(found) == 1, f"no whole-pixel window matches the crop at offset {offset}"
    oy, ox = found[0]
    assert torch.equal(y[0], lbl[0, oy:oy + h, ox:ox + w].long())


def test_scale_two_is_cv2_bilinear_and_nearest_labels():
    import cv2

    img, lbl = _frame(10, 12, seed=1)
    x, y = _one(img, lbl, (20, 24), scale=2.0)
    up = cv2.resize(img[0].numpy(), (24, 20), interpolation=cv2.INTER_LINEAR)  # cv2 rounds to uint8
    raw = x[0] * STD_T.view(3, 1, 1) + MEAN_T.view(3, 1, 1)
    assert (raw.permute(1, 2, 0) * 255 - torch.from_numpy(up).float()).abs().max() <= 1.0
    assert torch.equal(y[0], lbl[0].long().repeat_interleave(2, 0).repeat_interleave(2, 1))  # pixel j ← j // 2


@pytest.mark.parametrize(("offset", "rows"), [(0.0, slice(0, 6)), (1.0, slice(14, 20))])
def test_frame_smaller_than_crop_sits_inside_void(offset, rows):
    img, lbl = _frame(12, 16, seed=2, values=[1, 4])
    x, y = _one(img, lbl, (20, 20), scale=0.5, offset=(offset, offset))  # a 6×8 frame in a 20×20 crop
    cols = slice(0, 8) if offset == 0 else slice(12, 20)
    inside = torch.zeros(20, 20, dtype=torch.bool)
    inside[rows, cols] = True
    assert (y[0][~inside] == VOID).all()
    assert set(y[0][inside].unique().tolist()) <= {1, 4}
    fill = (-MEAN_T / STD_T).view(3, 1)  # raw 0 after normalisation, as PadIfNeeded's fill=0
    torch.testing.assert_close(x[0][:, ~inside], fill.expand(3, int((~inside).sum())))


def test_random_draws_keep_labels_in_the_source_set():
    img, lbl = _frame(24, 32, seed=3, values=[0, 3, 7])
    g = torch.Generator().manual_seed(0)
    b = 16
    imgs, lbls = img.expand(b, -1, -1, -1), lbl.expand(b, -1, -1)
    x, y = augment(imgs, lbls, torch.tensor([[24, 32]] * b), (20, 20), 0.5 + 1.5 * torch.rand(b, generator=g),
                   torch.rand(b, 2, generator=g), torch.rand(b, generator=g) < 0.5, torch.ones(b), torch.zeros(b),
                   MEAN_T, STD_T)
    assert set(y.unique().tolist()) <= {0, 3, 7, VOID}
    assert (y != VOID).float().mean() > 0.5
    assert torch.isfinite(x).all()


def test_random_draws_keep_image_and_label_aligned():
    """Each label painted in its own colour: wherever a label pixel's 3×3 neighbourhood agrees (no boundary to
    blur across), the augmented image must show that label's colour — under random scale, offset and flip."""
    from bgremover.data.classes import PALETTE

    g = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 11, (1, 6, 8), generator=g, dtype=torch.uint8)
    lbl = blocks.repeat_interleave(6, 1).repeat_interleave(6, 2)  # 36×48 of 6×6 patches
    img = torch.tensor(PALETTE, dtype=torch.uint8)[lbl.long()]
    b = 12
    x, y = augment(img.expand(b, -1, -1, -1), lbl.expand(b, -1, -1), torch.tensor([[36, 48]] * b), (30, 30),
                   0.5 + 1.5 * torch.rand(b, generator=g), torch.rand(b, 2, generator=g),
                   torch.rand(b, generator=g) < 0.5, torch.ones(b), torch.zeros(b), MEAN_T, STD_T)
    raw = ((x * STD_T.view(1, 3, 1, 1) + MEAN_T.view(1, 3, 1, 1)) * 255).permute(0, 2, 3, 1)
    same = torch.ones_like(y, dtype=torch.bool)
    pad = F.pad(y.float().unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    for dy in range(3):
        for dx in range(3):
            same &= pad[:, dy:dy + 30, dx:dx + 30] == y
    check = same & (y != VOID)
    check[:, [0, -1]] = check[:, :, [0, -1]] = False  # the crop's edge: its neighbours outside the crop are unknown
    assert check.sum() > 1000
    colours = torch.tensor(PALETTE, dtype=torch.float32)[y[check]]
    assert (raw[check] - colours).abs().max() < 1.0


def test_brightness_contrast_is_albumentations_formula():
    img, lbl = _frame(8, 8, seed=4)
    x, y = _one(img, lbl, (8, 8), alpha=1.2, beta=-0.1)
    raw = (x[0] * STD_T.view(3, 1, 1) + MEAN_T.view(3, 1, 1)) * 255
    want = (img[0].permute(2, 0, 1).float() * 1.2 - 25.5).clamp(0, 255)
    torch.testing.assert_close(raw, want, atol=1e-3, rtol=0)
    assert torch.equal(y[0], lbl[0].long())  # colour jitter is the image's alone: class indices are no colour


# --- the datamodule -------------------------------------------------------------------------------------------
def _dm(root, **kw):
    args = {"root": str(root), "batch_size": 2, "eval_batch_size": 2, "crop_size": (32, 32), "num_workers": 1,
            "scale_range": (0.5, 2.0), "color_jitter": 0.2, "seed": 3}
    dm = ResidentCamVidDataModule(**{**args, **kw})
    dm.setup("fit")
    return dm


def test_batches_shapes_dtypes_and_determinism(tiny_camvid):
    a, b = _dm(tiny_camvid), _dm(tiny_camvid)
    loader = a.train_dataloader()
    assert len(loader) == 2  # 4 frames, batch 2
    first = list(loader)
    assert len(first) == 2
    x, y = first[0]
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert y.shape == (2, 32, 32) and y.dtype == torch.int64
    for (xa, ya), (xb, yb) in zip(first, b.train_dataloader(), strict=True):  # same seed, same epoch
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    second = list(loader)  # the next epoch draws anew
    assert not torch.equal(first[0][0], second[0][0])
    other = _dm(tiny_camvid, seed=4).train_dataloader()
    assert not torch.equal(first[0][0], next(iter(other))[0])


def test_ddp_ranks_take_disjoint_shards(tiny_camvid):
    dm = _dm(tiny_camvid, epoch_repeats=3, batch_size=1)
    orders = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=5)
        loader = dm.train_dataloader()
        assert len(loader) == 6  # 4 frames × 3 repeats / 2 ranks
        orders.append(loader.epoch_order(5))
    dm.trainer = None
    whole = ResidentCamVidDataModule(root=str(tiny_camvid), batch_size=1, epoch_repeats=3, seed=3, num_workers=1)
    whole.setup("fit")
    full = whole.train_dataloader().epoch_order(5)
    assert torch.equal(torch.stack(orders, 1).flatten(), full)  # interleaved strides of one permutation
    assert sorted(full.tolist()) == sorted(list(range(4)) * 3)


def test_ddp_ranks_augment_with_draws_of_their_own(tmp_path):
    """Frames that are all one image: rank 0's and rank 1's batches differ by their augmentation draws only (as
    CamVidDataModule's under DDP, tests/test_ddp.py), and each rank's draws repeat for its epoch."""
    import shutil

    root = write_camvid(tmp_path / "CamVid", counts={"train": 4, "val": 1, "test": 1})
    for name in ("train_001.png", "train_002.png", "train_003.png"):
        shutil.copy(root / "train" / "train_000.png", root / "train" / name)
        shutil.copy(root / "trainannot" / "train_000.png", root / "trainannot" / name)
    dm = _dm(root, hflip=0.5)
    batches = []
    for rank in (0, 1, 1):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=2, overfit_batches=0)
        batches.append(next(iter(dm.train_dataloader()))[0])
    assert not torch.equal(batches[0], batches[1])
    assert torch.equal(batches[1], batches[2])


def test_val_and_test_equal_the_dataloader_path(tiny_camvid):
    kw = {"root": str(tiny_camvid), "batch_size": 2, "eval_batch_size": 2, "num_workers": 0}
    resident, plain = ResidentCamVidDataModule(**kw), CamVidDataModule(**kw)
    for stage, getter in (("validate", "val_dataloader"), ("test", "test_dataloader")):
        resident.setup(stage)
        plain.setup(stage)
        pairs = list(zip(getattr(resident, getter)(), getattr(plain, getter)(), strict=True))
        assert pairs
        for (xr, yr), (xp, yp) in pairs:
            assert xr.shape == xp.shape == (2, 3, 64, 64)  # 48×64 padded to multiples of 32
            torch.testing.assert_close(xr, xp, atol=1e-5, rtol=0)
            assert torch.equal(yr, yp)


def test_bad_settings_are_one_line_errors(tiny_camvid):
    from bgremover.data.camvid import CamVidError

    with pytest.raises(CamVidError, match="scale_range"):
        ResidentCamVidDataModule(root=str(tiny_camvid), scale_range=(2.0, 1.0))
    with pytest.raises(CamVidError, match="larger than"):
        _dm(tiny_camvid, batch_size=8).train_dataloader()


def test_real_frames(camvid_root):
    dm = _dm(camvid_root, limit_images=2, limit_eval_images=2, crop_size=(224, 224), batch_size=2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 224, 224) and y.shape == (2, 224, 224)
    source = set(np.unique(decode_split(camvid_root, "train", limit=2)["labels"]).tolist())
    assert set(y.unique().tolist()) <= source | {VOID}
    plain = CamVidDataModule(root=str(camvid_root), eval_batch_size=2, num_workers=0, limit_eval_images=2)
    plain.setup("validate")
    (xr, yr), (xp, yp) = next(iter(dm.val_dataloader())), next(iter(plain.val_dataloader()))
    assert xr.shape == (2, 3, 384, 480)
    torch.testing.assert_close(xr, xp, atol=1e-5, rtol=0)
    assert torch.equal(yr, yp)


# --- training through Hydra -----------------------------------------------------------------------------------
# `~experiment`: the base config, not the default quick recipe, so the test states what it depends on
SMALL = ["~experiment", "data=camvid_resident", "data.batch_size=2", "data.eval_batch_size=2", "data.crop_size=[32,32]",
         "data.num_workers=1", "extras.print_config=false", "measure_inference=false", "logger=csv"]


def test_fast_dev_run_with_resident_data(tiny_camvid, tmp_path):
    from bgremover.train import train

    cfg = compose_cfg(tmp_path, [*TINY_TIRAMISU, *SMALL, f"data.root={tiny_camvid}", "debug=fdr"])
    metrics, objects = train(cfg)
    assert type(objects["datamodule"]).__name__ == "ResidentCamVidDataModule"
    assert objects["trainer"].global_step == 1
    assert 0.0 <= metrics["test/mIoU"] <= 1.0 and math.isfinite(metrics["train/loss"])


def test_speedrun_budget_anneals_stops_with_a_last_validation(tiny_camvid, tmp_path, caplog):
    """A 6 s budget (4 s left too few epochs on a loaded 2-core machine): the run stops on time (max_epochs would take far longer), lr ends at 0, the stopping epoch
    is validated although validation is set for every 1000th epoch, and time-to-mIoU lands in the metrics."""
    from bgremover.train import train

    cfg = compose_cfg(tmp_path, [
        *TINY_TIRAMISU, *SMALL, f"data.root={tiny_camvid}", "trainer.max_epochs=100000",
        "trainer.check_val_every_n_epoch=1000", "trainer.num_sanity_val_steps=0", "trainer.max_time=00:00:01:00",
        "model.optimizer._target_=torch.optim.AdamW", "~model.optimizer.alpha", "~model.optimizer.eps", "~model.scheduler.gamma",
        "model.scheduler._target_=bgremover.lit.speedrun.WarmupCosineLR", "+model.scheduler.total_iters=null",
        "model.scheduler_interval=step", "callbacks.early_stopping=null", "callbacks.last_checkpoint=null",
        "+callbacks.time_to_miou._target_=bgremover.lit.speedrun.TimeToMIoU",
        "+callbacks.time_to_miou.thresholds=[0.0,1.01]", "+callbacks.time_to_miou.budget_s=6",
    ])
    import logging
    import re

    caplog.set_level(logging.INFO, logger="bgremover.train")
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    assert 1 < trainer.current_epoch < 100000
    # its test line carries the frame count as every test number does (audit: "test mIoU 0.0222 after 23.3 s")
    assert re.search(r"speedrun: test mIoU \d\.\d{4} \(\d+ frames\) after", caplog.text), caplog.text[-1500:]
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.budget_progress == 1.0 and trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)
    history = objects["model"].history
    assert len(history) == 1 and history[0]["epoch"] == trainer.current_epoch - 1  # the epoch it stopped in
    assert 0.0 <= metrics["time_to/0.000"] <= metrics["time/fit_s"] < 60
    assert 0.0 < metrics["time/first_step_s"] < metrics["time/fit_s"]  # the warm-up step, timed on its own
    assert "time_to/1.010" not in metrics
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert any(r.get("time_to/0.000") for r in rows)


def test_speedrun_recipe_without_validation_still_writes_a_checkpoint(tiny_camvid, tmp_path, caplog, recwarn):
    """The speed-run recipe with validation off (as the CPU probes ran it) ended with no checkpoint at all: its
    ModelCheckpoint watches val/mIoU. Now checkpoints/last.ckpt holds the final state, and summary.json says so.
    The run says it does not validate: its plan said "validation every 5 epoch(s)", Lightning warned each epoch
    that val/mIoU was missing, and time-to-mIoU listed every threshold as "not reached" (the H100 run on train+val)."""
    import json
    import logging

    caplog.set_level(logging.INFO, logger="bgremover.train")

    from bgremover.train import train

    tiny = [o for o in TINY_TIRAMISU if not o.startswith("model=")]
    cfg = compose_cfg(tmp_path, [
        "experiment=speedrun_tiramisu103", *tiny, *SMALL[1:], f"data.root={tiny_camvid}", "trainer.accelerator=cpu",
        "trainer.precision=32", "trainer.benchmark=false", "speedrun_budget_s=null", "trainer.max_epochs=2",
        "trainer.limit_val_batches=0", "test=false",
    ])
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["best_ckpt"] is None and summary["last_ckpt"] == str(tmp_path / "checkpoints" / "last.ckpt")
    assert torch.load(summary["last_ckpt"], weights_only=True)["global_step"] == summary["global_step"] > 0
    text = caplog.text
    assert "no validation (trainer.limit_val_batches=0)" in text and "validation every" not in text
    assert "no time to val/mIoU" in text and "not reached" not in text
    assert not [w for w in recwarn if "could not find the monitored key" in str(w.message)]


def test_validation_off_turns_early_stopping_off_and_the_run_finishes(tiny_camvid, tmp_path, recwarn):
    """A recipe validating every epoch, run with limit_val_batches=0 (compare_models, the paper recipes on a CPU):
    Lightning's EarlyStopping raised "metric val/mIoU which is not available" after the first epoch, and the run
    left no checkpoint. Now early stopping is off with one warning, and the run trains its epochs."""
    import json

    from bgremover.train import train

    cfg = compose_cfg(tmp_path, [*TINY_TIRAMISU, *SMALL, f"data.root={tiny_camvid}", "trainer.max_epochs=2",
                                 "trainer.check_val_every_n_epoch=1", "trainer.limit_val_batches=0", "test=false"])
    assert cfg.callbacks.early_stopping is not None
    train(cfg)
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["status"] == "ok" and summary["epochs"] == 2 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert [str(w.message) for w in recwarn if "early stopping" in str(w.message)] == [
        "trainer.limit_val_batches=0: early stopping (on val/mIoU) is off too, there is no validation to watch"]


def test_speedrun_experiments_compose():
    for name, budget in (("speedrun_tiramisu103", 570), ("speedrun_deeplabv3plus", 270), ("speedrun_remover", 270)):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"experiment={name}"])
        assert cfg.data._target_ == "bgremover.data.ResidentCamVidDataModule"
        assert cfg.model.scheduler._target_ == "bgremover.lit.speedrun.WarmupCosineLR"
        assert set(cfg.model.scheduler) == {"_target_", "_partial_", "total_iters", "warmup", "final_ratio"}
        assert cfg.callbacks.time_to_miou.budget_s == budget and cfg.trainer.precision == "bf16-mixed"
        assert cfg.callbacks.last_checkpoint.every_epoch is False and cfg.callbacks.early_stopping is None
        if name == "speedrun_remover":  # the shipped remover's recipe: the DeepLab speed-run, the shipped encoder
            assert cfg.model.net.encoder_name == "mobilenet_v2" and cfg.experiment_name == name


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WarmupCosineLR(opt, total_iters=100, warmup=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert 0 < lrs[0] < 0.2 and lrs[9] == pytest.approx(1.0)  # linear warm-up over 10 steps, never 0
    assert lrs[55] == pytest.approx(0.5, abs=1e-9)  # half-way through the cosine
    assert lrs[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)
    sched2 = WarmupCosineLR(opt, total_iters=1000, warmup=0.0, final_ratio=0.1)
    sched2.budget_progress = 0.5  # a time budget half spent outruns 0 of 1000 steps
    sched2.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.55)


def test_train_split_train_plus_val_is_resident_too(tmp_path):
    root = write_camvid(tmp_path / "CamVid", {"train": 4, "val": 2, "test": 2})
    with pytest.warns(UserWarning, match="not held out"):
        dm = _dm(root, train_split="train+val", cache=False)
    assert dm.tensors["train"]["labels"].shape[0] == 6 and dm.tensors["val"]["labels"].shape[0] == 2
    # the resident train tensors hold train's frames, then val's, as the files say
    files = sorted((root / "trainannot").iterdir()) + sorted((root / "valannot").iterdir())
    for k, lbl in enumerate(files):
        truth = np.array(Image.open(lbl))
        h, w = truth.shape
        assert np.array_equal(dm.tensors["train"]["labels"][k, :h, :w].cpu().numpy(), truth)


def test_a_resident_eval_reads_only_the_test_split(small_camvid, tmp_path):
    """`make eval` (train=false) with data=camvid_resident decoded train and val first (its prepare_data filled the
    cache for training whatever the stage), so on a copy holding only the test split, which data=camvid evaluates,
    it failed on "split folder missing: …/train" (an audit)."""
    import shutil

    from test_runs import TINY_RUN

    from bgremover.train import train

    base = [*TINY_RUN, "data=camvid_resident", "trainer.max_epochs=1"]
    train(compose_cfg(tmp_path / "a", [*base, f"data.root={small_camvid}", "test=false"]))
    test_only = tmp_path / "test_only"
    for split in ("test", "testannot"):
        shutil.copytree(small_camvid / split, test_only / split)
    metrics, _ = train(compose_cfg(tmp_path / "b", [*base, f"data.root={test_only}", "train=false",
                                                    f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"]))
    assert metrics["test/frames"] == 3


# --- what the train batches draw, measured on their pixels ------------------------------------------------------
def _write_frames(root, split, images, labels):
    """A split of the given H×W×3 uint8 images and H×W uint8 labels, named in order."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
    for k, (img, lbl) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img).save(root / split / f"{split}_{k:03d}.png")
        Image.fromarray(lbl, mode="L").save(root / f"{split}annot" / f"{split}_{k:03d}.png")
    return root


def _numbered_frames(root, n, h=24, w=32, seed=0):
    """n random frames whose labels are all the frame's number: a batch's labels say which frame each sample is."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
    _write_frames(root, "train", images, [np.full((h, w), k, np.uint8) for k in range(n)])
    _write_frames(root, "val", images[:1], [np.zeros((h, w), np.uint8)])
    return images


def _np_norm(img):
    """H×W×3 uint8 → 3×H×W normalised, in numpy."""
    return ((img.astype(np.float64) / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)


def _samples(dm, epochs=1):
    """(x, y) of every train sample of `epochs` epochs, in numpy."""
    loader = dm.train_dataloader()
    return [(x.numpy(), y.numpy()) for _ in range(epochs) for xb, yb in loader for x, y in zip(xb, yb, strict=True)]


@pytest.mark.parametrize("hflip", [0.0, 0.5, 1.0])
def test_train_samples_are_whole_frames_mirrored_with_probability_hflip(tmp_path, hflip):
    """Crop = frame, no scale, no jitter: each sample is its frame, or its mirror image; data.hflip says how often."""
    images = _numbered_frames(tmp_path, 6)
    dm = _dm(tmp_path, crop_size=(24, 32), scale_range=(1.0, 1.0), color_jitter=0.0, hflip=hflip, batch_size=3,
             epoch_repeats=8, cache=False)
    mirrored = []
    for x, y in _samples(dm):
        k = int(y[0, 0])
        assert (y == k).all()  # the labels moved with the image (all one value: any mirror of them is the same)
        want = _np_norm(images[k])
        if np.abs(x - want).max() < 1e-4:
            mirrored.append(False)
        else:
            np.testing.assert_allclose(x, want[:, :, ::-1], atol=1e-4)
            mirrored.append(True)
    assert len(mirrored) == 48
    share = np.mean(mirrored)
    assert share == hflip if hflip in (0.0, 1.0) else 0.3 < share < 0.7


def _nonvoid_frames(root, n=4, h=24, w=32):
    rng = np.random.default_rng(1)
    _write_frames(root, "train", [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)],
                  [np.full((h, w), 3, np.uint8)] * n)
    _write_frames(root, "val", [np.zeros((h, w, 3), np.uint8)], [np.zeros((h, w), np.uint8)])


@pytest.mark.parametrize(("settings", "lo", "hi"), [({"scale_range": (0.5, 1.5)}, 0.5, 1.5),
                                                     ({"scale_range": None, "scale_jitter": 0.4}, 0.6, 1.4)])
def test_train_samples_are_scaled_over_the_configured_range(tmp_path, settings, lo, hi):
    """A 24×32 frame of one class in a 40×52 crop (room for ×1.5): the frame's scale is the square root of its
    non-void share of the crop. Drawn over [lo, hi], both ends reached (data.scale_range, else scale_jitter)."""
    _nonvoid_frames(tmp_path)
    dm = _dm(tmp_path, crop_size=(40, 52), color_jitter=0.0, batch_size=4, epoch_repeats=16, cache=False, **settings)
    scales = np.array([np.sqrt((y != VOID).sum() / (24 * 32)) for _, y in _samples(dm)])
    assert len(scales) == 64
    assert scales.min() > lo - 0.05 and scales.max() < hi + 0.05, (scales.min(), scales.max())
    assert scales.min() < lo + 0.15 and scales.max() > hi - 0.15, (scales.min(), scales.max())


def test_brightness_contrast_hits_half_the_samples_over_the_whole_range(tmp_path):
    """A frame of two greys, 80 and 160, jittered by x ↦ a·x + 255·b: (a, b) are read back from the two. With
    data.color_jitter=0.2, about half the samples are jittered (albumentations' p=0.5), a in [0.8, 1.2] and b in
    [-0.2, 0.2] on both sides of no change; the labels never change."""
    img = np.full((24, 32, 3), 80, np.uint8)
    img[:, 16:] = 160
    _write_frames(tmp_path, "train", [img] * 4, [np.full((24, 32), 5, np.uint8)] * 4)
    _write_frames(tmp_path, "val", [img], [np.zeros((24, 32), np.uint8)])
    dm = _dm(tmp_path, crop_size=(24, 32), scale_range=(1.0, 1.0), color_jitter=0.2, hflip=0.0, batch_size=4,
             epoch_repeats=16, cache=False)
    a, b = [], []
    for x, y in _samples(dm):
        assert (y == 5).all()
        raw = (x * np.array(STD).reshape(3, 1, 1) + np.array(MEAN).reshape(3, 1, 1)) * 255
        dark, light = raw[:, :, :16], raw[:, :, 16:]
        assert np.ptp(dark) < 1e-3 and np.ptp(light) < 1e-3  # one affine map for the whole sample
        a.append((light.mean() - dark.mean()) / 80)
        b.append((dark.mean() - 80 * a[-1]) / 255)
    a, b = np.array(a), np.array(b)
    plain = (np.abs(a - 1) < 1e-5) & (np.abs(b) < 1e-5)
    assert len(a) == 64 and 0.3 < plain.mean() < 0.7, plain.mean()
    ja, jb = a[~plain], b[~plain]
    assert ja.min() > 0.8 - 1e-4 and ja.max() < 1.2 + 1e-4 and jb.min() > -0.2 - 1e-4 and jb.max() < 0.2 + 1e-4
    assert ja.min() < 0.9 and ja.max() > 1.1 and jb.min() < -0.1 and jb.max() > 0.1, (ja, jb)


def test_the_decode_cache_holds_the_frames_asked_for(tmp_path, monkeypatch):
    """One cache per file list: a later run with data.limit_images, or with a label file rewritten, gets the frames
    the files hold now, not an earlier run's arrays."""
    monkeypatch.setenv("BGREMOVER_CACHE", str(tmp_path / "cache"))
    root = write_camvid(tmp_path / "CamVid", {"train": 4})
    assert len(decode_split(root, "train")["labels"]) == 4
    two = decode_split(root, "train", limit=2)  # evenly spaced: frames 0 and 2
    want = [np.array(Image.open(root / "trainannot" / f"train_{k:03d}.png")) for k in (0, 2)]
    assert len(two["labels"]) == 2 and all(np.array_equal(two["labels"][i], want[i]) for i in range(2))
    fixed = np.full((48, 64), 7, np.uint8)  # a label corrected in place (its PNG now another size)
    Image.fromarray(fixed, mode="L").save(root / "trainannot" / "train_001.png")
    assert np.array_equal(decode_split(root, "train")["labels"][1], fixed)
    # redrawn again to the same PNG size: the file's time, not only its size, says the cache is stale
    label = root / "trainannot" / "train_001.png"
    size, redrawn = label.stat().st_size, np.full((48, 64), 4, np.uint8)  # 98 PNG bytes, as 7
    Image.fromarray(redrawn, mode="L").save(label)
    assert label.stat().st_size == size
    later = label.stat().st_mtime_ns + 10**9  # an edit comes later than a coarse file-system clock's tick
    os.utime(label, ns=(later, later))
    assert np.array_equal(decode_split(root, "train")["labels"][1], redrawn)


@pytest.mark.parametrize("ranks", [1, 2])
def test_val_batches_hold_every_val_frame_once(tmp_path, ranks):
    """3 val frames, data.eval_batch_size=2 (batch_size 4, limit_images 2 trim only the train split): batches of 2
    and 1, all 3 frames in file order, each normalised from its PNG; data.pad_multiple=16 leaves 48×64 unpadded.
    Under DDP each frame on exactly one rank (val/mIoU counts each once)."""
    root = write_camvid(tmp_path / "CamVid", {"train": 4, "val": 3})
    dm = _dm(root, batch_size=4, eval_batch_size=2, limit_images=2, pad_multiple=16, cache=False)
    seen = []
    for rank in range(ranks):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=ranks, current_epoch=0, overfit_batches=0)
        loader = dm.val_dataloader()
        batches = list(loader)
        assert len(loader) == len(batches)
        seen += [(x.numpy(), y.numpy()) for xb, yb in batches for x, y in zip(xb, yb, strict=True)]
        if ranks == 1:
            assert [len(y) for _, y in batches] == [2, 1]
    assert len(seen) == 3
    for k in range(3):
        img = np.array(Image.open(root / "val" / f"val_{k:03d}.png"))
        lbl = np.array(Image.open(root / "valannot" / f"val_{k:03d}.png"))
        x, y = seen[[0, 2, 1][k] if ranks == 2 else k]  # rank 0 holds frames 0 and 2, rank 1 frame 1
        np.testing.assert_allclose(x, _np_norm(img), atol=1e-5)
        assert np.array_equal(y, lbl)


def test_full_frame_training_pads_to_pad_multiple(tmp_path):
    """data.crop_size=null: the 48×64 frames train whole, padded to data.pad_multiple (16: not at all)."""
    root = write_camvid(tmp_path / "CamVid", {"train": 4, "val": 1})
    dm = _dm(root, crop_size=None, pad_multiple=16, scale_range=None, cache=False)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 48, 64) and y.shape == (2, 48, 64)


def test_an_epoch_drops_the_short_last_batch_and_shuffles_anew(tmp_path):
    """5 frames, batch 2: an epoch is 2 full batches of 4 different frames (the 5th waits for another epoch, as the
    DataLoader's drop_last); each epoch, and each of data.epoch_repeats' passes, in an order of its own."""
    _numbered_frames(tmp_path, 5)
    dm = _dm(tmp_path, crop_size=(24, 32), scale_range=(1.0, 1.0), batch_size=2, cache=False)
    loader = dm.train_dataloader()
    orders = []
    for _ in range(4):
        batches = list(loader)
        assert len(loader) == len(batches) == 2 and all(len(y) == 2 for _, y in batches)
        orders.append([int(y[0, 0]) for _, yb in batches for y in yb])
        assert len(set(orders[-1])) == 4
    assert len({tuple(o) for o in orders}) > 1, orders
    _numbered_frames(tmp_path / "more", 8)
    repeats = _dm(tmp_path / "more", crop_size=(24, 32), scale_range=(1.0, 1.0), batch_size=2, epoch_repeats=2,
                  cache=False)
    order = [int(y[0, 0]) for _, yb in repeats.train_dataloader() for y in yb]
    assert sorted(order[:8]) == sorted(order[8:]) == list(range(8)) and order[:8] != order[8:], order


def test_every_crop_window_is_drawn_equally_often():
    """A 6×8 crop of a 12×16 frame has 7×9 windows; offsets spread evenly over [0, 1] land once in each (as
    RandomCrop draws them), the bottom-right window included (offset 1: the last row and column get trained)."""
    img, lbl = _frame(12, 16, seed=7)
    frame = _norm(img[0])

    def window(offset):
        x, _ = _one(img, lbl, (6, 8), offset=offset)
        found = [(oy, ox) for oy in range(7) for ox in range(9)
                 if (x[0] - frame[:, oy:oy + 6, ox:ox + 8]).abs().max() < 1e-4]
        assert len(found) == 1, offset
        return found[0]

    assert [window(((i + 0.5) / 7, 0.5))[0] for i in range(7)] == list(range(7))
    assert [window((0.5, (i + 0.5) / 9))[1] for i in range(9)] == list(range(9))
    assert window((1.0, 1.0)) == (6, 8)


def test_val_frames_of_different_padded_sizes_are_refused_in_one_line(tmp_path):
    """The resident eval batches are one tensor: val frames that pad to two sizes are refused naming the split (not
    a numpy stacking error), and what data=camvid does with them instead."""
    from bgremover.data.camvid import CamVidError

    root = write_camvid(tmp_path / "CamVid", {"train": 4, "val": 1})
    write_camvid(tmp_path / "other", {"val": 1}, size=(40, 64))
    for sub in ("val", "valannot"):
        (tmp_path / "other" / sub / "val_000.png").rename(root / sub / "val_001.png")
    with pytest.raises(CamVidError, match=r"^the val frames differ in size: .*data=camvid evaluates"):
        _dm(root, pad_multiple=8, cache=False)


def test_ddp_with_fewer_val_frames_than_ranks_is_refused_in_one_line(tmp_path):
    """1 val frame, 2 ranks: rank 1 had nothing to validate, and the run failed at its first validation on
    Lightning's "`ResidentEvalLoader` within local rank has zero length" (its RankFailed line). Refused in the
    words data=camvid refuses it with."""
    from bgremover.data.camvid import CamVidError

    root = write_camvid(tmp_path / "CamVid", {"train": 4, "val": 1, "test": 2})
    dm = _dm(root, cache=False)
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, current_epoch=0, overfit_batches=0,
                                 strategy=SimpleNamespace(root_device=torch.device("cpu")))
    with pytest.raises(CamVidError, match="^the val split has 1 frames, fewer than the 2 DDP processes"):
        dm.val_dataloader()
    assert len(dm.test_dataloader()) == 1  # 2 test frames: one each


@pytest.mark.parametrize(("setting", "message"), [
    ({"scale_range": 1.5}, "data.scale_range must be [lo, hi] with 0 < lo <= hi, not 1.5"),
    ({"scale_range": ["a", "b"]}, "data.scale_range must be [lo, hi] with 0 < lo <= hi, not ['a', 'b']"),
    ({"epoch_repeats": 1.5}, "data.epoch_repeats must be a whole number >= 1, not 1.5"),
])
def test_resident_settings_of_the_wrong_type_are_one_line_errors(tiny_camvid, setting, message):
    """data.scale_range=1.5 was "TypeError: object of type 'float' has no len()"; data.epoch_repeats=1.5 built
    everything, passed the sanity check and stopped on "'float' object cannot be interpreted as an integer"."""
    from bgremover.data.camvid import CamVidError

    with pytest.raises(CamVidError) as err:
        ResidentCamVidDataModule(root=str(tiny_camvid), **setting)
    assert str(err.value) == message


def test_train_crops_are_drawn_over_the_whole_frame(tmp_path):
    """12×16 crops of 24×32 frames (no scale, flip or jitter): each is a window of its frame, found by its pixels;
    the windows reach all four edges, and their rows and columns are drawn apart (not all top-left, not only on
    the diagonal where the row's share of the room equals the column's)."""
    images = _numbered_frames(tmp_path, 4)
    dm = _dm(tmp_path, crop_size=(12, 16), scale_range=(1.0, 1.0), color_jitter=0.0, hflip=0.0, batch_size=4,
             epoch_repeats=16, cache=False)
    places = []
    for x, y in _samples(dm):
        frame = _np_norm(images[int(y[0, 0])])
        found = [(oy, ox) for oy in range(13) for ox in range(17)
                 if np.abs(x - frame[:, oy:oy + 12, ox:ox + 16]).max() < 1e-4]
        assert len(found) == 1
        places.append(found[0])
    oy, ox = np.array(places).T
    assert len(places) == 64 and oy.min() <= 1 and oy.max() >= 11 and ox.min() <= 1 and ox.max() >= 15, places
    assert (np.abs(oy / 12 - ox / 16) > 0.2).sum() > 10, places
