"""`python -m bgremover.train [overrides]` — fit a net on CamVid, test its best checkpoint, write summary.json.

Examples:
    python -m bgremover.train                                   # the quick CPU recipe (minutes)
    python -m bgremover.train experiment=tiramisu103_camvid     # the paper recipe (GPU)
    python -m bgremover.train -m model=tiramisu56,deeplabv3plus seed=1,2

(Near 400 lines: building the run, its W&B resume, fit/test and the run's record read as one sequence.)
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from bgremover import checks, config, resume, sweep, task, utils
from bgremover.errors import Interrupted, UserError, count, report, starting

# torch, Lightning and the nets are imported inside the functions: a bad config is refused before paying for them

log = logging.getLogger("bgremover.train")

CONFIG_DIR = config.CONFIG_DIR


class RunInterrupted(Interrupted):
    """Ctrl-C or SIGTERM stopped the run at `stage`: "fit" (last.ckpt holds the state to resume from), "start"
    (nothing trained yet; a resume's own checkpoint still resumes it) or "test" (`best_ckpt` is left to test)."""

    def __init__(self, signum: int, last_ckpt: str | None, epoch: int, step: int, stage: str = "fit",
                 best_ckpt: str | None = None) -> None:
        self.signum, self.last_ckpt, self.epoch, self.step = signum, last_ckpt, epoch, step
        self.stage, self.best_ckpt = stage, best_ckpt
        name = signal.Signals(signum).name
        where = "before training started" if stage == "start" else f"at epoch {epoch}, step {step}"
        if stage == "start" and not last_ckpt:
            super().__init__(f"interrupted by {name} {where}: nothing was trained")
            return
        if stage == "test":
            finish = os.environ.get(config.FINISH_ENV) or "make eval CKPT={best_ckpt}"
            super().__init__(f"interrupted by {name} in the test stage, after training finished; its best checkpoint "
                             f"is {best_ckpt}: finish with: {finish.replace('{best_ckpt}', shlex.quote(best_ckpt))}")
            return
        if last_ckpt:
            typed = _resume_overrides()
            # the data location from the environment (`DATA_DIR=... make train`) is not among the overrides
            env = "" if not os.environ.get("DATA_DIR") or any(o.startswith("data.root=") for o in typed) else \
                f"DATA_DIR={shlex.quote(os.environ['DATA_DIR'])} "
            args = " ".join([*typed, f"ckpt_path={shlex.quote(str(last_ckpt))}"])  # none typed: no leading space
            resume = f"resume with: {env}make train ARGS=\"{args}\""
            if os.environ.get(config.RESUME_ENV):  # started by a wrapper (make remover): its own command resumes in place
                resume = "resume with: " + os.environ[config.RESUME_ENV].replace("{ckpt_path}",
                                                                                   shlex.quote(str(last_ckpt)))
            super().__init__(f"interrupted by {name} {where}; {resume}")
        else:
            super().__init__(f"interrupted by {name} {where}, before any checkpoint was written")


def _interrupted_outside_fit(cfg: DictConfig, exc: BaseException, objects: dict[str, Any]) -> BaseException:
    """Ctrl-C while the run starts (a bare KeyboardInterrupt traceback) or in its test stage (Lightning's exit 1,
    with nothing said): a RunInterrupted saying what was kept and how to go on. Other exits pass through."""
    trainer = objects.get("trainer")
    if isinstance(exc, RunInterrupted) or (isinstance(exc, SystemExit) and trainer is None):
        return exc
    signum = signal.SIGINT
    if trainer is not None:  # Lightning is whole (without a trainer nothing is imported here: a Ctrl-C inside
        # `import torch` leaves it half-loaded, and importing Lightning raised an unrelated error as the run's failure)
        from pytorch_lightning.trainer.states import TrainerStatus

        if isinstance(exc, SystemExit) and trainer.state.status != TrainerStatus.INTERRUPTED:
            return exc
        signum = signal.SIGTERM if trainer.received_sigterm else signal.SIGINT
        if trainer.state.fn is not None and trainer.state.fn.value == "test":
            return RunInterrupted(signum, None, trainer.current_epoch, trainer.global_step, stage="test",
                                  best_ckpt=objects["summary"].best_ckpt or str(cfg.get("ckpt_path") or ""))
    resumed = str(cfg.ckpt_path) if cfg.get("ckpt_path") and cfg.get("train", True) else None
    return RunInterrupted(signum, resumed, 0, 0, stage="start")  # a resume's checkpoint still resumes it


def _resume_overrides() -> list[str]:
    return [o for o in utils.overrides() if not o.startswith(("ckpt_path=", "hydra."))]


def build(cfg: DictConfig) -> dict[str, Any]:
    """Datamodule, model, callbacks, loggers and trainer from the config; nothing is run yet."""
    from bgremover import checkpoint
    from bgremover.nets import count_parameters, ensure_pretrained_available

    ensure_pretrained_available(cfg.model.net)  # before instantiating: smp would hang on the download
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    if hasattr(datamodule, "label_info"):  # a dataset with its own class list (data=folder): the net follows it
        _use_labels(cfg, datamodule.label_info())
    weights = datamodule.class_weights()
    model = hydra.utils.instantiate(
        cfg.model,
        class_weights=None if weights is None else weights.tolist(),
        mean=list(cfg.data.mean),
        std=list(cfg.data.std),
        _convert_="all",
    )
    # Set after construction: passed as an argument, Hydra would instantiate this `_target_` dict too.
    model.hparams.net_config = OmegaConf.to_container(cfg.model.net, resolve=True)
    from bgremover.lit.checkpoints import RandomState
    from bgremover.lit.ddp import StopTogether
    from bgremover.lit.summary import RunSummary

    summary = RunSummary()  # not a config node: every run writes its summary.json
    # nor the random state (a run with callbacks=none resumes as exactly as any other), nor DDP's SIGTERM
    callbacks = [*utils.instantiate_dict(cfg.get("callbacks")), summary, RandomState(), StopTogether()]
    if cfg.trainer.get("limit_val_batches", 1.0) == 0:  # validation off: nothing for early stopping to watch
        from pytorch_lightning.callbacks import EarlyStopping
        from pytorch_lightning.utilities import rank_zero_warn

        if stopping := [c for c in callbacks if isinstance(c, EarlyStopping)]:
            # Lightning raised after the first epoch instead ("metric val/mIoU which is not available"), no checkpoint
            rank_zero_warn(f"trainer.limit_val_batches=0: early stopping (on {stopping[0].monitor}) is off too, "
                           "there is no validation to watch")
            callbacks = [c for c in callbacks if c not in stopping]
    resumed_from = None
    if mode := task.prepare_wandb(cfg):
        if cfg.logger.wandb.group is None:
            cfg.logger.wandb.group = sweep.sweep_group(cfg)
        if utils.is_multirun() and cfg.logger.wandb.get("name"):  # jobs that differ in lr alone (or Optuna's
            # trials) had one name: the job's number, as its folder, tells them apart on the dashboard
            from hydra.core.hydra_config import HydraConfig

            cfg.logger.wandb.name = f"{cfg.logger.wandb.name}-job{HydraConfig.get().job.num}"
        resumed_from = _resume_wandb(cfg, mode)
    loggers = utils.instantiate_loggers(cfg.get("logger"))
    if not loggers:  # logger=null: Lightning's LearningRateMonitor refuses a Trainer without a logger, after the build
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
    if "16" in str(cfg.trainer.get("precision")) and str(trainer.precision) != str(cfg.trainer.precision):
        with open_dict(cfg):  # 16-mixed on a CPU trains bf16-mixed (Lightning says so): record what trains
            cfg.trainer.precision = str(trainer.precision)
    if cfg.get("ckpt_init"):  # a new stage from an earlier run's weights: epoch, optimizer and schedule start fresh
        loaded, skipped = checkpoint.init_from(model, cfg.ckpt_init)
        fresh = (f"{len(skipped)} re-initialised: " + ", ".join(skipped[:6]) + (" …" if len(skipped) > 6 else "")
                 if skipped else "none re-initialised")
        log.info("initialised %d tensors of the net from %s (%s)", len(loaded), cfg.ckpt_init, fresh)
    params = count_parameters(model.net)
    extra = {"resumed_from_wandb_run": resumed_from} if resumed_from else {}
    for logger in loggers:  # the whole resolved config, so dashboards can filter and group by any value
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "model/params": params, **extra})
    return {"cfg": cfg, "datamodule": datamodule, "model": model, "callbacks": callbacks, "logger": loggers,
            "trainer": trainer, "params": params, "summary": summary}


