"""The run's checkpoint callbacks: `last.ckpt` at every epoch's end and on an interrupt, and the best epoch's.

Why not Lightning's `ModelCheckpoint(save_last=True)`: in pytorch-lightning 2.6 it writes `last.ckpt` only when it
also writes a top-k checkpoint, so after the last improvement `last.ckpt` silently stops moving and a resume from
it drops every later epoch. `LastCheckpoint` writes it at the end of every training epoch and when a run is
interrupted (Ctrl-C, SIGTERM), saved so that a resume runs what the interrupt cut short (the rest of an epoch, a
validation begun or due); when the epoch's state was just saved as the best checkpoint it links to that file instead
of writing a second copy. `BestCheckpoint` keeps the best epoch by val/mIoU, also across a resume into a new folder.
`RandomState` keeps in every checkpoint the random state a resume goes on with.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, Checkpoint, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from bgremover.files import CtrlC

log = logging.getLogger("bgremover.train")


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
        self._hold_ctrl_c(trainer)

    # Ctrl-C raises KeyboardInterrupt wherever training is, mostly inside a step: its forward had moved the
    # BatchNorm running statistics (on a CPU its optimizer may have updated some weights and not others), which
    # last.ckpt kept and the resume's run of that step moved again. The first Ctrl-C now stops the fit where a step
    # or a validation batch ends; a second stops it at once, as before. (DDP: lit/ddp.StopTogether's, agreed on by
    # every rank; each rank stopping at its own step's end could wait on the others.)
    _ctrl_c: CtrlC | None = None

    def _hold_ctrl_c(self, trainer: pl.Trainer) -> None:
        if trainer.world_size == 1:
            self._ctrl_c = CtrlC()
            self._ctrl_c.hold("Ctrl-C: stopping where this step ends, to save it whole (Ctrl-C again to stop at once)")

    def _let_go_of_ctrl_c(self) -> None:
        if self._ctrl_c is not None:
            self._ctrl_c.let_go()

    def _stop_if_ctrl_c_came(self) -> None:
        if self._ctrl_c is not None and self._ctrl_c.came:
            self._ctrl_c.let_go()
            self._ctrl_c = None
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        self._stop_if_ctrl_c_came()

    def on_validation_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        self._stop_if_ctrl_c_came()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._let_go_of_ctrl_c()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        # every_epoch=False: the epoch training stops after — saved here rather than at on_train_end, where
        # callbacks=ema has already copied the average over the raw weights a resume needs
        if self.every_epoch or _ends_after_this_step(trainer, last_batch=True):
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._let_go_of_ctrl_c()
        # whatever the epoch end did not catch: the state training ended with (a stop inside an epoch). With
        # validation off (limit_val_batches=0), ModelCheckpoint, monitoring val/mIoU, writes nothing: this is it
        if not trainer.fast_dev_run and trainer.global_step > 0:
            self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._let_go_of_ctrl_c()
        interrupted = isinstance(exception, KeyboardInterrupt | SIGTERMException)
        # one process, or DDP ranks that stopped together (a SIGTERM); not DDP's Ctrl-C, which stops each rank
        # where it is: a collective save while other ranks are being torn down could hang
        from bgremover.lit.ddp import stopped_together

        together = trainer.world_size == 1 or (isinstance(exception, SIGTERMException) and stopped_together(trainer))
        if interrupted and not trainer.fast_dev_run and together and trainer.global_step > 0:
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
        if _stopped_inside_the_epoch(trainer, loops):
            # trainer.max_time, max_steps or a time budget stopped the fit inside an epoch, and Lightning ends the
            # epoch there: a resume began the next one, so the rest of this epoch's frames were never trained and
            # its per-epoch lr step never taken. Saved as an epoch begun and not ended, Lightning resumes inside it.
            for counts in loops["epoch_progress"]["total"], loops["epoch_progress"]["current"]:
                counts["processed"] = counts["completed"] = counts["started"] - 1

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


class RandomState(Callback):
    """The global random generators (torch's, CUDA's, numpy's, Python's) as training left them, in every checkpoint,
    and put back when a fit resumes from it: seed_everything at the start of the resumed run seeded them anew, so the
    dropout masks after a resume (FC-DenseNet's 0.2, DeepLab's 0.5) were the first steps' masks again, and a run
    stopped and resumed trained other numbers than the run left alone. (The data draw from seeds of their epoch and
    frame: datamodule.ResumableShuffle, the resident loader.)

    What is saved is the state between the steps the checkpoint's loops resume between: as it is, or, written inside
    a training step that the resume runs again (an interrupt), as that step began. A fit's validation draws nothing
    from it (its state is put back at its end; the eval loaders draw their workers' seeds from generators of their
    own): a validation the resume runs again, or one that a stop inside an epoch added, moves no later draw. Put back
    as the resumed fit starts, after the sanity check (which Lightning runs with the state isolated)."""

    def __init__(self) -> None:
        self._step_began: tuple[int, dict[str, Any]] | None = None  # (batches begun, torch's state as the last began)
        self._val_began: dict[str, Any] | None = None  # torch's state as the running fit validation began
        self._restore: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None

    @staticmethod
    def _torch() -> dict[str, Any]:
        # CUDA's only once in use: asking for it starts CUDA on a machine with a GPU a run does not use
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}

    @staticmethod
    def _set_torch(state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])

    def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        # ~2 µs; numpy's and Python's (~50 µs each) no step draws from here: they are read as a checkpoint is written
        self._step_began = (trainer.fit_loop.epoch_loop.batch_progress.total.ready, self._torch())

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._val_began = self._torch()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_began is not None:
            state, self._val_began = self._val_began, None
            self._set_torch(state)

    def state_dict(self) -> dict[str, Any]:
        if self._restore is not None:  # a resume interrupted before its fit started: its state goes on
            return dict(self._restore)
        state = self._val_began or self._torch()
        if self._val_began is None and self._trainer is not None and self._step_began is not None:
            batches = self._trainer.fit_loop.epoch_loop.batch_progress.total
            if batches.processed < batches.ready == self._step_began[0]:  # inside a step: the resume runs it again
                state = self._step_began[1]
        _, key, pos, has_gauss, gauss = np.random.get_state()
        # plain lists and tuples: Lightning reads checkpoints with weights_only=True, which refuses numpy arrays
        return {**state, "numpy": [key.tolist(), int(pos), int(has_gauss), float(gauss)],
                "python": random.getstate()}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer  # its loops say which steps a checkpoint resumes between

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = dict(state_dict)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and trainer.is_global_zero and self.state_key not in (checkpoint.get("callbacks") or {}):
            log.warning("%s holds no random state (written by an older version): the dropout masks and other random "
                        "draws after the resume go on from seed=%d, not from where its run left them",
                        trainer.ckpt_path, torch.initial_seed())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._restore = self._restore, None
        if not state:
            return
        self._set_torch(state)
        key, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state(("MT19937", np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))


def _stopped_inside_the_epoch(trainer: pl.Trainer, loops: dict) -> bool:
    """Whether this checkpoint is written after the fit's epoch loop ended (its end hooks, or the fit's) with the
    epoch's batches not all run: a stop request or max_steps inside the epoch."""
    epochs, batches = loops["epoch_progress"]["current"], loops["epoch_loop.batch_progress"]
    total = trainer.num_training_batches
    return (trainer.state.fn == TrainerFn.FITTING and epochs["processed"] == epochs["started"] > 0
            and not batches["is_last_batch"] and isinstance(total, int) and 0 < batches["current"]["completed"] < total)


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
