"""Lightning's CSVLogger, keeping `csv/metrics.csv` across a resume in place.

Lightning's CSV writer deletes an existing metrics.csv when it starts ("Previous log files in this directory
will be deleted"): a run resumed in its own folder (`ckpt_path=<run>/checkpoints/last.ckpt
hydra.run.dir=<run>`) lost every row before the resume. When resuming (`resume_from`, the run's ckpt_path) the
rows up to the checkpoint's step are kept — later ones came from training the checkpoint does not hold (an older
checkpoint, a hard kill after the last save) and are trained again — and the writer appends after them, its
header widened when new metrics appear (Lightning's own rewrite). Not resuming: Lightning's behaviour.
"""

from __future__ import annotations

import csv
import os
import warnings

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment


class ResumableCSVLogger(CSVLogger):
    def __init__(self, *args, resume_from: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_from = resume_from

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = os.path.join(self.log_dir, "metrics.csv")
        kept = _rows_before(path, self.resume_from) if self.resume_from and os.path.isfile(path) else None
        with warnings.catch_warnings():
            if kept is not None:  # rewritten below, after the writer has started: nothing of it is lost
                os.remove(path)
                warnings.filterwarnings("ignore", message=".*Previous log files in this directory will be deleted.*")
            writer = CSVLogger.experiment.fget(self)
        if kept is not None:
            header, rows = kept
            with open(path, "w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=header)
                out.writeheader()
                out.writerows(rows)
            writer.metrics_keys = list(header)  # appended rows follow this header (widened as metrics appear)
        return writer


def _rows_before(path: str, ckpt_path: str) -> tuple[list[str], list[dict]] | None:
    """(header, the rows logged up to the checkpoint's global step); None when either cannot be read."""
    import torch

    try:
        step = int(torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except Exception:  # an unreadable checkpoint fails the resume itself, with its own message
        return None
    # the earlier test stage's row goes too: logged at the checkpoint's step it stayed beside the new one, and
    # went stale when the best epoch changed
    return header, [r for r in rows if (not r.get("step") or float(r["step"]) <= step)
                    and not any(k.startswith("test/") and v for k, v in r.items())]
