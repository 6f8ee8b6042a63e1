"""Report text: the tables, rendered once as blocks and written twice (Markdown and self-contained HTML)."""

from __future__ import annotations

import html
from pathlib import Path

from bgremover.compare.dataset import table_classes
from bgremover.compare.runs import (
    PAPER,
    PAPER_CITE,
    PAPER_CLASS_IOU_103,
    NetStats,
    Run,
    Stat,
    _num,
    run_labels,
)

DASH = "—"


def pct(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.1f}"


def pct_pm(s: Stat, of: int | None = None) -> str:
    """'52.0 ± 2.8' (percent); '± —' marks a single run, whose spread is unknown, not zero. With `of` (the row's
    runs), a figure that fewer of them have says '(1 of 2 runs)': a run tested with test=false, or whose number is
    missing, was averaged out of that cell without a word while the Runs column counted it (a user audit)."""
    if s.mean is None:
        return DASH
    cell = f"{100 * s.mean:.1f} ± {DASH if s.std is None else f'{100 * s.std:.1f}'}"
    return cell if of is None or s.n >= of else f"{cell} ({s.n} of {of} runs)"


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
    """A run's folder as the Runs table names it: relative to the folder it was found under, and with several
    folders compared, that folder's name first (two sweeps' job "0" are different runs)."""
    for root in roots:
        base = root if root.is_dir() else root.parent
        try:
            rel = path.resolve().relative_to(base.resolve())
        except ValueError:
            continue
        if str(rel) == ".":
            return base.name
        return f"{base.name}/{rel}" if len(roots) > 1 else str(rel)
    return str(path)


def main_table(stats: list[NetStats], paper: bool = True) -> tuple[list[str], list[list[str]]]:
    """The nets' rows; `paper`: with the paper's column (CamVid runs: the paper measured CamVid, no one's folder)."""
    has_infer = any(s.infer_ms is not None for s in stats)
    head = ["Net", "Runs", "Params (M)", "Test mIoU %", "Test frames", "Global acc %", "Best val mIoU %",
            "Train time"]
    if has_infer:
        head.append("Infer ms / 480×360")
    if paper:
        head.append(f"Paper ({PAPER_CITE}): mIoU / acc / params")
    rows = []
    for s in stats:
        row = [
            s.net,
            str(len(s.runs)),
            DASH if s.params_m is None else f"{s.params_m / 1e6:.2f}",
            pct_pm(s.miou, len(s.runs)),
            frames_cell(s.runs),
            pct_pm(s.acc, len(s.runs)),
            pct_pm(s.val_best, len(s.runs)) + val_note(s.runs),
            duration(s.wall_s),
        ]
        if has_infer:
            row.append(DASH if s.infer_ms is None else f"{s.infer_ms:.1f}")
        if paper:
            p = s.paper
            row.append(f"{p['name']}: {p['miou']} / {p['acc']} / {p['params_m']} M" if p else DASH)
        rows.append(row)
    return head, rows


def frames_cell(runs: list[Run]) -> str:
    """'233', or '160 of 233 (partial)' when any run was tested on part of the split; '4–6 of 233 (partial,
    mixed)' when the averaged runs were tested on different subsets (the smallest count alone hid that)."""
    counts = {r.test_frames for r in runs if r.test_frames[0] is not None}
    if not counts:
        return DASH
    frames, total = min(counts, key=lambda c: c[0])
    most = max(c[0] for c in counts)
    if most != frames:
        return f"{frames}–{most}" + (f" of {total}" if total is not None else "") + " (partial, mixed)"
    return f"{frames} of {total} (partial)" if total is not None and frames != total else str(frames)


def val_note(runs: list[Run]) -> str:
    """' (val trained on)' and/or ' (partial val split)' beside a val number of these runs, else ''. Every val
    number carries it (the Runs table and the Search paragraph showed theirs bare)."""
    return ((" (val trained on)" if any(r.trained_on_val for r in runs) else "")
            + (" (partial val split)" if any(r.val_partial for r in runs) else ""))


def partial_note(runs: list[Run]) -> str:
    """' — test frames 4 of 233 (partial)' beside a number of runs tested on part of the split, else ''."""
    cell = frames_cell(runs)
    return f" — test frames {cell}" if "partial" in cell else ""


def class_table(stats: list[NetStats]) -> tuple[list[str], list[list[str]]]:
    classes = table_classes(stats)  # the runs' own: a remover's background, foreground (CamVid's 11 were all "—")
    head = ["Net", *classes]
    rows = []
    for s in stats:  # a partial test set is named here too: this table was the only one silent about it
        rows.append([s.net + partial_note(s.runs), *(pct(s.class_iou[c].mean) for c in classes)])
        if s.paper and s.paper["name"] == PAPER["103"]["name"]:  # CamVid runs only (aggregate)
            rows.append(
                [f"paper: FC-DenseNet103 ({PAPER_CITE})", *(f"{PAPER_CLASS_IOU_103[c]:.1f}" for c in classes)]
            )
    return head, rows


def run_table(runs: list[Run], roots: list[Path]) -> tuple[list[str], list[list[str]]]:
    head = ["Run dir", "Net", "Seed", "Test mIoU %", "Best val mIoU %", "Epochs", "Wall time"]
    # each run under its row's label above (net and the settings that set its recipe apart): by net alone, runs of
    # lr 0.001 and 0.003 read alike
    label = run_labels(runs)
    ok = sorted((r for r in runs if r.ok), key=lambda r: (label.get(id(r), r.net), str(r.seed), str(r.dir)))
    rows = [
        [
            _rel(r.dir, roots),
            label.get(id(r), r.net),
            DASH if r.seed is None else str(r.seed),
            pct(r.metric("test/mIoU")) + partial_note([r]),
            pct(r.metric("val/mIoU_best")) + (val_note([r]) if r.metric("val/mIoU_best") is not None else ""),
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
