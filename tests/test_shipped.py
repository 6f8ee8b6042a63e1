"""The shipped default model: `make predict` works on a fresh clone, and the file is the model the README's
table describes (its recorded test mIoU is what evaluating the ONNX file on CamVid test gives)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from bgremover.data.classes import CLASSES, DEFAULT_FOREGROUND, MEAN, STD
from bgremover.predict import DEFAULT_MODEL, BackgroundRemover

EXAMPLES = sorted((REPO / "examples").glob("*.jpg"))


def test_shipped_model_and_examples_are_in_the_repo():
    assert DEFAULT_MODEL.is_file() and DEFAULT_MODEL.stat().st_size < 25 * 2**20
    assert len(EXAMPLES) >= 2
    assert (REPO / "models" / "README.md").is_file()


def test_shipped_metadata_is_complete():
    meta = BackgroundRemover(DEFAULT_MODEL).meta
    assert meta["format"] == "bgremover-onnx" and meta["format_version"] == 1
    assert meta["classes"] == list(CLASSES)
    assert meta["mean"] == pytest.approx(list(MEAN)) and meta["std"] == pytest.approx(list(STD))
    assert meta["default_foreground"] == list(DEFAULT_FOREGROUND)
    assert meta["size_multiple"] in (8, 16, 32) and meta["params"] > 1_000_000
    assert 0.2 < meta["test_mIoU"] < 1.0  # a trained model, not an initialisation
    assert meta["net"] and meta["exported_at"] and meta["bgremover_version"]


def test_shipped_example_cutouts_are_what_the_default_predictor_makes():
    """examples/*.nobg.png show today's default model (the int8 copy), not an older or the float one."""
    remover = BackgroundRemover()
    assert EXAMPLES  # a loop over none would pass
    for jpg in EXAMPLES:
        shipped = np.asarray(Image.open(jpg.with_suffix(".nobg.png")))
        assert shipped.shape[2] == 4
        alpha = np.asarray(remover.mask(np.asarray(Image.open(jpg).convert("RGB"))), np.int16)
        assert np.abs(shipped[..., 3].astype(np.int16) - alpha).max() <= 1, jpg.name


def test_make_predict_on_an_example_writes_a_cutout(tmp_path):
    """What a user types after cloning: the make target itself, on a shipped example image."""
    image = tmp_path / EXAMPLES[0].name
    shutil.copy(EXAMPLES[0], image)
    out_dir = tmp_path / "out"
    proc = subprocess.run(["make", "-s", "predict", f"IMG={image}", f"OUT={out_dir}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = out_dir / f"{image.stem}.nobg.png"
    cutout = Image.open(out)
    assert cutout.format == "PNG" and cutout.mode == "RGBA" and cutout.size == Image.open(image).size
    alpha = np.asarray(cutout)[..., 3]
    assert (alpha == 0).mean() > 0.3 and (alpha > 128).mean() > 0.01  # mostly background, some cars/people
    # the transparent region follows the background classes of the model that made it (the default: the
    # shipped model's int8 copy when it is there)
    remover = BackgroundRemover()
    classes = remover.logits(np.asarray(Image.open(image).convert("RGB"))).argmax(0)
    fg_ids = [CLASSES.index(c) for c in DEFAULT_FOREGROUND]
    is_fg = np.isin(classes, fg_ids)
    assert (alpha[is_fg] > 128).mean() > 0.8 and (alpha[~is_fg] < 128).mean() > 0.95


@pytest.mark.slow
def test_shipped_model_reproduces_its_recorded_test_miou(camvid_root, tmp_path):
    """All 233 test frames through the int8 file, the one `make predict` runs (twice as fast as the float one,
    which test_one_number checks against the test stage): it scores what its quantization record says, and
    within 0.01 of the float model's recorded test mIoU (the test stage padded with black, the predictor pads
    by reflection, and int8 costs ~0.1 point)."""
    from bgremover.remover import int8_path

    report = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bgremover.cutout_eval", "--model", str(int8_path(DEFAULT_MODEL)), "--data-root",
         str(camvid_root), "--json", str(report), "--quiet"],
        capture_output=True, text=True, timeout=1200, env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(report.read_text())
    meta = BackgroundRemover(int8_path(DEFAULT_MODEL)).meta
    assert result["n_images"] == 233 and meta["quantization"]["eval"]["frames"] == 233
    int8 = meta["quantization"]["eval"]["int8"]
    assert abs(result["mIoU"] - int8["mIoU"]) < 1e-3 and abs(result["cutout"]["fg_iou"] - int8["fg_iou"]) < 1e-3
    assert abs(result["mIoU"] - meta["test_mIoU"]) < 0.01, (result["mIoU"], meta["test_mIoU"])


@pytest.mark.skipif(bool(__import__("torch").cuda.is_available()), reason="with a GPU it would train for real")
@pytest.mark.parametrize(("target", "folder", "named"), [
    ("reproduce-default", "reproduce", ["speedrun_remover.yaml", "EXP=cpu_default (the earlier CPU-trained remover, "
                                        "87 min, 39.7 test mIoU)"]),
    ("speedruns", "speedruns", ["experiments/speedrun_*.yaml"]),
])
def test_gpu_recipes_without_a_gpu_say_so_and_train_nothing(tmp_path, target, folder, named):
    """The shipped model's recipe and the README's GPU results are GPU speed-runs: on a CPU-only machine `make
    reproduce-default` / `make speedruns` stop at once with one error line naming the recipes (and the CPU
    alternative), and write nothing."""
    before = sorted((REPO / "logs").glob(f"{folder}*")) if (REPO / "logs").is_dir() else []
    proc = subprocess.run(["make", "-s", target], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(name in errors[0] for name in named), errors
    assert "Traceback" not in proc.stderr and not proc.stdout.strip()
    assert (sorted((REPO / "logs").glob(f"{folder}*")) if (REPO / "logs").is_dir() else []) == before


def test_make_refuses_a_variable_no_target_reads():
    """README rows said `make train EXP=speedrun_tiramisu103 speedrun_budget_s=450`: make took the budget as a make
    variable nobody reads and ran the recipe's default 570 s. Now one line says where Hydra overrides go."""
    proc = subprocess.run(["make", "-s", "train", "EXP=speedrun_tiramisu103", "speedrun_budget_s=450"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.endswith("*** unknown make variable(s) speedrun_budget_s: Hydra overrides go in ARGS, e.g. make "
                         'train ARGS="speedrun_budget_s=...".  Stop.')
    proc = subprocess.run(["make", "-s", "remover", "DATA=x", "remover_budget_s=60"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)  # the advice named `make train` whatever the target
    assert proc.returncode == 2 and 'e.g. make remover ARGS="remover_budget_s=..."' in proc.stderr
    ok = subprocess.run(["make", "-n", "train", "EXP=speedrun_tiramisu103", "ARGS=speedrun_budget_s=450"], cwd=REPO,
                        capture_output=True, text=True, timeout=60, check=True)
    assert "experiment=speedrun_tiramisu103 speedrun_budget_s=450" in ok.stdout


def test_an_unknown_variable_gets_advice_that_works_for_its_target():
    """`make predict img=photo.jpg` was told `make predict ARGS="img=..."` and `make serve port=9000` `make serve
    ARGS="port=..."`: Hydra advice for programs that take no Hydra overrides (followed, predict read img=photo.jpg
    as a file name). A lower-cased variable is named as it is spelled; a CLI's options are flags in ARGS."""
    def line(*args: str) -> str:
        proc = subprocess.run(["make", "-s", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stdout == ""
        (only,) = proc.stderr.strip().splitlines()
        return only

    assert line("predict", "img=photo.jpg").endswith("*** unknown make variable(s) img: did you mean IMG=...? "
                                                      "(make's variables are upper-case).  Stop.")
    assert line("serve", "port=9000").endswith('*** unknown make variable(s) port: options go in ARGS, e.g. make '
                                               'serve ARGS="--port ...".  Stop.')
    assert 'Hydra overrides go in ARGS, e.g. make eval ARGS="tta=..."' in line("eval", "tta=flip")


def test_make_refuses_a_variable_its_target_does_not_read():
    """`make train CKPT=<run>/last.ckpt` (CKPT as eval/export/ship take it) trained a new model from scratch, `make
    quantize OUT=x.int8.onnx` wrote the default file, `make test ARGS=-x` ran the whole suite: known variables
    the named target never reads were dropped silently. Now one line says what the target takes; nothing runs."""
    def make(*args: str) -> subprocess.CompletedProcess:
        # as a person types it: under `make test` the inherited MAKELEVEL made make print "make[1]:"
        env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
        return subprocess.run(["make", "-s", *args], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)

    for args, says in ((["train", "CKPT=last.ckpt"], 'make train reads no CKPT: it takes EXP ARGS (a resume: ARGS="ckpt_path=..."'),
                       (["quantize", "OUT=x.int8.onnx"], "make quantize reads no OUT: it takes MODEL ARGS"),
                       (["test", "ARGS=-x"], "make test reads no ARGS: it takes none"),
                       (["example-data", "DATA=x"], "make example-data reads no DATA: it takes EXAMPLES"),
                       (["model-info", "CKPT=x.ckpt"], "make model-info reads no CKPT: it takes MODEL")):
        proc = make(*args)
        assert proc.returncode == 2 and proc.stdout == "", (args, proc.stdout)
        (line,) = proc.stderr.strip().splitlines()
        assert says in line and line.endswith("(make help shows how).  Stop."), line
    typo = make("trian", "EXP=x")  # a misspelt target is make's own error, not "trian reads no EXP"
    assert typo.returncode == 2 and typo.stderr.strip() == "make: *** No rule to make target 'trian'.  Stop."
    for args, runs in ((["eval", "CKPT=a b.ckpt"], 'ckpt_path="a b.ckpt"'),  # a goal that reads it: fine
                       (["train", "eval", "EXP=cpu_quick", "CKPT=c.ckpt"], "experiment=cpu_quick"),
                       (["train", "CKPT="], "bgremover.train"),  # an empty one sets nothing
                       (["predict", "IMG=a.jpg", "MODEL=m.onnx", "OUT=o", "ARGS=--refine"], '--out "o" --refine')):
        ok = make("-n", *args)
        assert ok.returncode == 0 and runs in ok.stdout, (args, ok.stderr)


def test_make_test_with_a_bad_test_jobs_says_so_in_one_line():
    """`make test TEST_JOBS=x` ended in pytest-xdist's whole usage block (exit 4); now one line naming the setting."""
    proc = subprocess.run(["make", "-s", "test", "TEST_JOBS=x"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.endswith("*** TEST_JOBS must be a number of test processes (0: one process) or auto, got 'x'.  Stop.")
    for jobs in ("0", "3", "auto"):
        ok = subprocess.run(["make", "-n", "test", f"TEST_JOBS={jobs}"], cwd=REPO, capture_output=True, text=True,
                            timeout=60, check=True)
        assert f"pytest -n {jobs} --dist worksteal" in ok.stdout


def test_the_default_int8_model_says_how_quantize_made_it(capsys):
    """`make model-info` on the default (int8) model printed "test mIoU: 56.5" alone: neither the 233 frames (its
    record predates the split size) nor that it is a copy of the float file, calibrated on 50 train frames, scoring
    0.1 below it on the same frames; the float file has no such line."""
    from bgremover import predict

    int8 = DEFAULT_MODEL.with_suffix(".int8.onnx")
    assert predict.main(["--info", "-m", str(int8)]) == 0
    lines = capsys.readouterr().out.splitlines()
    record = BackgroundRemover(int8).meta["quantization"]
    frames, scores = record["eval"]["frames"], record["eval"]
    assert f"test mIoU: {100 * scores['int8']['mIoU']:.1f} on {frames} " in "\n".join(lines) + " "
    assert (f"quantized: int8 copy of {DEFAULT_MODEL.name} (sha256 {record['source_sha256'][:12]}); calibrated on "
            f"{record['calibration']['frames']} frames of train; test mIoU {100 * scores['int8']['mIoU']:.1f} int8 "
            f"vs {100 * scores['float']['mIoU']:.1f} float on the same frames") in lines
    assert predict.main(["--info", "-m", str(DEFAULT_MODEL)]) == 0
    assert not any(line.startswith("quantized:") for line in capsys.readouterr().out.splitlines())
