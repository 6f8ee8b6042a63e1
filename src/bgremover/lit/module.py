"""SegmentationModule: one LightningModule for every net — loss, optimizer/scheduler, mIoU metrics, image panels.

The net is injected (Hydra builds it from `model.net`), so Tiramisu and DeepLab share all training code.
Checkpoints describe themselves: `checkpoint["bgremover"]` holds the net's config, the class names and the
normalization, so export and evaluation rebuild the net without Hydra or this module.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, Metric, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from bgremover.checkpoint import CHECKPOINT_KEY
from bgremover.data.classes import CLASSES, DEFAULT_FOREGROUND, MEAN, STD, VOID, colorize
from bgremover.errors import count
from bgremover.lit.cutout import CutoutMetric

STAGES = ("train", "val", "test")
log = logging.getLogger(__name__)


def _key(stage: str) -> str:
    """ModuleDict key of a stage's metric: an entry may not be called "train" (it would shadow Module.train)."""
    return f"{stage}_"


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, fg: Sequence[int], ignore_index: int) -> torch.Tensor:
    """1 - soft Dice of P(foreground classes) against their pixels, pooled over the batch, void left out.
    Cross-entropy alone weighs every pixel alike; this term weighs the overlap a cut-out is judged by (fg IoU)."""
    return dice_loss_of(soft_dice_sums(logits, target, fg, ignore_index))


def soft_dice_sums(logits: torch.Tensor, target: torch.Tensor, fg: Sequence[int], ignore_index: int) -> torch.Tensor:
    """(overlap, sum of P(foreground), foreground pixels) over the labelled pixels: the sums soft Dice is a ratio
    of, so that a split's Dice is that of its batches' sums added (a mean of batch Dice moves with the batching)."""
    prob = logits.float().softmax(1)[:, list(fg)].sum(1)
    valid = (target != ignore_index).float()
    truth = torch.isin(target, torch.as_tensor(list(fg), device=target.device)).float() * valid
    prob = prob * valid
    return torch.stack([(prob * truth).sum(), prob.sum(), truth.sum()])


def dice_loss_of(sums: torch.Tensor) -> torch.Tensor:
    overlap, predicted, truth = sums
    return 1 - (2 * overlap + 1) / (predicted + truth + 1)


