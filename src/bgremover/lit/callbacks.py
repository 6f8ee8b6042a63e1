"""Lightning callbacks of a training run: the best and the newest-epoch checkpoints, the up-front plan and time
estimate, a progress bar that shows the epoch total, and a weight average that is tested as it is saved.

Why not Lightning's `ModelCheckpoint(save_last=True)`: in pytorch-lightning 2.6 it writes `last.ckpt` only when it
also writes a top-k checkpoint, so after the last improvement `last.ckpt` silently stops moving and a resume from
it drops every later epoch. `LastCheckpoint` writes it at the end of every training epoch and when a run is
interrupted (Ctrl-C, SIGTERM); when the epoch's state was just saved as the best checkpoint it links to that file
instead of writing a second copy.

(Past 400 lines: the checkpoint, plan and progress-bar callbacks share one step and epoch arithmetic —
planned_steps, start_epoch, steps_left — and split apart, each half would import the other's.)
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import (
    Callback,
    Checkpoint,
    EMAWeightAveraging,
    ModelCheckpoint,
    TQDMProgressBar,
)
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from bgremover.errors import count

log = logging.getLogger("bgremover.train")

ESTIMATE_AFTER_STEPS = 10  # training steps timed (after the first, which warms up) before the estimate is printed


class LastCheckpoint(Checkpoint):
    """`<dirpath>/last.ckpt` always holds the newest training state: every epoch, and the step a run was stopped at.

    A `Checkpoint` subclass so that Lightning runs its epoch-end hook after ModelCheckpoint's (checkpoint callbacks
    go last, in list order): the best file of this epoch already exists and can be linked to.
    """

    def __init__(self, dirpath: str, filename: str = "last", every_epoch: bool = True) -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        # False: only the state training ends with (speed-runs: a write per epoch costs seconds of their budget)
        self.every_epoch = every_epoch
        self._saved_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run resumed in place finds last.ckpt as a link to the best file, which ModelCheckpoint deletes at the
        # first new best: until this run writes its own last.ckpt (with every_epoch=False, at the end) a hard kill
        # left a dangling link and no state to resume from. A hard link to the same file survives that deletion.
        if trainer.is_global_zero and self.path.is_symlink() and self.path.resolve().is_file():
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(self.path.resolve(), tmp)
            except OSError:  # a file system without hard links: a copy
                import shutil

                shutil.copyfile(self.path.resolve(), tmp)
            os.replace(tmp, self.path)
        trainer.strategy.barrier()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        # every_epoch=False: the epoch training stops after — saved here rather than at on_train_end, where
        # callbacks=ema has already copied the average over the raw weights a resume needs
        if self.every_epoch or _ends_after_this_step(trainer, last_batch=True):
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # whatever the epoch end did not catch: the state training ended with (a stop inside an epoch). With
        # validation off (limit_val_batches=0), ModelCheckpoint, monitoring val/mIoU, writes nothing: this is it
        if not trainer.fast_dev_run and trainer.global_step > 0:
            self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        interrupted = isinstance(exception, KeyboardInterrupt | SIGTERMException)
        # one process only: a collective save while other ranks are being torn down could hang
        if interrupted and not trainer.fast_dev_run and trainer.world_size == 1 and trainer.global_step > 0:
            self._validate_again = _inside_a_validation(trainer)
            self._validate_next = _before_its_validation(trainer, self._validated_after)
            try:
                self._save(trainer, link_allowed=False)
            finally:
                self._validate_again = self._validate_next = False

    _validate_again = False  # during an interrupt's save inside a validation: the saved val loop restarts it
    _validate_next = False  # during one between a training batch and the validation after it: the same
    _validated_after = -1  # training batches begun (over the run) when the latest fit validation began

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validated_after = trainer.fit_loop.epoch_loop.batch_progress.total.ready

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        loops = checkpoint["loops"]["fit_loop"]
        if self._validate_next:
            # Ctrl-C between a training batch and its validation (SIGTERM waits for the epoch's end): Lightning
            # takes a restart there for one saved after that validation and skipped it (the epoch missing from the
            # history, its weights never a best-epoch candidate). Saved as at the validation's start instead:
            for counts in loops["epoch_loop.batch_progress"]["total"], loops["epoch_loop.batch_progress"]["current"]:
                counts["completed"] = counts["processed"]  # the batch done (its on_train_batch_end cut short)
            # the val counts of the epoch are the previous validation's: this one has done none of its frames
            loops["epoch_loop.val_loop.batch_progress"]["current"].update(ready=0, started=0, processed=0,
                                                                         completed=0)
        if self._validate_again or self._validate_next:
            _restart_the_validation(loops["epoch_loop.val_loop.batch_progress"])

    def _save(self, trainer: pl.Trainer, link_allowed: bool = True) -> None:
        if trainer.global_step == self._saved_step:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        best = self._saved_as_best_now(trainer) if link_allowed else None
        if best is not None:
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)
                os.symlink(os.path.relpath(best, self.path.parent), tmp)
                os.replace(tmp, self.path)
            trainer.strategy.barrier()
        else:
            trainer.save_checkpoint(tmp)  # every rank calls it; rank zero writes
            if trainer.is_global_zero:
                os.replace(tmp, self.path)  # never a half-written last.ckpt
            trainer.strategy.barrier()
        self._saved_step = trainer.global_step

    @staticmethod
    def _saved_as_best_now(trainer: pl.Trainer) -> Path | None:
        """The top-1 checkpoint file if ModelCheckpoint wrote it at this very step (same state as ours)."""
        cb = best_checkpoint_callback(trainer)
        if cb is None or cb.save_top_k != 1:
            return None
        if getattr(cb, "_last_global_step_saved", None) != trainer.global_step or not cb.best_model_path:
            return None
        best = Path(cb.best_model_path)
        return best if best.is_file() and best.parent == Path(cb.dirpath) else None


def _inside_a_validation(trainer: pl.Trainer) -> bool:
    """Whether an interrupt came inside a fit's validation, before its last val batch was done."""
    if trainer.state.fn != TrainerFn.FITTING or not trainer.validating or trainer.sanity_checking:
        return False
    done = trainer.fit_loop.epoch_loop.val_loop.batch_progress.current.completed
    return done < sum(trainer.num_val_batches)


