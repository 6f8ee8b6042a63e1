"""Turn a sweep's training runs (one `summary.json` each) into a report folder a person would rather look at.

`python -m bgremover.compare [PATH ...] [--out DIR] [--wandb] [--data-root DIR] [--grid-images N]`

The report (`<sweep>/report/` by default) holds `report.md`, the same content as a self-contained
`report.html`, and PNG charts: `val_miou.png` (learning curves), `class_iou.png` (per-class IoU bars) and
`grid.png` (the same test images through every net, with the background-remover cut-outs). The test split and the
classes are the runs' own (CamVid's, or a data=folder run's folder's: compare/dataset).
Failed runs are listed and left out of the statistics. The folder is built under a temporary name and
renamed into place, so a crash never leaves a half report.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bgremover import errors
from bgremover.compare import grid, plots
from bgremover.compare.dataset import folders, foreground_of, on_camvid, shared_classes, test_set
from bgremover.compare.render import (
    DASH,
    Block,
    _rel,
    class_table,
    main_table,
    partial_note,
    pct,
    render_html,
    render_md,
    run_table,
    val_note,
)
from bgremover.compare.runs import (
    DEFAULT_GRID_IMAGES,
    MULTIRUNS_DIR,
    PAPER_CITE,
    REPORT_DIRNAME,
    CompareError,
    NetStats,
    Run,
    aggregate,
    find_runs,
    mixed_test_sets,
    newest_sweep,
    search_picks,
    short_number,
)
from bgremover.compare.wandb_log import log_wandb
from bgremover.config import SUMMARY_NAME

PROG = "python -m bgremover.compare"  # the command as run: its usage line and every error line


@dataclass
class Report:
    path: Path
    main_md: str  # the main table in Markdown, for stdout
    warnings: list[str]
    stats: list[NetStats]
    runs: list[Run]



def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished tmp folder to `out`, replacing an older report; the old one is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _stopped(runs: list[Run]) -> str:
    """'2 failed' or '1 failed, 1 interrupted' (Ctrl-C or SIGTERM: resumable, not a crash)."""
    interrupted = sum(r.summary.get("status") == "interrupted" for r in runs)
    return f"{len(runs) - interrupted} failed" + (f", {interrupted} interrupted" if interrupted else "")


def _check_out(out: Path, runs: list[Run]) -> None:
    """`--out` may be new, empty, or an earlier report (it is replaced whole): never a folder of other files, a run,
    or a folder holding the runs being reported on (it was renamed aside and deleted, runs and all)."""
    errors.check_writable(out, "--out", folder=True)  # a file in its place, or a folder we cannot write in
    resolved = out.resolve()
    for run in runs:
        if resolved == run.dir.resolve() or resolved in run.dir.resolve().parents:
            raise CompareError(f"--out {out} holds the run {run.dir} it would report on: choose another folder")
    if out.is_dir() and any(out.iterdir()):
        if not _is_our_report(out / "report.md") or any(out.rglob(SUMMARY_NAME)):
            raise CompareError(f"--out {out} is a folder that is not an earlier report (no report.md written by this "
                               "command, or runs in it): its files would be replaced; choose a new or empty folder")


def _never_started(paths: list[Path], runs: list[Run]) -> str:
    """' Sweep X planned 3 jobs: 1 never started.' for each grid sweep that was stopped before all its jobs ran."""
    from bgremover.sweep import planned_jobs

    notes = []
    for p in paths:
        if p.is_dir() and (planned := planned_jobs(p)) is not None:
            found = sum(1 for r in runs if p.resolve() in r.dir.resolve().parents)
            if found < planned:
                notes.append(f" Sweep {p} planned {planned} jobs: {planned - found} never started (it was stopped "
                             "before them).")
    return "".join(notes)


def _is_our_report(path: Path) -> bool:
    """A report.md this command wrote (its title line): a folder of one's own that holds a report.md of its own
    among other files was taken for an earlier report and replaced whole, the other files deleted (a user audit)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(REPORT_TITLES)
    except OSError:
        return False


REPORT_TITLES = ("# Sweep report: ", "# Report: ")  # the first line of every report.md (build_report's titles)
NONE_FINISHED = "No run finished: nothing to compare (the failed or interrupted runs are listed at the end)."


def _repeats(runs: list) -> bool:
    """Two runs of one recipe with the same seeds (the run's, and the data's split seed): one training twice.
    Runs that record no seed say nothing either way."""
    keys = [(r.seed, ((r.summary.get("config") or {}).get("data") or {}).get("seed")) for r in runs if r.seed is not None]
    return len(set(map(str, keys))) < len(keys)


