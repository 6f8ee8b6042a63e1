"""Lightning's CSVLogger, keeping `csv/metrics.csv` across a resume in place.

Lightning's CSV writer deletes an existing metrics.csv when it starts ("Previous log files in this directory
will be deleted"): a run resumed in its own folder (`ckpt_path=<run>/checkpoints/last.ckpt
hydra.run.dir=<run>`) lost every row before the resume. Here the file is kept and the writer appends to it, its
header widened when new metrics appear (Lightning's own rewrite). A new run's folder has no such file: no change.
"""

from __future__ import annotations

import csv
import os
import warnings

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment


class ResumableCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = os.path.join(self.log_dir, "metrics.csv")
        kept = path + ".kept" if os.path.isfile(path) else None
        if kept:
            os.replace(path, kept)  # out of the writer's reach while it starts
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Previous log files in this directory will be deleted.*")
            writer = CSVLogger.experiment.fget(self)
        if kept:
            os.replace(kept, path)
            with open(path, newline="") as f:
                writer.metrics_keys = sorted(next(csv.reader(f), []))  # appended rows follow this header
        return writer
