"""`make remover DATA=folder [EXP=remover] [ARGS="..."]`: from your image/mask folder to a background remover.

    python -m bgremover.train_remover DATA [--exp remover] [--run-dir DIR] [hydra overrides ...]

Trains `experiments/<exp>.yaml` (default: DeepLabV3+/MobileNetV2 fine-tuned from the shipped CamVid net for a
30-minute budget, `remover_budget_s`) on DATA with `python -m bgremover.train` — its plan, time estimate and
progress bar show as it runs, and its config checks refuse a bad folder before training — then exports the best
epoch to `<run>/remover.onnx`, scores it on the held-out images as `make eval-cutout` does, and prints those
numbers and the commands that use the model. Exit status: the training's when it failed (its `error:` line says
why), 1 when the export or the scoring failed, 130/143 when Ctrl-C/SIGTERM stopped them (one line: the commands
that finish the run), else 0.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from bgremover import errors
from bgremover.config import (
    CONFIG_DIR,
    FINISH_ENV,
    RESUME_ENV,
    SUMMARY_NAME,
    given_overrides,
    quoted,
)
from bgremover.errors import OneLineParser, UserError, count
from bgremover.files import Terminated, raise_terminated, stop_of
from bgremover.run_dirs import taken_run_dir
from bgremover.utils import KEEP_MEMORY_ENV

# where the configs and models/ are (a checkout, or pip's share/bgremover): the recipe's ckpt_init is found from here
PROJECT_ROOT = Path(CONFIG_DIR).parent
MODEL_NAME = "remover.onnx"


def _fmt(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def _split_file(run: Path) -> Path | None:
    """The run's split.json: the held-out images of a pooled folder, and the void value of any (a fixed-split
    folder's masks holding it failed the scoring as "label beyond the class list" without it)."""
    path = run / "split.json"
    return path if path.is_file() else None


