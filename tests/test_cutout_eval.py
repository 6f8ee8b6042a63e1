"""bgremover.cutout_eval: metric functions on hand-made arrays, then end to end on synthetic CamVid folders scored
with the controllable 1x1-conv model of test_predict.py (red -> Car, green -> Pedestrian, else Sky; black -> a
50/50 Car/Pedestrian split when the model normalizes with mean = std = 0.5)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgremover import cutout_eval as ce
from bgremover.errors import PARTIAL

_spec = importlib.util.spec_from_file_location(
    "_bgr_test_predict", Path(__file__).with_name("test_predict.py")
)
_tp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tp)
build_model = _tp.build_model

RED, GREEN, GRAY, BLACK = (255, 0, 0), (0, 255, 0), (128, 128, 128), (0, 0, 0)
SKY, BUILDING, CAR, PED, VOID = 0, 1, 8, 9, 11
H, W = 20, 30


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("m") / "ctl.onnx", metadata={"test_mIoU": 0.5})


def write_pair(root: Path, split: str, name: str, rgb: np.ndarray, label: np.ndarray) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / split / name)
    Image.fromarray(label.astype(np.uint8), mode="L").save(root / f"{split}annot" / name)


def scene() -> tuple[np.ndarray, np.ndarray]:
    """Gray (Sky) 20x30 frame, a red 10x10 Car at rows/cols 5..14, a green 10x5 Pedestrian at rows 5..14, cols
    20..24, and a void top row: the model predicts every labelled pixel right (600 px, 570 valid)."""
    rgb = np.empty((H, W, 3), np.uint8)
    rgb[:] = GRAY
    rgb[5:15, 5:15] = RED
    rgb[5:15, 20:25] = GREEN
    label = np.full((H, W), SKY, np.uint8)
    label[5:15, 5:15] = CAR
    label[5:15, 20:25] = PED
    label[0] = VOID
    return rgb, label


@pytest.fixture
def camvid(tmp_path) -> Path:
    """Two test images: a.png predicted perfectly; b.png the same picture with labelling the model disagrees
    with: the Car's two left columns (20 px, red) labelled Building and a gray 2x5 patch (10 px) labelled Car."""
    root = tmp_path / "CamVid"
    rgb, label = scene()
    write_pair(root, "test", "a.png", rgb, label)
    label_b = label.copy()
    label_b[5:15, 5:7] = BUILDING
    label_b[16:18, 0:5] = CAR
    write_pair(root, "test", "b.png", rgb, label_b)
    return root


# ------------------------------------------------------------------------------------------------ metric functions
def test_confusion_and_iou_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 11]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])  # the void pixel's prediction (2) must not count
    cm = ce.confusion_matrix(gt, pred, 4)
    expected = np.zeros((4, 4), int)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 0] = 1, 1, 2, 1
    np.testing.assert_array_equal(cm, expected)
    iou = ce.class_iou(cm)
    # class 0: tp 1, fp 1 (gt 2), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: 0/1; class 3 absent -> NaN
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 0.0])
    assert np.isnan(iou[3])
    miou, counted = ce.mean_iou(cm)
    assert counted == 3 and miou == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert ce.pixel_accuracy(cm) == pytest.approx(3 / 5)


def test_binary_counts_iou_and_mae_by_hand():
    gt = np.array([1, 1, 1, 0, 0, 1], bool)
    pred = np.array([1, 1, 0, 1, 0, 1], bool)
    valid = np.array([1, 1, 1, 1, 1, 0], bool)  # the last pixel (a hit) is void
    assert ce.binary_counts(gt, pred, valid) == (2, 1, 1)
    assert ce.iou_from_counts(2, 1, 1) == pytest.approx(0.5)
    assert np.isnan(ce.iou_from_counts(0, 0, 0))
    alpha = np.array([1.0, 0.75, 0.0, 0.5, 0.25, 0.0])
    s, n = ce.abs_error(alpha, gt, valid)
    assert n == 5 and s == pytest.approx(0 + 0.25 + 1 + 0.5 + 0.25)


