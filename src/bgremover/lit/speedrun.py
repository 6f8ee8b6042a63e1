"""Speed-run helpers (experiments/speedrun_*.yaml): a time-to-mIoU clock and a schedule that can end on a budget.

TimeToMIoU prints and logs, at each validation, the wall time since fit started (data already resident;
compilation and validations included) and, once per threshold, when val mIoU first reached it; after testing,
the test mIoU next to the training wall time. With `budget_s` it also owns the run's clock: it feeds the elapsed
fraction of the budget to WarmupCosineLR (so the learning rate anneals to its floor exactly when the budget ends,
however fast the machine) and stops training there with one last validation, so the best checkpoint is of the
annealed net. `trainer.max_time` stays the hard stop a little beyond the budget.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from bgremover.lit.checkpoints import validates

log = logging.getLogger("bgremover.train")

SYNC_EVERY_STEPS = 10  # under DDP, rank zero's clock is broadcast this often (a collective costs a host sync)


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up over the first `warmup` of the run, then half a cosine down to `final_ratio` × lr.

    Progress is the larger of step / total_iters and `budget_progress` (the elapsed fraction of a time budget,
    set by TimeToMIoU); `total_iters: null` in a config is filled in with the run's steps by SegmentationModule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_iters: int, warmup: float = 0.05,
                 final_ratio: float = 0.0, last_epoch: int = -1):
        if total_iters < 1 or not 0.0 <= warmup < 1.0 or not 0.0 <= final_ratio <= 1.0:
            raise ValueError(f"WarmupCosineLR needs total_iters >= 1, 0 <= warmup < 1, 0 <= final_ratio <= 1 "
                             f"(got {total_iters}, {warmup}, {final_ratio})")
        self.total_iters, self.warmup, self.final_ratio = total_iters, warmup, final_ratio
        self.budget_progress = 0.0
        super().__init__(optimizer, last_epoch)

    def progress(self) -> float:
        return min(1.0, max(self.last_epoch / self.total_iters, self.budget_progress))

    def factor(self) -> float:
        p = self.progress()
        if p < self.warmup:
            return min(1.0, (p * self.total_iters + 1) / (self.warmup * self.total_iters))  # step 0: not 0
        cos = 0.5 * (1.0 + math.cos(math.pi * (p - self.warmup) / (1.0 - self.warmup)))
        return self.final_ratio + (1.0 - self.final_ratio) * cos

    def get_lr(self) -> list[float]:
        return [base * self.factor() for base in self.base_lrs]


class TimeToMIoU(Callback):
    """Wall time at which val mIoU first reached each threshold; the final test mIoU with the training time."""

    def __init__(self, thresholds: Sequence[float] = (0.5, 0.6), budget_s: float | None = None,
                 metric: str = "val/mIoU"):
        self.thresholds = sorted(float(t) for t in thresholds)
        self.budget_s = float(budget_s) if budget_s else None
        self.metric = metric
        self.reached: dict[str, dict[str, float]] = {}  # threshold (as text) -> seconds, epoch, step, value
        self.fit_s: float | None = None
        self._t0: float | None = None
        self._train_t0: float | None = None
        # seconds of fit / of training before the checkpoint this run resumed from: the budget and the
        # time-to-mIoU clock go on from there (as Lightning's trainer.max_time does), not from zero
        # and the first steps' warm-up each earlier start paid inside the budget (a split run pays it again)
        self._resumed = {"fit_s": 0.0, "train_s": 0.0, "first_steps_s": 0.0}
        self._steps = 0
        self._val_trained = False
        self._validates = True
        self._val_partial = ""  # " (1 of 101 frames, PARTIAL)": the latest validation covered part of the split
        # the first training step's seconds, warm-up included: this process's, plus every earlier start's of a
        # resumed run (each paid it inside the budget; summary.json describes the whole run)
        self.first_step_s: float | None = None

    @staticmethod
    def key(threshold: float) -> str:
        return f"time_to/{threshold:.3f}"

    def elapsed(self) -> float:
        """Seconds since the fit started, a resumed run's earlier fit included."""
        return self._resumed["fit_s"] + (0.0 if self._t0 is None else time.perf_counter() - self._t0)

    @property
    def spent_before_s(self) -> float:
        """Training seconds of the budget spent before the checkpoint this run resumed from."""
        return self._resumed["train_s"]

    def train_elapsed(self) -> float:
        """Seconds of training (what the budget counts), a resumed run's earlier training included."""
        return self._resumed["train_s"] + (0.0 if self._train_t0 is None else time.perf_counter() - self._train_t0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._val_trained = bool(getattr(getattr(trainer, "datamodule", None), "trains_on_val", False))
        self._validates = validates(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_t0 = time.perf_counter()  # the budget counts from here, like trainer.max_time

    def _progress(self, trainer: pl.Trainer) -> float | None:
        """Elapsed fraction of the budget, the same on every rank (rank zero's clock); None between syncs."""
        progress = self.train_elapsed() / self.budget_s
        if trainer.world_size > 1:
            if self._steps % SYNC_EVERY_STEPS:
                return None
            progress = trainer.strategy.broadcast(progress)  # one clock, or ranks' learning rates would differ
        return progress

    def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        # Before the step: Lightning steps the schedulers right after the optimizer, before on_train_batch_end.
        if self.budget_s is None or self._train_t0 is None:
            return
        progress = self._progress(trainer)
        if progress is None:
            return
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "budget_progress"):
                config.scheduler.budget_progress = min(1.0, progress)
        if progress >= 1.0 and not trainer.should_stop:
            trainer.should_stop = True  # this step still runs (at the floor lr), then the loop stops
            # Lightning validates on a stop only in an epoch that validates anyway: make this one such an epoch.
            trainer.check_val_every_n_epoch = 1
            if trainer.is_global_zero:
                log.info("speedrun: time budget of %.0f s spent at step %d; %s", self.budget_s,
                         trainer.global_step, "last validation, then stop" if self._validates else "stop")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        self._steps += 1
        if self._steps == 1 and self._train_t0 is not None:
            # The first step carries one-time costs inside the budget (on the H100: 14-46 s, cuDNN autotuning the
            # net's convolution shapes, kernel loading): timed on its own, so a run says what its budget paid for.
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()  # once: the step's kernels, not just their launch
            this = time.perf_counter() - self._train_t0
            earlier = self._resumed["first_steps_s"]
            self.first_step_s = earlier + this
            if trainer.is_global_zero:
                log.info("speedrun: the first training step took %.1f s (%s, inside the budget)", this,
                         f"warm-up again: {self.first_step_s:.1f} s over this run's starts" if earlier
                         else "one-time warm-up")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not on_validation_epoch_end: callbacks run that hook before the module's, which logs val/mIoU.
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.metric])
        now = self.elapsed()
        from bgremover.utils import frames_note, test_split_info

        # trainer.limit_val_batches: the times are to a score over part of the val split, not the split's (the
        # PARTIAL flag every other number of part of a split carries, summary.json's val_split included)
        counted = trainer.callback_metrics.get("val/frames")
        split = test_split_info({} if counted is None else {"val/frames": float(counted)},
                                getattr(trainer, "datamodule", None), "val")
        self._val_partial = frames_note(split) if split["complete"] is False else ""
        for t in self.thresholds:
            if self.key(t) not in self.reached and value >= t:
                self.reached[self.key(t)] = {"seconds": now, "epoch": trainer.current_epoch,
                                             "step": trainer.global_step, "value": value}
                if trainer.is_global_zero:
                    log.info("speedrun: %s %.4f%s >= %.3f after %.1f s (epoch %d, step %d)", self.metric, value,
                             self._val_partial, t, now, trainer.current_epoch, trainer.global_step)
        self._publish(trainer, now)

    def _publish(self, trainer: pl.Trainer, fit_s: float) -> None:
        # self.log is closed by now: straight to the loggers, and into callback_metrics (a live dict) so that
        # summary.json's metrics carry the times too
        values = {"time/fit_s": fit_s, **{k: r["seconds"] for k, r in self.reached.items()}}
        if self.first_step_s is not None:
            values["time/first_step_s"] = self.first_step_s
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_s = self.elapsed()
        # again at the end: a run with validation off (trainer.limit_val_batches=0) published no time at all, and
        # summary.json's time/fit_s is then the training time the log line says, the last validation included
        self._publish(trainer, self.fit_s)
        if trainer.is_global_zero:
            log.info("speedrun: training took %.1f s; %s", self.fit_s, self.describe())

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get("test/mIoU")
        if value is not None and trainer.is_global_zero:
            from bgremover.utils import frames_note, test_split_info

            fit = f"{self.fit_s:.1f} s" if self.fit_s is not None else "unknown"
            counted = trainer.callback_metrics.get("test/frames")
            metrics = {} if counted is None else {"test/frames": float(counted)}
            frames = frames_note(test_split_info(metrics, trainer.datamodule))  # " (4 of 233 frames, PARTIAL)"
            log.info("speedrun: test mIoU %.4f%s after %s of training; %s", float(value), frames, fit,
                     self.describe())

    def describe(self) -> str:
        if not self._validates and not self.reached:
            return f"no validation (trainer.limit_val_batches=0): no time to {self.metric}"
        parts = []
        for t in self.thresholds:
            r = self.reached.get(self.key(t))
            parts.append(f"{self.metric} >= {t:.3f}: " + (f"{r['seconds']:.1f} s (epoch {r['epoch']})" if r
                                                           else "not reached"))
        # with train+val the thresholds measure data the net trains on: say so wherever the times are quoted
        partial = f" ({self.metric}{self._val_partial})" if self._val_partial else ""  # " (val/mIoU (1 of 2 …))"
        return "; ".join(parts) + partial + (" (val is in the training data: not a held-out score)"
                                             if self._val_trained else "")

    def state_dict(self) -> dict[str, Any]:
        return {"reached": dict(self.reached), "fit_s": self.elapsed(), "train_s": self.train_elapsed(),
                "first_steps_s": self._resumed["first_steps_s"] if self.first_step_s is None else self.first_step_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reached = dict(state_dict.get("reached", {}))
        self._resumed = {k: float(state_dict.get(k) or 0.0) for k in ("fit_s", "train_s", "first_steps_s")}
