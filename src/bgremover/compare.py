"""Turn a sweep's training runs (one `summary.json` each) into a report folder a person would rather look at.

`python -m bgremover.compare [PATH ...] [--out DIR] [--wandb] [--data-root DIR] [--grid-images N]`

The report (`<sweep>/report/` by default) holds `report.md`, the same content as a self-contained
`report.html`, and PNG charts: `val_miou.png` (learning curves), `class_iou.png` (per-class IoU bars) and
`grid.png` (the same CamVid test images through every net, with the background-remover cut-outs).
Failed runs are listed and left out of the statistics. The folder is built under a temporary name and
renamed into place, so a crash never leaves a half report.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bgremover.data.classes import CLASSES, DEFAULT_FOREGROUND, colorize

SUMMARY_NAME = "summary.json"  # what train.py writes into every run dir
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


class CompareError(Exception):
    """A problem the user can fix (bad path, nothing to compare): reported as one line, exit 1."""


# ----------------------------------------------------------------------------------------------- loading


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

    def metric(self, key: str) -> float | None:
        return _num((self.summary.get("metrics") or {}).get(key))

    @property
    def test_frames(self) -> tuple[int | None, int | None]:
        """(frames the test numbers cover, frames in the split); older summaries know neither."""
        split = self.summary.get("test_split") or {}
        return split.get("frames"), split.get("of")

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
        files = [root] if root.is_file() else sorted(root.rglob(SUMMARY_NAME))
        for f in files:
            if f.resolve() in seen:
                continue
            seen.add(f.resolve())
            try:
                summary = json.loads(f.read_text())
                if not isinstance(summary, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                summary = {"status": "failed", "error": f"unreadable {SUMMARY_NAME}: {e}"}
            runs.append(Run(f.parent, summary))
    return runs


def newest_sweep(base: Path = MULTIRUNS_DIR) -> Path:
    """The newest sweep under logs/: Hydra marks each sweep root with multirun.yaml, whatever the nesting."""
    if not base.is_dir():
        raise CompareError(f"no sweep given and {base}/ does not exist; pass a sweep dir")
    marked = [p.parent for p in base.rglob("multirun.yaml")]
    candidates = marked or [p for p in base.iterdir() if p.is_dir()]
    if not candidates:
        raise CompareError(f"no sweep given and {base}/ holds no sweep folder")
    return max(candidates, key=lambda p: p.stat().st_mtime)


# ------------------------------------------------------------------------------------------- statistics


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
    net: str
    runs: list[Run]
    params_m: float | None
    miou: Stat
    acc: Stat
    val_best: Stat
    class_iou: dict[str, Stat]
    wall_s: float | None
    infer_ms: float | None
    paper: dict[str, float | str] | None = field(default=None)

    @property
    def best_run(self) -> Run:
        return max(self.runs, key=lambda r: r.metric("test/mIoU") or -1.0)


def paper_entry(net: str) -> tuple[str, dict[str, float | str]] | None:
    """('103', paper numbers) for Tiramisu/FC-DenseNet nets of the paper's three depths, else None."""
    m = _TIRAMISU_RE.search(net)
    return (m.group(1), PAPER[m.group(1)]) if m else None


def aggregate(runs: list[Run]) -> list[NetStats]:
    """One NetStats per net over its successful runs, best test mIoU first."""
    by_net: dict[str, list[Run]] = {}
    for r in runs:
        if r.ok:
            by_net.setdefault(r.net, []).append(r)
    out = []
    for net, rs in by_net.items():
        rs.sort(key=lambda r: (str(r.seed), str(r.dir)))
        pe = paper_entry(net)
        out.append(
            NetStats(
                net=net,
                runs=rs,
                params_m=mean_std([_num(r.summary.get("params")) for r in rs]).mean,
                miou=mean_std([r.metric("test/mIoU") for r in rs]),
                acc=mean_std([r.metric("test/acc") for r in rs]),
                val_best=mean_std([r.metric("val/mIoU_best") for r in rs]),
                class_iou={c: mean_std([r.metric(f"test/iou_{c}") for r in rs]) for c in CLASSES},
                wall_s=mean_std([_num(r.summary.get("wall_time_s")) for r in rs]).mean,
                infer_ms=mean_std([_num(r.summary.get("infer_ms_480x360")) for r in rs]).mean,
                paper=pe[1] if pe else None,
            )
        )
    out.sort(key=lambda s: (-(s.miou.mean if s.miou.mean is not None else -1.0), s.net))
    return out


