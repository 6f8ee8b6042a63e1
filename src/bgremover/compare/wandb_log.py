"""The report's tables and charts as a W&B run of job type `compare`, in the sweep's group."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bgremover.compare.dataset import table_classes
from bgremover.compare.render import frames_cell
from bgremover.compare.runs import DEFAULT_WANDB_PROJECT, NetStats, Run, run_labels


def _wandb_project(runs: list[Run]) -> str:
    """$WANDB_PROJECT, else a `project` key under any wandb/logger section of the runs' config."""
    if os.environ.get("WANDB_PROJECT"):
        return os.environ["WANDB_PROJECT"]

    def walk(node: Any, inside: bool) -> str | None:
        if isinstance(node, dict):
            if inside and isinstance(node.get("project"), str):
                return node["project"]
            for k, v in node.items():
                found = walk(v, inside or "wandb" in str(k).lower() or "logger" in str(k).lower())
                if found:
                    return found
        return None

    for r in runs:
        found = walk(r.summary.get("config") or {}, False)
        if found:
            return found
    return DEFAULT_WANDB_PROJECT


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return "api.wandb.ai" in netrc.read_text() or bool(os.environ.get("WANDB_BASE_URL"))
    except OSError:
        return False


def log_wandb(report: Path, stats: list[NetStats], runs: list[Run], group: str) -> str:
    """Log tables and charts to W&B (an active run, else a new one in the sweep's group); returns a status line."""
    import wandb

    own = wandb.run is None
    if own:
        mode = os.environ.get("WANDB_MODE")
        if mode is None and not _wandb_has_key():
            mode = "offline"  # never stop at a login prompt; `wandb sync` can upload later
        run = wandb.init(
            project=_wandb_project(runs),
            group=group,
            job_type="compare",
            name=f"compare-{group}",
            mode=mode,
            # beside the report, as each job's run is beside its summary (not in whatever folder this ran from);
            # not inside it: a new report replaces that folder, and an offline run not yet synced with it
            dir=None if os.environ.get("WANDB_DIR") else str(report.parent),
            settings=wandb.Settings(silent=True),
        )
    else:
        run = wandb.run
    try:
        # test_frames: "4 of 233 (partial)" where the numbers cover part of the split (the tables said nothing)
        classes = table_classes(stats)  # the runs' own
        cols = ["net", "runs", "params_M", "test_mIoU_mean", "test_mIoU_std", "test_acc_mean", "test_acc_std",
                "test_frames", *(f"iou_{c}" for c in classes), "wall_time_s", "infer_ms_480x360"]  # fmt: skip
        data = []
        for s in stats:
            pm = None if s.params_m is None else s.params_m / 1e6
            ious = [s.class_iou[c].mean for c in classes]
            data.append([s.net, len(s.runs), pm, s.miou.mean, s.miou.std, s.acc.mean, s.acc.std,
                         frames_cell(s.runs), *ious, s.wall_s, s.infer_ms])  # fmt: skip
        run_cols = ["run_dir", "net", "seed", "status", "test_mIoU", "test_frames", "error"]
        label = run_labels(runs)  # as the report's per-run table names them
        run_data = [
            [str(r.dir), label.get(id(r), r.net), None if r.seed is None else str(r.seed),
             "ok" if r.ok else str(r.summary.get("status") or "failed"),
             r.metric("test/mIoU"), frames_cell([r]), "" if r.ok else r.error]
            for r in runs
        ]  # fmt: skip
        payload: dict[str, Any] = {
            "compare/nets": wandb.Table(columns=cols, data=data),
            "compare/runs": wandb.Table(columns=run_cols, data=run_data),
        }
        for name in ("val_miou", "class_iou", "grid"):
            if (report / f"{name}.png").is_file():
                payload[f"compare/{name}"] = wandb.Image(str(report / f"{name}.png"))
        run.log(payload)
        if stats:
            run.summary["compare/best_net"] = stats[0].net
            run.summary["compare/best_test_mIoU"] = stats[0].miou.mean
            # whole-split rows rank first (aggregate): "4 of 233 (partial)" here says no row was tested on all of it
            run.summary["compare/best_test_frames"] = frames_cell(stats[0].runs)
        where = getattr(run, "dir", "") or ""
    finally:
        if own:
            wandb.finish()
    return f"W&B: logged to run {run.id} (group {group!r}) {where}".rstrip()
