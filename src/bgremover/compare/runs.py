"""Sweep results in memory: every run's summary.json (`Run`), and per-net statistics over seeds (`NetStats`).

(Past 400 lines: the runs and what makes a report row of them — net, recipe and test set, the row's label, its
statistics — are one model, read by every other part of the report.)
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgremover.config import SUMMARY_NAME, SWEEP_REPORT_NAME
from bgremover.errors import UserError

REPORT_DIRNAME = "report"  # default report folder inside the sweep dir
MULTIRUNS_DIR = Path("logs")  # searched for the newest multirun.yaml (train sweeps: logs/train/multiruns/...)
DEFAULT_GRID_IMAGES = 3  # test images (rows) in grid.png
DEFAULT_WANDB_PROJECT = "bgremover"  # used when neither WANDB_PROJECT nor the runs' config names one
TILE_W = 240  # width in px of one grid cell; the height follows the test images' aspect ratio
HEADER_H = 24  # px of the grid's column-title band
CHECKER_PX = 12  # side of one checkerboard square behind cut-outs
CHECKER_RGB = ((255, 255, 255), (204, 204, 204))  # the usual "transparent" look of image editors
NET_COLOURS = "tab10"  # matplotlib colour map: one colour per net, the same in every chart

# Jégou et al. 2017, "The One Hundred Layers Tiramisu", Table 2 (CamVid test, 11 classes).
PAPER_CITE = "Jégou et al. 2017, Table 2"
PAPER: dict[str, dict[str, float | str]] = {
    "56": {"name": "FC-DenseNet56", "miou": 58.9, "acc": 88.9, "params_m": 1.5},
    "67": {"name": "FC-DenseNet67", "miou": 65.8, "acc": 90.8, "params_m": 3.5},
    "103": {"name": "FC-DenseNet103", "miou": 66.9, "acc": 91.5, "params_m": 9.4},
}
PAPER_CLASS_IOU_103: dict[str, float] = {
    "Building": 83.0, "Tree": 77.3, "Sky": 93.0, "Car": 77.3, "SignSymbol": 43.9, "Road": 94.5,
    "Pedestrian": 59.6, "Fence": 37.1, "Pole": 37.8, "Sidewalk": 82.2, "Bicyclist": 50.5,
}  # fmt: skip
_TIRAMISU_RE = re.compile(r"(?:tiramisu|fc[-_]?densenet|densenet)[-_]?(56|67|103)\b", re.IGNORECASE)


class CompareError(UserError):
    """A problem the user can fix (bad path, nothing to compare): reported as one line, exit 1."""


@dataclass
class Run:
    dir: Path  # where its summary.json lies (trusted over the summary's own run_dir: sweeps get moved)
    summary: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.summary.get("status") == "ok"

    @property
    def net(self) -> str:
        return str(self.summary.get("net") or "?")

    @property
    def seed(self) -> Any:
        return self.summary.get("seed")

    @property
    def best_ckpt(self) -> Path | None:
        """The run's best checkpoint: where its summary says, else at the same place inside the folder the run
        lies in now (a sweep moved, a run copied off a GPU machine), else None."""
        given = self.summary.get("best_ckpt")
        if not given:
            return None
        path = Path(given)
        if path.is_file():
            return path
        try:
            moved = self.dir / path.relative_to(str(self.summary.get("run_dir") or ""))
        except ValueError:  # not inside the run's old folder: nothing to re-root
            return None
        return moved if moved.is_file() else None

    def metric(self, key: str) -> float | None:
        return _num((self.summary.get("metrics") or {}).get(key))

    @property
    def test_frames(self) -> tuple[int | None, int | None]:
        """(frames the test numbers cover, frames in the split); older summaries know neither."""
        split = self.summary.get("test_split") or {}
        return split.get("frames"), split.get("of")

    @property
    def val_partial(self) -> bool:
        """Its val numbers (best val mIoU) cover part of the val split (trainer.limit_val_batches)."""
        return (self.summary.get("val_split") or {}).get("complete") is False

    @property
    def trained_on_val(self) -> bool:
        """data.train_split=train+val: its val mIoU is no held-out score."""
        data = (self.summary.get("config") or {}).get("data") or {}
        return "val" in str(data.get("train_split") or "").split("+")

    @property
    def partial_test(self) -> bool:
        frames, total = self.test_frames
        return frames is not None and total is not None and frames != total

    @property
    def error(self) -> str:
        err = self.summary.get("error") or f"status {self.summary.get('status')!r}"
        return " ".join(str(err).split())  # one line, whatever the summary held


def _num(value: Any) -> float | None:
    """A finite float, or None for missing/null/NaN (a diverged run must not poison a mean)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def find_runs(paths: list[Path]) -> list[Run]:
    """Every summary.json under the given sweep dirs (any depth) or given directly; unreadable ones count as failed."""
    runs: list[Run] = []
    seen: set[Path] = set()
    for root in paths:
        if not root.exists():
            raise CompareError(f"no such file or directory: {root}")
        if root.is_file() and root.name != SUMMARY_NAME:  # README.md here was a "failed run", its report beside it
            raise CompareError(f"{root} is neither a sweep folder nor a {SUMMARY_NAME} file")
        files = [root] if root.is_file() else sorted(root.rglob(SUMMARY_NAME))
        for f in files:
            if f.resolve() in seen or (root.is_dir() and _job_name(f.parent) not in (None, "train")):
                continue  # a failed evaluation's record (`make eval`'s folder) listed as a failed training run
            seen.add(f.resolve())
            try:
                summary = json.loads(f.read_text())
                if not isinstance(summary, dict):
                    raise ValueError("not a JSON object")
                _check_shape(summary)
            except (OSError, ValueError) as e:
                summary = {"status": "failed", "error": f"unreadable {SUMMARY_NAME}: {e}"}
            runs.append(Run(f.parent, summary))
        if root.is_dir():
            runs += _unfinished(root, seen)
    return runs


