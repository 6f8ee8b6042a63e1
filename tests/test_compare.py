"""`bgremover.compare`: known summaries in, known numbers, charts, grid and W&B table out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from bgremover import compare
from bgremover.data.classes import CLASSES, DEFAULT_FOREGROUND, PALETTE
from bgremover.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TIRAMISU, DEEPLAB = "tiramisu103", "deeplabv3plus_resnet18"
# (net, seed) -> (test mIoU, test acc); by hand: tiramisu 0.50/0.54 -> 52.0 ± 2.8, deeplab 0.60/0.66 -> 63.0 ± 4.2
NUMBERS = {
    (TIRAMISU, 1): (0.50, 0.80),
    (TIRAMISU, 2): (0.54, 0.84),
    (DEEPLAB, 1): (0.60, 0.85),
    (DEEPLAB, 2): (0.66, 0.91),
}
FAILED_ERROR = "CUDA out of memory while allocating 2.00 GiB"


def class_iou(net: str, seed: int, i: int) -> float:
    """Per-class IoU: class i gets 0.05*i + 0.30 (+0.10 for deeplab), seeds differ by ±0.02."""
    return 0.30 + 0.05 * i + (0.10 if net == DEEPLAB else 0.0) + (0.02 if seed == 2 else -0.02)


def write_summary(where: Path, summary: dict) -> None:
    where.mkdir(parents=True, exist_ok=True)
    (where / "summary.json").write_text(json.dumps(summary))


def ok_summary(
    run_dir: Path, net: str, seed: int, ckpt: Path | None = None, data_root: Path | None = None
) -> dict:
    miou, acc = NUMBERS[(net, seed)]
    metrics = {"test/mIoU": miou, "test/acc": acc, "val/mIoU_best": miou + 0.05, "test/loss": 0.7}
    metrics |= {f"test/iou_{c}": class_iou(net, seed, i) for i, c in enumerate(CLASSES)}
    return dict(
        status="ok", run_dir=str(run_dir), net=net, experiment="compare_models", group="cmp_sweep", seed=seed,
        params=9_321_000 if net == TIRAMISU else 12_300_000, epochs=3, wall_time_s=125.0 + seed,
        best_ckpt=str(ckpt) if ckpt else None, metrics=metrics,
        history={"epoch": [0, 1, 2], "val/mIoU": [0.1 * seed, 0.3, miou], "val/loss": [1, 0.8, 0.7],
                 "train/loss": [1.2, 0.9, 0.8]},
        infer_ms_480x360=35.2 if net == TIRAMISU else None,
        config={"data": {"root": str(data_root) if data_root else "/nonexistent/camvid"}},
    )  # fmt: skip


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep of 2 nets × 2 seeds (nested at Hydra-like depths) plus one failed job."""
    root = tmp_path / "sweep"
    for job, (net, seed) in enumerate(NUMBERS):
        d = root / str(job) / "run"
        write_summary(d, ok_summary(d, net, seed))
    d = root / "4"
    failed = {"status": "failed", "error": FAILED_ERROR, "run_dir": str(d), "net": TIRAMISU, "seed": 3}
    write_summary(d, failed | {"group": "cmp_sweep"})
    return root


