"""`python -m bgremover.data`: verifying is read-only and prints counts + classes; errors are one line, exit 1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from bgremover.data.__main__ import main
from bgremover.data.classes import CLASSES, PALETTE

SPLIT_SIZES = {"train": 3, "val": 2, "test": 2}
W, H = 32, 24


def make_tree(root: Path) -> Path:
    """A tiny CamVid folder: SPLIT_SIZES random RGB images and L labels that use all 12 values."""
    rng = np.random.default_rng(1)
    for split, n in SPLIT_SIZES.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(n):
            name = f"0001TP_{i:06d}.png"
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / split / name)
            label = ((np.arange(H * W).reshape(H, W) + i) % 12).astype(np.uint8)
            Image.fromarray(label).save(root / f"{split}annot" / name)
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file and folder under root, root included: any write changes it."""
    entries = [root, *root.rglob("*")]
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in entries}


def split_counts(out: str) -> dict[str, int]:
    return {s: int(n) for s, n in re.findall(r"^(train|val|test)\s+(\d+)$", out, re.M)}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bgremover.data", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
def test_verify_existing_prints_counts_and_classes_and_writes_nothing(tmp_path: Path, capsys, deep) -> None:
    root = make_tree(tmp_path / "CamVid")
    before = snapshot(root)

    assert main(["--root", str(root), "--no-download", *(["--deep"] if deep else [])]) == 0

    out = capsys.readouterr().out
    assert split_counts(out) == SPLIT_SIZES
    for index, (name, colour) in enumerate(zip(CLASSES, PALETTE, strict=False)):
        assert re.search(rf"^\s*{index}\s+{name}\s+\({colour[0]}, {colour[1]}, {colour[2]}\)$", out, re.M), (
            name
        )
    assert re.search(r"^\s*11\s+void\s+\(0, 0, 0\)", out, re.M)
    assert snapshot(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CamVid"]  # no temp or .partial folder beside it


def test_root_defaults_to_data_dir_env(tmp_path: Path, monkeypatch, capsys) -> None:
    root = make_tree(tmp_path / "elsewhere")
    monkeypatch.setenv("DATA_DIR", str(root))

    assert main(["--no-download"]) == 0
    assert split_counts(capsys.readouterr().out) == SPLIT_SIZES


def test_deep_check_catches_a_bad_label_value(tmp_path: Path, capsys) -> None:
    root = make_tree(tmp_path / "CamVid")
    bad = root / "valannot" / "0001TP_000001.png"
    Image.fromarray(np.full((H, W), 200, np.uint8)).save(bad)

    assert main(["--root", str(root)]) == 0  # the shallow check only pairs file names
    capsys.readouterr()
    assert main(["--root", str(root), "--deep"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m bgremover.data: error: ") and str(bad) in err[0] and "200" in err[0]


def test_incomplete_existing_dataset_is_an_error_not_a_download(tmp_path: Path, capsys) -> None:
    root = make_tree(tmp_path / "CamVid")
    for p in (root / "testannot").iterdir():
        p.unlink()
    (root / "testannot").rmdir()
    before = snapshot(root)

    assert main(["--root", str(root), "--url", "http://127.0.0.1:9/never-contacted.zip"]) == 1

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m bgremover.data: error: ") and str(root / "testannot") in err[0]
    assert snapshot(root) == before


def test_missing_dataset_with_no_download_is_one_error_line(tmp_path: Path) -> None:
    root = tmp_path / "nowhere" / "CamVid"

    result = run_cli("--root", str(root), "--no-download")

    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m bgremover.data: error: no CamVid dataset at ") and "make data" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_bad_argument_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    result = run_cli("--retries", "many")
    lines = result.stderr.strip().splitlines()
    assert (  # a usage error: exit 2 and the command's name, as every command here (errors.OneLineParser)
        result.returncode == 2
        and len(lines) == 1
        and lines[0].startswith("python -m bgremover.data: error: ")
        and "--retries" in lines[0]
    )


def test_stats_prints_yaml_ready_to_paste(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "CamVid")
    before = snapshot(root)

    # Own cache folder: the class-weight cache must not land in the dataset or the user's home.
    result = run_cli("stats", "--root", str(root), env={"BGREMOVER_CACHE": str(tmp_path / "cache")})

    assert result.returncode == 0, result.stderr
    stats = yaml.safe_load(result.stdout)
    pixels = np.concatenate(
        [np.asarray(Image.open(p)).reshape(-1, 3) / 255.0 for p in sorted((root / "train").iterdir())]
    )
    assert stats["mean"] == pytest.approx(pixels.mean(0).tolist(), abs=1e-4)
    assert stats["std"] == pytest.approx(pixels.std(0).tolist(), abs=1e-4)
    # pasted as they are, the lines train: `class_weights: [0.98, ...]` stopped the run on "unknown
    # data.class_weights '[0.98, ...]' (use null or median_freq)", the key takes a mode, not a list
    from bgremover.data import CamVidDataModule

    dm = CamVidDataModule(root=str(root), **stats)
    weights = dm.class_weights().tolist()
    line = next(x for x in result.stdout.splitlines() if x.startswith("class_weights:"))
    shown = [float(v) for v in re.findall(r"\d+\.\d+", line.split("#", 1)[1])]
    assert shown == pytest.approx(weights, abs=1e-4)
    assert len(weights) == len(CLASSES) and all(w > 0 for w in weights)
    assert sorted(weights)[len(weights) // 2] == pytest.approx(1.0, abs=1e-3)  # median class weighs 1
    assert snapshot(root) == before


@pytest.mark.parametrize("deep", [[], ["--deep"]])
def test_stats_refuses_a_bad_train_label(deep, tmp_path: Path, capsys, monkeypatch) -> None:
    """Without --deep a label value past void was left out of the median-frequency weights unseen (exit 0, weights
    printed; training refused the label later): the weights read labels by training's rule, so both name it."""
    monkeypatch.setenv("BGREMOVER_CACHE", str(tmp_path / "cache"))
    root = make_tree(tmp_path / "CamVid")
    Image.fromarray(np.full((H, W), 40, np.uint8)).save(root / "trainannot" / "0001TP_000001.png")
    assert main(["stats", "--root", str(root), *deep]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f"label values outside 0-11: {root / 'trainannot' / '0001TP_000001.png'} contains 40")


def test_stats_on_missing_dataset_is_one_error_line(tmp_path: Path, capsys) -> None:
    assert main(["stats", "--root", str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m bgremover.data: error: no CamVid dataset at ")
    assert not (tmp_path / "absent").exists()


def test_verify_real_camvid_counts(camvid_root, capsys) -> None:
    """The real dataset through the `camvid_root` fixture: skipped locally without it, a failure in CI."""
    root = camvid_root
    before = snapshot(root)

    assert main(["--root", str(root), "--no-download"]) == 0

    assert split_counts(capsys.readouterr().out) == {"train": 367, "val": 101, "test": 233}
    assert snapshot(root) == before


def test_every_command_reads_a_data_dir_with_a_tilde_as_training_does(tmp_path: Path, monkeypatch, capsys) -> None:
    """DATA_DIR="~/CamVid" (quoted, or from a .env file: no shell expands it) is the home folder's CamVid for
    training (camvid.resolve_root); `make data` looked for a literal ./~/CamVid (and would download the dataset
    into it) and eval-cutout / quantize / ship said it was not found. One rule for all of them now."""
    from bgremover import cutout_eval, quantize, ship
    from bgremover.errors import UserError

    home = tmp_path / "home"
    make_tree(home / "CamVid")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DATA_DIR", "~/CamVid")
    monkeypatch.chdir(tmp_path)
    assert main(["--no-download"]) == 0
    assert f"CamVid at {home / 'CamVid'}: OK" in capsys.readouterr().out
    assert not (tmp_path / "~").exists()
    # eval-cutout scores the shipped model on the tiny test split there (2 frames)
    model = Path(__file__).resolve().parents[1] / "models" / "bgremover-camvid.onnx"
    assert cutout_eval.main(["--model", str(model), "--quiet", "--threads", "1"]) == 0
    assert f"on {home / 'CamVid'} test: 2 images" in capsys.readouterr().out
    # ship and quantize hand their scoring the same folder
    seen = []

    def score(*args, **kwargs):  # stands in for the export and scoring: notes the folder, stops there
        seen.append(args[2])
        raise UserError("stopped here")

    monkeypatch.setattr(ship, "ship", score)
    monkeypatch.setattr(quantize, "quantize", score)
    (tmp_path / "models").mkdir()
    ship.main(["--ckpt", "x.ckpt", "--models-dir", str(tmp_path / "models")])
    quantize.main(["--model", str(model), "--out", str(tmp_path / "m.int8.onnx")])
    assert [Path(p) for p in seen] == [home / "CamVid"] * 2


def test_a_label_saved_as_jpeg_is_refused_by_name(tmp_path: Path, capsys) -> None:
    """A CamVid label saved as JPEG was read: JPEG blurs class edges into other values, so a train or `--deep`
    said "label values outside 0-11: … contains 16" (nothing said of the format), and a shallow check passed it."""
    root = make_tree(tmp_path / "CamVid")
    png = root / "trainannot" / "0001TP_000001.png"
    jpg = png.with_suffix(".jpg")
    Image.open(png).save(jpg, quality=90)
    png.unlink()

    for deep in ([], ["--deep"]):
        assert main(["--root", str(root), "--no-download", *deep]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"label saved as JPEG: {jpg} " in err[0] and "must be lossless PNG" in err[0], err


def test_an_existing_folder_that_is_not_camvid_is_not_sent_to_make_data(tmp_path, capsys):
    """`make data DATA_DIR=<an existing folder of other pictures>` answered "run `make data` to download CamVid",
    the command that had just failed: make data only reads a folder that exists. It now says what would help."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    assert main(["--root", str(tmp_path / "photos")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run `make data` to download" not in err[0], err
    assert f"{tmp_path / 'photos'} is not a CamVid folder" in err[0] and "make data DATA_DIR=<a new folder>" in err[0]
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["a.jpg"]
