"""RunSummary: the callback that writes a run's `summary.json` (rank zero only) — what the comparison report,
the exporter and `make remover` read.

It watches the run (fit start/end, the test stage), then `write()` adds the CPU inference time of one padded
480×360 frame and the resolved config. Under DDP every rank runs the hooks; only rank zero times and writes, so a
run has one summary and one timing, not one per process.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only

from bgremover import utils
from bgremover.checkpoint import epochs_trained
from bgremover.lit.checkpoints import LastCheckpoint, best_checkpoint_callback

log = logging.getLogger("bgremover.train")

INFER_SHAPE = (1, 3, 384, 480)  # a padded 480×360 CamVid frame, the size the report quotes latency for
INFER_REPEATS = 3  # timed forward passes after one warm-up; the median is reported


class RunSummary(Callback):
    """Collects what a run did; `write(path, ...)` turns it into summary.json on rank zero."""

    def __init__(self) -> None:
        self.fit_seconds: float | None = None
        self.history: list[dict[str, float]] = []
        self.epochs: int | None = None
        self.best_ckpt: str | None = None
        self.last_ckpt: str | None = None
        self.global_step: int | None = None  # set for a test-only run: the checkpoint's (else the trainer's)
        self._t0: float | None = None
        self._resumed_s = 0.0  # fit seconds spent before the checkpoint this run resumed from

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.time()

    def _fit_s(self) -> float:
        return self._resumed_s + (0.0 if self._t0 is None else time.time() - self._t0)

    # In every checkpoint: a resumed run's wall_time_s counts its training from the start, not from the resume.
    def state_dict(self) -> dict[str, Any]:
        return {"fit_s": self._fit_s()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_s = float(state_dict.get("fit_s") or 0.0)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # read now: testing the best checkpoint afterwards brings back that epoch's history
        self.fit_seconds = None if self._t0 is None else self._fit_s()
        self.history = list(getattr(pl_module, "history", []))
        self.epochs = trainer.current_epoch
        self.best_ckpt = best_checkpoint(trainer)
        self.last_ckpt = last_checkpoint(trainer)

    def from_checkpoint(self, ckpt: dict[str, Any], path: str) -> None:
        """A test-only run (train=false ckpt_path=X) describes the training recorded in X."""
        self.history = list(ckpt.get("history", []))
        self.epochs = epochs_trained(ckpt, unfinished=True)  # as its run's summary counts them (on_fit_end)
        self.best_ckpt = path
        self.fit_seconds = ((ckpt.get("callbacks") or {}).get(type(self).__qualname__) or {}).get("fit_s")
        self.global_step = int(ckpt.get("global_step", 0))  # the trainer of a test-only run never stepped

    @rank_zero_only
    def write(self, path: Path, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float],
              extra: dict[str, Any], measure_inference: bool = True) -> dict[str, Any]:
        summary = self.record(trainer, pl_module, metrics, extra, measure_inference)
        utils.write_json_atomic(path, summary)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.summary.update({k: summary.get(k) for k in
                                                  ("params", "wall_time_s", "infer_ms_480x360")})
        log.info("summary: %s", path)
        return summary

    def record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float],
               extra: dict[str, Any], measure_inference: bool = True) -> dict[str, Any]:
        """The summary.json of a run that finished (or was stopped in its test stage: train.py marks that)."""
        return {
            "status": "ok",
            **extra,
            "epochs": self.epochs,
            "global_step": trainer.global_step if self.global_step is None else self.global_step,
            "wall_time_s": None if self.fit_seconds is None else round(self.fit_seconds, 2),
            "best_ckpt": self.best_ckpt,
            "last_ckpt": self.last_ckpt,
            "metrics": dict(sorted(metrics.items())),
            "history": utils.history_lists(self.history),
            "infer_ms_480x360": measure_inference_ms(pl_module.net) if measure_inference else None,
            "hardware": hardware(),
        }


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    """The best epoch's file: a ModelCheckpoint that watches a metric. Lightning's own (callbacks=none) keeps the
    newest epoch, which was recorded, tested and exported as the best (a user audit): that is last_checkpoint's."""
    cb = best_checkpoint_callback(trainer)
    path = cb.best_model_path if cb is not None and cb.monitor else ""
    return str(Path(path).resolve()) if path else None


def last_checkpoint(trainer: pl.Trainer) -> str | None:
    for cb in trainer.callbacks:
        if isinstance(cb, LastCheckpoint) and cb.path.exists():
            return str(cb.path.absolute())  # the link itself, not its target: it moves with every epoch
    cb = best_checkpoint_callback(trainer)  # Lightning's default one (no metric): the newest epoch's file
    path = (cb.last_model_path or cb.best_model_path) if cb is not None and not cb.monitor else ""
    return str(Path(path).resolve()) if path else None


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ×{torch.cuda.device_count()}"
    return f"CPU ×{torch.get_num_threads()} threads"


@torch.no_grad()
def measure_inference_ms(net: torch.nn.Module) -> float:
    """Median fp32 eval-mode forward time of one padded 480×360 frame on this machine's CPU — also after a GPU
    fit (the net is copied to the CPU): the report quotes what a CPU-only user of the exported model gets."""
    cpu_net = copy.deepcopy(net).float().cpu().eval().to(memory_format=torch.channels_last)
    x = torch.randn(INFER_SHAPE).contiguous(memory_format=torch.channels_last)
    cpu_net(x)
    times = []
    for _ in range(INFER_REPEATS):
        t = time.perf_counter()
        cpu_net(x)
        times.append((time.perf_counter() - t) * 1000)
    return round(sorted(times)[len(times) // 2], 2)