def build_report(
    paths: list[Path],
    out: Path | None = None,
    data_root: str | Path | None = None,
    grid_images: int = DEFAULT_GRID_IMAGES,
    use_wandb: bool = False,
) -> Report:
    """Collect the summaries under `paths`, write the report folder, optionally log it to W&B."""
    paths = [Path(p) for p in paths]
    runs = find_runs(paths)
    if not runs:
        started = [p for p in paths if (p / "multirun.yaml").is_file()]  # Hydra wrote it, then no job ran
        # an eval sweep's jobs (or `make eval`'s folder) write eval.json: "stopped before any job ran" of a sweep
        # whose every job had evaluated
        evals = [p for p in paths if p.is_dir() and next(p.rglob("eval.json"), None)]
        raise CompareError(f"no {SUMMARY_NAME} found under {', '.join(map(str, paths))}" + (
            ": it holds evaluations (eval.json, bgremover.eval's), and the report compares training runs; each "
            "evaluation's numbers are in its eval.json" if evals else
            ": the sweep there stopped before any job ran (its command's error line says why)" if started else ""))
    sweep = paths[0] if paths[0].is_dir() else paths[0].parent
    out = Path(out) if out else sweep / REPORT_DIRNAME
    _check_out(out, runs)
    classes = shared_classes(runs)  # before anything is written: runs of other class lists are refused
    camvid, tested_on = on_camvid(runs), test_set(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = aggregate(runs)
    failed = [r for r in runs if not r.ok]
    groups = Counter(str(r.summary["group"]) for r in runs if r.summary.get("group"))
    group = groups.most_common(1)[0][0] if groups else sweep.name  # W&B's group for the compare run
    # one sweep: its group names it; runs of several groups gathered in one folder: the folder does; runs named
    # one by one (summary.json files, several folders): the nets compared
    if len(groups) <= 1:
        title = f"Sweep report: {group}"
    elif len(paths) == 1 and paths[0].is_dir():
        title = f"Report: {sweep.name} ({len(groups)} groups)"
    else:
        title = f"Report: {' vs '.join(sorted({r.net for r in runs}))} ({len(groups)} groups)"
    warnings: list[str] = []

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; a report is for others to read too
    try:
        charts = {
            "val_miou": plots.plot_val_miou(stats, tmp / "val_miou.png"),
            "class_iou": plots.plot_class_iou(stats, tmp / "class_iou.png"),
        }
        try:
            skipped = grid.make_grid(stats, grid.resolve_data_root(data_root, runs), grid_images, tmp / "grid.png")
        except (
            Exception
        ) as e:  # the grid is a bonus: a bad checkpoint or image must not cost the whole report
            skipped = f"grid skipped: {type(e).__name__}: {e}"
            (tmp / "grid.png").unlink(missing_ok=True)
        if skipped:
            warnings.append(skipped)

        head, rows = main_table(stats, paper=camvid)
        main_md = render_md([("table", head, rows)] if stats else [("p", NONE_FINISHED)])
        partial = [r for r in runs if r.ok and r.partial_test]
        mixed = mixed_test_sets(runs)
        # the same seeds twice in a row (a rerun, a resume that trained nothing more): repeats, not seeds
        repeated = [f"{st.net} ({len(st.runs)} runs, seeds {', '.join(str(r.seed) for r in st.runs)})" for st in stats
                    if _repeats(st.runs)]
        blocks: list[Block] = [
            ("h", 1, title),
            (
                "p",
                f"{len(runs)} runs found under {', '.join(str(p) for p in paths)}: {len(runs) - len(failed)} ok, "
                f"{_stopped(failed)}.{_never_started(paths, runs)} Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.",
            ),  # fmt: skip
            ("h", 2, "How to read this"),
            (
                "ul",
                [
                    f"Numbers are percentages on {tested_on}; X ± Y is the mean ± sample std (ddof=1) over "
                    "a net's seeds. '± —' means a single run: its spread is unknown, not zero; '(1 of 2 runs)' "
                    "that only some of the row's runs have the figure (a run trained with test=false has no test "
                    "numbers).",
                    "Runs are averaged only when their configs differ in the seed alone (and where they ran and "
                    "logged) and they were tested on the same frames; a net trained with several recipes gets a row "
                    "each, named by the settings that differ.",
                    f"mIoU = mean over the {len(classes)} classes"
                    + ("" if camvid else f" ({', '.join(classes)})")  # a folder's own, named: CamVid's are known
                    + " of intersection over union; global acc = share of non-void "
                    "pixels labelled right. Nets are sorted by test mIoU, best first; rows tested on part of the "
                    "test split come after all rows tested on the whole of it.",
                ] + ([f"Paper columns and rows are the published numbers of {PAPER_CITE}, not ours: they come from "
                      "the paper's much longer training, so short runs land below them."] if camvid else [])
                  + ["Failed and interrupted runs are listed at the end and left out of every statistic."]
                  + ([f"PARTIAL TEST SET: {errors.count(len(partial), 'run')} {'was' if len(partial) == 1 else 'were'} tested on fewer frames than the split holds "
                      f"(see 'Test frames'); their numbers are not comparable with {'full CamVid test' if camvid else 'whole-split'} results."]
                     if partial else [])
                  + ([f"MIXED TEST SETS: {'; '.join(mixed)}. Runs of one recipe tested on different frames (a "
                      "`make eval` of one seed on the whole split) get a row per test set: a mean over different "
                      "frames would compare nothing."] if mixed else [])
                  + ([f"REPEATED SEEDS: {'; '.join(repeated)}: runs of one seed are repeats of one training, "
                      "not different seeds, so the ± over them is not a seed spread."] if repeated else []),
            ),  # fmt: skip
            ("h", 2, "Nets (aggregated over seeds)"),
            ("table", head, rows) if stats else ("p", NONE_FINISHED),
        ]
        if stats:
            blocks += [("h", 2, "Per-class test IoU % (mean over seeds)"), ("table", *class_table(stats))]
        if charts["val_miou"]:
            blocks += [("h", 2, "Validation mIoU per epoch"),
                       ("p", "Thin lines: single runs; bold: the net's mean; band: min–max over its seeds."),
                       ("img", "val mIoU per epoch", "val_miou.png")]  # fmt: skip
        if charts["class_iou"]:
            blocks += [("h", 2, "Per-class IoU"), ("img", "per-class IoU", "class_iou.png")]
        blocks.append(("h", 2, "Qualitative grid"))
        if (tmp / "grid.png").is_file():
            fg = ", ".join(dict.fromkeys(c for r in runs if r.ok for c in foreground_of(r.summary)))
            rows_are = "CamVid test images" if camvid else f"test images of {' and '.join(folders(runs))}"
            blocks += [("p", f"Rows: the same {rows_are}. Columns: input | ground truth | each net's "
                             f"prediction | each net's cut-out (keeps {fg}; the checkerboard is the transparent "
                             "background). Each net is shown by its best seed's best checkpoint."),
                       ("img", "qualitative grid", "grid.png")]  # fmt: skip
        for w in warnings:
            blocks.append(("p", w))
        searches = []
        for folder, params, value, pick in search_picks(paths, runs):
            chosen = ", ".join(short_number(f"{k}={v}") for k, v in params.items())
            metric = ((pick.summary.get("config") or {}).get("optimized_metric") if pick else None) or "its objective"
            ran = (f"run {_rel(pick.dir, paths)} ({pick.net}): test mIoU {pct(pick.metric('test/mIoU'))} %"
                   + partial_note([pick]) if pick is not None else "its run was not found among the compared runs")
            on_val = val_note([pick]) if pick is not None and str(metric).startswith("val/") else ""
            # a fraction such as mIoU in the percent every table uses (it read 0.002745 beside 0.3 in the tables)
            shown = f"{pct(value)} %" if re.search(r"iou|acc", str(metric), re.IGNORECASE) else f"{value:.4g}"
            searches.append(("p", f"The Optuna study in {folder.name} picked {chosen} ({metric} = {shown}{on_val}): "
                                  f"{ran}. The tables above rank by test mIoU, which the search never saw."))
        if searches:
            blocks += [("h", 2, "Search"), *searches]
        if stats:
            blocks += [("h", 2, "Runs"), ("table", *run_table(runs, paths))]
        blocks.append(("h", 2, "Failed or interrupted runs"))
        if failed:
            blocks.append(("ul", [f"{_rel(r.dir, paths)} (net {r.net}, seed {DASH if r.seed is None else r.seed}): "
                                  f"{r.error}" for r in failed]))  # fmt: skip
        else:
            blocks.append(("p", "None."))

        (tmp / "report.md").write_text(render_md(blocks), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(blocks, title), encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    report = Report(out, main_md, warnings, stats, runs)
    active = "wandb" in sys.modules and getattr(sys.modules["wandb"], "run", None) is not None
    if use_wandb or active:
        try:
            warnings.append(log_wandb(out, stats, runs, group))
        except Exception as e:  # the report on disk is the product; W&B is a copy of it
            warnings.append(f"W&B logging failed: {type(e).__name__}: {e}")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = errors.OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument(
        "paths",
        nargs="*",
        type=Path,
        help=f"sweep dirs or summary.json files (default: newest under {MULTIRUNS_DIR}/)",
    )
    ap.add_argument("--out", type=Path, default=None, help="report folder (default: <first sweep>/report); an existing one must be empty or an earlier report")
    ap.add_argument(
        "--wandb", action="store_true", help="also log the tables and charts to W&B (job_type compare)"
    )
    ap.add_argument(
        "--data-root",
        default=None,
        help="data root for the grid (default: $DATA_DIR, then the runs' data.root; data=folder runs: their folder)",
    )
    ap.add_argument(
        "--grid-images", type=int, default=DEFAULT_GRID_IMAGES, help="test images in grid.png; 0 skips it"
    )
    args = ap.parse_args(argv)
    if args.grid_images < 0:
        ap.error("--grid-images must be >= 0")
    try:
        paths = args.paths or [newest_sweep()]
        report = build_report(paths, args.out, args.data_root, args.grid_images, args.wandb)
    except (errors.UserError, OSError) as e:
        return errors.report(e, PROG)  # the prefix its option errors carry
    except KeyboardInterrupt:  # a traceback before; the report is written whole or not at all (build_report)
        return errors.report("interrupted: no report written", PROG, 130)
    print(report.main_md, end="")
    for w in report.warnings:
        print(w)
    print(f"report: {report.path / 'report.md'} (html: {report.path / 'report.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