# ------------------------------------------------------------------------------------------- formatting

DASH = "—"


def pct(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.1f}"


def pct_pm(s: Stat) -> str:
    """'52.0 ± 2.8' (percent); '± —' marks a single run, whose spread is unknown, not zero."""
    if s.mean is None:
        return DASH
    return f"{100 * s.mean:.1f} ± {DASH if s.std is None else f'{100 * s.std:.1f}'}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _rel(path: Path, roots: list[Path]) -> str:
    for root in roots:
        base = root if root.is_dir() else root.parent
        try:
            rel = path.resolve().relative_to(base.resolve())
            return str(rel) if str(rel) != "." else base.name
        except ValueError:
            continue
    return str(path)


def main_table(stats: list[NetStats]) -> tuple[list[str], list[list[str]]]:
    has_infer = any(s.infer_ms is not None for s in stats)
    head = ["Net", "Runs", "Params (M)", "Test mIoU %", "Test frames", "Global acc %", "Best val mIoU %",
            "Train time"]
    if has_infer:
        head.append("Infer ms / 480×360")
    head.append(f"Paper ({PAPER_CITE}): mIoU / acc / params")
    rows = []
    for s in stats:
        row = [
            s.net,
            str(len(s.runs)),
            DASH if s.params_m is None else f"{s.params_m / 1e6:.2f}",
            pct_pm(s.miou),
            frames_cell(s.runs),
            pct_pm(s.acc),
            pct_pm(s.val_best),
            duration(s.wall_s),
        ]
        if has_infer:
            row.append(DASH if s.infer_ms is None else f"{s.infer_ms:.1f}")
        p = s.paper
        row.append(f"{p['name']}: {p['miou']} / {p['acc']} / {p['params_m']} M" if p else DASH)
        rows.append(row)
    return head, rows


def frames_cell(runs: list[Run]) -> str:
    """'233', or '160 of 233 (partial)' when any run was tested on part of the split."""
    counts = {r.test_frames for r in runs if r.test_frames[0] is not None}
    if not counts:
        return DASH
    frames, total = min(counts, key=lambda c: c[0])
    return f"{frames} of {total} (partial)" if total is not None and frames != total else str(frames)


def class_table(stats: list[NetStats]) -> tuple[list[str], list[list[str]]]:
    head = ["Net", *CLASSES]
    rows = []
    for s in stats:
        rows.append([s.net, *(pct(s.class_iou[c].mean) for c in CLASSES)])
        if s.paper and s.paper["name"] == PAPER["103"]["name"]:
            rows.append(
                [f"paper: FC-DenseNet103 ({PAPER_CITE})", *(f"{PAPER_CLASS_IOU_103[c]:.1f}" for c in CLASSES)]
            )
    return head, rows


def run_table(runs: list[Run], roots: list[Path]) -> tuple[list[str], list[list[str]]]:
    head = ["Run dir", "Net", "Seed", "Test mIoU %", "Best val mIoU %", "Epochs", "Wall time"]
    ok = sorted((r for r in runs if r.ok), key=lambda r: (r.net, str(r.seed), str(r.dir)))
    rows = [
        [
            _rel(r.dir, roots),
            r.net,
            DASH if r.seed is None else str(r.seed),
            pct(r.metric("test/mIoU")),
            pct(r.metric("val/mIoU_best")),
            DASH if r.summary.get("epochs") is None else str(r.summary["epochs"]),
            duration(_num(r.summary.get("wall_time_s"))),
        ]
        for r in ok
    ]
    return head, rows


# Report content is a list of blocks rendered twice (Markdown, HTML), so both files always say the same.
Block = tuple


def render_md(blocks: list[Block]) -> str:
    def cell(x: str) -> str:
        return x.replace("|", "\\|").replace("\n", " ")

    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"{'#' * b[1]} {b[2]}")
        elif kind == "p":
            out.append(b[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in b[1]))
        elif kind == "table":
            head, rows = b[1], b[2]
            lines = ["| " + " | ".join(map(cell, head)) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
            lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{b[1]}]({b[2]})")
    return "\n\n".join(out) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}