def table_row(md: str, first_cell: str) -> list[str]:
    """The cells of the first Markdown table row whose first cell is `first_cell`."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row for {first_cell!r} in:\n{md}")


def assert_png(path: Path, min_w: int = 300, min_h: int = 200) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        assert im.width >= min_w and im.height >= min_h, im.size
        return im.size


def test_report_numbers_charts_and_failed_run(sweep: Path) -> None:
    rep = compare.build_report([sweep], grid_images=0)
    out = sweep / "report"
    assert rep.path == out
    md = (out / "report.md").read_text()

    tira, deep = table_row(md, TIRAMISU), table_row(md, DEEPLAB)
    # these summaries predate test frame counts: "—" in the Test frames column
    assert tira[1:7] == ["2", "9.32", "52.0 ± 2.8", "—", "82.0 ± 2.8", "57.0 ± 2.8"]
    assert deep[1:7] == ["2", "12.30", "63.0 ± 4.2", "—", "88.0 ± 4.2", "68.0 ± 4.2"]
    assert tira[7] == "2m 06s"  # mean of 126 s and 127 s, rounded
    assert tira[8] == "35.2" and deep[8] == "—"  # inference time only where measured
    assert "FC-DenseNet103: 66.9 / 91.5 / 9.4 M" in tira[9] and deep[9] == "—"
    assert md.index(f"| {DEEPLAB} |") < md.index(f"| {TIRAMISU} |")  # best mIoU first

    # Per-class means: seeds ±0.02 cancel, so class i is 30 + 5i (+10 for deeplab).
    class_rows = [line for line in md.splitlines() if line.startswith(f"| {TIRAMISU} |")]
    tira_cls = [c.strip() for c in class_rows[1].strip("|").split("|")]  # second tiramisu row: class table
    for i, c in enumerate(CLASSES):
        assert tira_cls[1 + i] == f"{30 + 5 * i:.1f}", c
    assert f"| Net | {' | '.join(CLASSES)} |" in md
    deep_cls = [
        c.strip()
        for c in [r for r in md.splitlines() if r.startswith(f"| {DEEPLAB} |")][1].strip("|").split("|")
    ]
    assert deep_cls[1:] == [f"{40 + 5 * i:.1f}" for i in range(len(CLASSES))]
    paper = table_row(md, "paper: FC-DenseNet103 (Jégou et al. 2017, Table 2)")
    assert paper[1 + CLASSES.index("Sky")] == "93.0" and paper[1 + CLASSES.index("Bicyclist")] == "50.5"

    # Per-run table: 4 ok runs; failed job listed with its error, not counted.
    assert md.count("| 0/run |") == 1 and "| 3/run | deeplabv3plus_resnet18 | 2 | 66.0 | 71.0 | 3 |" in md
    assert f"4 (net {TIRAMISU}, seed 3): {FAILED_ERROR}" in md
    assert "5 runs found" in md and "4 ok, 1 failed." in md
    # an interrupted run (Ctrl-C, SIGTERM: resumable) is counted as such, not as a failure
    write_summary(sweep / "5", {"status": "interrupted", "error": "interrupted by SIGTERM at epoch 3, step 12",
                                "run_dir": str(sweep / "5"), "net": TIRAMISU, "seed": 4})
    md = compare.build_report([sweep], grid_images=0).path.joinpath("report.md").read_text()
    assert "6 runs found" in md and "4 ok, 1 failed, 1 interrupted." in md and "## Failed or interrupted runs" in md

    html = (out / "report.html").read_text()
    assert "<table>" in html and "<td>52.0 ± 2.8</td>" in html and FAILED_ERROR in html
    assert 'src="val_miou.png"' in html and 'src="class_iou.png"' in html
    assert "grid skipped" in md  # --grid-images 0
    assert_png(out / "val_miou.png")
    assert_png(out / "class_iou.png")
    assert not (out / "grid.png").exists()
    assert "52.0 ± 2.8" in rep.main_md and "Per-class" not in rep.main_md


def test_single_run_has_no_spread_and_no_history_skips_curve(tmp_path: Path) -> None:
    d = tmp_path / "one" / "0"
    s = ok_summary(d, DEEPLAB, 1)
    s["history"] = {}
    write_summary(d, s)
    md = (compare.build_report([tmp_path / "one"], grid_images=0).path / "report.md").read_text()
    assert table_row(md, DEEPLAB)[3] == "60.0 ± —"
    assert "single run" in md
    assert not (tmp_path / "one" / "report" / "val_miou.png").exists() and "val_miou.png" not in md


def test_rerun_replaces_report_atomically(sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compare.build_report([sweep], grid_images=0)
    (sweep / "report" / "stale.txt").write_text("old")
    compare.build_report([sweep], grid_images=0)
    assert not (sweep / "report" / "stale.txt").exists()  # replaced, not merged

    # A crash half-way leaves the previous report untouched and no temp folder behind.
    before = (sweep / "report" / "report.md").read_text()

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(compare.plots, "plot_class_iou", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        compare.build_report([sweep], grid_images=0)
    assert (sweep / "report" / "report.md").read_text() == before
    assert sorted(p.name for p in sweep.iterdir() if p.name.startswith(".")) == []


def test_out_never_replaces_a_folder_that_is_not_an_earlier_report(sweep: Path, tmp_path: Path) -> None:
    """`--out DIR` renamed any existing folder aside and deleted it: a folder of notes, the sweep itself (its runs
    and checkpoints) or a file. Only an earlier report (report.md, no runs inside) is replaced; the rest is refused
    before anything is written, and left as it was."""
    notes = tmp_path / "victim"
    notes.mkdir()
    (notes / "notes.txt").write_text("precious")
    afile = tmp_path / "afile"
    afile.write_text("x")
    summaries = sorted(sweep.rglob("summary.json"))
    for out, message in ((notes, "not an earlier report"), (sweep, "holds the run"), (sweep.parent, "holds the run"),
                         (afile, "is a file")):
        with pytest.raises(UserError, match=message):  # CompareError, or the shared output check
            compare.build_report([sweep], out=out, grid_images=0)
    assert (notes / "notes.txt").read_text() == "precious" and afile.read_text() == "x"
    assert sorted(sweep.rglob("summary.json")) == summaries and len(summaries) == 5
    assert not list(tmp_path.glob(".*old*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    compare.build_report([sweep], out=empty, grid_images=0)  # an empty folder, and then its own report, are fine
    compare.build_report([sweep], out=empty, grid_images=0)
    assert (empty / "report.md").is_file()


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "bgremover.compare", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)  # fmt: skip


@pytest.mark.slow
def test_cli(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    r = run_cli(str(sweep), "--out", str(out), "--grid-images", "0")
    assert r.returncode == 0, r.stderr
    assert "| tiramisu103 | 2 | 9.32 | 52.0 ± 2.8 |" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith(f"report: {out / 'report.md'}")
    assert (out / "report.html").is_file() and not (sweep / "report").exists()

    # Default sweep: the newest Hydra sweep (marked by multirun.yaml) under logs/ of the cwd.
    proj = tmp_path / "proj"
    newest = proj / "logs" / "multiruns" / "2025-01-02" / "10-00-00"
    newest.mkdir(parents=True)
    (newest / "multirun.yaml").write_text("{}")
    older = proj / "logs" / "multiruns" / "2025-01-01" / "09-00-00"
    older.mkdir(parents=True)
    (older / "multirun.yaml").write_text("{}")
    os.utime(older / "multirun.yaml", (1, 1))  # when a sweep ran: its marker's time
    write_summary(newest / "0", ok_summary(newest / "0", DEEPLAB, 2))
    r = run_cli("--grid-images", "0", cwd=proj)
    assert r.returncode == 0, r.stderr
    assert "66.0 ± —" in r.stdout and (newest / "report" / "report.md").is_file()


def test_the_newest_sweep_may_be_an_optuna_one(tmp_path: Path) -> None:
    """Optuna sweeps write no multirun.yaml: `make compare` without SWEEP reported an older grid sweep instead."""
    from bgremover.compare.runs import newest_sweep

    grid, optuna = tmp_path / "2025-01-01" / "09-00-00", tmp_path / "2025-01-02" / "10-00-00"
    for folder, marker in ((grid, "multirun.yaml"), (optuna, "optimization_results.yaml")):
        (folder / "0").mkdir(parents=True)
        (folder / marker).write_text("{}\n")
    os.utime(grid, (1, 1))
    assert newest_sweep(tmp_path) == optuna
    (optuna / "optimization_results.yaml").unlink()
    (optuna / "sweep_summary.json").write_text("{}\n")  # the SweepReport's, at every sweep's end
    os.utime(optuna, None)
    assert newest_sweep(tmp_path) == optuna
    # a report written into the older sweep later made it the newest (the folder's time moved)
    os.utime(grid / "multirun.yaml", (1, 1))
    (grid / "report").mkdir()
    assert newest_sweep(tmp_path) == optuna


def test_no_sweep_under_logs_is_said_not_replaced_by_the_newest_folder(tmp_path: Path) -> None:
    """With no sweep under logs/, `make compare` took the newest folder of any kind: logs/eval ("no summary.json
    found under logs/eval", a folder the user never named) or logs/train, every run ever trained (a user audit)."""
    from bgremover.compare.runs import newest_sweep

    (tmp_path / "train" / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "train" / "runs" / "r1" / "summary.json").write_text("{}\n")
    (tmp_path / "eval" / "runs" / "e1").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no sweep folder"):
        newest_sweep(tmp_path)


@pytest.mark.parametrize("make", ["empty", "missing"])
def test_cli_bad_input_one_error_line(tmp_path: Path, make: str) -> None:
    target = tmp_path / "nothing"
    if make == "empty":
        target.mkdir()
    r = run_cli(str(target))
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("python -m bgremover.compare: error:"), r.stderr
    assert not (target / "report").exists()


def test_a_file_that_is_no_summary_is_refused_not_reported(tmp_path: Path, capsys) -> None:
    """`make compare SWEEP=README.md` (a file where a sweep folder goes) exited 0 with "No run finished" and wrote
    a report/ folder beside the file (into the repository): it is one error line now, and nothing is written."""
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    assert compare.main([str(notes)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(notes) in err and "summary.json" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.md"]


def test_main_without_multiruns_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert compare.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m bgremover.compare: error:") and "logs" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ grid


def fake_camvid(root: Path, n: int = 4, w: int = 64, h: int = 48) -> Path:
    rng = np.random.default_rng(0)
    (root / "test").mkdir(parents=True)
    (root / "testannot").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "test" / f"img_{i}.png")
        Image.fromarray(rng.integers(0, 12, (h, w), dtype=np.uint8), mode="L").save(
            root / "testannot" / f"img_{i}.png"
        )
    return root


def biased_conv(winner: str):
    """A 1×1 conv that predicts `winner` everywhere (bias dominates), so predictions are known exactly."""
    import torch

    net = torch.nn.Conv2d(3, 11, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.fill_(-10.0)
        net.bias[CLASSES.index(winner)] = 10.0
    return net


META = {"mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3], "size_multiple": 32, "classes": list(CLASSES),
        "default_foreground": list(DEFAULT_FOREGROUND), "ignore_index": 11}  # fmt: skip


def grid_sweep(tmp_path: Path, ckpt_for) -> tuple[Path, Path]:
    data = fake_camvid(tmp_path / "camvid")
    root = tmp_path / "gsweep"
    for job, (net, seed) in enumerate(NUMBERS):
        d = root / str(job)
        write_summary(d, ok_summary(d, net, seed, ckpt=ckpt_for(d, net), data_root=data))
    return root, data


def expected_grid_size(n_rows: int, n_nets: int, w: int = 64, h: int = 48) -> tuple[int, int]:
    return compare.TILE_W * (2 + 2 * n_nets), compare.HEADER_H + n_rows * round(compare.TILE_W * h / w)


@pytest.mark.slow
def test_grid_layout_and_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Loader stub: tiramisu "sees" only cars (all foreground), deeplab only sky (all background).
    winners = {TIRAMISU: "Car", DEEPLAB: "Sky"}

    def ckpt_for(d: Path, net: str) -> Path:
        p = d / "checkpoints" / "best.ckpt"
        p.parent.mkdir(parents=True)
        p.write_text(net)
        return p

    monkeypatch.setattr(
        compare.grid, "_load_checkpoint", lambda p: (biased_conv(winners[Path(p).read_text()]), META)
    )
    root, _ = grid_sweep(tmp_path, ckpt_for)  # data root comes from the runs' config.data.root
    monkeypatch.delenv("DATA_DIR", raising=False)
    rep = compare.build_report([root], grid_images=3)
    assert not [w for w in rep.warnings if "grid" in w], rep.warnings
    grid = root / "report" / "grid.png"
    size = assert_png(grid)
    assert size == expected_grid_size(3, 2)
    assert "grid.png" in (root / "report" / "report.md").read_text()

    img = np.asarray(Image.open(grid).convert("RGB"))
    th = round(compare.TILE_W * 48 / 64)
    cy = compare.HEADER_H + th + th // 2  # middle of row 2

    def cell(col: int) -> np.ndarray:
        return img[cy - 5 : cy + 5, col * compare.TILE_W + 100 : col * compare.TILE_W + 110]

    # Columns: input | gt | deeplab pred | tiramisu pred | deeplab cut-out | tiramisu cut-out (best net first).
    assert (cell(2) == PALETTE[CLASSES.index("Sky")]).all()
    assert (cell(3) == PALETTE[CLASSES.index("Car")]).all()
    assert set(map(tuple, cell(4).reshape(-1, 3))) <= set(compare.CHECKER_RGB)  # all background: checkerboard
    assert np.abs(cell(5).astype(int) - cell(0).astype(int)).max() <= 1  # all foreground: the input itself


def test_a_single_validation_is_plotted_on_whole_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One validated epoch: matplotlib's default range around it put ticks at -0.04 … 0.04 on the epoch axis."""
    from matplotlib.figure import Figure

    from bgremover.compare import plots

    s = ok_summary(tmp_path / "r", TIRAMISU, 1)
    s["history"] = {"epoch": [0], "val/mIoU": [0.3]}
    write_summary(tmp_path / "r", s)
    seen = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: seen.append(
        (fig.axes[0].get_xlim(), list(fig.axes[0].get_xticks()))) or real(fig, *a, **k))
    assert plots.plot_val_miou(compare.aggregate(compare.find_runs([tmp_path / "r"])), tmp_path / "v.png")
    assert seen == [((-0.5, 0.5), [0.0])]  # and its one tick: 0.6, 0.7, … read as fractions of an epoch


def test_grid_titles_wrap_instead_of_being_cut() -> None:
    """Cut to one line, every column of a sweep's grid read "deeplabv3plus_mobilenet_v2 (model…": the setting
    that told them apart and "prediction"/"cut-out" were lost."""
    from PIL import ImageDraw

    from bgremover.compare.grid import _font, _wrap

    font, draw = _font(), ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def fits(text: str) -> bool:
        return draw.textlength(text, font=font) <= compare.TILE_W - 8

    title = "deeplabv3plus_mobilenet_v2 (model.optimizer.lr=0.001, data.crop_size=[224,224]) prediction"
    lines = _wrap(title, fits)
    assert len(lines) > 1 and all(fits(line) for line in lines), lines
    assert "".join(lines).replace(" ", "") == title.replace(" ", "") and lines[-1].endswith("prediction")
    assert _wrap("input", fits) == ["input"]


def test_a_row_over_different_test_subsets_says_so() -> None:
    """Runs tested on 4 and on 6 frames were averaged into one row reading "4 of 233 (partial)"."""
    from bgremover.compare.render import frames_cell
    from bgremover.compare.runs import Run

    def run(frames, of=233):
        return Run(Path("r"), {"status": "ok", "test_split": {"frames": frames, "of": of}})

    assert frames_cell([run(233), run(233)]) == "233"
    assert frames_cell([run(4), run(4)]) == "4 of 233 (partial)"
    assert frames_cell([run(6), run(4)]) == "4–6 of 233 (partial, mixed)"
    assert frames_cell([run(233), run(4)]) == "4–233 of 233 (partial, mixed)"
    # the Runs and Per-class tables said "2.0" with no word of the 4 frames
    from bgremover import compare
    from bgremover.compare.render import class_table, run_table

    def scored(frames):
        return Run(Path(f"r{frames}"), {"status": "ok", "net": "n", "seed": frames, "test_split": {
            "frames": frames, "of": 233, "complete": frames == 233}, "metrics": {"test/mIoU": 0.02, "test/iou_Sky": 0.1}})

    _, rows = run_table([scored(4), scored(233)], [Path(".")])
    assert sorted(r[3] for r in rows) == ["2.0", "2.0 — test frames 4 of 233 (partial)"]
    _, rows = class_table(compare.aggregate([scored(4)]))
    assert rows[0][0] == "n — test frames 4 of 233 (partial)"


def test_a_partial_test_set_is_never_ranked_above_the_whole_split(tmp_path: Path, monkeypatch) -> None:
    """A net tested on 4 frames (60.0) was the report's first row above one tested on all 233 (40.0), W&B's
    compare/best_net, and an unmarked bar in class_iou.png."""
    from matplotlib.axes import Axes

    root = tmp_path / "runs"
    for name, net, frames, miou in (("a", TIRAMISU, 4, 0.60), ("b", DEEPLAB, 233, 0.40), ("c", DEEPLAB, 233, 0.30)):
        s = ok_summary(root / name, TIRAMISU, 1) | {"net": net, "test_split": {"frames": frames, "of": 233}}
        s["metrics"] = s["metrics"] | {"test/mIoU": miou}
        s["config"] = {"model": {"optimizer": {"lr": miou}}}  # b and c: two recipes of one net, two rows
        write_summary(root / name, s)
    untested = ok_summary(root / "d", DEEPLAB, 1) | {"config": {"model": {"optimizer": {"lr": 0.2}}}}  # test=false
    write_summary(root / "d", untested | {"metrics": {"val/mIoU_best": 0.5}})
    stats = compare.aggregate(compare.find_runs([root]))
    assert [(s.runs[0].dir.name, s.miou.mean) for s in stats] == [("b", 0.40), ("c", 0.30), ("a", 0.60), ("d", None)]
    labels: list = []
    bar = Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda self, *a, **k: labels.append(k.get("label")) or bar(self, *a, **k))
    logged: dict = {}
    payloads: list = []

    class Run:
        id, dir, summary = "stub", "", logged

        def log(self, payload):  # what W&B would store: the nets table, in the report's order
            payloads.append(payload)

    stub = types.SimpleNamespace(run=None, Table=lambda columns, data: data, Image=lambda path: path,
                                 Settings=lambda **k: k, init=lambda **k: Run(), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", stub)
    md = (compare.build_report([root], out=tmp_path / "rep", grid_images=0, use_wandb=True).path / "report.md").read_text()
    table = md[md.index("## Nets"):md.index("## Per-class")]
    assert table.index(f"| {DEEPLAB} (model.optimizer.lr=0.3) |") < table.index(f"| {TIRAMISU} |")
    assert (logged["compare/best_net"], logged["compare/best_test_mIoU"]) == (f"{DEEPLAB} (model.optimizer.lr=0.4)", 0.40)
    assert logged["compare/best_test_frames"] == "233"
    nets = payloads[0]["compare/nets"]  # the Table stub hands back its rows: net, runs, ..., test frames
    assert [(row[0], row[7]) for row in nets] == [(f"{DEEPLAB} (model.optimizer.lr=0.4)", "233"),
                                                  (f"{DEEPLAB} (model.optimizer.lr=0.3)", "233"),
                                                  (TIRAMISU, "4 of 233 (partial)"), (f"{DEEPLAB} (model.optimizer.lr=0.2)", "—")]
    assert f"{TIRAMISU} — test frames 4 of 233 (partial)" in labels and f"{DEEPLAB} (model.optimizer.lr=0.4)" in labels
    # every row partial: the best one is named with its frames
    only = compare.build_report([root / "a"], out=tmp_path / "rep2", grid_images=0, use_wandb=True)
    assert only.stats[0].net == TIRAMISU and logged["compare/best_test_frames"] == "4 of 233 (partial)"


def test_seeds_tested_on_different_frames_are_never_averaged(tmp_path: Path) -> None:
    """`make eval CKPT=<sweep>/1/...` attached whole-split numbers to one seed of a sweep tested on 4 frames: its
    row read "0.4 ± 0.5 | 4–233 of 233 (partial, mixed)", a mean of a 4-frame and a 233-frame score."""
    root = tmp_path / "sweep"
    for job, (net, seed) in enumerate(NUMBERS):
        s = ok_summary(root / str(job), net, seed) | {"test_split": {"frames": 4, "of": 233, "complete": False}}
        if (net, seed) == (DEEPLAB, 1):  # evaluated again, on the whole split
            s |= {"test_split": {"frames": 233, "of": 233, "complete": True}}
            s["metrics"] = s["metrics"] | {"test/mIoU": 0.30, "test/acc": 0.70}
        write_summary(root / str(job), s)
    report = compare.build_report([root], out=tmp_path / "rep", grid_images=0)
    md = (report.path / "report.md").read_text()
    whole, part = f"{DEEPLAB} (233 test frames)", f"{DEEPLAB} (4 test frames)"
    assert [s.net for s in report.stats] == [whole, part, TIRAMISU]  # the whole split's row still ranks first
    assert table_row(md, whole)[1:6] == ["1", "12.30", "30.0 ± —", "233", "70.0 ± —"]
    assert table_row(md, part)[1:6] == ["1", "12.30", "66.0 ± —", "4 of 233 (partial)", "91.0 ± —"]
    assert table_row(md, TIRAMISU)[1:5] == ["2", "9.32", "52.0 ± 2.8", "4 of 233 (partial)"]
    assert "mixed" not in md and "48.0 ±" not in md  # no mean of 0.30 and 0.66 anywhere
    assert f"MIXED TEST SETS: {DEEPLAB}: 233 and 4 frames." in md
    assert table_row(md, "2")[1:4] == [whole, "1", "30.0"]  # the Runs table names each run's row
    assert table_row(md, "3")[1:4] == [part, "2", "66.0 — test frames 4 of 233 (partial)"]
    # one test set: one row, named as before
    assert [s.net for s in compare.aggregate(compare.find_runs([root / "1", root / "3"]))] == [DEEPLAB, TIRAMISU]


def test_a_diverged_seed_does_not_poison_its_nets_mean(tmp_path: Path) -> None:
    """A run whose loss diverged records test numbers of NaN (summary.json writes them as NaN): the net's row is the
    mean of its other seeds, over the seeds that have a number, not NaN for the whole row."""
    root = tmp_path / "sweep"
    for job, (net, seed) in enumerate(NUMBERS):
        s = ok_summary(root / str(job), net, seed)
        if (net, seed) == (DEEPLAB, 1):
            s["metrics"] = s["metrics"] | {"test/mIoU": float("nan"), "test/acc": float("nan")}
        write_summary(root / str(job), s)
    diverged = root / str(list(NUMBERS).index((DEEPLAB, 1))) / "summary.json"
    assert '"test/mIoU": NaN' in diverged.read_text()
    stats = {s.net: s for s in compare.aggregate(compare.find_runs([root]))}
    other = NUMBERS[(DEEPLAB, 2)]
    assert (stats[DEEPLAB].miou.mean, stats[DEEPLAB].miou.std, stats[DEEPLAB].miou.n) == (other[0], None, 1)
    assert stats[DEEPLAB].acc.mean == other[1] and stats[TIRAMISU].miou.n == 2


def test_a_sweep_that_ran_no_job_says_so(tmp_path: Path) -> None:
    """A sweep that failed while composing (`model=deeplabv3plus,deeplabv4`) leaves only multirun.yaml; compare
    said just "no summary.json found"."""
    from bgremover import compare
    from bgremover.compare.report import CompareError

    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(CompareError, match="the sweep there stopped before any job ran"):
        compare.build_report([tmp_path], out=tmp_path / "report", grid_images=0)


def test_an_eval_sweep_is_not_called_a_sweep_that_ran_no_job(tmp_path: Path, capsys) -> None:
    """`python -m bgremover.eval -m ckpt_path=X split=val,test` ran and reported both jobs ok; compare over its
    folder said "the sweep there stopped before any job ran (its command's error line says why)"."""
    sweep = tmp_path / "eval_sweep"
    for job, split in enumerate(("val", "test")):
        (sweep / str(job)).mkdir(parents=True)
        (sweep / str(job) / "eval.json").write_text(json.dumps({"split": split, "metrics": {f"{split}/mIoU": 0.5}}))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / "sweep_summary.json").write_text("[]\n")
    assert compare.main([str(sweep)]) == 1
    assert capsys.readouterr().err == (
        f"python -m bgremover.compare: error: no summary.json found under {sweep}: it holds evaluations (eval.json, "
        "bgremover.eval's), and the report compares training runs; each evaluation's numbers are in its eval.json\n")
    assert not (sweep / "report").exists()


def test_a_folder_of_unfinished_runs_says_there_is_nothing_to_compare(tmp_path: Path) -> None:
    """Only an interrupted run: the report's Nets table was empty, headers alone, with nothing saying why."""
    write_summary(tmp_path / "s" / "0", {"status": "interrupted", "error": "interrupted by SIGTERM at epoch 1, step 4",
                                         "net": TIRAMISU, "seed": 1, "run_dir": str(tmp_path / "s" / "0")})
    report = compare.build_report([tmp_path / "s"], grid_images=0)
    md = (report.path / "report.md").read_text()
    assert "No run finished: nothing to compare" in md and "| Net |" not in md
    assert "## Failed or interrupted runs" in md and "interrupted by SIGTERM" in md
    assert report.main_md.strip().startswith("No run finished")


@pytest.mark.parametrize("field,value", [("metrics", "0.5"), ("test_split", "233"), ("config", ["data"]),
                                         ("history", [0.1, 0.2])])
def test_a_hand_edited_summary_is_a_failed_run_not_a_traceback(tmp_path: Path, field: str, value) -> None:
    """A summary.json whose nested record was edited into a string or a list stopped the report on
    "AttributeError: 'str' object has no attribute 'get'"; it is a failed run naming the field, the others reported."""
    for job, net in enumerate((TIRAMISU, DEEPLAB)):
        d = tmp_path / "s" / str(job)
        write_summary(d, ok_summary(d, net, 1) | ({field: value} if job == 0 else {}))
    report = compare.build_report([tmp_path / "s"], grid_images=0)
    md = (report.path / "report.md").read_text()
    assert "2 runs found" in md and "1 ok, 1 failed" in md
    assert f"unreadable summary.json: '{field}' is a" in md and "not an object" in md
    assert "| deeplabv3plus_resnet18 | 1 | 12.30 | 60.0 ± — |" in md


def test_runs_of_one_seed_are_flagged_as_repeats(tmp_path: Path) -> None:
    """Two runs of one net with the same seed (a rerun, or a resume that trained nothing more) were averaged as if
    they were two seeds, "± 0.0" read as a seed spread."""
    for job, seed in enumerate((1, 1, 2)):
        write_summary(tmp_path / "s" / str(job), ok_summary(tmp_path / "s" / str(job), TIRAMISU, seed))
    md = (compare.build_report([tmp_path / "s"], grid_images=0).path / "report.md").read_text()
    assert (f"- REPEATED SEEDS: {TIRAMISU} (3 runs, seeds 1, 1, 2): runs of one seed are repeats of one training, "
            "not different seeds, so the ± over them is not a seed spread.") in md
    one_each = (compare.build_report([tmp_path / "s" / "0", tmp_path / "s" / "2"], out=tmp_path / "r2",
                                     grid_images=0).path / "report.md").read_text()
    assert "REPEATED SEEDS" not in one_each
    from bgremover.compare.report import _repeats
    from bgremover.compare.runs import Run

    def run(seed, data_seed=0):
        return Run(Path("r"), {"status": "ok", "seed": seed, "config": {"data": {"seed": data_seed}}})

    assert _repeats([run(1), run(1)]) and not _repeats([run(1), run(2)])
    assert not _repeats([run(1, 0), run(1, 1)])  # other splits of the data: two trainings
    assert not _repeats([run(None), run(None)])  # no seed recorded: nothing to say


def test_report_title_names_the_sweep_or_the_folder(tmp_path: Path) -> None:
    """A sweep's report is titled by its group; separate runs (several groups) gathered in one folder by the folder."""
    for job, (net, seed) in enumerate(NUMBERS):
        write_summary(tmp_path / "one" / str(job), ok_summary(tmp_path / "one" / str(job), net, seed))
        d = tmp_path / "runs" / str(job)
        write_summary(d, {**ok_summary(d, net, seed), "group": f"speedrun_{net}"})
    one = (compare.build_report([tmp_path / "one"], grid_images=0).path / "report.md").read_text()
    assert one.startswith("# Sweep report: cmp_sweep\n")
    md = (compare.build_report([tmp_path / "runs"], grid_images=0).path / "report.md").read_text()
    assert md.startswith("# Report: runs (2 groups)\n")
    named = sorted((tmp_path / "runs").glob("*/summary.json"))  # runs named one by one: the nets compared
    md = (compare.build_report(named, out=tmp_path / "rep", grid_images=0).path / "report.md").read_text()
    nets = sorted({net for net, _ in NUMBERS})
    assert len(nets) == 2 and md.startswith(f"# Report: {nets[0]} vs {nets[1]} (2 groups)\n")


def test_best_checkpoint_found_in_a_moved_run(tmp_path: Path) -> None:
    """A run copied elsewhere (off a GPU machine, a moved sweep) keeps its checkpoint at the same place inside its
    folder: the report's grid finds it there; a path outside the old run folder is not guessed at."""
    old, new = tmp_path / "gpu-box" / "run", tmp_path / "here" / "run"
    ckpt = new / "checkpoints" / "epoch_049.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_text("x")
    run = compare.Run(new, ok_summary(old, DEEPLAB, 1, ckpt=old / "checkpoints" / "epoch_049.ckpt"))
    assert run.best_ckpt == ckpt
    assert compare.Run(new, ok_summary(old, DEEPLAB, 1, ckpt=tmp_path / "elsewhere.ckpt")).best_ckpt is None
    assert compare.Run(new, ok_summary(old, DEEPLAB, 1, ckpt=old / "checkpoints" / "gone.ckpt")).best_ckpt is None
    assert compare.Run(new, ok_summary(old, DEEPLAB, 1)).best_ckpt is None


def test_grid_skipped_without_checkpoint_or_data(sweep: Path, tmp_path: Path) -> None:
    rep = compare.build_report([sweep], grid_images=3)
    assert any("no run has an existing best_ckpt" in w for w in rep.warnings)
    assert "grid skipped" in (sweep / "report" / "report.md").read_text()

    ck = tmp_path / "x.ckpt"
    ck.write_text("x")
    assert "no test images" in compare.make_grid(
        compare.aggregate(
            [compare.Run(tmp_path, {**ok_summary(tmp_path, DEEPLAB, 1), "best_ckpt": str(ck)})]
        ),
        tmp_path / "no_data",
        3,
        tmp_path / "g.png",
    )


def test_pick_images_is_deterministic_and_spread() -> None:
    files = [Path(f"{i:03d}.png") for i in range(233)]
    assert compare.pick_images(files, 3) == [files[0], files[116], files[232]]
    assert compare.pick_images(files[:2], 3) == files[:2]
    assert compare.pick_images(files, 0) == []


@pytest.mark.slow
def test_grid_with_real_checkpoint_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented checkpoint format through the one checkpoint loader (no stub): a registered net class."""
    import torch

    from bgremover import export
    assert hasattr(export, "load_checkpoint_net")

    from bgremover.nets import FCDenseNet

    tiny = {"down_blocks": [1], "up_blocks": [1], "bottleneck_layers": 1, "growth_rate": 4, "first_conv_channels": 8}

    def ckpt_for(d: Path, net: str) -> Path:
        model = FCDenseNet(**tiny)
        with torch.no_grad():  # the classifier's bias decides: Pedestrian everywhere
            model.final_conv.weight.zero_()
            model.final_conv.bias.copy_(biased_conv("Pedestrian").bias)
        p = d / "checkpoints" / "epoch_002.ckpt"
        p.parent.mkdir(parents=True)
        torch.save(
            {
                "state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
                "bgremover": {
                    "net_config": {"_target_": "bgremover.nets.FCDenseNet", **tiny},
                    "net_name": "conv",
                    **META,
                },
            },
            p,
        )  # fmt: skip
        return p

    root, data = grid_sweep(tmp_path, ckpt_for)
    monkeypatch.setenv("DATA_DIR", "/nonexistent")  # --data-root wins over DATA_DIR
    rep = compare.build_report([root], data_root=data, grid_images=2)
    assert not [w for w in rep.warnings if "grid" in w], rep.warnings
    assert assert_png(root / "report" / "grid.png") == expected_grid_size(2, 2)
    img = np.asarray(Image.open(root / "report" / "grid.png").convert("RGB"))
    y = compare.HEADER_H + 20
    for col in (2, 3):  # both nets' prediction columns: Pedestrian everywhere
        assert (
            img[y, col * compare.TILE_W + 5 : col * compare.TILE_W + 200]
            == PALETTE[CLASSES.index("Pedestrian")]
        ).all()


# ------------------------------------------------------------------------------------------- W&B


@pytest.mark.slow
def test_wandb_offline_logs_table(sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    # wandb keeps its settings (the run dir among them) in a process-wide singleton: after a test file that ran a
    # W&B run earlier in this process (test_resume), this one wrote into the repository's ./wandb
    wandb.teardown()
    write_summary(sweep / "5", {"status": "interrupted", "error": "interrupted by SIGTERM at epoch 3, step 12",
                                "run_dir": str(sweep / "5"), "net": TIRAMISU, "seed": 4})
    rep = compare.build_report([sweep], grid_images=0, use_wandb=True)
    assert any(w.startswith("W&B: logged") and "cmp_sweep" in w for w in rep.warnings), rep.warnings
    assert wandb.run is None  # finished

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (table,) = (run_dir / "files" / "media" / "table" / "compare").glob("nets_*.table.json")
    t = json.loads(table.read_text())
    rows = {r[0]: dict(zip(t["columns"], r, strict=True)) for r in t["data"]}
    assert rows[TIRAMISU]["test_mIoU_mean"] == pytest.approx(0.52)
    assert rows[DEEPLAB]["test_mIoU_std"] == pytest.approx(0.0424264, abs=1e-6)
    assert rows[TIRAMISU]["test_frames"] == "—"  # these summaries predate test_split; frames_cell is tested above
    (runs_table,) = (run_dir / "files" / "media" / "table" / "compare").glob("runs_*.table.json")
    t = json.loads(runs_table.read_text())
    statuses = sorted(dict(zip(t["columns"], r, strict=True))["status"] for r in t["data"])
    assert statuses == ["failed", "interrupted", "ok", "ok", "ok", "ok"], statuses  # interrupted read "failed"
    assert any((run_dir / "files" / "media" / "images" / "compare").glob("val_miou_*.png"))
    # wandb's writer process may still be flushing the run log after finish() returns: give it a moment
    log = next(run_dir.glob("*.wandb"))
    for _ in range(100):
        if b"compare/nets" in log.read_bytes():
            break
        time.sleep(0.2)
    assert b"compare/nets" in log.read_bytes()


@pytest.mark.slow
def test_wandb_offline_run_lies_beside_the_report(sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m bgremover.compare --wandb` wrote its offline run into the current folder's wandb/."""
    pytest.importorskip("wandb")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    compare.build_report([sweep], out=tmp_path / "rep" / "report", grid_images=0, use_wandb=True)
    assert len(list((tmp_path / "rep" / "wandb").glob("offline-run-*"))) == 1
    assert not (elsewhere / "wandb").exists() and not (tmp_path / "rep" / "report" / "wandb").exists()


def test_runs_of_one_net_with_different_recipes_are_not_averaged_as_seeds(tmp_path: Path, monkeypatch) -> None:
    """Two FC-DenseNet103 speed-runs of 170 s and 450 s were one row, "mean ± std over seeds" of both."""
    root = tmp_path / "runs"
    base = {"model": {"optimizer": {"lr": 0.002}}, "speedrun_budget_s": 170, "paths": {"output_dir": "x"}}
    for name, seed, miou, cfg in (
        ("a", 1, 0.30, base),
        ("b", 2, 0.34, base | {"paths": {"output_dir": "y"}}),  # another seed, another folder: the same recipe
        ("c", 1, 0.46, base | {"speedrun_budget_s": 450}),
    ):
        s = ok_summary(root / name, TIRAMISU, 1) | {"seed": seed, "config": cfg}
        s["metrics"] = s["metrics"] | {"test/mIoU": miou}
        write_summary(root / name, s)
    stats = compare.aggregate(compare.find_runs([root]))
    assert [(s.net, len(s.runs), round(s.miou.mean * 100, 1)) for s in stats] == [
        ("tiramisu103 (speedrun_budget_s=450)", 1, 46.0),
        ("tiramisu103 (speedrun_budget_s=170)", 2, 32.0),
    ]
    assert all(s.paper is not None for s in stats)  # still the paper's FC-DenseNet103 row
    md = (compare.build_report([root], out=tmp_path / "report", grid_images=0).path / "report.md").read_text()
    assert "| tiramisu103 (speedrun_budget_s=170) | 2 |" in md
    # the per-run table names each run by its row's label: by net alone the 170 s and 450 s runs read alike
    runs_table = md[md.index("## Runs"):]
    assert "| a | tiramisu103 (speedrun_budget_s=170) | 1 |" in runs_table
    assert "| c | tiramisu103 (speedrun_budget_s=450) | 1 |" in runs_table

    # and W&B's runs table as the report's (it said "tiramisu103" for both, unchecked until now); a stand-in
    # wandb module records what would be logged
    logged: dict = {}

    class Table:
        def __init__(self, columns, data):
            self.rows = [dict(zip(columns, r, strict=True)) for r in data]

    class Run:
        id, dir, summary = "stub", "", {}

        def log(self, payload):
            logged.update(payload)

    stub = types.SimpleNamespace(run=None, Table=Table, Image=lambda path: path, Settings=lambda **k: k,
                                 init=lambda **k: Run(), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", stub)
    compare.build_report([root], out=tmp_path / "report2", grid_images=0, use_wandb=True)
    labels = {Path(r["run_dir"]).name: r["net"] for r in logged["compare/runs"].rows}
    assert labels == {"a": "tiramisu103 (speedrun_budget_s=170)", "b": "tiramisu103 (speedrun_budget_s=170)",
                      "c": "tiramisu103 (speedrun_budget_s=450)"}


def test_ctrl_c_during_compare_is_one_line(sweep: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Ctrl-C while the report was built printed a KeyboardInterrupt traceback."""
    from bgremover.compare import report

    monkeypatch.setattr(report, "build_report", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert report.main([str(sweep), "--out", str(tmp_path / "r")]) == 130
    assert capsys.readouterr().err == "python -m bgremover.compare: error: interrupted: no report written\n"
    assert not (tmp_path / "r").exists()


def test_paper_numbers_stand_only_beside_the_papers_net(tmp_path: Path) -> None:
    """A shrunk FC-DenseNet103 (growth 4, a quick try) kept the name tiramisu103, and the report set the paper's
    66.9 mIoU and its per-class row beside it as if it were the net the paper measured."""
    root = tmp_path / "runs"
    paper_net = {"down_blocks": [4, 5, 7, 10, 12], "up_blocks": [12, 10, 7, 5, 4], "bottleneck_layers": 15,
                 "growth_rate": 16, "first_conv_channels": 48, "dropout": 0.0}
    for name, net in (("paper", paper_net), ("shrunk", paper_net | {"growth_rate": 4}),
                      ("shallow", paper_net | {"down_blocks": [2, 2, 2, 2, 2]})):
        s = ok_summary(root / name, TIRAMISU, 1) | {"config": {"model": {"net": net}}}
        write_summary(root / name, s)
    stats = compare.aggregate(compare.find_runs([root]))
    assert sorted(s.runs[0].dir.name for s in stats if s.paper is not None) == ["paper"]
    assert len(stats) == 3
    md = (compare.build_report([root], out=tmp_path / "report", grid_images=0).path / "report.md").read_text()
    assert md.count("66.9") == 1  # the paper's net's row only


def test_recipe_labels_are_the_overrides_that_differ(tmp_path: Path) -> None:
    """Labels name what the user typed (not the settings derived from it), seeds and logging left out."""
    root = tmp_path / "runs"
    for name, seed, budget in (("a", 1, 170), ("b", 2, 170), ("c", 1, 450)):
        s = ok_summary(root / name, TIRAMISU, 1) | {"seed": seed}
        s["config"] = {"speedrun_budget_s": budget, "callbacks": {"time_to_miou": {"budget_s": budget}}}
        s["overrides"] = ["experiment=speedrun_tiramisu103", f"speedrun_budget_s={budget}", f"seed={seed}",
                          f"hydra.run.dir=/tmp/{name}", "logger=csv"]
        write_summary(root / name, s)
    assert sorted((s.net, len(s.runs)) for s in compare.aggregate(compare.find_runs([root]))) == [
        ("tiramisu103 (speedrun_budget_s=170)", 2), ("tiramisu103 (speedrun_budget_s=450)", 1)]


def test_search_trials_are_labelled_with_short_numbers(tmp_path: Path) -> None:
    """An Optuna sweep's trials differ in sampled floats: labels carry 4 significant digits, not 17 — unless
    that would give two trials one label."""
    root = tmp_path / "runs"
    for name, lr in (("0", "0.00035090148857968553"), ("1", "0.0012345678912"), ("2", "0.00035090148857961111")):
        s = ok_summary(root / name, TIRAMISU, 1)
        s["config"] = {"model": {"optimizer": {"lr": float(lr)}}}
        s["overrides"] = [f"model.optimizer.lr={lr}"]
        write_summary(root / name, s)
    labels = sorted(s.net for s in compare.aggregate(compare.find_runs([root / "0", root / "1"])))
    assert labels == ["tiramisu103 (model.optimizer.lr=0.0003509)", "tiramisu103 (model.optimizer.lr=0.001235)"]
    labels = sorted(s.net for s in compare.aggregate(compare.find_runs([root])))  # 0 and 2 round alike: as typed
    assert "tiramisu103 (model.optimizer.lr=0.00035090148857968553)" in labels and len(set(labels)) == 3


def test_runs_of_several_sweeps_are_named_with_their_sweep(tmp_path: Path) -> None:
    """Two sweeps compared together each have a job "0": the Runs table names the sweep too (it showed "0" twice)."""
    roots = []
    for sweep, seed in (("sweep_a", 1), ("sweep_b", 2)):
        write_summary(tmp_path / sweep / "0", ok_summary(tmp_path / sweep / "0", TIRAMISU, seed))
        roots.append(tmp_path / sweep)
    md = (compare.build_report(roots, out=tmp_path / "report", grid_images=0).path / "report.md").read_text()
    assert table_row(md, "sweep_a/0")[1] == TIRAMISU and table_row(md, "sweep_b/0")[1] == TIRAMISU
    md = (compare.build_report(roots[:1], out=tmp_path / "one", grid_images=0).path / "report.md").read_text()
    assert table_row(md, "0")[1] == TIRAMISU  # one folder compared: names relative to it, as before


def test_report_says_which_trial_an_optuna_search_picked(tmp_path: Path) -> None:
    """The report ranks by test mIoU; an Optuna study picks by its objective (val/mIoU_best). Where a compared
    sweep holds the study's optimization_results.yaml, a "Search" paragraph names the pick and its run."""
    sweep = tmp_path / "sweep"
    for job, lr, seed in (("0", "0.00035090148857968553", 1), ("1", "0.0012345678912", 2)):
        s = ok_summary(sweep / job, TIRAMISU, seed)
        s["config"] = {"model": {"optimizer": {"lr": float(lr)}}, "optimized_metric": "val/mIoU_best"}
        s["overrides"] = [f"model.optimizer.lr={lr}", "data.crop_size=[224,224]", f"seed={seed}"]
        write_summary(sweep / job, s)
    (sweep / "optimization_results.yaml").write_text(  # as hydra-optuna-sweeper 1.2 writes it (a choice as text)
        "name: optuna\nbest_params:\n  model.optimizer.lr: 0.0012345678912\n  data.crop_size: '[224,224]'\n"
        "best_value: 0.6712\n")
    md = (compare.build_report([sweep], out=tmp_path / "report", grid_images=0).path / "report.md").read_text()
    assert "## Search" in md
    assert ("The Optuna study in sweep picked model.optimizer.lr=0.001235, data.crop_size=[224,224] "
            f"(val/mIoU_best = 67.1 %): run 1 ({TIRAMISU}): test mIoU") in md
    s = json.loads((sweep / "1" / "summary.json").read_text())
    write_summary(sweep / "1", {**s, "val_split": {"frames": 4, "of": 101, "complete": False}})
    md = (compare.build_report([sweep], out=tmp_path / "reportv", grid_images=0).path / "report.md").read_text()
    assert "(val/mIoU_best = 67.1 % (partial val split)): run 1" in md  # the picked value is a val number
    write_summary(sweep / "1", s)
    (sweep / "optimization_results.yaml").write_text(  # the list itself, written with spaces: the same pick
        "name: optuna\nbest_params:\n  model.optimizer.lr: 0.0012345678912\n  data.crop_size: [224, 224]\n"
        "best_value: 0.6712\n")
    md = (compare.build_report([sweep], out=tmp_path / "report", grid_images=0).path / "report.md").read_text()
    assert f"(val/mIoU_best = 67.1 %): run 1 ({TIRAMISU})" in md
    s["test_split"] = {"frames": 4, "of": 233, "complete": False}  # the picked run, tested on 4 frames: said so
    write_summary(sweep / "1", s)
    md = (compare.build_report([sweep], out=tmp_path / "report2", grid_images=0).path / "report.md").read_text()
    assert f"run 1 ({TIRAMISU}): test mIoU " in md and " % — test frames 4 of 233 (partial). The tables" in md
    (sweep / "optimization_results.yaml").write_text("name: optuna\nsolutions: []\n")  # multi-objective: no pick
    md = (compare.build_report([sweep], out=tmp_path / "report", grid_images=0).path / "report.md").read_text()
    assert "## Search" not in md


def test_val_of_a_train_plus_val_run_is_marked_as_trained_on(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for name, split in (("a", "train"), ("b", "train+val")):
        s = ok_summary(root / name, TIRAMISU if name == "a" else DEEPLAB, 1)
        s["config"] = {"data": {"train_split": split}}
        write_summary(root / name, s)
    md = (compare.build_report([root], out=tmp_path / "report", grid_images=0).path / "report.md").read_text()
    assert table_row(md, DEEPLAB)[6] == "65.0 ± — (val trained on)"
    assert table_row(md, TIRAMISU)[6] == "55.0 ± —"
    # the Runs table's val column too (it showed the trained-on number bare, audit)
    runs = [line for line in md.split("## Runs")[1].splitlines() if line.startswith("| ")][1:]
    val = {cells[1]: cells[4] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in runs)}
    assert val == {DEEPLAB: "65.0 (val trained on)", TIRAMISU: "55.0"}, md


def test_seeds_of_a_real_sweep_are_averaged(tmp_path: Path) -> None:
    """A real sweep's jobs each resolve their checkpoint dirpath, default_root_dir and data.seed to their own
    folder and seed: `make compare` made every job a row of its own ("10.8 ± —", labels of checkpoint paths).
    Configs composed as `python -m bgremover.train -m` resolves them; only a changed setting splits a net."""
    from conftest import compose_cfg
    from omegaconf import OmegaConf, open_dict

    root = tmp_path / "sweep"
    jobs = [(0, "deeplabv3plus", 1, []), (1, "deeplabv3plus", 2, []), (2, "tiramisu56", 1, []),
            (3, "tiramisu56", 2, []), (4, "deeplabv3plus", 1, ["model.optimizer.lr=0.01"])]
    for num, model, seed, extra in jobs:
        out = root / str(num)
        cfg = compose_cfg(out, ["experiment=compare_models", f"model={model}", f"seed={seed}", "logger=csv", *extra])
        with open_dict(cfg):
            del cfg["hydra"]
        net = TIRAMISU if model == "tiramisu56" else DEEPLAB
        s = ok_summary(out, net, seed) | {"config": OmegaConf.to_container(cfg, resolve=True),
                                          "overrides": [f"model={model}", f"seed={seed}", *extra]}
        assert s["config"]["callbacks"]["model_checkpoint"]["dirpath"] == f"{out}/checkpoints"  # what differed
        write_summary(out, s)
    stats = {s.net: len(s.runs) for s in compare.aggregate(compare.find_runs([root]))}
    assert stats == {TIRAMISU: 2, f"{DEEPLAB} (model.optimizer.lr=0.01)": 1, f"{DEEPLAB} (model.optimizer.lr=0.001)": 2}


def test_recipes_told_apart_only_by_their_fourth_setting_stay_two_rows(tmp_path: Path) -> None:
    """A user audit: a sweep over lr compared beside a run whose other settings differed: both lr groups were
    labelled by the first 3 differing settings alike, one replaced the other, and the report dropped 2 of 5 runs."""
    root = tmp_path / "runs"
    common = ["trainer.max_steps=2", "data.limit_eval_images=2", "trainer.check_val_every_n_epoch=1"]
    for name, seed, overrides in (("a", 1, [*common, "model.optimizer.lr=0.001"]),
                                  ("b", 2, [*common, "model.optimizer.lr=0.001"]),
                                  ("c", 1, [*common, "model.optimizer.lr=0.002"]),
                                  ("d", 2, [*common, "model.optimizer.lr=0.002"]),
                                  ("e", 1, ["trainer.max_steps=3"])):
        config: dict = {}
        for o in overrides:  # the resolved config says what the overrides set
            key, value = o.split("=")
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = float(value) if "." in value else int(value)
        s = ok_summary(root / name, TIRAMISU, seed) | {"overrides": overrides, "config": config}
        write_summary(root / name, s)
    stats = compare.aggregate(compare.find_runs([root]))
    assert sorted(len(s.runs) for s in stats) == [1, 2, 2], [(s.net, len(s.runs)) for s in stats]  # all 5 runs
    assert len({s.net for s in stats}) == 3
    assert any("model.optimizer.lr=0.001" in s.net for s in stats)


def test_a_figure_fewer_runs_have_says_so_beside_the_runs_count(sweep: Path) -> None:
    """A run trained with test=false (no test numbers) was averaged out of the test columns without a word: the
    row said "Runs 2" and "52.0 ± —", the legend's sign for a single run (a user audit)."""
    d = sweep / "1" / "run"  # FC-DenseNet103's second seed, now untested
    summary = json.loads((d / "summary.json").read_text())
    summary["metrics"] = {k: v for k, v in summary["metrics"].items() if not k.startswith("test/")}
    (d / "summary.json").write_text(json.dumps(summary))
    md = (compare.build_report([sweep], grid_images=0).path / "report.md").read_text()
    tira = table_row(md, TIRAMISU)
    assert tira[1] == "2" and tira[3] == "50.0 ± — (1 of 2 runs)" and tira[5] == "80.0 ± — (1 of 2 runs)"
    assert tira[6] == "57.0 ± 2.8"  # both runs have their val figure
    assert table_row(md, DEEPLAB)[3] == "63.0 ± 4.2"


def test_a_grid_sweep_stopped_before_some_jobs_says_how_many_never_started(sweep: Path) -> None:
    """A sweep stopped by SIGTERM during a job left fewer job folders than it planned; the report said "2 runs found:
    1 ok, 1 interrupted" and nothing of the job that never ran (a user audit)."""
    def write_multirun(target: str, task: list[str], params: dict | None = None) -> None:
        (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
            "sweeper": {"_target_": target, "max_batch_size": None, "params": params},
            "overrides": {"task": task}}}))

    basic = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    write_multirun(basic, ["trainer=cpu", "seed=1,2", "data.crop_size=[64,64],[50,50],[32,32]"])  # 6 planned, 5 found
    md = (compare.build_report([sweep], grid_images=0).path / "report.md").read_text()
    assert f"Sweep {sweep} planned 6 jobs: 1 never started" in md
    write_multirun(basic, ["seed=3"], {"model": "a,b,c", "seed": "1,2"})  # the sweeper's params, the command line last
    md = (compare.build_report([sweep], grid_images=0).path / "report.md").read_text()
    assert f"Sweep {sweep} planned 3 jobs" not in md and "never started" not in md  # 3 planned, 5 found
    write_multirun(basic, ["seed=1,2,3"], {"model": "a,b"})
    assert "planned 6 jobs: 1 never started" in (compare.build_report([sweep], grid_images=0).path / "report.md").read_text()
    write_multirun("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", ["seed=1,2,3,4,5,6,7"])
    assert "never started" not in (compare.build_report([sweep], grid_images=0).path / "report.md").read_text()