def _resume_wandb(cfg: DictConfig, mode: str) -> str | None:
    """A run resumed from a checkpoint (`ckpt_path=`) and the W&B run that checkpoint was logged to. Online it
    continues that run (same id, resume="allow": one run whose curves go on); offline, or from a run that was
    logged offline, it starts a new one, since `wandb sync` of an offline run erases what another run with its id
    logged (wandb/wandb#3841, #5865: the first part, or the online continuation); the new run's config
    names the old one (`resumed_from_wandb_run`). Either way it keeps the old run's name and group (a sweep job's
    `<net>-seed1-job3` in group `<exp>-<sweep folder>` was renamed `<net>-seed1` and moved to group `<exp>` by a
    resume from outside the sweep) unless the command line gives them or the resume is itself a sweep's job.
    A test-only run (train=false) never continues the training run: it is a new run of job type "eval".
    Returns the old run's id, or None."""
    if not cfg.get("ckpt_path") or cfg.logger.wandb.get("id"):
        return None
    from bgremover import checkpoint

    ckpt = checkpoint.read(cfg.ckpt_path)
    previous, name, group = ckpt.get("wandb_run_id"), ckpt.get("wandb_run_name"), ckpt.get("wandb_run_group")
    with open_dict(cfg):
        if name and not config.given("logger.wandb.name") and not utils.is_multirun():  # a sweep's jobs keep
            cfg.logger.wandb.name = name  # their own -jobN: several may resume one checkpoint
        if group and not config.given("logger.wandb.group") and not utils.is_multirun():
            cfg.logger.wandb.group = group
        if not cfg.get("train", True):  # train=false tests the checkpoint: an eval run beside the training run,
            # as `make eval` makes; continuing that run overwrote its config with this one and logged at step 0
            if not config.given("logger.wandb.job_type"):
                cfg.logger.wandb.job_type = "eval"
        elif previous and mode == "online" and not ckpt.get("wandb_run_offline"):
            cfg.logger.wandb.id, cfg.logger.wandb.resume = previous, "allow"
    return previous


