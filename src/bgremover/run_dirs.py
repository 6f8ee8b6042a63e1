"""Run folders a command must not write into, and a resume in place's record kept and put back.

`hydra.run.dir=X` (or a sweep's `hydra.sweep.dir=X`) that already holds a run, an evaluation, a sweep, or a run that
was killed before its summary: refused in one line before Hydra writes anything (config.hydra_command_line), unless
the command resumes that run in place. A resume in place that is refused before it trains gets the run's own
summary, config and logs back (task.run_task). And the run a checkpoint (or a model exported into its folder)
belongs to: its summary.json and split.json, and the data it trained on, read without torch (the config checks).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bgremover.config import SUMMARY_NAME, SWEEP_REPORT_NAME, given_overrides, sweeps


def _resumed_in_place(given: dict[str, str]) -> Path | None:
    """hydra.run.dir when the command's ckpt_path lies inside it: a resume of that run in its own folder."""
    run_dir, ckpt = given.get("hydra.run.dir"), given.get("ckpt_path")
    return Path(run_dir) if run_dir and ckpt and Path(run_dir).resolve() in Path(ckpt).resolve().parents else None


_RECORDS = (SUMMARY_NAME, "eval.json", SWEEP_REPORT_NAME, "multirun.yaml")  # what marks a run's or a sweep's folder


def _is_record(path: Path) -> bool:
    """A multirun.yaml alone is a sweep that never started a job (refused at its start): nothing to overwrite."""
    return path.name != "multirun.yaml" or any(p.name != "multirun.yaml" for p in path.parent.iterdir())


def _first_record(where: Path) -> Path | None:
    """A run's or sweep's record anywhere below `where`: one walk that stops at the first (a glob per name walked a
    large folder four times, ~1.4 s), not into checkpoints/ or wandb/, which hold none and many files."""
    for root, dirs, files in os.walk(where):
        found = next((Path(root) / n for n in _RECORDS if n in files and _is_record(Path(root) / n)), None)
        if found is not None:
            return found
        dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "wandb"))
    return None


def taken_run_dir(args: list[str], resumes: bool = True) -> str | None:
    """`hydra.run.dir=X` where X already holds a run (or an evaluation): Hydra would overwrite its .hydra config
    and log, training its summary and last.ckpt, leaving the old best checkpoint beside the new run's. Refused
    before Hydra writes anything, unless the command resumes that run in place (ckpt_path inside X; `resumes`:
    a training — an evaluation never resumes, and replaced the training's .hydra record). A sweep
    (`-m hydra.sweep.dir=X`) into a folder holding an earlier sweep's jobs: job N overwrote the earlier job N's
    results and the earlier jobs were counted into the new sweep's report."""
    given = given_overrides(args)
    if sweeps(args):
        sweep_dir = given.get("hydra.sweep.dir")
        if not sweep_dir:
            return None
        where = Path(sweep_dir).resolve()
        # inside a run or a sweep's job (a new sweep nested in job 0 became a run "0/0" of that sweep), or above
        # earlier sweeps (logs/train/multiruns itself: every sweep under it went into one report)
        owner = next((p for p in where.parents if any((p / n).is_file() and _is_record(p / n) for n in _RECORDS)),
                     None)
        if owner is not None:
            return (f"hydra.sweep.dir={sweep_dir} lies inside the run or sweep {owner}: its jobs would be counted "
                    "into that one; choose a new folder")
        held = _first_record(where) if where.is_dir() else None
        if held is not None:
            return (f"hydra.sweep.dir={sweep_dir} already holds a sweep or run ({held.relative_to(where)}): its "
                    "results would be overwritten or counted into this one; choose a new folder")
        return None
    run_dir = given.get("hydra.run.dir")
    if run_dir and any(_is_record(Path(run_dir) / n) for n in (SWEEP_REPORT_NAME, "multirun.yaml")
                       if (Path(run_dir) / n).is_file()):
        # a single run at a sweep's root: the sweep's report then counted it among its jobs (a user audit)
        return (f"hydra.run.dir={run_dir} holds a sweep: a run there would be counted among its jobs; choose a new "
                "folder")
    if not run_dir:
        return None
    finished = any((Path(run_dir) / name).is_file() for name in (SUMMARY_NAME, "eval.json"))
    if not finished and not _unfinished_run(Path(run_dir)):
        return None
    if resumes and _resumed_in_place(given):
        return None
    # an evaluation never resumes; nor does a run stopped before its first checkpoint (Ctrl-C in its first
    # seconds): told to resume it with ckpt_path=.../last.ckpt, the user got "checkpoint not found"
    can_resume = resumes and (Path(run_dir) / "checkpoints" / "last.ckpt").exists()
    held = ("already holds a run: its config, log and results would be overwritten" if finished else
            f"holds a run that wrote no {SUMMARY_NAME} (killed, or still running): its config, log and last.ckpt "
            "would be overwritten")
    return (f"hydra.run.dir={run_dir} {held}; "
            "choose a new folder" + (" (or resume it in place with ckpt_path=<that run>/checkpoints/last.ckpt)"
                                     if can_resume else " (it holds no checkpoint to resume from)" if resumes else ""))


