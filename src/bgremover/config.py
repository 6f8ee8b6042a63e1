"""Where the Hydra configs live, and the command line's guards: overrides read and rewritten (`X=null`, paths
relative to the launch folder), a run folder already taken refused and a resume in place kept (`run_dirs.py`).

The checks of the composed config (bad values refused in one line before anything is built) are `checks.py`.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

SUMMARY_NAME = "summary.json"  # per run: train.py writes it; the report, the exporter and sweeps read it
SWEEP_REPORT_NAME = "sweep_summary.json"  # per multirun: every job with its status


# A wrapper that starts a training (train_remover) sets it to the command that resumes the run in place, with
# "{ckpt_path}" where the checkpoint goes: `make train ARGS=...` would start a new run and skip the wrapper's work.
RESUME_ENV = "BGREMOVER_RESUME_COMMAND"
# ...and to the command that finishes a run whose training is done (interrupted in its test stage), with
# "{best_ckpt}" where the best checkpoint goes: make remover's export and scoring
FINISH_ENV = "BGREMOVER_FINISH_COMMAND"


def find_config_dir() -> Path:
    """$PROJECT_ROOT/conf, else the checkout's conf/ (editable install: any working directory), else the copy
    `pip install .` puts in <prefix>/share/bgremover/conf."""
    if os.environ.get("PROJECT_ROOT"):
        return Path(os.environ["PROJECT_ROOT"]) / "conf"
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "train.yaml").is_file():
        return checkout
    return Path(sys.prefix) / "share" / "bgremover" / "conf"


CONFIG_DIR = str(find_config_dir())


def require_config_dir() -> None:
    """One line instead of Hydra's "Primary config directory not found" when no configs can be found."""
    if not (Path(CONFIG_DIR) / "train.yaml").is_file():
        from bgremover.errors import report

        sys.exit(report(f"no configs at {CONFIG_DIR}: run from a bgremover checkout (pip install -e .) or set "
                        "PROJECT_ROOT to one"))