def test_out_with_a_report_md_among_other_files_is_refused(sweep: Path, tmp_path: Path) -> None:
    """A folder of one's own that happens to hold a report.md (notes, a thesis) was taken for an earlier report and
    replaced whole, its other files deleted (a user audit)."""
    mine = tmp_path / "docs"
    mine.mkdir()
    (mine / "report.md").write_text("my own report")
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not an earlier report"):
        compare.build_report([sweep], out=mine, grid_images=0)
    assert (mine / "thesis.tex").read_text() == "precious" and (mine / "report.md").read_text() == "my own report"


def test_a_killed_job_without_summary_is_listed_as_failed(sweep: Path) -> None:
    """A sweep job killed by SIGKILL (the out-of-memory killer) leaves .hydra/ and train.log but no summary.json:
    the report said "0 failed" and "None" under failed runs, as if the sweep had fewer jobs."""
    job = sweep / "5"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: MULTIRUN\n  job:\n    name: train\n    num: 5\n")
    (job / ".hydra" / "overrides.yaml").write_text("- seed=7\n")
    (job / "train.log").write_text("")
    evaluation = sweep / "6"  # an evaluation's folder is no training run
    (evaluation / ".hydra").mkdir(parents=True)
    (evaluation / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    name: eval\n")
    (evaluation / ".hydra" / "overrides.yaml").write_text("[]\n")
    rep = compare.build_report([sweep], grid_images=0)
    md = (rep.path / "report.md").read_text()
    assert "6 runs found" in md and "4 ok, 2 failed" in md
    assert "5 (net ?, seed —): no summary.json: the run was killed" in md
    assert "6 (net" not in md


def test_a_failed_evaluations_record_is_no_failed_training_run(sweep: Path) -> None:
    """An eval that failed after its build writes a `failed` summary.json into its own folder (logs/eval/runs/<ts>):
    a report over a folder holding it (`compare logs`) listed it as one more failed training run."""
    evaluation = sweep / "eval" / "runs" / "2026-11-28_10-00-00"
    (evaluation / ".hydra").mkdir(parents=True)
    (evaluation / ".hydra" / "hydra.yaml").write_text("hydra:\n  job:\n    name: eval\n")
    (evaluation / "summary.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: boom"}))
    md = (compare.build_report([sweep], grid_images=0).path / "report.md").read_text()
    assert "5 runs found" in md and "4 ok, 1 failed" in md and "boom" not in md