def _finished(run: Path) -> str | None:
    """The best checkpoint of a run whose training finished (summary.json "ok"), else None."""
    try:
        summary = json.loads((run / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(summary, dict) and summary.get("status") == "ok"
    return (summary.get("best_ckpt") or summary.get("last_ckpt")) if ok else None


def score_held_out(run: Path, data: Path, onnx_path: Path) -> dict | None:
    """The exported model on the held-out images, scored as the printed `make eval-cutout` command scores it
    (full resolution, through the predictor). The test stage's own numbers are at the training scale
    (data.image_size) and differ from these on larger images: printing those beside this command misled."""
    from bgremover import cutout_eval as ce

    pairs, read_label, classes = ce.find_folder_pairs(data, "test", None, _split_file(run))
    if not pairs:
        return None
    return ce.evaluate(ce.load_remover(onnx_path, expected=classes), pairs, read_label=read_label)


def report(run: Path, data: Path, onnx_path: Path, summary: dict, agreement: str, held: dict | None) -> str:
    """What the user needs after training: the held-out numbers, where the model is and how to use it."""
    from bgremover.lit.callbacks import _duration  # the run plan's format
    from bgremover.utils import frames_note

    cfg = summary.get("config", {})
    history = summary.get("history") or {}
    fg = [v for v in history.get("val/fg_iou", []) if v is not None and v == v]
    classes = (cfg.get("model") or {}).get("class_names") or []
    keep = (cfg.get("model") or {}).get("default_foreground") or []
    if held is None:
        scores = "held-out test set: no images (nothing to score)"
    else:
        c = held["cutout"]
        n = held["n_images"]
        scores = (f"held-out test set ({count(n, 'image')}, as `score it` below scores it): foreground "
                  f"IoU {_fmt(c['fg_iou'])}, boundary F {_fmt(c['boundary_f'])} ({held['boundary_tol']} px), "
                  f"alpha MAE {_fmt(c['mae'])}, mIoU {_fmt(held['mIoU'])}")
    lines = [
        f"remover: {onnx_path} ({summary.get('net')}, classes {', '.join(classes)}; keeps {', '.join(keep)}; "
        f"{agreement})",
        scores,
        f"training: {'?' if summary.get('wall_time_s') is None else _duration(summary['wall_time_s'])}, "
        f"{count(summary.get('epochs'), 'epoch')} "
        f"({summary.get('global_step')} steps), best val foreground IoU "
        f"{_fmt(max(fg) if fg else None)}{frames_note(summary.get('val_split')) if fg else ''}; run folder {run}",
        f"use it:   make predict IMG=photo.jpg MODEL={shlex.quote(str(onnx_path))}",
        f"score it: {score_command(run, data, onnx_path)}",
    ]
    return "\n".join(lines)


def score_command(run: Path, data: Path, onnx_path: Path) -> str:
    """`make eval-cutout` on the run's held-out images; paths quoted (a folder with a space broke it)."""
    split_file = _split_file(run) or run / "split.json"  # written as training starts
    # the model infers at its training scale (`image_size` in its metadata): no --max-side needed
    args = f"--data-root {shlex.quote(str(data))} --split-file {shlex.quote(str(split_file))}"
    return f"make eval-cutout MODEL={shlex.quote(str(onnx_path))} ARGS=\"{args}\""


def finish_command(run: Path, data: Path, best_ckpt: str = "{best_ckpt}") -> str:
    """What is left after the training of a run: its export, then its scoring."""
    ckpt = best_ckpt if best_ckpt == "{best_ckpt}" else shlex.quote(best_ckpt)
    return (f"make export CKPT={ckpt} OUT={shlex.quote(str(run / MODEL_NAME))} && "
            f"{score_command(run, data, run / MODEL_NAME)}")


def _taken_out(overrides: list[str], key: str) -> tuple[str | None, list[str]]:
    """The value `key=` (or `+key=`) has among the overrides (its last, as Hydra reads it), and the overrides
    without it: the command passes what it names its own way."""
    named = [o for o in overrides if o.lstrip("+").startswith(key + "=")]
    return (given_overrides(named)[key] if named else None), [o for o in overrides if o not in named]


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m bgremover.train_remover", description=__doc__.splitlines()[0])
    p.add_argument("data", help="your folder: images/ + masks/, or train|val|test/{images,masks}")
    p.add_argument("--exp", default="remover", help="experiment (experiments/<exp>.yaml, default remover)")
    p.add_argument("--run-dir", help="run folder (default ./logs/remover/runs/<date>_<time>)")
    p.add_argument("--no-keep-memory", action="store_true",
                   help="leave glibc's malloc defaults (make remover KEEP_MEMORY=), as make train KEEP_MEMORY= does")
    # default=[]: argparse marks a `*` positional without one required, and named it beside `data` in the usage error
    p.add_argument("overrides", nargs="*", default=[], help="Hydra overrides, e.g. remover_budget_s=600 ckpt_init=null")
    args = p.parse_intermixed_args(argv)  # options may come after the overrides
    data = Path(args.data).expanduser()
    from bgremover.data.folder import FolderDataError, layout

    try:
        layout(data)  # a file, a missing folder, a wrong layout: one line before anything starts
    except FolderDataError as e:
        return errors.report(e)
    data = data.resolve()
    # `hydra.run.dir=X` among the overrides, as `make train` takes it: the training went to X (Hydra's last value
    # wins) while the export and scoring read the default folder, so the whole budget ended in "No such file or
    # directory: .../summary.json" and no remover.onnx. It names the run folder, as --run-dir does.
    option = "--run-dir "
    typed, args.overrides = _taken_out(args.overrides, "hydra.run.dir")
    if typed is not None:
        if args.run_dir is not None:
            return errors.report(f"--run-dir {args.run_dir} and hydra.run.dir={typed} both name the run folder: "
                                 "give one", code=2)
        args.run_dir, option = os.path.expanduser(typed), "hydra.run.dir="
    # `data.root=B` among the overrides: the training read B (Hydra's last value wins) while the held-out scoring
    # read DATA, so the numbers printed were of another folder's images. Both name the folder, and DATA is the one
    # the command needs: the same folder typed twice is taken, two different ones refused
    typed, args.overrides = _taken_out(args.overrides, "data.root")
    if typed is not None and Path(typed).expanduser().resolve() != data:
        return errors.report(f"data.root={typed} and the folder {data} both name the data to train on: give "
                             "the folder once, as make remover DATA=path", code=2)
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    run = Path(args.run_dir or Path("logs") / "remover" / "runs" / stamp).resolve()
    if taken := taken_run_dir([f"hydra.run.dir={run}", *args.overrides]):  # in the words the command used
        return errors.report(taken.replace(f"hydra.run.dir={run}", f"{option}{run}"))
    cmd = [sys.executable, "-m", "bgremover.train", f"experiment={args.exp}", f"data.root={quoted(data)}",
           f"hydra.run.dir={quoted(run)}", "task_name=remover", *args.overrides]
    # the training process keeps freed memory for reuse (utils.KEEP_MEMORY_ENV) unless the caller set those itself
    # or turned it off (`make remover KEEP_MEMORY=`, which added them again before --no-keep-memory)
    env = {**({} if args.no_keep_memory else KEEP_MEMORY_ENV), **os.environ, "PROJECT_ROOT": os.environ.get("PROJECT_ROOT") or str(PROJECT_ROOT)}
    # interrupted, the training says how to go on: this command, in this run folder (then export and scores)
    kept = [shlex.quote(o) for o in args.overrides if not o.startswith("ckpt_path=")]
    env[RESUME_ENV] = (f"make remover DATA={shlex.quote(str(data))} EXP={shlex.quote(args.exp)} "
                       f"{'KEEP_MEMORY= ' if args.no_keep_memory else ''}"
                       f"ARGS=\"--run-dir {shlex.quote(str(run))} {' '.join([*kept, 'ckpt_path={ckpt_path}'])}\"")
    env[FINISH_ENV] = finish_command(run, data)  # interrupted in its test stage: the training is done
    # said first, while the training's config checks decode the folder (a bad file is their error line)
    print(f"remover: checking {data}, then training {args.exp} → {run}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env)
    # SIGTERM (a job scheduler, `kill`) reaches only this process: pass it on, so the training saves last.ckpt,
    # says how to resume and ends, instead of running on as an orphan
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    interrupted, rc = False, None
    while rc is None:
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # the training got the Ctrl-C too: it saves last.ckpt and says how to resume,
            interrupted = True  # the first where its step ends, a second at once (a traceback here, before)
    if interrupted:  # a Ctrl-C just after the training finished: it exited (254) without a word, as did this
        if best := _finished(run):
            return errors.report(f"interrupted after training finished; finish with: "
                                 f"{finish_command(run, data, best)}", code=130)
        return rc or 130
    if rc != 0:
        return rc
    # the training is over: passed on to it, a SIGTERM was ignored and the export and scoring went on (exit 0)
    signal.signal(signal.SIGTERM, raise_terminated)  # it stops the export or the scoring as Ctrl-C does
    best = None
    try:
        summary = json.loads((run / SUMMARY_NAME).read_text())
        best = summary.get("best_ckpt") or summary.get("last_ckpt")
        if not best:
            raise UserError(f"the run wrote no checkpoint: {run / SUMMARY_NAME}")
        from bgremover.export import export_onnx, load_checkpoint_net

        net, meta = load_checkpoint_net(best)
        result = export_onnx(net, meta, run / MODEL_NAME)  # written whole or not at all
        held = score_held_out(run, data, result["path"])
    except (UserError, OSError, ValueError) as e:
        return errors.report(e)
    except (KeyboardInterrupt, Terminated) as e:  # was a bare traceback, with nothing said of the finished training
        how, code = stop_of(e)
        return errors.report(f"{how} after training finished; finish with: {finish_command(run, data, best)}"
                             if best else f"{how} before the run's summary was read", code=code)
    print(report(run, data, result["path"], summary, result["agreement"], held))
    return 0


if __name__ == "__main__":
    sys.exit(main())
