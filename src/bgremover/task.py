"""The task wrapper train and eval run in (lightning-hydra-template's task_wrapper): W&B set up offline without a
key and always finished with the run's exit status, a failed or interrupted run's summary.json, and the folder of
a run that did nothing removed again."""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bgremover import config, run_dirs
from bgremover.config import SUMMARY_NAME, overrides
from bgremover.errors import Interrupted
from bgremover.utils import _log_to_files, error_summary, is_multirun, is_user_error, write_json_atomic


# --- W&B -------------------------------------------------------------------------------------------------------
def wandb_mode() -> str:
    """online only when a key is at hand; otherwise offline, so no run ever prompts or waits for a login."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("online", "offline", "disabled", "dryrun", "run"):
        return "offline" if mode == "dryrun" else ("online" if mode == "run" else mode)
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    with contextlib.suppress(OSError, netrc.NetrcParseError):  # no ~/.netrc, or one W&B cannot read: offline
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    return "offline"


def prepare_wandb(cfg: DictConfig) -> str | None:
    """The W&B mode for a config with a wandb logger (None without one), set where wandb and the logger read it:
    train and eval alike (eval with logger=wandb stopped on "No API key configured" without a key)."""
    if not ("logger" in cfg and cfg.logger and "wandb" in cfg.logger):
        return None
    mode = wandb_mode()
    if mode == "online" and cfg.logger.wandb.get("offline"):  # WandbLogger's own switch, set by the user: a key at
        mode = "offline"  # hand took the run online anyway (with no network: a CommError exit after 100 s)
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    cfg.logger.wandb.offline = mode == "offline"
    return mode


def mark_split(loggers, split: str, info: dict) -> None:
    """`<split>/frames_of` and `<split>/partial` beside `<split>/frames` in the W&B run's summary: the dashboard
    showed test/frames=12 and nothing saying "of 233" (a training run's test stage, and `make eval`'s run)."""
    if not info.get("frames"):
        return
    from pytorch_lightning.utilities import rank_zero_only

    if rank_zero_only.rank:  # under DDP the other ranks' W&B experiment is Lightning's dummy, whose `summary` is a
        return  # no-op function: rank 1 ended a finished run on an AttributeError (torchrun: the job failed, exit 1)
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger.experiment, "summary", None) is not None:
            logger.experiment.summary.update({f"{split}/frames_of": info["of"],
                                              f"{split}/partial": info["complete"] is False})


def finish_wandb(exit_code: int = 0, announce: bool = True) -> None:
    """Close the W&B run; without this a Hydra multirun logs every job into the first job's run. `exit_code`: a
    failed or interrupted run's (W&B showed it "finished", a success, while summary.json said "failed"). An offline
    run says how to upload it (unless `announce` is off: its folder is about to go): WANDB_SILENT (set so a run
    prints nothing of W&B's) also hid W&B's own `wandb sync` line."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            run = wandb.run
            offline, where = bool(getattr(run, "offline", False)), Path(run.dir).parent if run.dir else None
            wandb.finish(exit_code=exit_code)
            if offline and where is not None and announce:
                logging.getLogger("bgremover.train").info("W&B: offline run, upload it with `wandb sync %s`", where)


# --- the task wrapper ------------------------------------------------------------------------------------------
def run_task(task: Callable[[DictConfig], tuple[dict, dict]], cfg: DictConfig) -> tuple[dict, dict]:
    """Run train/eval; on failure write a `failed` (or `interrupted`) summary.json, log the traceback to the
    run's log file and re-raise; always close W&B. Multirun jobs never share a W&B run because of the finally.

    A single run that failed on a user error before writing any checkpoint leaves no run folder behind: it
    holds nothing but the config of a command that never ran.
    """
    config.paths_from_launch_dir(cfg)
    start = time.time()
    out_dir = Path(cfg.paths.output_dir)
    exit_code = 0
    try:
        return task(cfg)
    except BaseException as exc:
        exit_code = _exit_code(exc)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        # Lightning's rank, if Lightning was imported at all (not imported: no process group, rank 0; importing it
        # here cost every refusal before the build 4 s)
        lightning = sys.modules.get("pytorch_lightning")
        if lightning is not None and lightning.utilities.rank_zero_only.rank:  # a DDP rank's folder is rank zero's: one failing alone (its shard's bad frame)
            # removed the folder rank zero was training in, or replaced its record; rank zero writes it, as on success
            _log_to_files("".join(traceback.format_exception(exc)))
            raise
        interrupted = isinstance(exc, Interrupted)
        if not interrupted:
            _log_to_files("".join(traceback.format_exception(exc)))
        summary = {
            "status": "interrupted" if interrupted else "failed",
            "error": error_summary(exc),
            "run_dir": str(out_dir),
            "net": cfg.model.get("net_name") if "model" in cfg else None,
            "seed": cfg.get("seed"),
            "wall_time_s": round(time.time() - start, 2),
            "overrides": overrides(),
            "config": OmegaConf.to_container(cfg, resolve=False),
        }
        if interrupted:
            summary.update(last_ckpt=exc.last_ckpt, epoch=exc.epoch, global_step=exc.step, stage=exc.stage)
            if exc.stage == "test":  # the training is done: its whole record (train.py), less the test numbers
                summary = {**summary, **(getattr(exc, "record", None) or {}), "status": "interrupted",
                           "best_ckpt": exc.best_ckpt}
            if getattr(exc, "fit_s", None) is not None:  # training time, as a finished run's (resumes included)
                summary["wall_time_s"] = round(exc.fit_s, 2)
        nothing = is_user_error(exc) or (interrupted and exc.stage == "start" and not exc.last_ckpt)
        empty = _empty_run_dir() if nothing and not is_multirun() else None
        if empty is not None:
            finish_wandb(exit_code, announce=False)  # its offline run goes with the folder: no `wandb sync` line
            _remove_run_dir(empty)
        # a refused resume in place gets the run's own record back (restore_run_record) instead of a stub
        elif not (nothing and not is_multirun() and run_dirs.restore_run_record()):
            write_json_atomic(out_dir / SUMMARY_NAME, summary)
        raise
    finally:
        finish_wandb(exit_code)


def _exit_code(exc: BaseException) -> int:
    """The exit status the command ends with: 128 + the signal for Ctrl-C / SIGTERM, else 1."""
    if isinstance(exc, Interrupted):
        return 128 + int(exc.signum)
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 1


_RUN_DIR_SCAFFOLD = {".hydra", SUMMARY_NAME, "wandb", "csv"}  # what a run folder holds before training starts


def _empty_run_dir() -> Path | None:
    """The folder Hydra made for this run if it holds nothing yet (never a user's own paths.output_dir)."""
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    if out_dir is None or not out_dir.is_dir():
        return None
    return out_dir if all(p.name in _RUN_DIR_SCAFFOLD or p.suffix == ".log" for p in out_dir.iterdir()) else None


def _remove_run_dir(out_dir: Path) -> None:
    import shutil

    for handler in logging.getLogger().handlers:  # the log file lives inside: close it first
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == out_dir:
            handler.close()
            logging.getLogger().removeHandler(handler)
    if not config.made_by_this_command(out_dir):  # an empty folder of the user's, given as hydra.run.dir: emptied
        for entry in out_dir.iterdir():  # of what this run wrote (it held only that: _empty_run_dir), kept
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    # and the folders Hydra made above it (logs/train/runs/ of a fresh checkout, where a typo left them empty),
    # up to the first that holds anything or was there before the command
    for parent in out_dir.resolve().parents:
        if parent not in config.ABSENT_AT_START:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty (another run started meanwhile)
            break
