"""A DDP run that fails on one rank: one error line, naming the real cause, and nothing written after it; and one
SIGTERM stopping every rank at the same step (`StopTogether`, at the end).

Every rank runs in rank zero's run folder, and rank zero's failure path writes or removes it (task.run_task).
Without this, a rank's own error was followed by its peers' consequences: rank 1 failing on a bad frame left rank
zero to report and record gloo's "Connection closed by peer", and rank zero failing on one removed its folder while
rank 1 went on, printed that same gloo error and pointed at a log file that was gone.

So a non-zero rank that fails hands its cause to rank zero through the process group's store (hosted by rank zero:
handed over means rank zero is alive to say it) and exits without a line of its own (1, or 128 + the signal of
an interrupt, which rank zero says itself); rank zero, failing, ends its run with the first cause a peer handed
over, if any, and stops the ranks it started before it touches the folder. (Training under `strategy=ddp_spawn`,
whose ranks are multiprocessing children, is refused before it starts: checks.validate_train.)
"""

from __future__ import annotations

import json
import logging
import signal
import traceback

from pytorch_lightning.callbacks import Callback

from bgremover.errors import Interrupted, RankFailed, UserError
from bgremover.files import CtrlC

log = logging.getLogger("bgremover.train")

_KEY = "bgremover/failed/{rank}"
_STOP_WAIT_S = 30  # for a stopped rank to be gone before rank zero writes or removes the folder


def settle(trainer, exc: BaseException) -> BaseException:
    """The exception this process's run ends with, `exc` unless DDP has a better one (see the module's text)."""
    from bgremover.utils import _log_to_files

    store = _store(trainer)
    if store is None:
        return exc
    rank = trainer.global_rank
    if rank:
        _log_to_files("".join(traceback.format_exception(exc)))  # the traceback stays in the run's log
        try:
            store.set(_KEY.format(rank=rank), json.dumps(_describe(exc)))
        except Exception:  # rank zero is gone: this rank says its own error
            return exc
        # an interrupt (SIGTERM reaches every rank) exits as rank zero's does, 128 + the signal
        return SystemExit(128 + exc.signum if _interrupted(exc) else 1)
    if _interrupted(exc):  # rank zero's own interrupt (SIGTERM reaches every rank): its resume line, not a peer's
        return exc
    cause = _handed_over(store, trainer.world_size)
    _stop_started_ranks(trainer)
    return exc if cause is None else cause


def _interrupted(exc: BaseException) -> bool:
    return isinstance(exc, Interrupted)


def _store(trainer):
    """The default process group's store, when this process is one of several DDP ranks."""
    if trainer is None or trainer.world_size < 2:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.distributed_c10d._get_default_store()


def _describe(exc: BaseException) -> dict:
    from bgremover.utils import error_summary, is_user_error

    return {"user": is_user_error(exc), "message": error_summary(exc)}


def _handed_over(store, world: int) -> BaseException | None:
    """The lowest rank's cause handed over to rank zero (check: never waits for a key that is not there)."""
    for rank in range(1, world):
        key = _KEY.format(rank=rank)
        try:
            if not store.check([key]):
                continue
            found = json.loads(store.get(key))
        except Exception:  # an unreadable store: rank zero's own error stands
            return None
        if found["user"]:
            return UserError(found["message"])  # what one process says of it (a bad frame names its file)
        return RankFailed(f"DDP rank {rank} failed with {found['message']}")
    return None


def _stop_started_ranks(trainer) -> None:
    """Rank zero's children (strategy=ddp re-runs the command for each other rank): stopped and waited for, as
    Lightning does on Ctrl-C, so none of them writes into a folder rank zero is about to record or remove."""
    from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher
    from pytorch_lightning.trainer.connectors.signal_connector import _get_sigkill_signal

    launcher = trainer.strategy.launcher
    if not isinstance(launcher, _SubprocessScriptLauncher):
        return
    launcher.kill(_get_sigkill_signal())
    for proc in launcher.procs:
        try:
            proc.wait(timeout=_STOP_WAIT_S)
        except Exception:  # still there: the failure is recorded anyway
            log.debug("DDP rank process %s did not stop", proc.pid, exc_info=True)