tr:nth-child(even){background:#fafafa}
img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}
h1{border-bottom:2px solid #444}
h2{border-bottom:1px solid #ccc;margin-top:1.6em}
""".strip()


def render_html(blocks: list[Block], title: str) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in b[1]) + "</ul>")
        elif kind == "table":
            head, rows = b[1], b[2]
            t = ["<table><thead><tr>", *(f"<th>{e(h)}</th>" for h in head), "</tr></thead><tbody>"]
            for r in rows:
                t += ["<tr>", *(f"<td>{e(c)}</td>" for c in r), "</tr>"]
            t.append("</tbody></table>")
            out.append("".join(t))
        elif kind == "img":
            out.append(f'<p><img src="{e(b[2])}" alt="{e(b[1])}"></p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- charts


def _mpl():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training boxes
    import matplotlib.pyplot as plt

    return plt


def _colours(stats: list[NetStats]) -> dict[str, Any]:
    cmap = _mpl().get_cmap(NET_COLOURS)
    return {s.net: cmap(i % cmap.N) for i, s in enumerate(stats)}


def plot_val_miou(stats: list[NetStats], path: Path) -> bool:
    """val/mIoU per epoch: thin line per run, bold mean per net with its min–max band. False if no history."""
    curves: dict[str, list[tuple[list[float], list[float]]]] = {}
    for s in stats:
        for r in s.runs:
            h = r.summary.get("history") or {}
            ys = h.get("val/mIoU") or []
            xs = h.get("epoch") or list(range(len(ys)))
            pts = [(float(x), 100 * v) for x, y in zip(xs, ys, strict=False) if (v := _num(y)) is not None]
            if pts:
                curves.setdefault(s.net, []).append(([p[0] for p in pts], [p[1] for p in pts]))
    if not curves:
        return False
    plt = _mpl()
    from matplotlib.ticker import MaxNLocator

    colours = _colours(stats)
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=100)
    for s in stats:
        if s.net not in curves:
            continue
        c = colours[s.net]
        by_epoch: dict[float, list[float]] = {}
        for xs, ys in curves[s.net]:
            ax.plot(xs, ys, color=c, lw=0.8, alpha=0.35)
            for x, y in zip(xs, ys, strict=True):
                by_epoch.setdefault(x, []).append(y)
        ep = sorted(by_epoch)
        ax.fill_between(
            ep, [min(by_epoch[x]) for x in ep], [max(by_epoch[x]) for x in ep], color=c, alpha=0.15
        )
        n = len(curves[s.net])
        ax.plot(
            ep, [statistics.fmean(by_epoch[x]) for x in ep], color=c, lw=2.2, label=f"{s.net} (mean of {n})",
            marker="o", ms=4,  # a run of one or two validations is a point, not a line: markers keep it visible
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("Validation mIoU per epoch — thin: single runs, bold: mean, band: min–max over seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_class_iou(stats: list[NetStats], path: Path) -> bool:
    """Per-class test IoU, nets side by side (mean over seeds, error bar = sample std). False if no numbers."""
    have = [s for s in stats if any(st.mean is not None for st in s.class_iou.values())]
    if not have:
        return False
    plt = _mpl()
    colours = _colours(stats)
    fig, ax = plt.subplots(
        figsize=(max(10, 1.1 * len(CLASSES) + 0.4 * len(have) * len(CLASSES) / 4), 5.5), dpi=100
    )
    width = 0.8 / len(have)
    xs = range(len(CLASSES))
    for i, s in enumerate(have):
        means = [100 * (s.class_iou[c].mean or 0.0) for c in CLASSES]
        errs = [100 * (s.class_iou[c].std or 0.0) for c in CLASSES]
        pos = [x - 0.4 + width * (i + 0.5) for x in xs]
        ax.bar(pos, means, width, yerr=errs, capsize=2, color=colours[s.net], label=s.net)
    if any(s.paper and s.paper["name"] == PAPER["103"]["name"] for s in have):
        ax.scatter(list(xs), [PAPER_CLASS_IOU_103[c] for c in CLASSES], marker="_", s=600, color="black",
                   linewidths=2, zorder=3, label=f"paper FC-DenseNet103 ({PAPER_CITE})")  # fmt: skip
    ax.set_xticks(list(xs))
    ax.set_xticklabels(CLASSES, rotation=30, ha="right")
    ax.set_ylabel("test IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-class test IoU (mean over seeds; error bars: sample std)")
    ax.grid(axis="y", alpha=0.3)
    # Below the axes: inside, it would hide the tall bars or the paper's markers.
    ax.legend(
        fontsize=9, ncol=min(4, len(have) + 1), loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------------------------- grid


def _load_checkpoint(path: Path):
    """(net in eval mode, meta) via the export module; imported lazily because it pulls in torch."""
    from bgremover.export import load_checkpoint_net

    return load_checkpoint_net(path)


def resolve_data_root(arg: str | Path | None, runs: list[Run]) -> Path | None:
    """--data-root, else $DATA_DIR, else the data.root of a run's resolved config — the first that exists
    (the Makefile always exports a DATA_DIR, possibly the not-yet-downloaded default)."""
    if arg:
        return Path(arg)
    candidates = [os.environ.get("DATA_DIR")]
    candidates += [((r.summary.get("config") or {}).get("data") or {}).get("root") for r in runs]
    roots = [Path(c) for c in candidates if isinstance(c, str) and c]
    return next((r for r in roots if (r / "test").is_dir()), roots[0] if roots else None)


def pick_images(files: list[Path], n: int) -> list[Path]:
    """n evenly spaced test images: deterministic, and spread over the split's different sequences."""
    if n <= 0 or not files:
        return []
    if n >= len(files):
        return files
    if n == 1:
        return [files[len(files) // 2]]
    idx = sorted({round(i * (len(files) - 1) / (n - 1)) for i in range(n)})
    return [files[i] for i in idx]


def _checker(w: int, h: int):
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w]
    sq = ((yy // CHECKER_PX + xx // CHECKER_PX) % 2).astype(bool)
    out = np.empty((h, w, 3), dtype=np.uint8)
    out[~sq], out[sq] = CHECKER_RGB
    return out


def _predict(net, meta: dict[str, Any], rgb, device: str):
    """(HxW class ids, HxW foreground probability) for one HxWx3 uint8 image."""
    import numpy as np
    import torch

    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(1, 3, 1, 1)
    # np.array copies: torch warns about (and must not write into) a read-only PIL buffer
    from bgremover.padding import crop, pad_image

    padded, box = pad_image(np.asarray(rgb, dtype=np.uint8), int(meta.get("size_multiple") or 1))
    x = torch.from_numpy(np.ascontiguousarray(padded)).permute(2, 0, 1)[None].float() / 255.0
    x = (x - mean) / std
    h, w = box[2], box[3]
    with torch.no_grad():
        logits = net(x.to(device))
        if isinstance(logits, dict):
            logits = logits["out"]
        logits = crop(logits.float().cpu(), box)
    classes = list(meta.get("classes") or CLASSES)
    fg_names = meta.get("default_foreground") or DEFAULT_FOREGROUND
    fg = [classes.index(c) for c in fg_names if c in classes]
    prob = logits.softmax(1)[0]
    alpha = prob[fg].sum(0) if fg else torch.zeros(h, w)
    return logits.argmax(1)[0].numpy(), alpha.numpy()


def _font(size: int = 13):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def make_grid(stats: list[NetStats], data_root: Path | None, n_images: int, path: Path) -> str | None:
    """Write grid.png; return None on success or a one-line reason why it was skipped."""
    if n_images <= 0:
        return "grid skipped: --grid-images 0"
    picks: list[tuple[NetStats, Run]] = []
    for s in stats:
        with_ckpt = [
            r for r in s.runs if r.summary.get("best_ckpt") and Path(r.summary["best_ckpt"]).is_file()
        ]
        if with_ckpt:
            picks.append((s, max(with_ckpt, key=lambda r: r.metric("test/mIoU") or -1.0)))
    if not picks:
        return "grid skipped: no run has an existing best_ckpt"
    if data_root is None:
        return "grid skipped: no data root (use --data-root or DATA_DIR)"
    test_dir, annot_dir = data_root / "test", data_root / "testannot"
    files = sorted(test_dir.glob("*.png")) if test_dir.is_dir() else []
    if not files:
        return f"grid skipped: no test images in {test_dir}"

    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = pick_images(files, n_images)
    images = [np.asarray(Image.open(f).convert("RGB")) for f in chosen]
    labels = []
    for f, img in zip(chosen, images, strict=True):
        a = annot_dir / f.name
        labels.append(np.asarray(Image.open(a)) if a.is_file() else np.full(img.shape[:2], 255, np.uint8))

    nets, errors = [], []
    for s, r in picks:
        try:
            net, meta = _load_checkpoint(Path(r.summary["best_ckpt"]))
            nets.append((s.net, net.to(device).eval(), meta))
        except Exception as e:  # one broken checkpoint must not cost the others their column
            errors.append(f"{s.net}: {type(e).__name__}: {e}")
    if not nets:
        return "grid skipped: no checkpoint could be loaded (" + "; ".join(errors) + ")"

    h0, w0 = images[0].shape[:2]
    tile_h = max(1, round(TILE_W * h0 / w0))
    checker = _checker(TILE_W, tile_h)
    titles = [
        "input",
        "ground truth",
        *(f"{n} prediction" for n, _, _ in nets),
        *(f"{n} cut-out" for n, _, _ in nets),
    ]
    canvas = Image.new("RGB", (TILE_W * len(titles), HEADER_H + tile_h * len(images)), "white")
    draw, font = ImageDraw.Draw(canvas), _font()
    for col, t in enumerate(titles):
        while len(t) > 3 and draw.textlength(t, font=font) > TILE_W - 8:
            t = t[:-2] + "…"
        draw.text((col * TILE_W + 4, 5), t, fill="black", font=font)

    def tile(arr, resample) -> Image.Image:
        return Image.fromarray(arr).resize((TILE_W, tile_h), resample)

    for row, (img, lab) in enumerate(zip(images, labels, strict=True)):
        preds, cuts = [], []
        for _, net, meta in nets:
            cls, alpha = _predict(net, meta, img, device)
            preds.append(tile(colorize(cls), Image.Resampling.NEAREST))
            a = np.asarray(
                Image.fromarray(alpha.astype(np.float32)).resize((TILE_W, tile_h), Image.Resampling.BILINEAR)
            )
            a = np.clip(a, 0.0, 1.0)[..., None]
            rgb = np.asarray(tile(img, Image.Resampling.BILINEAR), dtype=np.float32)
            cuts.append(Image.fromarray((a * rgb + (1 - a) * checker).round().astype(np.uint8)))
        gt = colorize(lab) if lab.max() <= len(CLASSES) else np.full((*lab.shape, 3), 128, np.uint8)
        for col, im in enumerate(
            [tile(img, Image.Resampling.BILINEAR), tile(gt, Image.Resampling.NEAREST), *preds, *cuts]
        ):
            canvas.paste(im, (col * TILE_W, HEADER_H + row * tile_h))
    canvas.save(path)
    return ("grid: some checkpoints failed to load: " + "; ".join(errors)) if errors else None


# ------------------------------------------------------------------------------------------------- W&B


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
            settings=wandb.Settings(silent=True),
        )
    else:
        run = wandb.run
    try:
        cols = ["net", "runs", "params_M", "test_mIoU_mean", "test_mIoU_std", "test_acc_mean", "test_acc_std",
                *(f"iou_{c}" for c in CLASSES), "wall_time_s", "infer_ms_480x360"]  # fmt: skip
        data = []
        for s in stats:
            pm = None if s.params_m is None else s.params_m / 1e6
            ious = [s.class_iou[c].mean for c in CLASSES]
            data.append([s.net, len(s.runs), pm, s.miou.mean, s.miou.std, s.acc.mean, s.acc.std, *ious,
                         s.wall_s, s.infer_ms])  # fmt: skip
        run_cols = ["run_dir", "net", "seed", "status", "test_mIoU", "error"]
        run_data = [
            [str(r.dir), r.net, None if r.seed is None else str(r.seed), "ok" if r.ok else "failed",
             r.metric("test/mIoU"), "" if r.ok else r.error]
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
        where = getattr(run, "dir", "") or ""
    finally:
        if own:
            wandb.finish()
    return f"W&B: logged to run {run.id} (group {group!r}) {where}".rstrip()


# ------------------------------------------------------------------------------------------------ report


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
        raise CompareError(f"no {SUMMARY_NAME} found under {', '.join(map(str, paths))}")
    sweep = paths[0] if paths[0].is_dir() else paths[0].parent
    out = Path(out) if out else sweep / REPORT_DIRNAME
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = aggregate(runs)
    failed = [r for r in runs if not r.ok]
    groups = Counter(str(r.summary["group"]) for r in runs if r.summary.get("group"))
    group = groups.most_common(1)[0][0] if groups else sweep.name
    warnings: list[str] = []

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; a report is for others to read too
    try:
        charts = {
            "val_miou": plot_val_miou(stats, tmp / "val_miou.png"),
            "class_iou": plot_class_iou(stats, tmp / "class_iou.png"),
        }
        try:
            skipped = make_grid(stats, resolve_data_root(data_root, runs), grid_images, tmp / "grid.png")
        except (
            Exception
        ) as e:  # the grid is a bonus: a bad checkpoint or image must not cost the whole report
            skipped = f"grid skipped: {type(e).__name__}: {e}"
            (tmp / "grid.png").unlink(missing_ok=True)
        if skipped:
            warnings.append(skipped)

        head, rows = main_table(stats)
        main_md = render_md([("table", head, rows)])
        partial = [r for r in runs if r.ok and r.partial_test]
        blocks: list[Block] = [
            ("h", 1, f"Sweep report: {group}"),
            (
                "p",
                f"{len(runs)} runs found under {', '.join(str(p) for p in paths)}: {len(runs) - len(failed)} ok, "
                f"{len(failed)} failed. Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.",
            ),  # fmt: skip
            ("h", 2, "How to read this"),
            (
                "ul",
                [
                    "Numbers are percentages on the CamVid test split; X ± Y is the mean ± sample std (ddof=1) over "
                    "a net's seeds. '± —' means a single run: its spread is unknown, not zero.",
                    "mIoU = mean over the 11 classes of intersection over union; global acc = share of non-void "
                    "pixels labelled right. Nets are sorted by test mIoU, best first.",
                    f"Paper columns and rows are the published numbers of {PAPER_CITE}, not ours: they come from "
                    "the paper's much longer training, so short runs land below them.",
                    "Failed runs are listed at the end and left out of every statistic.",
                ] + ([f"PARTIAL TEST SET: {len(partial)} run(s) were tested on fewer frames than the split holds "
                      "(see 'Test frames'); their numbers are not comparable with full CamVid test results."]
                     if partial else []),
            ),  # fmt: skip
            ("h", 2, "Nets (aggregated over seeds)"),
            ("table", head, rows),
            ("h", 2, "Per-class test IoU % (mean over seeds)"),
            ("table", *class_table(stats)),
        ]
        if charts["val_miou"]:
            blocks += [("h", 2, "Validation mIoU per epoch"),
                       ("p", "Thin lines: single runs; bold: the net's mean; band: min–max over its seeds."),
                       ("img", "val mIoU per epoch", "val_miou.png")]  # fmt: skip
        if charts["class_iou"]:
            blocks += [("h", 2, "Per-class IoU"), ("img", "per-class IoU", "class_iou.png")]
        blocks.append(("h", 2, "Qualitative grid"))
        if (tmp / "grid.png").is_file():
            fg = ", ".join(DEFAULT_FOREGROUND)
            blocks += [("p", f"Rows: the same CamVid test images. Columns: input | ground truth | each net's "
                             f"prediction | each net's cut-out (keeps {fg}; the checkerboard is the transparent "
                             "background). Each net is shown by its best seed's best checkpoint."),
                       ("img", "qualitative grid", "grid.png")]  # fmt: skip
        for w in warnings:
            blocks.append(("p", w))
        blocks += [("h", 2, "Runs"), ("table", *run_table(runs, paths)), ("h", 2, "Failed runs")]
        if failed:
            blocks.append(("ul", [f"{_rel(r.dir, paths)} (net {r.net}, seed {DASH if r.seed is None else r.seed}): "
                                  f"{r.error}" for r in failed]))  # fmt: skip
        else:
            blocks.append(("p", "None."))

        (tmp / "report.md").write_text(render_md(blocks), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(blocks, f"Sweep report: {group}"), encoding="utf-8")
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
    ap = argparse.ArgumentParser(prog="python -m bgremover.compare", description=__doc__.splitlines()[0])
    ap.add_argument(
        "paths",
        nargs="*",
        type=Path,
        help=f"sweep dirs or summary.json files (default: newest under {MULTIRUNS_DIR}/)",
    )
    ap.add_argument("--out", type=Path, default=None, help="report folder (default: <first sweep>/report)")
    ap.add_argument(
        "--wandb", action="store_true", help="also log the tables and charts to W&B (job_type compare)"
    )
    ap.add_argument(
        "--data-root",
        default=None,
        help="CamVid root for the grid (default: $DATA_DIR, then the runs' data.root)",
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
    except (CompareError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.main_md, end="")
    for w in report.warnings:
        print(w)
    print(f"report: {report.path / 'report.md'} (html: {report.path / 'report.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