def _before_its_validation(trainer: pl.Trainer, validated_after: int) -> bool:
    """Whether an interrupt came after a fit's training batch that Lightning validates after, before that
    validation began (trainer.validating is set a moment before the val loop resets its counts and begins)."""
    if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress
    done = progress.current
    if not trainer.enable_validation or done.ready == 0 or done.processed != done.ready:
        return False  # no validation, or the batch's own step not done (Lightning trains it again)
    if validated_after == progress.total.ready:
        return False  # its validation ran: the restart Lightning assumes (an interrupt at the epoch's end hooks)
    return _validates_here(trainer, done.ready - 1, progress.is_last_batch)


def _restart_the_validation(progress: dict) -> None:
    """An interrupted validation's saved progress, as if it had been interrupted in its first batch: the resume
    validates the epoch again over the whole split. Lightning restores the place, not the metric states of the
    frames before it: a Ctrl-C inside a val batch resumed over the frames left (a 2-of-4-frame score picked the
    exported remover), one between val batches skipped the epoch's validation (the epoch missing from the history)."""
    done = progress["current"]["completed"]
    for part in ("total", "current"):
        counts = progress[part]
        kept = counts["completed"] - done
        # started one batch past processed: Lightning's "restarted mid-evaluation", which validates on from here
        counts.update(ready=kept + 1, started=kept + 1, processed=kept, completed=kept)
    progress["is_last_batch"] = False


def _ends_after_this_step(trainer: pl.Trainer, last_batch: bool) -> bool:
    """After a training batch (or, with last_batch, at an epoch's end): whether the fit loop ends here (a stop
    request, max_steps reached, the last epoch's last batch)."""
    epochs, steps = trainer.max_epochs, trainer.max_steps
    return bool(trainer.should_stop or (steps not in (None, -1) and trainer.global_step >= steps)
                or (last_batch and epochs not in (None, -1) and trainer.current_epoch + 1 >= epochs))


def _validates_here(trainer: pl.Trainer, batch_idx: int, last_batch: bool) -> bool:
    """Whether Lightning validates after this training batch by its own rules (its _should_check_val_fx): in an
    epoch that validates, on a stop request, or every val_check_interval batches (the epoch's end is one only when
    the interval divides the epoch: val_check_interval=0.5 of 5 batches validates after 2 and 4, not 5)."""
    every = trainer.check_val_every_n_epoch
    if every is not None and (trainer.current_epoch + 1) % every:
        return False
    if trainer.should_stop:
        return True
    if getattr(trainer, "_val_check_time_interval", None) is not None:  # by wall-clock time: not known ahead,
        return False  # so the end is validated on a stop request (once: Lightning checks that first)
    interval = trainer.val_check_batch  # batches between validations; counted over the run when every is None
    if not isinstance(interval, int):  # inf: a loader without a length, validated at its end
        return last_batch
    done = batch_idx if every is not None else trainer.fit_loop.epoch_loop.total_batch_idx
    return (done + 1) % interval == 0