def test_boundary_map_and_disk_dilation():
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    ring = m.copy()
    ring[2, 2] = False
    np.testing.assert_array_equal(ce.boundary_map(m), ring)
    assert not ce.boundary_map(np.ones((4, 4), bool)).any()  # the image frame is not an object edge
    dot = np.zeros((7, 7), bool)
    dot[3, 3] = True
    d = ce.dilate(dot, 2)
    assert d.sum() == 13  # Euclidean disk of radius 2: 1 + 4 + 4 (distance 2) + 4 diagonals (sqrt 2)
    assert d[3, 1] and d[2, 2] and not d[2, 1]  # (1, 2) is sqrt(5) > 2 away


def square(shift: int, s: int = 20, size: int = 60) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[20 : 20 + s, 20 + shift : 20 + s + shift] = True
    return m


@pytest.mark.parametrize("shift", [1, 2])
def test_boundary_f_is_exact_within_tolerance(shift):
    assert ce.boundary_f(square(0), square(shift), tol=2) == (1.0, 1.0, 1.0)


def test_boundary_f_of_square_shifted_beyond_tolerance():
    # Shift 5 with tol 2: of the GT ring's 4*19 = 76 pixels the top and bottom rows match from column +3 on
    # (17 each) and the right column's 2 pixels next to each corner (4): 38 = exactly half; by symmetry the
    # predicted ring's precision is half too.
    p, r, f = ce.boundary_f(square(0), square(5), tol=2)
    assert (p, r, f) == (0.5, 0.5, 0.5)
    assert ce.boundary_f(square(0), square(5), tol=5) == (1.0, 1.0, 1.0)


def test_boundary_f_edge_cases():
    empty = np.zeros((60, 60), bool)
    assert ce.boundary_f(empty, empty) is None
    assert ce.boundary_f(square(0), empty) == (1.0, 0.0, 0.0)
    assert ce.boundary_f(empty, square(0)) == (0.0, 1.0, 0.0)
    # predicted edges on ignored (void) pixels do not cost precision
    assert ce.boundary_f(empty, square(0), ignore=square(0)) is None


def test_predicted_edges_on_void_still_match_for_recall():
    """A predicted edge on void pixels costs no precision and still finds the ground-truth edge beside it (recall):
    the one void-aware step that counts them apart."""
    gt = np.zeros((40, 40), bool)
    gt[10:30, 10:30] = True
    ignore = np.zeros_like(gt)
    ignore[:, 25:] = True  # the square's right edge (column 29) lies on void
    # precision: the predicted edge off the void (all on the gt edge); recall: every gt edge pixel, the void's
    # column 29 included, has a predicted edge pixel on it (on void: 5 columns from any counted one)
    assert ce.boundary_f(gt, gt, tol=2, ignore=ignore) == (1.0, 1.0, 1.0)


def test_labelled_box_holds_every_valid_pixel_and_no_more():
    from bgremover.cutout_metrics import labelled_box

    valid = np.zeros((5, 6), bool)
    valid[1, 2] = valid[3, 4] = True
    assert labelled_box(valid) == (slice(1, 4), slice(2, 5))
    assert labelled_box(np.zeros((5, 6), bool)) is None


