"""Lightning callbacks of a training run besides the checkpoints (`lit/checkpoints.py`): the up-front plan and time
estimate, a progress bar that shows the epoch total, an early stopping that keeps the patience it is given, and a
weight average that is tested as it is saved.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import (
    Callback,
    EMAWeightAveraging,
    TQDMProgressBar,
)
from pytorch_lightning.trainer.states import TrainerFn

from bgremover.errors import count
from bgremover.lit.checkpoints import (  # noqa: F401  (configs and older runs name them here too)
    BestCheckpoint,
    LastCheckpoint,
    best_checkpoint_callback,
    validates,
)

log = logging.getLogger("bgremover.train")

ESTIMATE_AFTER_STEPS = 10  # training steps timed (after the first, which warms up) before the estimate is printed


class RunPlan(Callback):
    """Says up front what the run will do, then how long it will take, measured on its own first steps."""

    def __init__(self, estimate_after_steps: int = ESTIMATE_AFTER_STEPS) -> None:
        self.estimate_after_steps = estimate_after_steps
        self._t0: float | None = None
        self._steps = 0
        self._val_s = 0.0
        self._val_t0: float | None = None
        self._val_runs = 0
        self._estimated = False
        self._start = NO_START

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = (start_epoch(trainer), trainer.global_step, steps_into_epoch(trainer))
        if trainer.is_global_zero and not trainer.fast_dev_run:
            log.info("plan: %s", describe_plan(trainer, pl_module, self._start))

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        self._steps += 1
        if self._steps == 1:  # the first step pays for allocations, compilation and worker start-up
            self._t0 = time.perf_counter()
            return
        if self._estimated or self._steps - 1 < self.estimate_after_steps or self._t0 is None:
            return
        self._estimated = True
        per_step = (time.perf_counter() - self._t0 - self._val_s) / (self._steps - 1)
        if trainer.is_global_zero and not trainer.fast_dev_run:
            log.info("estimate: %s", describe_estimate(trainer, per_step, self._start))

    def on_validation_start(self, trainer: pl.Trainer, *_: Any) -> None:
        if not trainer.sanity_checking:
            self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, *_: Any) -> None:
        if self._val_t0 is not None and not trainer.sanity_checking:
            self._val_s += time.perf_counter() - self._val_t0
            self._val_runs += 1
            self._val_t0 = None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def _time_limit(trainer: pl.Trainer) -> tuple[float, str] | None:
    """(seconds, what sets it) of the earliest time limit: trainer.max_time (Lightning's Timer) or a callback's
    time budget (`budget_s`, e.g. the remover's and the speed-runs' TimeToMIoU) — what is left of it when this
    process started training: both clocks go on across a resume."""
    limits = []
    for cb in trainer.callbacks:
        if type(cb).__name__ == "Timer":
            total, spent, what = getattr(cb, "_duration", None), getattr(cb, "_offset", 0.0), "trainer.max_time"
        else:
            total, spent, what = (getattr(cb, "budget_s", None), getattr(cb, "spent_before_s", 0.0),
                                  f"{type(cb).__name__}'s time budget")
        if total:
            limits.append((max(0.0, float(total) - float(spent or 0.0)), what))
    return min(limits, default=None)


def planned_steps(trainer: pl.Trainer) -> tuple[int | None, int | None]:
    """(epochs, optimizer steps per epoch) the run is set up for; None where unbounded or unknown."""
    epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
    per_epoch = trainer.num_training_batches
    if per_epoch == float("inf"):
        per_epoch = None
    elif per_epoch is not None:
        # an epoch's last, partial accumulation steps too (Lightning's estimated_stepping_batches rounds up)
        per_epoch = max(1, -(-int(per_epoch) // max(1, trainer.accumulate_grad_batches)))
    if trainer.max_steps not in (None, -1) and per_epoch:
        limit = -(-trainer.max_steps // per_epoch)
        epochs = limit if epochs is None else min(epochs, limit)
    return epochs, per_epoch


def start_epoch(trainer: pl.Trainer) -> int:
    """The epoch training starts (or resumes) with. A checkpoint ModelCheckpoint wrote after an epoch's
    validation (a last.ckpt linked to the best file) still counts that epoch as running when training starts;
    Lightning moves on only afterwards. Its steps tell: all of that epoch's steps are done."""
    epoch = trainer.current_epoch
    _, per_epoch = planned_steps(trainer)
    if per_epoch and trainer.global_step >= (epoch + 1) * per_epoch:
        epoch = trainer.global_step // per_epoch
    return epoch


def steps_into_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps a resumed fit has already done of the epoch it goes on inside: a Ctrl-C's last.ckpt is
    written mid-epoch (as a max_time stop's is: LastCheckpoint) and Lightning skips those batches; 0 where it
    starts its epoch afresh."""
    loop = trainer.fit_loop
    if not getattr(loop, "restarted_mid_epoch", False) or start_epoch(trainer) != trainer.current_epoch:
        return 0  # (a validation-end checkpoint: its epoch is done, see start_epoch)
    epoch_loop = loop.epoch_loop  # as its reset() will count them: a checkpoint written at a batch's end (the
    # interrupt's) holds that batch as processed, not yet completed
    done = epoch_loop.batch_progress.current.completed + int(getattr(epoch_loop, "restarted_on_train_batch_end", False))
    return int(done) // max(1, trainer.accumulate_grad_batches)


def planned_total(trainer: pl.Trainer) -> int | None:
    """Optimizer steps the run is set up for: epochs × steps, or trainer.max_steps where that comes first."""
    epochs, per_epoch = planned_steps(trainer)
    if not (epochs and per_epoch):
        return None
    total = epochs * per_epoch
    return min(total, trainer.max_steps) if trainer.max_steps not in (None, -1) else total


# Where a run starts training: (epoch, global step, optimizer steps already done of that epoch); a resumed run's
# is later, and the plan and estimate count what is left from it
Start = tuple[int, int, int]
NO_START: Start = (0, 0, 0)


def steps_left(trainer: pl.Trainer, start: Start) -> int | None:
    """Optimizer steps a run resumed at `start` will take: whole epochs from its start epoch, less what a mid-epoch
    checkpoint (Ctrl-C, a max_time stop) did of its epoch."""
    epochs, per_epoch = planned_steps(trainer)
    if not (epochs and per_epoch):
        return None
    left = (epochs - start[0]) * per_epoch - start[2]
    if trainer.max_steps not in (None, -1):
        left = min(left, trainer.max_steps - start[1])
    return max(0, left)


def describe_plan(trainer: pl.Trainer, pl_module: pl.LightningModule, start: Start = NO_START) -> str:
    """The run in one line; from `start` where a resumed run goes on: it counts what is left."""
    epochs, per_epoch = planned_steps(trainer)
    steps = planned_total(trainer)
    hp = pl_module.hparams
    dm = trainer.datamodule
    batch = getattr(getattr(dm, "hparams", None), "batch_size", None)
    crop = getattr(getattr(dm, "hparams", None), "crop_size", None)
    params = sum(p.numel() for p in pl_module.net.parameters()) / 1e6
    # where trainer.max_steps ends the run first, say so: "2 of 2 epochs × 4 steps − 3 done = 2 steps left" did not add up
    capped = trainer.max_steps not in (None, -1) and epochs and per_epoch and \
        (epochs - start[0]) * per_epoch - start[2] > trainer.max_steps - start[1]
    cap = f" (trainer.max_steps={trainer.max_steps})" if capped else ""
    total = count(steps, "step") + cap if steps else "steps until stopped"
    parts = [
        f"{hp.get('net_name', 'net')} ({params:.2f} M params)",
        f"{count(epochs, 'epoch') if epochs else '∞ epochs'} × {count(per_epoch, 'step') if per_epoch else '? steps'} "
        f"= {total}" if not start[1] else
        f"resumes at epoch {start[0]} (step {start[1]}): {f'{epochs - start[0]} of {epochs}' if epochs else '∞'} "
        f"epochs × {count(per_epoch, 'step') if per_epoch else '? steps'} " + (f"− {start[2]} done " if start[2] else "")
        + "= " + (f"{count(steps_left(trainer, start), 'step')} left{cap}" if steps else total),
        f"batch {batch}" + (f" of {crop[0]}×{crop[1]} crops" if crop else " of full frames")
        # data.batch_size is each DDP rank's: what a step trains (and what the lr is tuned for) is world times it
        + (f" per rank × {trainer.world_size} ranks" if trainer.world_size > 1 else ""),
        f"validation every {count(trainer.check_val_every_n_epoch, 'epoch')}"
        + (" and at the end" if (trainer.check_val_every_n_epoch or 1) > 1 else "") if validates(trainer) else
        "no validation (trainer.limit_val_batches=0)",
        f"{trainer.strategy.root_device.type} {trainer.precision}",
    ]
    limit = _time_limit(trainer)
    if limit:
        # the step in flight ends first (seconds on a CPU), and a budget validates once more: not "at most"
        parts.append(f"stops after {_duration(limit[0])} {'more ' if start[1] else ''}of training ({limit[1]})")
    return ", ".join(parts)


def describe_estimate(trainer: pl.Trainer, seconds_per_step: float, start: Start = NO_START) -> str:
    """How long the run (or what is left of a resumed one, from `start`) will take at `seconds_per_step`."""
    epochs, _ = planned_steps(trainer)
    steps = planned_total(trainer)
    text = f"{seconds_per_step:.2f} s per training step"
    if not steps:
        return text
    left_epochs = epochs - start[0]
    total = seconds_per_step * steps_left(trainer, start)
    which = f"the {count(left_epochs, 'epoch')} left" if start[1] else count(epochs, "epoch")
    limit = _time_limit(trainer)
    if limit and limit[0] < total:  # the time limit is the run's real length: say it first
        return (f"{text} → {limit[1]} stops it after {_duration(limit[0])}, after about "
                f"{start[0] + max(1, int(limit[0] / total * left_epochs))} of the {epochs} epochs (all of {which} "
                f"would take about {_duration(total)}, validation extra)")
    return f"{text} → about {_duration(total)} of training for {which} (validation extra)"


def epoch_label(epoch: int, epochs: int | None, limit_s: float | None = None, elapsed_s: float = 0.0,
                first: int = 0, now_s: float | None = None) -> str:
    """The bar's `Epoch 2/99`: Lightning's numbering (from 0, as checkpoint names, summary.json's history, W&B's
    `epoch` and every log line number epochs), over the last epoch's number. Under a time limit that ends the run
    first (the remover's 1000 epochs in 30 min), the last is the epoch the time reaches at this process's pace so
    far (`Epoch 3/~23`, from `first`, the epoch it started or resumed at; `elapsed_s` is when this epoch started),
    with the time left at `now_s` (inside the epoch; its start by default)."""
    total = f"/{epochs - 1}" if epochs else ""
    if not limit_s:
        return f"Epoch {epoch}{total}"
    left = max(0.0, limit_s - elapsed_s)
    shown = f"{_duration(left if now_s is None else max(0.0, limit_s - now_s))} of {_duration(limit_s)} left"
    if epoch <= first or elapsed_s <= 0:  # below first: the finished epoch a resume from its end shows first
        return f"Epoch {epoch}{total} ({shown if now_s else f'stops after {_duration(limit_s)}'})"
    # the epoch running when the time runs out: this one and the ones after it that start before then, at the pace
    # of the epochs done (the one running would count as done already)
    last = epoch + max(1, math.ceil(left / (elapsed_s / (epoch - first)))) - 1
    if epochs is None or last < epochs - 1:
        total = f"/~{last}"
    return f"Epoch {epoch}{total} ({shown})"


GPU_REFRESH_STEPS = 20  # a bar update reads the loss off the GPU (a host sync): not every step there


class EpochProgressBar(TQDMProgressBar):
    """Lightning's bar, with `Epoch 2/99` instead of `Epoch 2`, so the run's length is always in view.

    `refresh_rate=None` picks it from the device: every step on a CPU (a step can take seconds), every
    GPU_REFRESH_STEPS on an accelerator (each update is a host sync that stalls the GPU's queue)."""

    def __init__(self, refresh_rate: int | None = None, **kwargs: Any) -> None:
        super().__init__(refresh_rate=1 if refresh_rate is None else refresh_rate, **kwargs)
        self._auto = refresh_rate is None
        self._t0: float | None = None  # when this process's fit started, and at which epoch (resumed runs)
        self._first_epoch: int | None = None
        self._epoch_s = 0.0  # seconds into this process's fit when the running epoch started

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._auto and trainer.strategy.root_device.type != "cpu":
            self._refresh_rate = GPU_REFRESH_STEPS
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._t0, self._first_epoch = time.perf_counter(), start_epoch(trainer)  # a resumed fit starts later
        loop = trainer.fit_loop  # resumed inside an epoch Lightning skips on_train_epoch_start: the bar would read
        if getattr(loop, "restarted_mid_epoch", False) or getattr(loop, "restarted_on_epoch_end", False):
            self.on_train_epoch_start(trainer, pl_module)  # "Training: 26/?", with no epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._epoch_s = time.perf_counter() - (self._t0 or time.perf_counter())
        self.train_progress_bar.set_description(self._label(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # the time left, at each refresh of the bar: set at the epoch's start only, it stood still for a whole epoch
        # (minutes on a CPU). Lightning's update below redraws the bar, so this one draws nothing
        if self._t0 is not None and self._should_update(batch_idx + 1, self.train_progress_bar.total):
            self.train_progress_bar.set_description(self._label(trainer, time.perf_counter() - self._t0),
                                                    refresh=False)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _label(self, trainer: pl.Trainer, now_s: float | None = None) -> str:
        epochs, _ = planned_steps(trainer)
        limit = _time_limit(trainer)
        return epoch_label(trainer.current_epoch, epochs, limit and limit[0], self._epoch_s, self._first_epoch or 0,
                           now_s)


class EarlyStopping(pl.callbacks.EarlyStopping):
    """Lightning's early stopping, with the patience the command sets. Lightning restores a checkpoint's patience
    with its count: `ckpt_path=... callbacks.early_stopping.patience=200` went on with the old 100 (or a run
    stopped with patience 1 and resumed with 5 stopped after one more epoch), while summary.json recorded 200.
    The count of epochs without a new best goes on from the checkpoint."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        if self.patience != patience:
            log.info("early stopping: patience %d (the checkpoint's run had %d), %s without a new best so far",
                     patience, self.patience, count(self.wait_count, "epoch"))
        self.patience = patience


class EMAWeights(EMAWeightAveraging):
    """Lightning's moving average of the weights (`callbacks=ema`), scored as it is saved.

    Lightning's callback keeps its average model after the fit, and when `trainer.test(ckpt_path="best")` then
    loads the best checkpoint it puts that checkpoint's *raw* weights (`current_model_state`) back into the
    module: the test stage would score weights that no checkpoint's state_dict, `make eval`, export or `make
    ship` uses. Outside fitting this callback leaves the loaded state_dict (the average) alone and swaps nothing.
    """

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        self.decay = decay

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the average spans ~1/(1-decay) steps: a run only a few spans long ends with an average that still holds
        # much of its early, barely trained weights (and is what every checkpoint, test and export then use)
        total, span = planned_total(trainer), 1.0 / (1.0 - self.decay)
        if total is not None and total < 3 * span and trainer.is_global_zero:
            # a run of 5 steps or fewer has nothing to average: the formula said "use decay=0.0000"
            fix = f"use callbacks.ema.decay={1.0 - 5.0 / total:.4f}" if total > 5 else "train without callbacks=ema"
            log.warning("callbacks.ema.decay=%g averages over ~%d steps, and this run plans %d: the average keeps "
                        "much of the early weights; for this length %s", self.decay, round(span), total, fix)

    @staticmethod
    def _fitting(trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._fitting(trainer):
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    # True from a validation's start to its end: the module holds the average, the AveragedModel the raw weights
    _swapped = False

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fitting(trainer):
            super().on_validation_epoch_start(trainer, pl_module)
            self._swapped = self._average_model is not None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fitting(trainer):
            super().on_validation_epoch_end(trainer, pl_module)
            self._swapped = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Ctrl-C or SIGTERM inside a validation skips the swap back: LastCheckpoint's interrupt save (a checkpoint
        # callback, so it runs after this one) wrote the raw weights as the average and the average as the
        # weights a resume trains on
        if self._swapped:
            self._swap_models(pl_module)
            self._swapped = False