def _use_labels(cfg: DictConfig, info: dict[str, Any]) -> None:
    """The data's classes, void index and default foreground into cfg.model (so summary.json and the checkpoint
    say them too), and the net's output count: `classes` (smp) or `num_classes` (FC-DenseNet)."""
    with open_dict(cfg):
        cfg.model.class_names = list(info["class_names"])
        cfg.model.ignore_index = int(info["ignore_index"])
        cfg.model.default_foreground = list(info["default_foreground"])
        cfg.model.image_size = info.get("image_size")  # the exported model infers at this scale by default
        key = "num_classes" if "num_classes" in cfg.model.net else "classes"
        cfg.model.net[key] = len(info["class_names"])


def _fit(cfg: DictConfig, trainer, model, datamodule) -> None:
    """trainer.fit, with Ctrl-C / SIGTERM turned into RunInterrupted (Lightning exits 1, or 0 for SIGTERM)."""
    from pytorch_lightning.trainer.states import TrainerStatus

    try:
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    except (KeyboardInterrupt, SystemExit) as exc:
        if trainer.state.status != TrainerStatus.INTERRUPTED:
            raise
        from bgremover.lit.ddp import stopped_together
        from bgremover.lit.summary import RunSummary, last_checkpoint

        signum = stopped_together(trainer) or (signal.SIGTERM if trainer.received_sigterm else signal.SIGINT)

        stop = RunInterrupted(signum, last_checkpoint(trainer), trainer.current_epoch, trainer.global_step)
        # the summary's wall_time_s: training time, counted as the resume will count on (not the process time)
        stop.fit_s = next((c._fit_s() for c in trainer.callbacks if isinstance(c, RunSummary)), None)
        raise stop from exc
    if trainer.global_step == 0 and not cfg.get("ckpt_path"):  # Lightning's "No training batches" is an info line
        limit = cfg.data.get("limit_images")  # and the test stage then scored an untrained net as the run's result
        raise UserError(f"training took no step: the train split fills no batch of data.batch_size="
                        f"{cfg.data.batch_size} (a short last batch is dropped)"
                        + (f" with data.limit_images={limit}" if limit else "") + "; lower data.batch_size")


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit, then test with the best checkpoint; returns (metric_dict, object_dict). RunSummary writes summary.json."""
    objects: dict[str, Any] = {}
    try:
        return _train(cfg, objects)
    except (KeyboardInterrupt, SystemExit) as exc:  # outside fit: while starting, or in the test stage
        stop = _interrupted_outside_fit(cfg, exc, objects)
        if stop is exc:
            raise
        if stop.stage == "test":
            stop.record = _untested_record(cfg, objects)
        raise stop from exc
    except Exception as exc:  # under DDP: the real cause, said once (lit/ddp.py)
        if objects.get("trainer") is None:  # nothing launched (and torch perhaps not imported)
            raise
        from bgremover.lit import ddp

        settled = ddp.settle(objects["trainer"], exc)
        if settled is exc:
            raise
        raise settled from exc


def _train(cfg: DictConfig, objects: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    from bgremover import checkpoint

    # the set-up reads a resume's checkpoint once (its checks, the optimizer and seed it adopts, its W&B run, its
    # classes: five full reads of FC-DenseNet103's 110 MB); left before the fit, which reads it itself
    with checkpoint.read_once():
        resume.adopt_split(cfg, cfg.get("ckpt_path"))  # a resumed (or train=false) folder run keeps its split
        checks.validate_train(cfg)
        resume.adopt_optimizer(cfg)  # what a resume trains with is what the run records
        resume.adopt_seed(cfg)  # and the data it draws
        quiet = utils.is_multirun() and not cfg.get("verbose")
        import pytorch_lightning as pl
        from pytorch_lightning.utilities import rank_zero_only

        # once: DDP's other ranks printed it again, into the same train.log; extras=null: off, as in the template
        if (cfg.get("extras") or {}).get("print_config") and not quiet and not rank_zero_only.rank:
            log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
        if quiet:  # a sweep job: its one line comes at the end (print_job_line); the details are in its log file
            with open_dict(cfg):
                cfg.trainer.enable_model_summary = False
                if (cfg.get("callbacks") or {}).get("progress_bar"):  # the speed-runs set it to null
                    cfg.callbacks.progress_bar.refresh_rate = 0
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        objects.update(build(cfg))  # the caller's dict: an interrupt in the test stage reads the trainer from it
        trainer, model, datamodule, summary = (objects[k] for k in ("trainer", "model", "datamodule", "summary"))
        ckpt = checkpoint.read(cfg.ckpt_path) if cfg.get("ckpt_path") else None
        if ckpt is not None:  # tested (train=false) or resumed on data of other classes: Lightning's state_dict
            # RuntimeError ("size mismatch for net.segmentation_head...") came instead of a word on the classes
            checkpoint.check_classes(cfg.ckpt_path, checkpoint.meta(ckpt)["classes"], list(model.hparams.class_names))
    if cfg.get("train", True):
        del ckpt  # (Lightning reads it again: not held through the fit)
        _fit(cfg, trainer, model, datamodule)
    else:  # train=false ckpt_path=X tests X: how to finish a run that was stopped before its test stage
        summary.from_checkpoint(ckpt, str(Path(cfg.ckpt_path).resolve()))
    # the run's best val/mIoU, read before the test stage: testing loads the best checkpoint, whose best so far is
    # that epoch's, not the run's where it was picked by another metric (the remover's val/fg_iou)
    fitted_best = _add_best_val({}, model)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()} | fitted_best
    objects["fit_metrics"] = dict(metrics)  # an interrupted test stage records the run with these
    if cfg.get("test", True):  # the best epoch, not the last: the number a user would ship
        trainer.test(model=model, datamodule=datamodule, ckpt_path=summary.best_ckpt, weights_only=True,
                     verbose=not quiet)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    metrics.update(fitted_best or _add_best_val({}, model))  # train=false: the tested checkpoint's
    split = utils.test_split_info(metrics, datamodule)
    if split["complete"] is False:  # Lightning's table showed test/frames 4.0 and nothing else
        _warn("test numbers over %d of %d frames: PARTIAL, not the test split's score (%s)", split["frames"],
              split["of"], _cut_by(cfg, "data.limit_eval_images or trainer.limit_test_batches"),
              extra=utils.IN_JOB_LINE)
    # the best epoch is picked by val numbers: over part of the split (limit_val_batches) they said nothing of it
    val_split = utils.test_split_info(metrics, datamodule, "val")  # train=false validated nothing: all None
    if val_split["complete"] is False:
        _warn("val numbers (and the best epoch they pick) over %d of %d frames: PARTIAL (%s)", val_split["frames"],
              val_split["of"], _cut_by(cfg, "trainer.limit_val_batches or data.limit_eval_images"),
              extra=utils.IN_JOB_LINE)
    val_split = _cut_validations(summary.history, val_split)  # the run's (the module now holds the best epoch's)
    task.mark_split(trainer.loggers, "test", split)
    task.mark_split(trainer.loggers, "val", val_split)  # the val numbers that picked the tested epoch, the same way
    summary.write(Path(cfg.paths.output_dir) / utils.SUMMARY_NAME, trainer, model, metrics,
                  _run_record(cfg, objects, split, val_split), measure_inference=cfg.get("measure_inference", True))
    return metrics, objects


def _warn(*args: Any, **kwargs: Any) -> None:
    """A warning of the run's record, on rank zero: every DDP rank computes that record, and each rank's PARTIAL
    warnings reached the terminal and train.log (twice with 2 processes)."""
    from pytorch_lightning.utilities import rank_zero_only

    if not rank_zero_only.rank:
        log.warning(*args, **kwargs)


def _cut_by(cfg: DictConfig, limits: str) -> str:
    """What cut a split short: fast_dev_run (debug=fdr) runs a batch or a few of each, whatever the limits are (its
    warnings blamed data.limit_eval_images or trainer.limit_test_batches, set by nobody)."""
    fast = (cfg.get("trainer") or {}).get("fast_dev_run")
    if not fast:
        return limits
    batches = count(1 if fast is True else int(fast), "batch", "batches")
    return f"trainer.fast_dev_run (debug=fdr) runs {batches} of each split"


def _cut_validations(history: list[dict], val_split: dict) -> dict:
    """A validation interrupted (Ctrl-C) and resumed finished over the frames it had left: Lightning restores its
    place, not the metric states of the frames before (last.ckpt now restarts it: LastCheckpoint; a checkpoint
    written before that still resumes this way). Such epochs are named (`cut_epochs`), and where the best
    epoch is one of them the run's val numbers are PARTIAL: it was picked by a score over part of the split (a
    user audit: val/frames 8, 10, 10 and the 8-frame epoch picked, without a word)."""
    of = val_split.get("of")
    if not of or val_split.get("complete") is False:  # unknown, or partial throughout (already said)
        return val_split
    cut = [h for h in history if h.get("val/frames") is not None and h["val/frames"] < of]
    if not cut:
        return val_split
    scored = [h for h in history if h.get("val/mIoU") is not None]
    best = max(scored, key=lambda h: h["val/mIoU"]) if scored else None
    picked = best is not None and any(h is best for h in cut)
    _warn("val of epoch%s %s covered %s of %d frames (a validation interrupted and resumed)%s",
          "s" if len(cut) > 1 else "", ", ".join(str(h["epoch"]) for h in cut),
          "/".join(str(h["val/frames"]) for h in cut), of,
          ": the best epoch is one of them, so it was picked by a PARTIAL score" if picked else "",
          extra=utils.IN_JOB_LINE if picked else None)
    return {**val_split, "cut_epochs": [h["epoch"] for h in cut], **({"complete": False} if picked else {})}


def _add_best_val(metrics: dict[str, float], model) -> dict[str, float]:
    """val/mIoU_best over the whole run, resumes included (the Optuna objective), into `metrics`."""
    if model.val_miou_best.update_called:
        metrics["val/mIoU_best"] = float(model.val_miou_best.compute())
    return metrics


def _run_record(cfg: DictConfig, objects: dict[str, Any], split: dict, val_split: dict) -> dict[str, Any]:
    """What summary.json says of the run beside its metrics and training record."""
    return {
        "run_dir": str(Path(cfg.paths.output_dir).resolve()),
        "net": objects["model"].hparams.net_name,
        "experiment": cfg.get("experiment_name"),
        "group": sweep.sweep_group(cfg),
        "seed": cfg.seed,
        "params": objects["params"],
        "commit": utils.source_commit(),  # the code that trained it (an exported model says it too)
        "test_split": split,
        "val_split": val_split,
        "overrides": utils.overrides(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        **_trained_config(cfg),
    }


def _untested_record(cfg: DictConfig, objects: dict[str, Any]) -> dict[str, Any] | None:
    """The summary.json of a run stopped in its test stage, training done: its whole record, so that the `make
    eval` that finishes it (eval.attach_to_run) leaves a run like any other (it was a stub: no history, epochs or
    val numbers, and `make compare` never counted it)."""
    try:
        model, datamodule = objects["model"], objects["datamodule"]
        metrics = {**_add_best_val({}, model), **(objects.get("fit_metrics") or {})}  # the fit's best first
        split, val_split = (utils.test_split_info(metrics, datamodule, s) for s in ("test", "val"))
        return objects["summary"].record(objects["trainer"], model, metrics, _run_record(cfg, objects, split, val_split),
                                         measure_inference=False)  # eval measures it when it attaches
    except Exception:  # never instead of the interrupt: the stub record then
        log.debug("no full record of the interrupted run", exc_info=True)
        return None


def _trained_config(cfg: DictConfig) -> dict[str, Any]:
    """train=false tests a checkpoint trained by another command: its run's config (lr, epochs, ckpt_init) as
    `trained_config`, which compare groups and labels by. `config` alone described this test-only command."""
    if cfg.get("train", True) or not cfg.get("ckpt_path"):
        return {}
    from bgremover import checkpoint

    path = checkpoint.run_summary(cfg.ckpt_path)
    try:
        trained = json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        trained = {}
    found = trained.get("trained_config") or trained.get("config")
    return {"trained_config": found} if isinstance(found, dict) else {}


def ddp_relaunch_conflict(cfg: DictConfig) -> str | None:
    """Why this sweep (-m) job cannot run its trainer config, or None.

    Lightning's DDP launcher starts ranks 1..N-1 by re-running this process's command line; under -m that line
    is the whole sweep, so each extra rank would start a sweep of its own (seen: a second sweep folder, a rank
    that outlives its job, exit status 0). Ranks that the cluster starts itself (SLURM tasks, torchrun) are
    not re-launched. The trainer is built to ask Lightning which launcher it would use; nothing runs.
    """
    from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

    try:
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, _convert_="all")
    except Exception:  # a trainer that cannot be built is the run's own error to report
        return None
    launcher = trainer.strategy.launcher
    if not (isinstance(launcher, _SubprocessScriptLauncher) and launcher.num_processes > 1
            and not launcher.cluster_environment.creates_processes_externally):
        return None
    n = launcher.num_processes
    return (f"trainer.strategy={cfg.trainer.get('strategy', 'auto')} on {n} devices re-runs this command for "
            f"each extra process, which under -m re-runs the whole sweep: run the jobs one at a time without -m, "
            f"or let SLURM start the processes (hydra/launcher=slurm hydra.launcher.tasks_per_node={n})")


def main() -> float | None:
    """`bgremover-train` / `python -m bgremover.train`: Hydra's command line over conf/train.yaml."""
    config.hydra_command_line()
    with starting():
        return _main()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    multirun = utils.is_multirun()
    utils.quiet_libraries(verbose=bool(cfg.get("verbose")) or not multirun)
    if (cfg.get("extras") or {}).get("enforce_tags") and not cfg.get("tags"):
        sys.exit(report("extras.enforce_tags is set but no tags were given (tags=[...])"))
    if multirun and (conflict := ddp_relaunch_conflict(cfg)):  # refused at the first job, before any rank starts
        sys.exit(report(conflict, code=2))
    try:
        metrics, _ = task.run_task(train, cfg)
    except RunInterrupted as exc:
        sys.exit(report(str(exc), code=128 + exc.signum))
    except Exception as exc:
        utils.print_error(exc)
        if multirun:
            sweep.print_job_line(cfg)
            # keep the sweep going (SweepReport lists the failure at the end). None, not nan: Optuna's sweeper
            # records a job without a number as a failed trial, while nan made it raise and end the whole sweep
            return None
        sys.exit(1)
    if multirun:
        sweep.print_job_line(cfg)
    name = cfg.get("optimized_metric")
    value = metrics.get(name or "")
    # a misspelt name: an Optuna sweep then failed as "Return value must be float-castable. Got 'None'". Not said
    # of a single run with validation off: its val metric is missing for that reason, and no sweep reads it.
    validated = any(k.startswith("val/") for k in metrics)
    if name and value is None and (multirun or validated):
        logged = ", ".join(sorted(k for k in metrics if k.startswith(("val/", "test/")) and "iou_" not in k))
        print(f"warning: optimized_metric={name} is not among this run's metrics ({logged or 'none'}): a sweep "
              "gets no number from it", file=sys.stderr, flush=True)
    return None if value is None else float(value)


if __name__ == "__main__":
    main()

__all__ = ["RunInterrupted", "UserError", "build", "main", "train"]
