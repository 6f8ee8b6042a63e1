"""What a run started from a checkpoint keeps of it (ckpt_path: a resume, or train=false / eval testing it).

A resume needs the net its checkpoint saved, the weight averaging it was trained with (callbacks=ema), and something
left to train (epochs, steps, clocks); it goes on with the checkpoint's optimizer, which Lightning restores whatever
the command says; and a folder run keeps the split its run drew. Each was a quietly wrong number before: an "ok"
run that trained nothing, a run that trained on from the average and dropped the raw weights, a recorded learning
rate that never ran, held-out images trained on.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from omegaconf import DictConfig, open_dict

from bgremover import checks
from bgremover.config_keys import as_number
from bgremover.errors import UserError, count

log = logging.getLogger("bgremover.train")


def adopt_split(cfg: DictConfig, ckpt_path) -> None:
    """A folder run resumed or evaluated from a checkpoint uses the split its run drew (the run's split.json)
    unless data.split_file names one: drawn again, a folder that had gained images moved held-out images into
    training and scored trained-on ones as held out."""
    data = cfg.get("data") or {}
    if "split_out" not in data or data.get("split_file") or not ckpt_path or not Path(str(ckpt_path)).is_file():
        return
    from bgremover.data import folder as fd
    from bgremover.run_dirs import run_file

    path = run_file(ckpt_path, fd.SPLIT_FILE)
    if path is None or fd.read_split(path).get("fixed"):
        return
    log.info("data.split_file=%s: the split of the checkpoint's run", path)
    with open_dict(cfg):
        cfg.data.split_file = str(path)


def check(cfg: DictConfig, model) -> None:
    """A resume needs the net its checkpoint saved (ckpt_init is the one that adapts), and something left to train:
    a checkpoint already at trainer.max_epochs (or max_steps) trained nothing, yet wrote an "ok" run that compare
    then averaged with the original as if it were another seed. Resumed or tested (train=false), it must be a
    Lightning checkpoint, not a weights-only copy."""
    from bgremover import checkpoint

    ckpt = checkpoint.read(cfg.ckpt_path)
    # a weights-only copy (checkpoint.save_weights: models/*.pt) has no training state for Lightning to restore:
    # resuming or testing it was "KeyError: 'pytorch-lightning_version'" after the build, with a run folder left
    if "pytorch-lightning_version" not in ckpt:
        raise UserError(f"ckpt_path {cfg.ckpt_path} holds weights only (no epoch, optimizer or schedule to go on "
                        f"from): start a run from them with ckpt_init={cfg.ckpt_path}, or test them with "
                        f"make eval CKPT={cfg.ckpt_path}")
    if not cfg.get("train", True):  # train=false tests the checkpoint: nothing is trained on from it
        return
    saved = checkpoint.meta(ckpt, cfg.ckpt_path).get("net_name")
    if saved and model.get("net_name") and saved != model.net_name:  # was a state_dict RuntimeError after the build
        raise UserError(f"ckpt_path {cfg.ckpt_path} holds a {saved}, and this run builds a {model.net_name}: "
                        "resume with the run's own settings (its .hydra/overrides.yaml), or start from its "
                        "weights with ckpt_init=")
    trainer = cfg.get("trainer") or {}
    epochs, steps = checkpoint.epochs_trained(ckpt), ckpt.get("global_step")
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    done = (isinstance(max_epochs, int) and 0 < max_epochs <= epochs) \
        or (isinstance(steps, int) and isinstance(max_steps, int) and 0 < max_steps <= steps)
    if done:
        raise UserError(f"ckpt_path {cfg.ckpt_path} has trained {count(epochs, 'epoch')} "
                        f"({count(steps, 'step')}): with "
                        f"trainer.max_epochs={max_epochs} and trainer.max_steps={max_steps} nothing is left to "
                        "train; raise them to go on, or test it with train=false")
    # callbacks=ema checkpoints the moving average as the state_dict, the raw weights beside it (current_model_state):
    # only a weight-averaging callback puts the raw ones back, so without it the resume trained on from the average
    # (with the raw weights' optimizer moments), and its checkpoints held the raw weights no more
    if "current_model_state" in ckpt and not _averages_weights(cfg):
        raise UserError(f"ckpt_path {cfg.ckpt_path} was trained with callbacks=ema (its weights are the moving "
                        "average, the raw ones kept beside them): add callbacks=ema to resume it, or start a new run "
                        f"from the average with ckpt_init={cfg.ckpt_path}")
    # the clocks go on across a resume (Lightning's Timer, TimeToMIoU's budget): a spent one stopped the resumed
    # run at once, which then tested and wrote an "ok" run like the case above
    states = ckpt.get("callbacks") or {}
    clocks = [("trainer.max_time", checks.max_time_s(cfg), (states.get("Timer") or {}).get("time_elapsed", {}).get("train"))]
    for name, cb in (cfg.get("callbacks") or {}).items():
        if isinstance(cb, DictConfig) and cb.get("budget_s") is not None:
            spent = [s.get("train_s") for k, s in states.items() if k.split("{")[0] == cb._target_.rsplit(".", 1)[-1]]
            clocks.append((f"callbacks.{name}.budget_s", float(as_number(cb.budget_s)), (spent or [None])[0]))
    for key, limit, spent in clocks:
        if limit is not None and isinstance(spent, int | float) and spent >= limit:
            raise UserError(f"ckpt_path {cfg.ckpt_path} has trained {spent:.0f} s, and {key} allows {limit:.0f} s "
                            "in all: nothing is left to train; raise it to go on, or test it with train=false")


def _averages_weights(cfg: DictConfig) -> bool:
    """Whether one of the run's callbacks is a Lightning weight averaging (callbacks=ema's EMAWeights is one)."""
    from hydra.utils import get_class
    from pytorch_lightning.callbacks import WeightAveraging

    for cb in (cfg.get("callbacks") or {}).values():
        if not isinstance(cb, DictConfig) or not cb.get("_target_"):
            continue
        try:
            cls = get_class(cb._target_)
        except Exception:  # an unknown class: Hydra's own error names it when it is built
            continue
        if issubclass(cls, WeightAveraging):
            return True
    return False


def adopt_optimizer(cfg: DictConfig) -> None:
    """A resume restores the optimizer and its schedule from the checkpoint (Lightning), so a changed
    model.optimizer.lr or weight_decay never applied, yet the run recorded it (summary.json, W&B, compare's labels).
    Say so, and record the values that train."""
    opt = (cfg.get("model") or {}).get("optimizer")
    if not (cfg.get("ckpt_path") and cfg.get("train", True) and isinstance(opt, DictConfig)):
        return
    from bgremover import checkpoint

    groups = [g for s in checkpoint.read(cfg.ckpt_path).get("optimizer_states") or [] for g in s.get("param_groups", [])]
    if not groups:
        return
    saved = {"lr": groups[0].get("initial_lr", groups[0].get("lr")), "weight_decay": groups[0].get("weight_decay")}
    changed = {k: v for k, v in saved.items() if isinstance(v, int | float) and opt.get(k) is not None
               and not math.isclose(float(opt.get(k)), float(v), rel_tol=1e-6)}
    if not changed:
        return
    log.warning(
        "a resume goes on with the checkpoint's optimizer: %s (not this command's %s); to train with new values "
        "start a new run from its weights with ckpt_init=%s",
        ", ".join(f"model.optimizer.{k}={v:g}" for k, v in changed.items()),
        ", ".join(f"{opt.get(k)}" for k in changed), cfg.ckpt_path)
    with open_dict(cfg):
        for k, v in changed.items():
            cfg.model.optimizer[k] = float(v)


def adopt_seed(cfg: DictConfig) -> None:
    """A resume goes on with the seed its run trained with: its epochs' orders and augmentations are drawn from it,
    and a resume typed without the run's `seed=` (a hand-written ckpt_path=) drew the rest of the run from
    another one, recorded it, and named its W&B run by it. Say so, and train and record the run's."""
    if not (cfg.get("ckpt_path") and cfg.get("train", True)):
        return
    from bgremover import checkpoint

    saved = (checkpoint.read(cfg.ckpt_path).get("datamodule_hyper_parameters") or {}).get("seed")
    given = as_number(cfg.get("seed"))
    if not isinstance(saved, int) or isinstance(saved, bool) or saved == given:
        return
    log.warning("a resume goes on with its run's seed=%d (not this command's %s): the data of the epochs left are "
                "drawn from it; for another draw start a new run from its weights with ckpt_init=%s", saved, given,
                cfg.ckpt_path)
    with open_dict(cfg):
        cfg.seed = saved