_OBJECT_FIELDS = ("metrics", "test_split", "val_split", "config", "trained_config", "history")


def _check_shape(summary: dict[str, Any]) -> None:
    """The summary's nested records are objects (or absent): one edited by hand into a string or a list made the
    report stop on a traceback (a user audit); such a run is listed as failed, saying which field is wrong."""
    for key in _OBJECT_FIELDS:
        value = summary.get(key)
        if value is not None and not isinstance(value, dict):
            kind = {str: "a string", list: "an array", bool: "a boolean"}.get(type(value), "a number")
            raise ValueError(f"{key!r} is {kind}, not an object")


def _unfinished(root: Path, seen: set[Path]) -> list[Run]:
    """Training runs (sweep jobs) under `root` that left no summary.json: killed (SIGKILL, the out-of-memory
    killer, a lost machine) or still running. They were missing from the report, which said "0 failed"."""
    from bgremover.sweep import read_overrides

    out = []
    for hydra_dir in sorted(root.rglob(".hydra")):
        run_dir = hydra_dir.parent
        if (run_dir / SUMMARY_NAME).resolve() in seen or (run_dir / SUMMARY_NAME).exists():
            continue
        if _job_name(run_dir) != "train":  # an evaluation's folder (eval.json) is no run
            continue
        seen.add((run_dir / SUMMARY_NAME).resolve())
        out.append(Run(run_dir, {"status": "failed", "overrides": read_overrides(run_dir), "error": (
            f"no {SUMMARY_NAME}: the run was killed before it finished (SIGKILL, out of memory) or is still "
            f"running; its log: {run_dir / 'train.log'}")}))
    return out


def _job_name(run_dir: Path) -> str | None:
    """The Hydra job that made a run folder ("train", "eval"), from its .hydra/hydra.yaml; None if unreadable."""
    import yaml

    try:
        job = ((yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text()) or {}).get("hydra") or {}).get("job")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return job.get("name") if isinstance(job, dict) else None


# What marks a sweep's root folder, whatever the nesting: Hydra's basic sweeper writes multirun.yaml, the Optuna
# sweeper only optimization_results.yaml, and every sweep of this project gets the SweepReport's file at its end.
SWEEP_MARKERS = ("multirun.yaml", "optimization_results.yaml", SWEEP_REPORT_NAME)


