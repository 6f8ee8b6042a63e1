"""Charts of a sweep: val mIoU per epoch and per-class IoU, one colour per net (matplotlib, Agg)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bgremover.compare.dataset import table_classes
from bgremover.compare.render import partial_note
from bgremover.compare.runs import (
    NET_COLOURS,
    PAPER,
    PAPER_CITE,
    PAPER_CLASS_IOU_103,
    NetStats,
    _num,
)


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
    epochs = {x for runs in curves.values() for xs, _ in runs for x in xs}
    if len(epochs) == 1:  # one validation: matplotlib's ±0.05 around it gave ticks of -0.04 … 0.04
        (only,) = epochs
        ax.set_xlim(only - 0.5, only + 0.5)  # (±1 put a tick at epoch -1)
        ax.set_xticks([only])  # MaxNLocator(integer=True) needs two whole numbers in view: it ticked 0.6, 0.7, …
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("Validation mIoU per epoch — thin: single runs, bold: mean, band: min–max over seeds")
    ax.grid(alpha=0.3)
    if max(len(s.net) for s in stats) > 40:  # long recipe labels would cover the curves: below the axes instead
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=9, frameon=False)
    else:
        ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_class_iou(stats: list[NetStats], path: Path) -> bool:
    """Per-class test IoU, nets side by side (mean over seeds, error bar = sample std). False if no numbers."""
    have = [s for s in stats if any(st.mean is not None for st in s.class_iou.values())]
    if not have:
        return False
    plt = _mpl()
    colours = _colours(stats)
    classes = table_classes(stats)  # the runs' own
    fig, ax = plt.subplots(
        figsize=(max(10, 1.1 * len(classes) + 0.4 * len(have) * len(classes) / 4), 5.5), dpi=100
    )
    width = 0.8 / len(have)
    xs = range(len(classes))
    for i, s in enumerate(have):
        means = [100 * (s.class_iou[c].mean or 0.0) for c in classes]
        errs = [100 * (s.class_iou[c].std or 0.0) for c in classes]
        pos = [x - 0.4 + width * (i + 0.5) for x in xs]
        # a partial test set's bars stood unmarked beside whole-split ones
        ax.bar(pos, means, width, yerr=errs, capsize=2, color=colours[s.net], label=s.net + partial_note(s.runs))
    if any(s.paper and s.paper["name"] == PAPER["103"]["name"] for s in have):
        ax.scatter(list(xs), [PAPER_CLASS_IOU_103[c] for c in classes], marker="_", s=600, color="black",
                   linewidths=2, zorder=3, label=f"paper FC-DenseNet103 ({PAPER_CITE})")  # fmt: skip
    ax.set_xticks(list(xs))
    ax.set_xticklabels(classes, rotation=30, ha="right")
    ax.set_ylabel("test IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-class test IoU (mean over seeds; error bars: sample std)")
    ax.grid(axis="y", alpha=0.3)
    # Below the axes: inside, it would hide the tall bars or the paper's markers.
    # as many columns as the longest label leaves room for (a net with several recipes has a long one)
    longest = max(len(s.net + partial_note(s.runs)) for s in have) + 4
    ncol = max(1, min(4, len(have) + 1, int(fig.get_figwidth() * 13 // longest)))
    ax.legend(fontsize=9, ncol=ncol, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")  # the legend below the axes is part of the picture
    plt.close(fig)
    return True
