"""Hydra multirun sweeps: a job's one line when it ends, the sweep's summary at its end (every job with its status
and test mIoU, and exit 1 if any failed), and the W&B group that makes a sweep one group."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bgremover.config import SUMMARY_NAME, SWEEP_REPORT_NAME, overrides
from bgremover.errors import count
from bgremover.utils import frames_note, val_note, write_json_atomic


def sweep_group(cfg: DictConfig) -> str:
    """W&B group: the one logger.wandb.group names, else the experiment's name, plus the sweep folder in a multirun
    so that each sweep is one group. summary.json records it too, and `compare --wandb` logs beside it (a group
    set on the command line was recorded as the experiment's, and the comparison landed in another group)."""
    from hydra.core.hydra_config import HydraConfig

    named = OmegaConf.select(cfg, "logger.wandb.group")
    if named:
        return str(named)

    base = cfg.get("experiment_name") or cfg.get("task_name", "train")
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if str(hc.mode) == "RunMode.MULTIRUN":
            return f"{base}-{Path(hc.sweep.dir).name}"
    return str(base)


def print_job_line(cfg: DictConfig) -> None:
    """A sweep job's one line on stderr: its overrides, status and test mIoU with the frames it covers."""
    from hydra.core.hydra_config import HydraConfig

    num = HydraConfig.get().job.num if HydraConfig.initialized() else 0
    path = Path(cfg.paths.output_dir) / SUMMARY_NAME
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        s = {"status": "failed", "error": "no summary.json"}
    m = s.get("metrics") or {}
    what = " ".join(job_overrides()) or "defaults"
    line = f"[job {num}] {what}: {s.get('status')}"
    if m.get("test/mIoU") is not None:
        line += f" test/mIoU={m['test/mIoU']:.4f}" + frames_note(s.get("test_split")) + val_note(s.get("val_split"))
    if s.get("wall_time_s") is not None:
        line += f" in {s['wall_time_s']:.0f} s"
    if s.get("error"):
        line += f" — {s['error']}"
    print(line, file=sys.stderr, flush=True)


def job_overrides() -> list[str]:
    """What sets this sweep job apart: its overrides less those the command line gave every job as typed
    (`data.root=…`), a searched number cut to 4 significant digits. The line repeated all of them, with Optuna's
    lr=0.00024156772025296256."""
    import yaml

    from bgremover.compare.runs import short_number

    def parsed(override: str) -> tuple[str, Any]:
        key, _, value = override.partition("=")
        try:
            return key.lstrip("+~"), yaml.safe_load(value)  # Hydra writes the job's `false` back as False
        except yaml.YAMLError:
            return key.lstrip("+~"), value

    def unescaped(override: str) -> str:  # a job's overrides come back escaped: trainer.max_time=00\:00\:05\:00
        key, sep, value = override.partition("=")
        return key + sep + re.sub(r"\\(.)", r"\1", value)

    typed = [parsed(a) for a in sys.argv[1:] if "=" in a or a.startswith("~")]  # Hydra's `~key` is `~key=null`
    return [short_number(unescaped(o)) for o in overrides() if parsed(unescaped(o)) not in typed]


# --- the sweep report -------------------------------------------------------------------------------------------
class SweepReport(Callback):
    """Hydra callback: after a multirun, list every job with its status and exit 1 if any failed.

    Failed jobs do not stop the sweep (train.main returns NaN for them in multirun mode), so the others'
    results survive; this is where the failure is reported instead.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from bgremover import config as settings  # (`config` is the argument here)

        sweep_dir = Path(config.hydra.sweep.dir)  # config.drop_unstarted_sweep may remove what the sweep adds
        settings.SWEEP_DIR = (sweep_dir, not sweep_dir.exists())
        if not config.get("verbose") and "optuna" in str(config.hydra.sweeper.get("_target_")).lower():
            import optuna  # its INFO line "A new study created in memory…" broke the one line per job

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            # the sweeper's two lines per failed trial ("Failed experiment: Return value must be float-castable.
            # Got 'None'", "Failed [...] times out of 1 with max_failure_rate=0.0") read as the sweep stopping, and it
            # goes on: the job's own line says why it failed, the sweep's end lists it
            logging.getLogger("hydra_plugins.hydra_optuna_sweeper._impl").setLevel(logging.CRITICAL)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from bgremover.compare.runs import short_number

        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sorted((p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")), key=_job_number)
        rows = []
        for job in jobs:
            s = _job_record(job)
            metrics = s.get("metrics", {})
            rows.append(
                {
                    "job": job.name,
                    "status": s.get("status", "?"),
                    "net": s.get("net"),
                    "seed": s.get("seed"),
                    "overrides": read_overrides(job),
                    "val/mIoU_best": metrics.get("val/mIoU_best"),
                    "test/mIoU": metrics.get("test/mIoU"),
                    "test_split": s.get("test_split"),  # frames the number covers: a partial set says so
                    "val_split": s.get("val_split"),  # and those of the val numbers that picked the tested epoch
                    "error": s.get("error"),
                    **({"split": s["split"], f"{s['split']}/mIoU": metrics.get(f"{s['split']}/mIoU")}
                       if s.get("split") else {}),  # an evaluation's: the split it scored
                }
            )
        write_json_atomic(sweep_dir / SWEEP_REPORT_NAME, {"sweep_dir": str(sweep_dir), "jobs": rows})
        failed = [r for r in rows if r["status"] != "ok"]
        # the keys whose values differ between jobs: what the sweep varies, shown per job below
        swept = {o.split("=")[0] for r in rows for o in r["overrides"]
                 if any(o not in other["overrides"] for other in rows)}
        print(f"\nsweep {sweep_dir}: {len(rows) - len(failed)} of {len(rows)} jobs ok", file=sys.stderr)
        for r in rows:
            score = "" if r["test/mIoU"] is None else \
                f" test/mIoU={r['test/mIoU']:.4f}" + frames_note(r["test_split"]) + val_note(r["val_split"])
            if r.get("split") == "val" and r.get("val/mIoU") is not None:  # an evaluation of the val split
                score = f" val/mIoU={r['val/mIoU']:.4f}" + frames_note(r["val_split"])
            what = " ".join(short_number(o) for o in r["overrides"] if o.split("=")[0] in swept) or r["job"]
            line = f"  [{r['status']}] job {r['job']} ({what}){score}" + (f": {r['error']}" if r["error"] else "")
            print(line, file=sys.stderr)
        if failed:
            from bgremover.errors import report

            sys.exit(report(f"{count(len(failed), 'sweep job')} failed (see above); the others' results are kept"))


def _job_record(job: Path) -> dict[str, Any]:
    """A job's record: a training run's summary.json (a failed evaluation writes one too), else an evaluation's
    eval.json, which an eval sweep's jobs write instead (every one of them was listed as failed, "no summary.json",
    and the sweep exited 1)."""
    if (job / SUMMARY_NAME).is_file():
        return json.loads((job / SUMMARY_NAME).read_text())
    try:
        ev = json.loads((job / "eval.json").read_text())
    except (OSError, ValueError):
        return {"status": "failed", "error": f"no {SUMMARY_NAME} (the job crashed before writing one)"}
    split = ev.get("split") or "test"
    frames = ev.get("frames")
    return {"status": "ok", "net": ev.get("net"), "seed": (ev.get("config") or {}).get("seed"), "split": split,
            "metrics": ev.get("metrics") or {}, f"{split}_split": frames}


def planned_jobs(sweep_dir: Path) -> int | None:
    """How many jobs a grid sweep (Hydra's basic sweeper) planned, from the multirun.yaml Hydra writes at its start:
    a sweep stopped part-way (SIGTERM, a lost machine) left fewer job folders, and nothing said so. The count is the
    sweeper's own (its params, then the command line's overrides, expanded as it expands them). None for another
    sweeper (Optuna's trials are drawn as it goes) or a file that cannot be read."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        cfg = OmegaConf.load(Path(sweep_dir) / "multirun.yaml")
        sweeper = cfg.hydra.sweeper
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None
        params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        parsed = OverridesParser.create().parse_overrides(params + list(cfg.hydra.overrides.task))
        return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))
    except Exception:  # Hydra's private API or a hand-edited file: the count is a note, never an error
        return None


def read_overrides(job: Path) -> list[str]:
    """A job folder's overrides (its .hydra/overrides.yaml), [] when unreadable."""
    import yaml

    try:
        return list(yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or [])
    except (OSError, yaml.YAMLError):
        return []


def _job_number(path: Path) -> tuple[int, str]:
    head = path.name.split("_", 1)[0]
    return (int(head), path.name) if head.isdigit() else (1 << 30, path.name)