def newest_sweep(base: Path = MULTIRUNS_DIR) -> Path:
    """The newest sweep under logs/ (an Optuna sweep too: it has no multirun.yaml, and an older grid was taken)."""
    if not base.is_dir():
        raise CompareError(f"no sweep given and {base}/ does not exist; pass a sweep dir")
    # when a sweep ran is when its marker files were written: the folder's own time moves with every report,
    # W&B run or temporary folder written into it later (a report over an older sweep made it the "newest")
    ran: dict[Path, float] = {}
    for name in SWEEP_MARKERS:
        for p in base.rglob(name):
            ran[p.parent] = max(ran.get(p.parent, 0.0), p.stat().st_mtime)
    if not ran:  # it took the newest folder of any kind instead: logs/eval, or logs/train with every run ever made
        raise CompareError(f"no sweep given and {base}/ holds no sweep folder (none has a "
                           f"{' or '.join(SWEEP_MARKERS)}); pass a sweep dir or run folders")
    return max(ran, key=ran.__getitem__)


@dataclass
class Stat:
    mean: float | None
    std: float | None  # sample std (ddof=1); None when fewer than two values
    n: int


def mean_std(values: list[float | None]) -> Stat:
    vals = [v for v in values if v is not None]
    if not vals:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))


@dataclass
class NetStats:
    net: str  # the net, and where it was trained with several recipes the settings that tell them apart
    runs: list[Run]
    params_m: float | None
    miou: Stat
    acc: Stat
    val_best: Stat
    class_iou: dict[str, Stat]
    wall_s: float | None
    infer_ms: float | None
    paper: dict[str, float | str] | None = field(default=None)


def paper_entry(net: str, net_config: dict[str, Any] | None = None) -> tuple[str, dict[str, float | str]] | None:
    """('103', paper numbers) for Tiramisu/FC-DenseNet nets of the paper's three depths, else None. `net_config`
    (the run's model.net) must then build the paper's layers: a run that shrank an FC-DenseNet103
    (model.net.growth_rate=4, a test's or a quick try's) keeps its name but is not the net the paper measured."""
    m = _TIRAMISU_RE.search(net)
    if not m:
        return None
    if net_config:
        from bgremover.nets.tiramisu import TIRAMISU_CONFIGS  # torch: only where a Tiramisu run is compared

        paper_net = {**TIRAMISU_CONFIGS[f"fcdensenet{m.group(1)}"], "first_conv_channels": 48}
        if any(k in net_config and list(_as_tuple(net_config[k])) != list(_as_tuple(v)) for k, v in paper_net.items()):
            return None
    return m.group(1), PAPER[m.group(1)]


def _as_tuple(v: Any) -> tuple:
    return tuple(v) if isinstance(v, list | tuple) else (v,)


# Config keys in which runs of one recipe may differ: the seed, where a run lives and logs, what it does after
# training. Any other difference (lr, budget, crop, epochs, devices...) makes another recipe.
NOT_RECIPE = ("seed", "paths", "hydra", "logger", "extras", "tags", "task_name", "ckpt_path", "train", "test",
              "measure_inference", "verbose", "data.root", "data.num_workers", "data.cache", "data.download",
              "data.seed", "trainer.enable_progress_bar", "trainer.enable_model_summary", "callbacks.progress_bar")
# and every setting whose value lies in the run's own folder (checkpoint dirpath, default_root_dir, a split file):
# where a run wrote, not how it trained — each job of a sweep has its own
LABEL_KEYS = 3  # differing settings named in a group's label (more only where needed to keep labels apart)


def recipe(run: Run) -> dict[str, str]:
    """The run's resolved config as dotted keys → values, without NOT_RECIPE and paths in the run's own folder
    (empty for old summaries)."""
    flat: dict[str, str] = {}
    config = run.summary.get("trained_config") or run.summary.get("config") or {}  # a train=false run: its ckpt's
    own = str((config.get("paths") or {}).get("output_dir") or "").rstrip("/")

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif _is_recipe_key(prefix[:-1]) and not (own and isinstance(node, str)
                                                   and (node == own or node.startswith(own + "/"))):
            flat[prefix[:-1]] = json.dumps(node, sort_keys=True)

    walk(config, "")
    return flat