# Lightning's DDP launcher runs the command line again for ranks 1..N-1, into rank zero's folder (LOCAL_RANK set);
# torchrun and multi-node launches start every rank with these: the folder rank zero has just begun is theirs too
_RANK_ENV = ("LOCAL_RANK", "RANK", "NODE_RANK", "GROUP_RANK")


def _unfinished_run(folder: Path) -> bool:
    """A run began in `folder` and wrote no summary.json: killed (SIGKILL, the out-of-memory killer) or still
    running. Hydra's record of its start or a checkpoint marks it (a refused command leaves neither behind). A new
    run there replaced its last.ckpt, the killed run's one way to go on, and two running runs wrote one folder."""
    if any(os.environ.get(name, "0") != "0" for name in _RANK_ENV):
        return False
    return (folder / ".hydra" / "hydra.yaml").is_file() or any((folder / "checkpoints").glob("*.ckpt"))


# A resume in place: the run's record as it was before Hydra and the run rewrote it (files: their bytes; logs:
# their length; the checkpoints folder: its listing, to tell whether the resume trained), put back by
# restore_run_record when the resume is refused before training (a spent budget, another net, a bad value)
_KEPT: dict[str, Any] = {}


def keep_run_record(args: list[str]) -> None:
    """Before Hydra writes into a run folder that a command resumes in place: its summary.json and .hydra files
    as they are, and how long its logs are."""
    run = _resumed_in_place(given_overrides(args))
    if run is None or not (run / SUMMARY_NAME).is_file():
        return
    _KEPT.update(
        files={p: p.read_bytes() for p in (run / SUMMARY_NAME, *(run / ".hydra").glob("*.yaml"))},
        logs={p: p.stat().st_size for p in run.glob("*.log")},
        checkpoints=(run / "checkpoints", _listing(run / "checkpoints")),
    )


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and times of a folder's files: whether a run wrote checkpoints since."""
    return [(p.name, p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(folder.iterdir())] \
        if folder.is_dir() else []


def restore_run_record() -> bool:
    """Put a refused in-place resume's run folder back as it was (its summary, config and logs): the refusal
    replaced a finished run's summary with a `failed` stub and its .hydra record with the refused command."""
    if not _KEPT or _listing(_KEPT["checkpoints"][0]) != _KEPT["checkpoints"][1]:
        return False  # nothing kept, or the resume trained: its record is the run's now
    from bgremover.utils import write_bytes_atomic

    for path, data in _KEPT["files"].items():
        write_bytes_atomic(path, data)
    for path, size in _KEPT["logs"].items():
        if path.is_file() and path.stat().st_size > size:
            os.truncate(path, size)  # the refusal's traceback, appended
    return True


def run_file(path: str | os.PathLike, name: str) -> Path | None:
    """The file `name` (summary.json, split.json) of the run a checkpoint belongs to: beside it (a copied-out
    best.ckpt) or one folder up (run/checkpoints/epoch_N.ckpt); None for a checkpoint outside any run. Here, not in
    bgremover.checkpoint, because the config checks look before torch is imported."""
    ckpt = Path(path).resolve()
    return next((d / name for d in (ckpt.parent, ckpt.parent.parent) if (d / name).is_file()), None)


def run_summary(path: str | os.PathLike) -> Path | None:
    """The summary.json of the run a checkpoint belongs to."""
    return run_file(path, SUMMARY_NAME)


def run_data(path: str | os.PathLike) -> dict[str, Any]:
    """The data config the checkpoint's run trained on (its summary.json's), {} where nothing says."""
    import json

    summary = run_summary(path)
    try:
        data = (json.loads(summary.read_text()).get("config") or {}).get("data") if summary else None
    except (OSError, ValueError, AttributeError):
        data = None
    return data if isinstance(data, dict) else {}


def folder_root(data: dict[str, Any]) -> str | None:
    """The image/mask folder a run's data config trained on (data=folder, make remover's), None for CamVid: the one
    test of "a folder run" that the checks, eval-cutout and compare share."""
    if str(data.get("_target_", "")).endswith("FolderDataModule") and data.get("root"):
        return str(data["root"])
    return None


def own_folder(path: str | os.PathLike | None) -> str | None:
    """'its own folder, ARGS="data=folder data.root=<it>"' for a checkpoint of a run trained on an image/mask
    folder (make remover's), else None: what a command testing it on CamVid's config is told to give instead. The
    folder is quoted for the shell (the command quotes it for Hydra): `data.root=/x/My Photos` made `Photos` a word
    of its own, Hydra's "Error parsing override 'Photos'"."""
    import shlex

    root = folder_root(run_data(path)) if path and Path(str(path)).is_file() else None
    return f'its own folder, ARGS="data=folder data.root={shlex.quote(root)}"' if root else None