def test_cutout_stats_average_boundary_figures_over_images_by_hand():
    """summary(): the mean over images of each image's precision, recall and F (not a median, not pooled), each
    under its own name. Two exact images (1, 1, 1) and one whose net found nothing (1, 0, 0, DAVIS's convention):
    precision 1, recall and F 2/3; foreground IoU pooled: 2 * 400 of 3 * 400 pixels."""
    gt = np.zeros((40, 40), bool)
    gt[10:30, 10:30] = True
    valid = np.ones_like(gt)
    stats = ce.CutoutStats()
    for alpha in (gt.astype(np.float32), gt.astype(np.float32), np.zeros((40, 40), np.float32)):
        stats.update(alpha, gt, valid)
    got = stats.summary()
    assert got["boundary_images"] == 3
    assert got["boundary_precision"] == 1.0
    assert got["boundary_recall"] == pytest.approx(2 / 3) and got["boundary_f"] == pytest.approx(2 / 3)
    assert got["fg_iou"] == pytest.approx(800 / 1200) and got["mae"] == pytest.approx(400 / 4800)


def test_cutout_stats_same_on_a_void_padded_frame():
    """The test stage scores frames padded to the size multiple with void labels (bgremover.padding), eval-cutout
    the frame at its own size: the same prediction must give the same numbers. A car touching the frame's bottom
    edge had a ground-truth edge along the padding in the test stage only (recall 0.79, F 0.89 instead of 1)."""
    from bgremover.padding import pad_image, pad_label

    label = np.zeros((36, 48), np.uint8)
    label[20:, 10:30] = 8  # a car running out of the frame at the bottom
    label[:3, 40:] = 11  # some void inside the frame
    alpha = (label == 8).astype(np.float32)
    plain = ce.CutoutStats()
    plain.update(alpha, label == 8, label < 11)
    padded_alpha = pad_image(alpha, 32)[0]  # the net sees a reflected frame: its prediction goes on into the border
    padded_label = pad_label(label, 32, 11)
    assert padded_label.shape == (64, 64)
    padded = ce.CutoutStats()
    padded.update(padded_alpha, padded_label == 8, padded_label < 11)
    assert plain.summary() == padded.summary()
    assert plain.summary()["boundary_f"] == 1.0