def test_the_grid_shows_each_nets_best_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'Each net is shown by its best seed's best checkpoint': seed 2 of both nets (test mIoU 0.54 and 0.66 against
    0.50 and 0.60), jobs 1 and 3 of the sweep."""
    loaded: list[Path] = []

    def ckpt_for(d: Path, net: str) -> Path:
        p = d / "checkpoints" / "best.ckpt"
        p.parent.mkdir(parents=True)
        p.write_text(net)
        return p

    def load(p):
        loaded.append(Path(p))
        return biased_conv("Car"), META

    monkeypatch.setattr(compare.grid, "_load_checkpoint", load)
    root, _ = grid_sweep(tmp_path, ckpt_for)
    monkeypatch.delenv("DATA_DIR", raising=False)
    compare.build_report([root], grid_images=1)
    assert sorted(p.parent.parent.name for p in loaded) == ["1", "3"]


def test_inference_time_is_the_mean_over_seeds_and_percentages_keep_a_decimal(tmp_path: Path) -> None:
    """Infer ms of two seeds timed at 30 and 40 ms: 35.0 (not the slower one); a class IoU of 2/3: 66.7 %."""
    from bgremover.compare.render import class_table, main_table

    root = tmp_path / "sweep"
    for job, ms in ((0, 30.0), (1, 40.0)):
        s = ok_summary(root / str(job), TIRAMISU, job + 1) | {"infer_ms_480x360": ms}
        s["metrics"] = s["metrics"] | {"test/iou_Sky": 2 / 3}
        write_summary(root / str(job), s)
    stats = compare.aggregate(compare.find_runs([root]))
    head, rows = main_table(stats)
    assert rows[0][head.index("Infer ms / 480×360")] == "35.0"
    head, rows = class_table(stats)
    assert rows[0][head.index("Sky")] == "66.7"


# ------------------------------------------------------------------------------------------ data=folder runs

REMOVER_CLASSES = ["background", "foreground"]


def folder_summary(run_dir: Path, folder: Path, seed: int, ckpt: Path | None = None) -> dict:
    """What `make remover` writes: data=folder (FolderDataModule), the folder's own two classes."""
    s = ok_summary(run_dir, DEEPLAB, seed, ckpt=ckpt)
    s["metrics"] = {k: v for k, v in s["metrics"].items() if not k.startswith("test/iou_")}
    s["metrics"] |= {"test/iou_background": 0.90 + 0.01 * seed, "test/iou_foreground": 0.70 + 0.01 * seed}
    s["group"], s["test_split"] = "remover", {"frames": 3, "of": 3, "complete": True}
    s["config"] = {"data": {"_target_": "bgremover.data.FolderDataModule", "root": str(folder), "image_size": 32},
                   "model": {"class_names": REMOVER_CLASSES, "default_foreground": ["foreground"]}}
    return s