class StopTogether(Callback):
    """SIGTERM (or Ctrl-C, in a fit) under DDP: every rank stops where the same training step (or validation) ends.

    Lightning's handler broadcasts from rank zero inside the handler, wherever the signal landed; the broadcast
    paired with whatever collective another rank was in (its next step's broadcast, a gradient all-reduce), so a
    SIGTERM that reached one rank alone (a scheduler stopping one task, `kill` of one pid) stopped that rank and left
    the others training into a collective it never joined: rank zero failed on gloo's "Connection closed by peer"
    and named the interrupt a crash, and a SIGTERM landing in a collective could hang every rank. Here the handler
    only notes the signal (and stops rank zero's child ranks, as Lightning's does); the ranks then agree at each
    training step's end and each validation's, all of them in the same collective, and stop there together, in
    one state, which LastCheckpoint then saves as it saves one process's interrupt (the run had stopped with no
    checkpoint of the steps since the last epoch's end). One process: Lightning's.

    The first Ctrl-C of a fit, which a terminal sends to every rank, stopped each where it was (a KeyboardInterrupt
    mid-step or mid-collective), with no checkpoint: it is noted and agreed on the same way, as the first Ctrl-C
    stops one process where its step ends (LastCheckpoint); a second stops at once.
    """

    def __init__(self) -> None:
        self._sigterm = False  # this rank got SIGTERM
        self._ctrl_c = CtrlC()  # or Ctrl-C, in a fit
        self.signum = 0  # the signal every rank stopped for (SIGTERM if any rank got it): the run's exit says it

    def on_train_start(self, trainer, pl_module) -> None:
        self._take_over(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._take_over(trainer)  # trainer.validate, and fit's sanity check (before on_train_start)

    def on_test_start(self, trainer, pl_module) -> None:
        self._take_over(trainer)

    @property
    def agreed(self) -> bool:
        """Every rank stopped at the same step (or validation) end."""
        return bool(self.signum)

    def _take_over(self, trainer) -> None:
        import threading

        try:  # Lightning's private handler list (2.6): another version's is left as it is
            from pytorch_lightning.trainer.connectors.signal_connector import _HandlersCompose
        except ImportError:
            return
        handler = signal.getsignal(signal.SIGTERM)
        notifier = getattr(getattr(trainer, "_signal_connector", None), "_sigterm_notifier_fn", None)
        if trainer.world_size < 2 or threading.current_thread() is not threading.main_thread() \
                or not isinstance(handler, _HandlersCompose) or notifier is None:
            return

        def came(signum, frame) -> None:
            log.info("rank %d: SIGTERM: stopping where this step ends, with the other ranks", trainer.global_rank)
            if not self._sigterm and trainer.strategy.launcher is not None:
                trainer.strategy.launcher.kill(signum)  # rank zero's child ranks (strategy=ddp), as Lightning does
            self._sigterm = True

        # Lightning's other SIGTERM handlers (SLURM's requeue, one set before the fit) stay as they were
        handler.signal_handlers = [came if h == notifier else h for h in handler.signal_handlers]

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            self._ctrl_c.hold("Ctrl-C: stopping where this step ends, with the other ranks, to save it whole (Ctrl-C "
                              "again to stop at once)" if trainer.is_global_zero else None)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._ctrl_c.let_go()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._ctrl_c.let_go()

    def on_train_batch_end(self, trainer, *_) -> None:
        if self._agree(trainer):
            # Stopped here, where the first Ctrl-C stops one process (this callback comes after the others): not
            # in a validation due after this batch, which the ranks run in uneven batch counts and Lightning's
            # per-val-batch check would cut short on some of them, out of step for the checkpoint's collective
            from pytorch_lightning.utilities.exceptions import SIGTERMException

            raise SIGTERMException

    # After a whole validation, not after each of its batches: the unpadded eval sampler gives ranks different
    # batch counts (3 frames on 2 ranks: 2 and 1), and a per-batch collective waited for a batch never run. A test
    # stage under way runs to its end, and the run finishes with its numbers.
    def on_validation_end(self, trainer, pl_module) -> None:
        self._agree(trainer)

    def _agree(self, trainer) -> bool:
        """Whether the ranks stop here (all of them: each learns it in the same collective)."""
        if trainer.world_size < 2 or trainer.received_sigterm:
            return False
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return False
        mine = signal.SIGTERM if self._sigterm else signal.SIGINT if self._ctrl_c.came else 0
        came = torch.tensor([int(mine)], device=trainer.strategy.root_device)
        dist.all_reduce(came, op=dist.ReduceOp.MAX)  # every rank is here, after the same step or validation
        if came.item():
            # after a validation, Lightning's own checks stop them (SIGTERM's flag, for a Ctrl-C too: `signum`)
            trainer._signal_connector.received_sigterm = True
            self.signum = int(came.item())
            self._ctrl_c.let_go()
        return self.agreed


def stopped_together(trainer) -> int:
    """The signal StopTogether stopped this DDP run's ranks for, in one place (0: it did not): a collective (the
    interrupt's checkpoint) finds every rank there."""
    return next((c.signum for c in trainer.callbacks if isinstance(c, StopTogether) and c.agreed), 0)