def hydra_command_line(resumes: bool = True, task: str = "train") -> None:
    """What a Hydra entry point (train, eval) does first: refuse a missing config directory, and have Hydra's own
    errors (an unknown key or option in an override, bad override syntax) print as one `error:` line with exit
    status 2, as argparse does, instead of Hydra's several lines and its HYDRA_FULL_ERROR hint.
    ``HYDRA_FULL_ERROR=1`` still gives Hydra's full report."""
    require_config_dir()
    multirun = sweeps(sys.argv[1:])
    defaults = OmegaConf.load(Path(CONFIG_DIR) / f"{task}.yaml").get("defaults") or []  # eval has no model group
    required = set(REQUIRED_GROUPS) & {next(iter(d)) if isinstance(d, DictConfig) else d for d in defaults}
    if needed := next((a for a in sys.argv[1:] if _drop_group(a).startswith("~")
                       and _drop_group(a).lstrip("~") in required), None):
        from bgremover.errors import report

        group = _drop_group(needed).lstrip("~")
        options = ", ".join(sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml")))
        sys.exit(report(f"{needed}: {task} cannot run without a {group} config; choose one of: {options}", code=2))
    sys.argv[1:] = [path_override(_drop_group(a), multirun) for a in sys.argv[1:]]
    from bgremover.run_dirs import keep_run_record, taken_run_dir

    if refused := taken_run_dir(sys.argv[1:], resumes) or missing_launcher(sys.argv[1:]):
        from bgremover.errors import report

        sys.exit(report(refused, code=2))
    if resumes:
        keep_run_record(sys.argv[1:])
    _note_absent_folders(sys.argv[1:], task)
    from hydra._internal import utils as hydra_utils  # Hydra reports through this module-level function
    from hydra.errors import CompactHydraException

    original = getattr(hydra_utils, "run_and_report", None)
    if original is None or getattr(original, "one_line", False):
        return

    def run_and_report(func):
        try:
            return func()
        except CompactHydraException as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            from bgremover.errors import report

            drop_unstarted_sweep()
            sys.exit(report(_hydra_message(exc), code=2))
        except Exception as exc:  # anything else: Hydra's own report
            if isinstance(exc, ValueError) and str(exc) == "No trials are completed yet.":  # Optuna's best_trial
                from bgremover.errors import report

                sys.exit(report("no Optuna trial finished: every job failed (the [job] lines above say why)"))
            return original(functools.partial(_reraise, exc))

    run_and_report.one_line = True
    hydra_utils.run_and_report = run_and_report


# folders where this command's run folder goes that did not exist when it started: what Hydra made for it, all a
# refused run may remove (an empty `mine/sub` above `hydra.run.dir=mine/sub/run1` was removed with the run)
ABSENT_AT_START: set[Path] = set()
RUN_DIR_GIVEN = False  # hydra.run.dir on the command line (else a fresh timestamped folder)


def _note_absent_folders(args: list[str], task: str) -> None:
    global RUN_DIR_GIVEN
    given = given_overrides(args)
    RUN_DIR_GIVEN = "hydra.run.dir" in given
    root = Path(given.get("paths.root_dir") or os.environ.get("PROJECT_ROOT") or ".")
    runs = Path(given.get("paths.log_dir") or root / "logs") / given.get("task_name", task) / "runs"
    for folder in (runs / "_", Path(given.get("hydra.run.dir") or runs) / "_"):  # "_": the run folder's place
        if "${" in str(folder):  # an interpolation: not known before Hydra resolves it, so never removed
            continue
        for parent in folder.expanduser().resolve().parents:
            if parent.exists():
                break
            ABSENT_AT_START.add(parent)


def made_by_this_command(folder: Path) -> bool:
    """Whether `folder` did not exist when the command started (a timestamped default run folder never did)."""
    return folder.resolve() in ABSENT_AT_START or not RUN_DIR_GIVEN


# this command's sweep folder, and whether the sweep made it (sweep.SweepReport.on_multirun_start)
SWEEP_DIR: tuple[Path, bool] | None = None


def drop_unstarted_sweep() -> None:
    """A sweep refused before its first job (`model=tiramisu65,tiramisu56`: no such model) left its folder with
    only multirun.yaml, which `make compare` then took for the newest sweep and refused: the file goes, and the
    folder too when the sweep made it."""
    if SWEEP_DIR is None:
        return
    folder, made = SWEEP_DIR
    if folder.is_dir() and [p.name for p in folder.iterdir()] == ["multirun.yaml"]:
        (folder / "multirun.yaml").unlink(missing_ok=True)
        if made:
            folder.rmdir()


# groups a run cannot do without: switched off (`model=null`, `~trainer`) they failed after the build on a missing
# key, or in Hydra's own traceback (`paths=null`)
REQUIRED_GROUPS = ("data", "model", "trainer", "paths")


def _drop_group(arg: str) -> str:
    """`logger=null` (how the lightning-hydra-template's configs switch a group off) as Hydra's `~logger`: Hydra
    itself only takes the delete form on the command line and answered `logger=null` with a bare ValueError
    traceback. Only for names of config groups: `ckpt_path=null` stays a value."""
    key, sep, value = arg.partition("=")
    if sep and value in ("null", "None") and key.isidentifier() and (Path(CONFIG_DIR) / key).is_dir():
        return f"~{key}"
    return arg


# overrides whose value is a file or folder: typed (or printed in a resume line) as the shell gives them
PATH_KEYS = frozenset({"ckpt_path", "ckpt_init", "data.root", "data.split_file", "hydra.run.dir", "hydra.sweep.dir",
                       "paths.log_dir", "paths.root_dir"})


def paths_from_launch_dir(cfg: DictConfig) -> None:
    """With `hydra.job.chdir=true` Hydra runs the task inside its run folder, and a relative data.root (the default
    data/CamVid, `DATA_DIR=../shared/CamVid`) or ckpt_path was looked for there: "dataset folder not found" for a
    folder that is there. They are read from the folder the command started in, as with chdir off (Hydra's own
    advice: hydra.utils.to_absolute_path)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or not HydraConfig.get().job.get("chdir"):
        return
    # the path settings the task reads (hydra.* and paths.* made the run folder before the chdir)
    for key in sorted(k for k in PATH_KEYS if not k.startswith(("hydra.", "paths."))):
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            OmegaConf.update(cfg, key, str(Path(HydraConfig.get().runtime.cwd) / value), merge=False)


def path_override(arg: str, multirun: bool = False) -> str:
    """`ckpt_path=/runs/poolé/epoch=3-step=10.ckpt`, `data.root=~/CamVid`, `ckpt_path=/runs/v1,v2/last.ckpt`: a path
    Hydra's grammar refuses (non-ASCII letters, `=` as in Lightning's checkpoint names, `~`, brackets) or splits
    (`,`: a sweep) quoted for Hydra, `~` expanded as the shell expands a word; each was a grammar error ("add
    --multirun" for the comma). In a multirun, `ckpt_path=a.ckpt,b.ckpt` (the whole is no path) stays a sweep."""
    key, sep, value = arg.partition("=")
    if not sep or key.lstrip("+") not in PATH_KEYS or not value or value[0] in "'\"":
        return arg
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = os.path.expanduser(value)
    try:
        sweep = OverridesParser.create().parse_override(arg).is_sweep_override()
    except Exception:  # noqa: BLE001 — Hydra's grammar errors: quoted, the path is read as typed
        sweep = None
    if path == value and (sweep is False or (sweep and multirun and not Path(value).exists())):
        return arg  # Hydra reads it as typed, or it is a sweep
    return f"{key}={quoted(path)}"


def sweeps(args: list[str]) -> bool:
    """-m, or a setting that makes the command a sweep without it: hparams_search=optuna sets hydra.mode=MULTIRUN,
    and such a sweep into an earlier sweep's folder (hydra.sweep.dir=) overwrote its job 0 and took in the rest."""
    given = given_overrides(args)
    search = Path(CONFIG_DIR) / "hparams_search" / f"{given.get('hparams_search')}.yaml"
    return (any(a in ("-m", "--multirun") for a in args) or given.get("hydra.mode") == "MULTIRUN"
            or (search.is_file() and OmegaConf.select(OmegaConf.load(search), "hydra.mode") == "MULTIRUN"))


def given_overrides(args: list[str]) -> dict[str, str]:
    """key=value overrides of a command line (`+key=value` as key), a quoted value (`quoted`) as Hydra reads it;
    a key given twice has its last value, as in Hydra."""
    pairs = (a.lstrip("+").split("=", 1) for a in args if "=" in a and not a.startswith("~"))
    return {key: _unquoted(value) for key, value in pairs}


def _unquoted(value: str) -> str:
    """A quoted override value as Hydra reads it: backslashes before a quote or the end halved (`quoted`'s inverse)."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return re.sub(r"(\\*)(" + value[0] + "|$)", lambda m: m[1][: len(m[1]) // 2] + m[2], value[1:-1])
    return value


def missing_launcher(args: list[str]) -> str | None:
    """A sweep through `hydra/launcher=slurm` (the README's SLURM command) where SLURM's `srun` is not at hand: submitit
    said so in a traceback after the sweep folder was made, and that folder, holding only multirun.yaml, was then
    the newest sweep `make compare` refused. Said before Hydra writes anything."""
    import shutil

    if not sweeps(args) or given_overrides(args).get("hydra/launcher") != "slurm" or shutil.which("srun"):
        return None
    return ("hydra/launcher=slurm hands each job to SLURM, and this machine has no srun on its PATH: run the sweep "
            "on a SLURM cluster's login node, or without hydra/launcher=slurm to run its jobs here one after another")


def _reraise(exc: BaseException):
    raise exc


def _hydra_message(exc: BaseException) -> str:
    """Hydra's multi-line message as one line: its sentences, the cause's first line, and any list of options."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    options: list[str] = []
    at = next((i for i, line in enumerate(lines) if line.startswith("Available options")), None)
    if at is not None:  # the options run until the next "...:" heading (Hydra's config search path)
        options = lines[at + 1 :]
        options = options[: next((i for i, o in enumerate(options) if o.endswith(":")), len(options))]
        lines = lines[:at]
    near = _near_key(exc.__cause__)
    if near:  # Hydra's advice for a misspelt key, `+remover_budget=600`, added a key nothing reads: the run then
        # trained the recipe's 30 minutes without a word (and `+trainer.max_epoch=2` failed later, in other words)
        lines = [line for line in lines if not line.startswith("To append to your config use")]
        lines.append(f"Did you mean {near}?")
    text = " ".join(lines) or type(exc).__name__
    override = getattr(exc, "override", None)  # OverrideParseException: name what was typed
    if isinstance(override, str) and override and override not in text:
        text = f"bad override {override!r}: {text}"
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        first = " ".join(str(cause).strip().splitlines()[0].split())
        if first not in text:
            text += f" ({first})"
    if options:
        text += f"; options: {', '.join(options)}"
    return text


def _near_key(cause: BaseException | None) -> str | None:
    """For OmegaConf's "Key 'remover_budget' is not in struct": the key of that node it is a typo of
    ('remover_budget_s'), with its node's path, or None."""
    node, key, full = (getattr(cause, name, None) for name in ("parent_node", "key", "full_key"))
    if not isinstance(key, str) or not isinstance(full, str) or not isinstance(node, DictConfig):
        return None
    close = close_key(key, node.keys())
    return f"'{full.removesuffix(key)}{close}'" if close else None


def close_key(key: str, keys) -> str | None:
    """The one of `keys` that `key` is a typo of, or None: the measure both typo answers use (a key Hydra refuses,
    a key added with `+` that nothing reads)."""
    import difflib

    close = difflib.get_close_matches(key, [k for k in keys if isinstance(k, str) and k != key], n=1, cutoff=0.75)
    return close[0] if close else None


def overrides() -> list[str]:
    """The command line's overrides of this job (a multirun job's own values); none outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def quoted(value: object) -> str:
    """A value for a Hydra override built from a path: quoted, so `,` (a sweep), `=`, brackets and non-ASCII
    letters in a folder's name are taken as they are (`data.root=/data/poolé` was a grammar error)."""
    # Hydra's escapes in a quoted value: a backslash run before a quote or the end doubled, each quote escaped
    return "'" + re.sub(r"(\\+)(?='|$)", lambda m: m[1] * 2, str(value)).replace("'", "\\'") + "'"


def given(key: str) -> bool:
    """Whether the command line sets `key` (`key=`, `+key=`, `++key=`, a group's `trainer=`): the user's choice,
    which the adjustments a run makes by itself leave alone."""
    return any(o.lstrip("+").split("=", 1)[0] == key for o in overrides())