def validates(trainer: pl.Trainer) -> bool:
    """False when validation is off (trainer.limit_val_batches=0: a run on train+val, or a fixed schedule)."""
    return getattr(trainer, "limit_val_batches", 1.0) != 0  # getattr: as on_fit_start reads the datamodule


def best_checkpoint_callback(trainer: pl.Trainer) -> ModelCheckpoint | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, keeping the best epoch across a resume into a new run folder, and scoring the
    weights a run ends with.

    Lightning restores the best score only when the checkpoint folder is unchanged; `make train ARGS="ckpt_path=
    <old run>/checkpoints/last.ckpt"` writes a new folder, so the first epoch after the resume became "best" however
    bad, and the run tested and exported it. Here the old best file is copied into the new folder and ranked as
    before: a later epoch must beat it, and replacing it deletes the copy, never the earlier run's file.

    Lightning validates only at the end of an epoch that validates anyway: a run that trainer.max_steps or
    trainer.max_time stopped inside an epoch, or whose last epoch was not one of every check_val_every_n_epoch,
    never scored its last weights, and the best was picked among older ones. The step a run ends at validates."""

    _fitting = False
    _trainer: pl.Trainer | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        # A checkpoint callback runs after the others (Lightning orders them last), so after Timer's stop request.
        if trainer.sanity_checking or trainer.fast_dev_run or not trainer.enable_validation:
            return
        batch_idx = args[-1] if args else kwargs["batch_idx"]
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        if not _ends_after_this_step(trainer, last_batch) or _validates_here(trainer, batch_idx, last_batch):
            return
        trainer.check_val_every_n_epoch = 1  # Lightning validates only in an epoch that validates,
        if not _validates_here(trainer, batch_idx, last_batch):
            trainer.should_stop = True  # and off its val_check_interval only on a stop request (the run ends here)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._fitting = stage == "fit"  # before the restore: a test-only run (train=false) copies nothing
        self._trainer = trainer  # its ckpt_path, set by the time the restore calls load_state_dict

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation off: Lightning moves the save to the train epoch's end and warns every epoch that val/mIoU is
        # missing. There is no best to keep then; LastCheckpoint writes the run's checkpoint.
        if validates(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old_dir, old_best = state_dict.get("dirpath", self.dirpath), state_dict.get("best_model_path") or ""
        score = state_dict.get("best_model_score")
        moved = self._fitting and self.dirpath != old_dir and score is not None and old_best
        if moved and not Path(old_best).is_file():
            # a run folder copied or moved (from the GPU machine, say) has its best file beside last.ckpt, not at the
            # path recorded: the first epoch after the resume became best however bad, and was tested and exported
            resumed = getattr(self._trainer, "ckpt_path", None)
            beside = Path(str(resumed)).parent / Path(old_best).name if resumed else None
            if beside is not None and beside.is_file():
                old_best = str(beside)
            else:
                log.warning("resumed into a new folder without the best checkpoint so far, %s (%s %.4f), nor a copy "
                            "beside %s: the best epoch is picked among the epochs from here on", old_best,
                            self.monitor, float(score), resumed)
        if not moved or not Path(old_best).is_file():
            super().load_state_dict(state_dict)
            return
        import shutil

        from pytorch_lightning.utilities.rank_zero import rank_zero_only

        copy = os.path.join(self.dirpath, os.path.basename(old_best))
        if rank_zero_only.rank == 0 and not os.path.exists(copy):
            os.makedirs(self.dirpath, exist_ok=True)
            shutil.copy2(old_best, copy)
        self.best_model_path = self.kth_best_model_path = copy
        self.best_model_score = self.kth_value = score
        self.best_k_models = {copy: score}
        log.info("resumed into a new folder: the best checkpoint so far, %s (%s %.4f), copied to %s",
                 old_best, self.monitor, float(score), copy)


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
    written mid-epoch and Lightning skips those batches; 0 where it starts its epoch afresh (a max_time stop)."""
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
    """Optimizer steps a run resumed at `start` will take: whole epochs from its start epoch, since Lightning
    counts an epoch stopped by trainer.max_time as done and resumes at the next one (so not the planned steps minus
    the step reached: a plan said 397 × 6 = 2387), less what a mid-epoch checkpoint (Ctrl-C) did of its epoch."""
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
        f"batch {batch}" + (f" of {crop[0]}×{crop[1]} crops" if crop else " of full frames"),
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