class SoftDiceSums(Metric):
    """A val/test split's soft-Dice sums, added over batches and ranks; ``compute`` is its Dice loss."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("sums", default=torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, sums: torch.Tensor) -> None:
        self.sums += sums.detach().to(self.sums.dtype)

    def compute(self) -> torch.Tensor:
        return dice_loss_of(self.sums).float()


class SegmentationModule(pl.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        net_name: str = "net",
        net_config: dict | None = None,
        class_names: Sequence[str] = CLASSES,
        ignore_index: int = VOID,
        class_weights: Sequence[float] | None = None,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
        size_multiple: int = 32,
        default_foreground: Sequence[str] = DEFAULT_FOREGROUND,
        image_size: int | None = None,
        dice_weight: float = 0.0,
        channels_last: bool = True,
        compile: bool = False,
        log_images_every_n_epochs: int = 5,
        num_log_images: int = 3,
    ):
        super().__init__()
        # Only plain values go into hparams: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.num_classes = len(class_names)
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.criterion = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
        if weight is not None:  # keep the weights on the module's device, out of the state dict
            del self.criterion.weight
            self.criterion.register_buffer("weight", weight, persistent=False)

        def iou(average):
            return MulticlassJaccardIndex(self.num_classes, average=average, ignore_index=ignore_index)

        def acc():
            return MulticlassAccuracy(self.num_classes, average="micro", ignore_index=ignore_index)

        # Separate metric objects per stage: sharing one would mix validation and test confusion matrices.
        self.miou = nn.ModuleDict({_key(s): iou("macro") for s in STAGES})
        self.acc = nn.ModuleDict({_key(s): acc() for s in STAGES})
        self.loss_mean = nn.ModuleDict({_key(s): MeanMetric() for s in STAGES})
        # frames each stage saw, summed over ranks: every test number is reported with its frame count
        self.frames = nn.ModuleDict({_key(s): SumMetric() for s in STAGES})
        # a class absent from both labels and predictions (a partial test set) has no IoU: NaN, not the 0 that
        # printed "test/iou_Fence: 0.0000" while mIoU ("macro") rightly left it out
        self.test_class_iou = MulticlassJaccardIndex(self.num_classes, average="none", ignore_index=ignore_index,
                                                     zero_division=float("nan"))
        # foreground IoU, boundary F and alpha MAE of P(default foreground): what a cut-out is judged by
        fg = [list(class_names).index(c) for c in default_foreground if c in class_names]
        self.fg_index = fg
        self.cutout = nn.ModuleDict({_key(s): CutoutMetric(fg, ignore_index) for s in ("val", "test")}) if fg else None
        # val/test loss with a Dice term: the split's Dice (of its summed overlap), not a mean of batch Dice
        self.dice = nn.ModuleDict({_key(s): SoftDiceSums() for s in ("val", "test")}) if fg and dice_weight else None
        self.val_miou_best = MaxMetric()
        self.history: list[dict[str, float]] = []  # per-epoch validation metrics, kept in checkpoints
        self._panel: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._panel_epoch: int | None = None  # epoch of the last logged image panel
        self.__dict__["_compiled_net"] = None  # bypasses nn.Module registration: state-dict keys stay "net.*"
        self.tta = None  # bgremover.lit.tta.TTA for val/test, set by `make eval ARGS="tta=..."` only

    # --- forward ---------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile and self._compiled_net is None:
            self.__dict__["_compiled_net"] = torch.compile(self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self._compiled_net if self._compiled_net is not None and self.training else self.net
        return net(x)

    def on_fit_start(self) -> None:
        self.configure_model()

    # --- steps -----------------------------------------------------------------------------------------------
    def _step(self, batch, stage: str, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if stage == "test":  # the published number: fp32 whatever the training precision, as export and eval run
            with torch.autocast(x.device.type, enabled=False):
                logits = self.tta(self, x.float(), self.hparams.size_multiple) if self.tta else self(x.float())
        elif stage == "val" and self.tta:
            logits = self.tta(self, x, self.hparams.size_multiple)
        else:
            logits = self(x)
        # half-precision logits to fp32 for the loss; not fp64 ones (precision=64-true): the class-weight buffer is
        # fp64 there too, and the cast failed as "expected scalar type Float but found Double"
        weight = self.criterion.weight
        if weight is not None and weight.dtype in (torch.float16, torch.bfloat16):
            # bf16-true/16-true cast this buffer with the module: against the fp32 logits the loss failed at the
            # first step ("expected scalar type Float but found BFloat16"); the weights as given, in fp32 again
            self._class_weights_as_given()
        loss = self.criterion(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, y)
        pooled = loss  # what loss_mean pools: the whole loss in training, the cross-entropy alone in val/test
        if self.hparams.dice_weight and self.fg_index:
            sums = soft_dice_sums(logits, y, self.fg_index, self.hparams.ignore_index)
            loss = loss + self.hparams.dice_weight * dice_loss_of(sums)
            if stage == "train":
                pooled = loss
            else:
                self.dice[_key(stage)].update(sums)
        preds = logits.argmax(1)
        # weighted by the batch loss's own denominator: it is the mean over labelled pixels (with class weights, the
        # mean weighted by their classes' weights), so the epoch's is that mean over the split however frames are
        # batched (frame-weighted, or pixel-counted under class weights, test/loss moved with the eval batch size)
        is_labelled = y != self.hparams.ignore_index
        if self.criterion.weight is None:
            labelled = is_labelled.sum()
        else:
            labelled = (self.criterion.weight[y.masked_fill(~is_labelled, 0)] * is_labelled).sum()
        # an all-void batch: a NaN loss with weight 0, which adds nothing (an `if` would sync a GPU every step)
        self.loss_mean[_key(stage)].update(torch.nan_to_num(pooled.detach()), weight=labelled)
        self.miou[_key(stage)].update(preds, y)
        self.acc[_key(stage)].update(preds, y)
        self.frames[_key(stage)].update(len(x))
        if stage == "train":  # per step, this rank's: the curve people watch; every epoch mean is from loss_mean
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(x))
        if stage == "test":
            self.test_class_iou.update(preds, y)
        if stage != "train" and self.cutout is not None:
            self.cutout[_key(stage)].update(logits, y)
        if stage == "val" and batch_idx == 0:
            k = self.hparams.num_log_images
            self._panel = (x[:k].detach().float().cpu(), y[:k].cpu(), preds[:k].cpu())
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", batch_idx)

    # --- epoch ends ------------------------------------------------------------------------------------------
    def _log_epoch(self, stage: str) -> dict[str, float]:
        values = {
            f"{stage}/mIoU": self.miou[_key(stage)].compute(),
            f"{stage}/acc": self.acc[_key(stage)].compute(),
        }
        # no labelled pixel in the split (mIoU NaN: nothing counted): torchmetrics' micro accuracy says 0.0 there, a
        # number that reads as "all wrong"; NaN as mIoU and eval-cutout say
        if torch.isnan(values[f"{stage}/mIoU"]):
            values[f"{stage}/acc"] = torch.full_like(values[f"{stage}/acc"], float("nan"))
        # val/test loss from the metric, not self.log(on_epoch=True, sync_dist=True): Lightning averages the ranks'
        # frame counts as integers, so with unequal counts per rank (unpadded val/test) its epoch mean is wrong.
        values[f"{stage}/loss_epoch" if stage == "train" else f"{stage}/loss"] = self.loss_mean[_key(stage)].compute()
        if stage != "train" and self.dice is not None:
            values[f"{stage}/loss"] = values[f"{stage}/loss"] + self.hparams.dice_weight * self.dice[_key(stage)].compute()
            self.dice[_key(stage)].reset()
        if stage != "train":
            values[f"{stage}/frames"] = self.frames[_key(stage)].compute().float()
        if stage != "train" and self.cutout is not None:
            values.update({f"{stage}/{k}": v for k, v in self.cutout[_key(stage)].compute().items()})
            self.cutout[_key(stage)].reset()
        # torchmetrics' compute() already reduced these over the ranks; sync_dist=True on them and on the values
        # below averages equal numbers (no change) and tells Lightning they are global (no DDP warning).
        self.log_dict(values, prog_bar=stage != "train", sync_dist=True)
        out = {k: float(v) for k, v in values.items()}  # the logger's epoch values come too late for the history
        if stage == "train":
            out["train/loss"] = out["train/loss_epoch"]
        else:
            out[f"{stage}/frames"] = int(out[f"{stage}/frames"])
        for metric in (self.miou[_key(stage)], self.acc[_key(stage)], self.loss_mean[_key(stage)],
                       self.frames[_key(stage)]):
            metric.reset()
        return out

    def on_train_epoch_end(self) -> None:
        # A resume with trainer.max_steps from an epoch-end checkpoint: Lightning replays this hook with no batch
        # trained, and NaN train numbers went to the logs as one more epoch (a user audit)
        if self.miou[_key("train")].update_called:
            self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch("val")
        if self.trainer.sanity_checking:  # the check before training: its numbers must not become the best
            return
        self.val_miou_best.update(torch.tensor(values["val/mIoU"]))
        best = float(self.val_miou_best.compute())
        self.log("val/mIoU_best", best, prog_bar=True, sync_dist=True)
        # the step too: a run stopped inside an epoch by max_time validates that epoch, and again when resumed
        self.history.append({"epoch": self.current_epoch, "step": self.global_step, **values, "val/mIoU_best": best})
        # At the first validation, then at the first one at least N epochs later: validation may itself run
        # only every few epochs (check_val_every_n_epoch), so `epoch % N == 0` could never hold.
        every = self.hparams.log_images_every_n_epochs
        if every and (self._panel_epoch is None or self.current_epoch - self._panel_epoch >= every):
            self._panel_epoch = self.current_epoch
            self._log_panel()

    def on_test_start(self) -> None:
        # the *-true precisions (bf16-true, 16-true, 64-true) cast the module itself, and _step's fp32 input then
        # met bf16/fp16/fp64 weights: the run trained, then failed in its test stage. The test number is fp32's,
        # as `make eval` and the exported model compute it (the weights widen or round exactly as they load there)
        if any(p.dtype != torch.float32 for p in self.net.parameters()):
            self.float()
            if self.criterion.weight is not None:  # rounded to bf16/fp16 by the cast, were it half
                self._class_weights_as_given()

    def _class_weights_as_given(self) -> None:
        """The loss's class weights in fp32, as computed (a cast of the module to half precision rounded them)."""
        self.criterion.weight = torch.tensor(self.hparams.class_weights, dtype=torch.float32,
                                             device=self.criterion.weight.device)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        per_class = self.test_class_iou.compute()
        self.test_class_iou.reset()
        self.log_dict({f"test/iou_{name}": float(v) for name, v in zip(self.hparams.class_names, per_class, strict=True)},
                      sync_dist=True)

    # --- images for the dashboard ----------------------------------------------------------------------------
    def panel_images(self) -> list[np.ndarray]:
        """input | ground truth | prediction, one H×3W RGB image per sample of the first validation batch."""
        if self._panel is None:
            return []
        x, y, p = self._panel
        mean = torch.tensor(self.hparams.mean).view(3, 1, 1)
        std = torch.tensor(self.hparams.std).view(3, 1, 1)
        rows = []
        for xi, yi, pi in zip(x, y, p, strict=True):
            rgb = ((xi * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            void = self.hparams.ignore_index
            rows.append(np.concatenate([rgb, colorize(yi.numpy(), void), colorize(pi.numpy(), void)], axis=1))
        return rows

    def _log_panel(self) -> None:
        images = self.panel_images()
        for logger in self.loggers:
            if images and hasattr(logger, "log_image"):  # WandbLogger; CSV has no images
                logger.log_image(
                    key="val/examples",
                    images=images,
                    caption=["input | ground truth | prediction"] * len(images),
                    # the step Lightning logs this epoch's val numbers at (global_step was one past it)
                    step=getattr(self.trainer.fit_loop.epoch_loop, "_batches_that_stepped", self.global_step),
                )

    # --- optimisation ----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.net.parameters())
        if self.scheduler_factory is None:
            return optimizer
        factory = self.scheduler_factory
        if self._schedule_spans_the_run():
            factory = functools.partial(factory, total_iters=self._run_length())
        scheduler = factory(optimizer=optimizer)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # (the lightning-hydra-template's scheduler) Lightning refused it without the metric it steps on, after
            # the build: val/mIoU where the scheduler's mode waits for it to grow, else val/loss; stepped after each
            # validation, as Lightning's docs pair it with check_val_every_n_epoch (per step there is no val metric)
            every = self.trainer.check_val_every_n_epoch or 1
            return {"optimizer": optimizer, "lr_scheduler": {
                "scheduler": scheduler, "interval": "epoch", "frequency": every,
                "monitor": "val/mIoU" if scheduler.mode == "max" else "val/loss"}}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval, "frequency": 1},
        }

    def _schedule_spans_the_run(self) -> bool:
        """Convention: `total_iters: null` in a scheduler config means "the whole run", known only at fit time."""
        factory = self.scheduler_factory
        return isinstance(factory, functools.partial) and "total_iters" in factory.keywords \
            and factory.keywords["total_iters"] is None

    def _run_length(self) -> int:
        steps = self.trainer.max_epochs if self.hparams.scheduler_interval == "epoch" \
            else self.trainer.estimated_stepping_batches
        return max(1, int(steps))

    def on_train_start(self) -> None:
        """A resumed run of another length (trainer.max_epochs raised, say): the checkpoint's scheduler brings the
        first run's total_iters back, so the added epochs trained past its end — at lr 0 for the poly and cosine
        recipes. A schedule that spans the run is stretched to the new length from the step it is at."""
        if not self._schedule_spans_the_run() or self._trainer is None or not self.trainer.ckpt_path:
            return
        schedulers = self.lr_schedulers()
        scheduler = schedulers[0] if isinstance(schedulers, list) else schedulers
        total, old = self._run_length(), getattr(scheduler, "total_iters", None)
        from bgremover.lit.speedrun import WarmupCosineLR  # its get_lr is closed-form by construction

        closed_form = getattr(scheduler, "_get_closed_form_lr", None)
        if closed_form is None and isinstance(scheduler, WarmupCosineLR):
            closed_form = scheduler.get_lr
        if old in (None, total) or closed_form is None:  # a recursive schedule cannot be re-placed: left as it is
            return
        scheduler.total_iters = total
        lrs = closed_form()
        for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)
        if self.trainer.is_global_zero:
            log.info("resumed with another run length: the learning-rate schedule planned for %s now spans %d "
                     "(lr %.3g at %d)", count(old, self.hparams.scheduler_interval), total, lrs[0], scheduler.last_epoch)

    # --- self-describing checkpoints -------------------------------------------------------------------------
    def export_meta(self) -> dict[str, Any]:
        hp = self.hparams
        return {
            "net_config": hp.net_config,
            "net_name": hp.net_name,
            "classes": list(hp.class_names),
            "mean": [float(v) for v in hp.mean],
            "std": [float(v) for v in hp.std],
            "size_multiple": int(hp.size_multiple),
            "default_foreground": list(hp.default_foreground),
            "ignore_index": int(hp.ignore_index),
            # long side (px) the images were scaled to for training and test; None = used at their own size
            "image_size": None if hp.get("image_size") is None else int(hp.image_size),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.export_meta()
        checkpoint["history"] = list(self.history)
        # torchmetrics states are not in the state dict: keep the best so far, so a resumed run's best (what
        # Optuna maximises) still covers the epochs before the resume
        if self.val_miou_best.update_called:
            checkpoint["val_miou_best"] = float(self.val_miou_best.compute())
        checkpoint["panel_epoch"] = self._panel_epoch
        # the W&B run this training logs to: a resume from this file continues it (train.py, online)
        wandb = [lg for lg in (self._trainer.loggers if self._trainer else []) if type(lg).__name__ == "WandbLogger"]
        if wandb:
            checkpoint["wandb_run_id"] = wandb[0].version
            # and its name: a sweep job's "-job3" (train.py) is lost when the job is resumed outside its sweep
            name = getattr(wandb[0].experiment, "name", None)
            if isinstance(name, str) and name:  # not a rank > 0's dummy experiment
                checkpoint["wandb_run_name"] = name
            group = getattr(wandb[0].experiment, "group", None)  # and its group: a sweep's `<exp>-<sweep folder>`
            if isinstance(group, str) and group:
                checkpoint["wandb_run_group"] = group
            offline = getattr(wandb[0].experiment, "offline", None)  # an offline run's id is not resumed online
            if isinstance(offline, bool):
                checkpoint["wandb_run_offline"] = offline
        # Strip a torch.compile wrapper's prefix so every checkpoint has plain "net.*" keys.
        checkpoint["state_dict"] = {k.replace("._orig_mod", ""): v for k, v in checkpoint["state_dict"].items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = list(checkpoint.get("history", []))
        self._panel_epoch = checkpoint.get("panel_epoch")
        best = checkpoint.get("val_miou_best")
        if best is None:  # checkpoints written before val_miou_best was saved: the history has it
            best = max((row["val/mIoU"] for row in self.history if "val/mIoU" in row), default=None)
        self.val_miou_best.reset()
        if best is not None:
            self.val_miou_best.update(torch.tensor(float(best)))