def fake_folder(root: Path, n: int = 3, w: int = 40, h: int = 30) -> Path:
    """An image/mask folder as data=folder lays it out: test/images + test/masks (binary 0/255 masks)."""
    rng = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / split / "images" / f"p{i}.jpg")
            mask = np.zeros((h, w), np.uint8)
            mask[:, w // 2:] = 255  # right half foreground
            Image.fromarray(mask, mode="L").save(root / split / "masks" / f"p{i}.png")
    return root


def test_a_folder_runs_report_speaks_of_its_own_classes_and_test_split(tmp_path: Path) -> None:
    """`make compare` over `make remover` runs said "percentages on the CamVid test split", "mean over the 11
    classes", showed CamVid's per-class table (all "—") and the paper's column; it speaks of the runs' own."""
    folder = tmp_path / "photos"
    for seed in (1, 2):
        write_summary(tmp_path / "runs" / str(seed), folder_summary(tmp_path / "runs" / str(seed), folder, seed))
    md = (compare.build_report([tmp_path / "runs"], out=tmp_path / "rep", grid_images=0).path / "report.md").read_text()
    assert "CamVid" not in md and "11 classes" not in md and "Jégou" not in md
    assert f"percentages on the test split of the image/mask folder {folder};" in md
    assert "mean over the 2 classes (background, foreground) of intersection over union" in md
    assert "| Net | background | foreground |" in md
    assert table_row(md, DEEPLAB)[1:3] == ["2", "12.30"]  # the main table: both seeds in one row
    rows = [line for line in md.splitlines() if line.startswith(f"| {DEEPLAB} |")]
    assert rows[1] == f"| {DEEPLAB} | 91.5 | 71.5 |"  # the per-class row: mean over the two seeds


@pytest.mark.slow
def test_a_folder_runs_grid_reads_the_folders_test_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid was "skipped: no test images in <folder>/test" (CamVid's layout) although <folder>/test/images was
    full; it takes the folder's test images and masks as data=folder reads them, never $DATA_DIR's CamVid."""
    import torch

    folder = fake_folder(tmp_path / "photos")
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_text("x")
    write_summary(tmp_path / "run", folder_summary(tmp_path / "run", folder, 1, ckpt=ckpt))
    net = torch.nn.Conv2d(3, 2, 1)
    with torch.no_grad():  # "foreground" everywhere
        net.weight.zero_()
        net.bias.copy_(torch.tensor([-10.0, 10.0]))
    meta = META | {"classes": REMOVER_CLASSES, "default_foreground": ["foreground"], "ignore_index": 2}
    monkeypatch.setattr(compare.grid, "_load_checkpoint", lambda p: (net, meta))
    monkeypatch.setenv("DATA_DIR", str(fake_camvid(tmp_path / "camvid")))  # the Makefile's: not these runs' data
    rep = compare.build_report([tmp_path / "run"], out=tmp_path / "rep", grid_images=2)
    assert not [w for w in rep.warnings if "grid" in w], rep.warnings
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"Rows: the same test images of {folder}." in md and "(keeps foreground;" in md
    img = np.asarray(Image.open(tmp_path / "rep" / "grid.png").convert("RGB"))
    th = round(compare.TILE_W * 30 / 40)  # the folder's 40x30 frames set the tiles' aspect
    assert img.shape == (compare.HEADER_H + 2 * th, 4 * compare.TILE_W, 3)
    y = compare.HEADER_H + th // 2
    gt = img[y - 3:y + 3, compare.TILE_W: 2 * compare.TILE_W]
    assert (gt[:, 10:20] == PALETTE[0]).all() and (gt[:, -20:-10] == PALETTE[1]).all()  # its mask, left | right


def test_runs_of_different_class_lists_are_refused_in_one_line(tmp_path: Path, capsys) -> None:
    """A remover run (background, foreground) beside a CamVid run: one table averaged and tabled them as one."""
    write_summary(tmp_path / "cv", ok_summary(tmp_path / "cv", DEEPLAB, 1))
    write_summary(tmp_path / "mine", folder_summary(tmp_path / "mine", tmp_path / "photos", 2))
    assert compare.main([str(tmp_path), "--out", str(tmp_path / "rep"), "--grid-images", "0"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "different classes (cv: 11 (Sky … Bicyclist); mine: 2 (background, " \
        "foreground))" in err  # short enough for the one line (cut at 300 characters) under any tmp_path
    assert not (tmp_path / "rep").exists()