def run_labels(runs: list[Run]) -> dict[int, str]:
    """id(run) -> the label of its row (net, and the settings that set its recipe apart), for every ok run."""
    return {id(r): name for name, rs in group_runs(runs).items() for r in rs}


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """The successful runs by net and recipe: only runs that differ in NOT_RECIPE alone (seeds) are averaged.
    A net trained with several recipes gets one group each, labelled with the settings that tell them apart; a
    recipe whose runs were tested on different test sets, one group per set (by_test_set)."""
    out: dict[str, list[Run]] = {}
    for net, recipes in _by_recipe(runs).items():
        labels = _labels(list(recipes.values())) if len(recipes) > 1 else [""]
        for label, rs in zip(labels, recipes.values(), strict=True):
            sets = by_test_set(rs)
            for part in sets:
                frames = f"{part[-1].test_frames[0]} test frames" if len(sets) > 1 else ""
                name = f"{net} ({'; '.join(x for x in (label, frames) if x)})" if label or frames else net
                while name in out:  # never one group over another, whatever the labels say
                    name += "'"
                out[name] = part
    return out


def _by_recipe(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    """The successful runs by net, then by recipe."""
    by_net: dict[str, dict[str, list[Run]]] = {}
    for r in runs:
        if r.ok:
            by_net.setdefault(r.net, {}).setdefault(json.dumps(recipe(r), sort_keys=True), []).append(r)
    return by_net


def mixed_test_sets(runs: list[Run]) -> list[str]:
    """'deeplab: 233 and 4 frames' for each net whose runs of one recipe were tested on different test sets (and so
    got a row per set)."""
    out = []
    for net, recipes in _by_recipe(runs).items():
        for rs in recipes.values():
            if len(sets := by_test_set(rs)) > 1:
                out.append(f"{net}: {' and '.join(str(part[-1].test_frames[0]) for part in sets)} frames")
    return out


def by_test_set(runs: list[Run]) -> list[list[Run]]:
    """One recipe's runs by the test frames their numbers cover, the whole split's first, then the most frames: a
    mean over different test sets measures nothing (`make eval` of one seed of a 4-frame sweep on all 233 frames
    made a row of "0.4 ± 0.5" over a 4-frame and a 233-frame score). Runs with no count (no test numbers, older
    summaries) join the first."""
    sets: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.test_frames[0] is not None:
            sets.setdefault(r.test_frames, []).append(r)
    if len(sets) < 2:
        return [runs]
    order = sorted(sets, key=lambda k: (k[0] != k[1], -(_num(k[0]) or 0)))
    unknown = [r for r in runs if r.test_frames[0] is None]
    return [unknown + sets[order[0]], *(sets[k] for k in order[1:])]


def _is_recipe_key(key: str) -> bool:
    return not any(key == n or key.startswith(n + ".") for n in NOT_RECIPE)


def _labels(groups: list[list[Run]]) -> list[str]:
    """What tells a net's recipes apart: the command-line overrides they do not share (what their users typed),
    else the resolved settings that differ (same command, say, on another version of the code)."""
    typed = [[o for o in (g[0].summary.get("overrides") or []) if _is_recipe_key(o.lstrip("+~").split("=")[0])]
             for g in groups]
    labels = [[o for o in t if not all(o in u for u in typed)] for t in typed]
    if all(labels) and len({tuple(lab) for lab in labels}) == len(labels):
        short = [[short_number(o) for o in lab] for lab in labels]  # Optuna's lr=0.00035090148857968553
        if len({tuple(lab) for lab in short}) == len(short):  # unless rounding would merge two recipes' labels
            labels = short
        return _cut(labels)
    flats = [recipe(g[0]) for g in groups]
    keys = sorted(k for k in set().union(*flats) if len({f.get(k) for f in flats}) > 1)
    return _cut([[f"{k}={json.loads(f[k]) if k in f else '-'}" for k in keys] for f in flats])


def _cut(labels: list[list[str]]) -> list[str]:
    """Each label's first LABEL_KEYS settings, or as many more as keep the labels apart: cut to 3, two recipes
    that differed in their 4th (a sweep's lr, beside a run whose other settings differed) read alike, and one
    group replaced the other in the report (a user audit)."""
    longest = max((len(lab) for lab in labels), default=0)
    for n in range(LABEL_KEYS, longest + 1):
        out = [", ".join(lab[:n]) + (", …" if len(lab) > n else "") for lab in labels]
        if len(set(out)) == len(out):
            return out
    return [", ".join(lab) for lab in labels]


def short_number(override: str) -> str:
    """``key=value`` with a long number (as a search samples it) cut to 4 significant digits; anything else as is."""
    key, sep, value = override.partition("=")
    if not sep or len(value) <= 8 or value.lstrip("-").isdigit():  # a step count stays exact
        return override
    try:
        return f"{key}={float(value):.4g}"
    except ValueError:
        return override


def search_picks(paths: list[Path], runs: list[Run]) -> list[tuple[Path, dict[str, Any], float, Run | None]]:
    """Per compared folder that an Optuna sweep wrote (its ``optimization_results.yaml``, single objective): the
    folder, the trial's parameters, its objective value and the run that trained them (None if not found).
    The report sorts nets by test mIoU; the search chose by its objective (val/mIoU_best), so it says which."""
    import yaml

    picks = []
    for path in paths:
        results = path / "optimization_results.yaml"
        if not results.is_file():
            continue
        try:
            found = yaml.safe_load(results.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        params, value = found.get("best_params"), found.get("best_value")
        if not isinstance(params, dict) or not isinstance(value, int | float):
            continue  # a multi-objective study lists a Pareto front instead: no single pick
        chosen = [r for r in runs if r.ok and _is_inside(r.dir, path) and all(
            _same_value(_override(r, k), v) for k, v in params.items())]
        picks.append((path, params, float(value), chosen[0] if len(chosen) == 1 else None))
    return picks


def _is_inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _override(run: Run, key: str) -> str | None:
    for o in run.summary.get("overrides") or []:
        k, sep, v = o.lstrip("+~").partition("=")
        if sep and k == key:
            return v
    return None


def _same_value(typed: str | None, value: Any) -> bool:
    """Whether an override's text and a study's parameter are one value: the sweeper records a choice of lists
    as the text '[224,224]', and another version might keep the list itself or write it with spaces."""
    import yaml

    if typed is None:
        return False

    def parsed(v: Any) -> Any:
        try:
            v = yaml.safe_load(v) if isinstance(v, str) else v
        except yaml.YAMLError:
            return v
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    return parsed(typed) == parsed(value)


def aggregate(runs: list[Run]) -> list[NetStats]:
    """One NetStats per net and recipe (group_runs): rows over the whole test split, then partial ones, each by test
    mIoU, then rows without test numbers."""
    from bgremover.compare.dataset import classes_of, folder_of

    out = []
    for label, rs in group_runs(runs).items():
        rs.sort(key=lambda r: (str(r.seed), str(r.dir)))
        config = rs[0].summary.get("trained_config") or rs[0].summary.get("config") or {}
        # the paper measured CamVid: a Tiramisu trained on one's own folder is not the row it published
        pe = None if folder_of(rs[0].summary) else paper_entry(rs[0].net, (config.get("model") or {}).get("net"))
        classes = classes_of(rs[0].summary)  # the run's own (make remover's: background, foreground)
        out.append(
            NetStats(
                net=label,
                runs=rs,
                params_m=mean_std([_num(r.summary.get("params")) for r in rs]).mean,
                miou=mean_std([r.metric("test/mIoU") for r in rs]),
                acc=mean_std([r.metric("test/acc") for r in rs]),
                val_best=mean_std([r.metric("val/mIoU_best") for r in rs]),
                class_iou={c: mean_std([r.metric(f"test/iou_{c}") for r in rs]) for c in classes},
                wall_s=mean_std([_num(r.summary.get("wall_time_s")) for r in rs]).mean,
                infer_ms=mean_std([_num(r.summary.get("infer_ms_480x360")) for r in rs]).mean,
                paper=pe[1] if pe else None,
            )
        )
    out.sort(key=lambda s: (s.miou.mean is None, any(r.partial_test for r in s.runs), -(s.miou.mean or 0.0), s.net))
    return out