def test_a_downscaled_inference_is_scored_on_bilinearly_resized_logits():
    """--max-side: the logits come back at the label's size as the predictor resizes its alpha (bilinear, pixel
    centres aligned): one row 0, 1 becomes 0, 0.25, 0.75, 1 (nearest: 0, 0, 1, 1, a blockier class map scored)."""
    logits = np.array([[[0.0, 1.0]], [[1.0, 0.0]]], np.float32)  # 2 classes x 1 x 2
    up = ce._at_size(logits, (1, 4))
    assert up.shape == (2, 1, 4)
    np.testing.assert_allclose(up[0, 0], [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(up[1, 0], [1.0, 0.75, 0.25, 0.0])
    assert ce._at_size(logits, (1, 2)) is logits


def test_ms_per_image_is_milliseconds_of_timed_inference(model, camvid, monkeypatch):
    """Each image's inference timed once (the warm-up not counted): a clock moving 0.25 s per reading gives 250."""
    clock = iter(np.arange(0.0, 1000.0, 0.25))
    monkeypatch.setattr(ce.time, "perf_counter", lambda: float(next(clock)))
    r = ce.evaluate(ce.load_remover(model, threads=1), ce.find_pairs(camvid, "test"))
    assert r["n_images"] == 2 and r["ms_per_image"] == pytest.approx(250.0)


# ------------------------------------------------------------------------------------------------ end to end
def test_evaluate_by_hand(model, camvid):
    remover = ce.load_remover(model, threads=1)
    r = ce.evaluate(remover, ce.find_pairs(camvid, "test"))
    assert r["n_images"] == 2 and r["foreground"] == ["Car"]
    # Confusion over 1140 valid pixels. Sky: tp 420 + 410, fp 10 (the gray Car patch). Car: tp 100 + 80,
    # fn 10, fp 20 (the red Building columns). Pedestrian 100/100. Building: tp 0, fn 20. 7 classes absent.
    expected = {"Sky": 830 / 840, "Car": 180 / 210, "Pedestrian": 1.0, "Building": 0.0}
    for name, iou in expected.items():
        assert r["class_iou"][name] == pytest.approx(iou)
    assert sorted(r["mIoU_classes"]) == sorted(expected)
    assert r["class_iou"]["Road"] is None
    assert r["mIoU"] == pytest.approx(sum(expected.values()) / 4)
    assert r["pixel_accuracy"] == pytest.approx(1110 / 1140)
    assert r["metadata_test_mIoU"] == 0.5

    c = r["cutout"]
    assert c["fg_iou"] == pytest.approx(180 / 210)
    assert c["mae"] == pytest.approx(30 / 1140)  # the controllable model's alpha is exactly 0 or 1
    # b.png: the predicted ring (36 px) lies within 2 px of the GT Car's (32 px), the GT patch's 10 edge pixels
    # are unmatched: P 1, R 32/42, F 32/37; a.png is perfect.
    assert c["boundary_images"] == 2
    assert c["boundary_f"] == pytest.approx((1 + 32 / 37) / 2)
    a, b = r["per_image"]
    assert (a["image"], a["fg_iou"], a["boundary_f"]) == ("a.png", 1.0, 1.0)
    assert a["mae"] == pytest.approx(0.0, abs=1e-6)
    assert b["fg_iou"] == pytest.approx(80 / 110) and b["mae"] == pytest.approx(30 / 570)
    assert r["cutout_threshold"] is None and r["ms_per_image"] > 0


def test_perfect_prediction_scores_one(model, camvid):
    pairs = ce.find_pairs(camvid, "test", limit=1)
    assert [p[0].name for p in pairs] == ["a.png"]
    r = ce.evaluate(ce.load_remover(model, classes=["car", "Pedestrian"], threads=1), pairs)
    assert r["foreground"] == ["Car", "Pedestrian"]
    assert r["mIoU"] == 1.0 and r["pixel_accuracy"] == 1.0 and len(r["mIoU_classes"]) == 3
    assert r["cutout"]["fg_iou"] == 1.0 and r["cutout"]["boundary_f"] == 1.0
    assert r["cutout"]["mae"] == pytest.approx(0.0, abs=1e-6)


def test_threshold_scores_the_hard_mask(tmp_path):
    # With mean = std = 0.5 black pixels get P(Car) = 0.5 exactly: foreground at the soft cut (>= 0.5),
    # background under --threshold 0.6; the soft MAE charges them 0.5, the hard one 1 (or 0 at threshold 0.4).
    model = build_model(tmp_path / "half.onnx", mean=(0.5,) * 3, std=(0.5,) * 3)
    rgb, label = scene()
    rgb[16:18, 0:10] = BLACK
    label[16:18, 0:10] = CAR  # 20 px labelled Car: Car GT = 120 px, 570 valid px
    write_pair(tmp_path / "cv", "val", "x.png", rgb, label)
    pairs = ce.find_pairs(tmp_path / "cv", "val")
    remover = ce.load_remover(model, threads=1)
    high = ce.evaluate(remover, pairs, threshold=0.6)
    assert high["cutout"]["fg_iou"] == pytest.approx(1.0)
    assert high["cutout"]["mae"] == pytest.approx(10 / 570)
    assert high["cutout_threshold"]["fg_iou"] == pytest.approx(100 / 120)
    assert high["cutout_threshold"]["mae"] == pytest.approx(20 / 570)
    assert high["cutout"]["boundary_f"] == 1.0
    assert high["cutout_threshold"]["boundary_f"] < 0.95  # the black patch's edges are missed
    low = ce.evaluate(remover, pairs, threshold=0.4)
    assert low["cutout_threshold"]["mae"] == pytest.approx(0.0, abs=1e-6)
    assert low["cutout_threshold"]["fg_iou"] == pytest.approx(1.0)


def test_cli_writes_json_and_prints_table(model, camvid, tmp_path):
    out = tmp_path / "res" / "cutout.json"
    res = subprocess.run(
        [sys.executable, "-m", "bgremover.cutout_eval", "--model", str(model), "--data-root", str(camvid),
         "--threshold", "0.5", "--threads", "1", "--json", str(out), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    for text in ("mIoU", "foreground IoU", "boundary F (tol 2 px)", "MAE", "threshold 0.5", "ms/image"):
        assert text in res.stdout
    assert f"{sum([830 / 840, 180 / 210, 1.0, 0.0]) / 4:.4f}" in res.stdout
    # the printed foreground IoU is pooled over pixels and says so (a mean of the per-image IoUs is another number)
    assert "(foreground IoU and MAE over the pixels of all 2 images pooled, not a mean of per-image scores" in res.stdout
    data = json.loads(out.read_text())
    assert data["n_images"] == 2 and data["split"] == "test" and data["data_root"] == str(camvid)
    assert data["split_frames"] == {"frames": 2, "of": 2, "complete": True}
    # without --quiet, stderr to a file (not a terminal) gets no progress bar either
    res = subprocess.run(
        [sys.executable, "-m", "bgremover.cutout_eval", "--model", str(model), "--data-root", str(camvid),
         "--threads", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0 and "img/s" not in res.stderr and "it/s" not in res.stderr, res.stderr[-500:]
    assert data["cutout"]["fg_iou"] == pytest.approx(180 / 210)
    per_image = [row["fg_iou"] for row in data["per_image"] if row["fg_iou"] is not None]
    assert abs(np.mean(per_image) - 180 / 210) > 0.005  # so "pooled" names which of two numbers is printed
    assert f"{'foreground IoU':<34}{180 / 210:>16.4f}" in res.stdout  # the pooled one, first column (soft)
    for key, value in data["cutout"].items():  # ~0/1 alphas: thresholding at 0.5 changes nothing
        assert data["cutout_threshold"][key] == pytest.approx(value, abs=1e-6), key
    assert [p.name for p in out.parent.iterdir()] == ["cutout.json"]  # no temp file left behind


def test_data_dir_env_is_the_default_root(model, camvid, monkeypatch, capsys):
    monkeypatch.setenv("DATA_DIR", str(camvid))
    assert ce.main(["--model", str(model), "--limit", "1", "--threads", "1", "--quiet"]) == 0
    # a --limit subset is flagged as eval and export flag a partial test set (it said "1 images" and no more)
    assert "1 images of 2 (PARTIAL: these numbers are not the split's)" in capsys.readouterr().out
    assert ce.main(["--model", str(model), "--threads", "1", "--quiet"]) == 0
    assert "2 images, foreground" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["--model", "{tmp}/missing.onnx"], 1, "model file not found"),
        (["--data-root", "{tmp}/nowhere"], 1, "dataset folder not found"),
        (["--classes", "Car,Unicorn"], 1, "unknown class name(s) Unicorn"),
        (["--split", "val"], 1, "split folder missing"),
        (["--limit", "0"], 2, "--limit"),
        (["--threshold", "1.5"], 2, "--threshold"),
        (["--boundary-tol", "-1"], 2, "--boundary-tol"),
        (["--limit", "many"], 2, "invalid int value"),
        (["--void-value", "7"], 2, "are for an image/mask folder, not CamVid"),  # ignored before
        (["--void-value", "300"], 2, "--void-value must be a mask value 0-255, got 300"),  # named data.void_value, exit 1
        (["--split-file", "{tmp}/split.json"], 2, "are for an image/mask folder, not CamVid"),
    ],
)
def test_bad_inputs_give_one_error_line(model, camvid, tmp_path, capsys, args, code, text):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["--model", str(model), "--data-root", str(camvid), "--quiet"]
    json_path = tmp_path / "r.json"
    try:
        rc = ce.main(base + args + ["--json", str(json_path)])
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and text in lines[0], err
    assert "Traceback" not in err and not json_path.exists()


def test_an_unwritable_json_path_is_refused_before_the_evaluation(model, camvid, tmp_path, capsys, monkeypatch):
    """`--json photo.jpg/x.json` or `--json /proc/x.json` printed the whole report, then failed on the write
    (naming a hidden temp file): on 233 frames, minutes lost. Now one line, exit 2, before any inference."""
    (tmp_path / "photo.jpg").write_bytes(b"not a folder")
    ran = []
    monkeypatch.setattr(ce, "evaluate", lambda *a, **k: ran.append(a))
    for target, text in ((tmp_path / "photo.jpg" / "x.json", f"{tmp_path / 'photo.jpg'} is a file, not a folder"),
                         (Path("/proc/x.json"), "--json /proc/x.json: cannot write in /proc"),
                         (tmp_path, f"--json {tmp_path} is a folder")):
        assert ce.main(["--model", str(model), "--data-root", str(camvid), "--quiet", "--json", str(target)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], lines
    assert ran == [] and not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob(".*tmp"))


def test_a_json_path_naming_the_model_is_refused(model, camvid, tmp_path, capsys, monkeypatch):
    """`--json model.onnx` wrote the report over the model being scored (exit 0): one line, exit 2, nothing run."""
    copy = tmp_path / "m.onnx"
    copy.write_bytes(model.read_bytes())
    ran = []
    monkeypatch.setattr(ce, "evaluate", lambda *a, **k: ran.append(a))
    link = tmp_path / "link.json"
    link.symlink_to(copy)
    for target in (copy, link):
        assert ce.main(["--model", str(copy), "--data-root", str(camvid), "--quiet", "--json", str(target)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "would overwrite the model" in lines[0], lines
    assert ran == [] and copy.read_bytes() == model.read_bytes()


def test_missing_label_and_size_mismatch_are_errors(model, camvid, capsys):
    (camvid / "testannot" / "b.png").unlink()
    assert ce.main(["--model", str(model), "--data-root", str(camvid), "--quiet"]) == 1
    assert "no label" in capsys.readouterr().err
    Image.fromarray(np.zeros((5, 5), np.uint8), mode="L").save(camvid / "testannot" / "b.png")
    assert ce.main(["--model", str(model), "--data-root", str(camvid), "--quiet"]) == 1
    assert "label is 5x5 but image is 30x20" in capsys.readouterr().err


def test_a_label_training_refuses_is_refused_here_too(model, camvid, capsys):
    """A CamVid label is read by the training's rule (bgremover.data.camvid): a value above void (11), which `make
    eval` and training refuse, was scored by eval-cutout as void without a word (a 255-void copy of CamVid, a damaged
    file), and its mIoU set beside the model's test mIoU."""
    from bgremover.data.camvid import CamVidError, read_pair

    label = np.asarray(Image.open(camvid / "testannot" / "b.png")).copy()
    label[10, 10] = 200
    Image.fromarray(label, mode="L").save(camvid / "testannot" / "b.png")
    with pytest.raises(CamVidError) as training:
        read_pair(camvid / "test" / "b.png", camvid / "testannot" / "b.png")
    assert ce.main(["--model", str(model), "--data-root", str(camvid), "--quiet"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"{ce.PROG}: error: {training.value}"]
    assert "label values outside 0-11" in lines[0] and "contains 200" in lines[0]


def test_imports_no_torch_lightning_or_hydra():
    code = (
        "import sys\nimport bgremover.cutout_eval\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'torchvision'})))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""


# ------------------------------------------------------------------------------------------------ real CamVid
def test_smoke_on_real_camvid(model, camvid_root, tmp_path):
    out = tmp_path / "real.json"
    rc = ce.main(["--model", str(model), "--data-root", str(camvid_root), "--limit", "2", "--threads", "1",
                  "--threshold", "0.5", "--json", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["n_images"] == 2 and r["foreground"] == ["Car"]
    for key in ("mIoU", "pixel_accuracy"):
        assert 0.0 <= r[key] <= 1.0
    for stats in (r["cutout"], r["cutout_threshold"]):
        for key in ("fg_iou", "boundary_f", "boundary_precision", "boundary_recall", "mae"):
            assert stats[key] is None or 0.0 <= stats[key] <= 1.0, key
        assert stats["mae"] is not None
    assert len(r["class_iou"]) == 11 and np.asarray(r["confusion_matrix"]).sum() > 0.5 * 2 * 480 * 360


@pytest.mark.parametrize(("eval_record", "note"), [
    ({"frames": 12}, "metadata test_mIoU 0.6000 on 12 frames"),  # a record from before `of` was kept
    ({"frames": 12, "of": 233}, f"metadata test_mIoU 0.6000 on 12 of 233 frames ({PARTIAL})"),
])
def test_an_int8_copys_own_score_comes_with_its_own_frame_count(camvid, tmp_path, eval_record, note):
    """An int8 copy scored on `quantize --eval-limit 12` frames was reported as "metadata test_mIoU 0.0668 on 3
    frames": its own mIoU beside the float model's frame count (an audit)."""
    quantized = build_model(tmp_path / "q.onnx", metadata={
        "test_mIoU": 0.5, "test_frames": 3, "test_frames_of": 3,
        "quantization": {"eval": {"split": "test", **eval_record, "int8": {"mIoU": 0.6}}}})
    remover = ce.load_remover(quantized, threads=1)
    assert remover.test_miou == 0.6 and remover.test_frames == (12, eval_record.get("of"))
    r = ce.evaluate(remover, ce.find_pairs(camvid, "test"))
    assert (r["metadata_test_mIoU"], r["metadata_test_frames"]) == (0.6, 12)
    assert note in ce.format_report(r, str(camvid), "test", 1)
    plain = ce.load_remover(build_model(tmp_path / "f.onnx", metadata={"test_mIoU": 0.5, "test_frames": 3,
                                                                        "test_frames_of": 3}), threads=1)
    assert plain.test_frames == (3, 3) and "metadata test_mIoU 0.5000 on 3 frames" in ce.format_report(
        ce.evaluate(plain, ce.find_pairs(camvid, "test")), str(camvid), "test", 1)


# ------------------------------------------------------------------------------------------------ mutation audit
def test_binary_counts_tell_false_positives_from_false_negatives():
    """(tp, fp, fn) in that order: a prediction of everything has fp, no fn (IoU alone cannot tell them apart)."""
    gt = np.array([1, 0, 0, 0], bool)
    assert ce.binary_counts(gt, np.ones(4, bool)) == (1, 3, 0)
    assert ce.binary_counts(np.ones(4, bool), gt) == (1, 0, 3)


def test_boundary_precision_and_recall_are_not_swapped():
    """A 20x20 square found exactly plus a stray 4x4 blob far from it: every GT edge pixel is matched (recall 1),
    of the 76 + 12 predicted edge pixels 76 are (precision 76/88); the report's rows say which is which."""
    gt = np.zeros((60, 60), bool)
    gt[10:30, 10:30] = True
    pred = gt.copy()
    pred[45:49, 45:49] = True
    p, r, f = ce.boundary_f(gt, pred, tol=2)
    assert (p, r) == (76 / 88, 1.0)
    assert f == pytest.approx(2 * (76 / 88) / (76 / 88 + 1))
    stats = ce.CutoutStats()
    stats.update(pred.astype(np.float32), gt, np.ones_like(gt))
    got = stats.summary()
    assert (got["boundary_precision"], got["boundary_recall"]) == (76 / 88, 1.0)


def test_alpha_mae_pools_pixels_not_images():
    """MAE over the set's pixels, as documented: 10 pixels all wrong in one image and 30 right in another give
    10/40 = 0.25, not the mean of the two images' MAEs (0.5)."""
    stats = ce.CutoutStats()
    stats.update(np.ones((2, 5), np.float32), np.zeros((2, 5), bool), np.ones((2, 5), bool))
    stats.update(np.zeros((5, 6), np.float32), np.zeros((5, 6), bool), np.ones((5, 6), bool))
    assert stats.summary()["mae"] == pytest.approx(0.25)


def test_the_reports_precision_and_recall_rows_are_the_boundary_figures(model, camvid):
    """b.png's boundary: precision 1, recall 32/42 (see test_evaluate_by_hand); a.png's 1, 1. The summary and the
    printed table give precision 1 and recall (1 + 32/42) / 2 = 0.8810 under their own names."""
    r = ce.evaluate(ce.load_remover(model, threads=1), ce.find_pairs(camvid, "test"))
    assert r["cutout"]["boundary_precision"] == 1.0
    assert r["cutout"]["boundary_recall"] == pytest.approx((1 + 32 / 42) / 2)
    lines = ce.format_report(r, str(camvid), "test", 1).splitlines()
    assert next(ln for ln in lines if ln.strip().startswith("precision")).split()[-1] == "1.0000"
    assert next(ln for ln in lines if ln.strip().startswith("recall")).split()[-1] == "0.8810"


def test_a_downscaled_inference_is_scored_over_every_labelled_pixel(model, camvid):
    """--max-side below the images' size: the argmax is taken on logits brought back to the label's size, so the
    confusion matrix counts all 1140 labelled pixels of the two frames (not a downscaled map's)."""
    r = ce.evaluate(ce.load_remover(model, threads=1, max_side=10), ce.find_pairs(camvid, "test"))
    assert r["max_side"] == 10
    assert int(np.asarray(r["confusion_matrix"]).sum()) == 1140


def test_pixel_accuracy_of_no_labelled_pixel_is_undefined_not_zero():
    """A split whose labels are all void: accuracy has nothing to count (NaN, 'n/a' in the report), where 0.0 would
    read as every pixel wrong; as mIoU, and as the training module says."""
    assert np.isnan(ce.pixel_accuracy(np.zeros((3, 3), np.int64)))
    assert np.isnan(ce.mean_iou(np.zeros((3, 3), np.int64))[0])


def test_a_folder_runs_model_scored_on_camvid_is_given_its_scoring_command(camvid, tmp_path, capsys, monkeypatch):
    """`make eval-cutout MODEL=<run>/remover.onnx` without --data-root said "dataset folder not found: data/CamVid
    (run `make data` or set DATA_DIR)" on a machine without CamVid (a remover's user has none), and "model classes
    background, foreground are not CamVid's ...: its argmax cannot be scored" where CamVid was: the model's run
    folder says where it trained, and the line gives the command that scores it there (what make remover prints)."""
    folder = tmp_path / "my photos"
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(
        {"status": "ok", "config": {"data": {"_target_": "bgremover.data.FolderDataModule", "root": str(folder)}}}))
    (run / "split.json").write_text("{}")
    binary = build_model(run / "remover.onnx", metadata={"classes": ["background", "foreground"],
                                                         "default_foreground": ["foreground"]})
    line = (f"{binary} was trained on the image/mask folder {folder}, not CamVid: score it there, make eval-cutout "
            f"MODEL={binary} ARGS=\"--data-root '{folder}' --split-file {run / 'split.json'}\"")
    for root in (tmp_path / "no CamVid", camvid):
        monkeypatch.setenv("DATA_DIR", str(root))
        assert ce.main(["--model", str(binary), "--quiet"]) == 1
        assert capsys.readouterr().err == f"{ce.PROG}: error: {line}\n", root
    # a model outside any run keeps the plain line
    loose = build_model(tmp_path / "loose.onnx")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "no CamVid"))
    assert ce.main(["--model", str(loose), "--quiet"]) == 1
    assert "dataset folder not found" in capsys.readouterr().err
