"""`python -m bgremover.ship`: a checkpoint becomes the shipped set (float ONNX, int8 copy, float16 weights) only
when it beats the shipped model on the same test frames; otherwise, or if installing stops half-way, the models
folder keeps its old set. The candidate is a tiny FC-DenseNet trained here for a few seconds on synthetic scenes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_export import MEAN, STD, TINY_CONFIG, tiny_net, write_checkpoint
from test_quantize import build_net, scene

from bgremover import checkpoint, ship
from bgremover.data.classes import CLASSES
from bgremover.remover import BackgroundRemover, file_sha256

NAMES = ("bgremover-camvid.onnx", "bgremover-camvid.int8.onnx", "bgremover-camvid.pt")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ship") / "CamVid"
    for split, n in (("train", 4), ("test", 3)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(n):
            rgb, label = scene(2 * i + (split == "test"))
            Image.fromarray(rgb).save(root / split / f"{split}_{i}.png")
            Image.fromarray(label, mode="L").save(root / f"{split}annot" / f"{split}_{i}.png")
    return root


def fit(data: Path, run: Path, steps: int) -> Path:
    """A checkpoint of the tiny FC-DenseNet fitted to the train scenes for `steps` Adam steps (inputs prepared as
    the predictor does: normalized, reflect-padded to the size multiple, padding labelled void)."""
    net = tiny_net().train()
    xs, ys = [], []
    for f in sorted((data / "train").iterdir()):
        rgb = np.asarray(Image.open(f), np.float32) / 255
        x = (torch.from_numpy(rgb).permute(2, 0, 1) - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        y = torch.from_numpy(np.array(Image.open(data / "trainannot" / f.name))).long()
        xs.append(F.pad(x[None], (0, 64 - x.shape[2], 0, 64 - x.shape[1]), mode="reflect")[0])
        ys.append(F.pad(y, (0, 64 - y.shape[1], 0, 64 - y.shape[0]), value=11))
    x, y = torch.stack(xs), torch.stack(ys)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y, ignore_index=11).backward()
        opt.step()
    return write_checkpoint(run, net.eval(), TINY_CONFIG, "tiny")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    return fit(data, tmp_path_factory.mktemp("run"), 150)  # 100 % on the test scenes


def run_ship(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bgremover.ship", *args, "--threads", "1", "--quiet"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def listing(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir())}


def test_ship_installs_a_working_set_where_none_was(trained, data, tmp_path):
    models = tmp_path / "models"
    proc = run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in models.iterdir()) == sorted(NAMES)  # no scratch folder, no temp files
    assert "| CamVid test, 3 frames | mIoU % | cut-out IoU % | boundary F % (2 px) | alpha MAE |" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| candidate |")).split("|")
    assert row[2:4] == [" 100.00 ", " 100.00 "] and 90 < float(row[4]) <= 100 and float(row[5]) < 0.05  # points, MAE
    assert "| shipped |" not in proc.stdout
    assert "out-of-range" not in proc.stderr  # onnxruntime's per-tensor notices for the BN scales are dropped

    float_model, int8_model, weights = (models / n for n in NAMES)
    remover = BackgroundRemover(int8_model, threads=1)
    assert remover.meta["quantization"]["source_sha256"] == file_sha256(float_model)  # the default path takes it
    assert remover.meta["net"] == "tiny"
    rgb, label = scene(3)
    pred = BackgroundRemover(float_model, threads=1).logits(rgb).argmax(0)
    assert (pred == label).mean() > 0.95  # the trained net, exported

    net, info, ckpt = checkpoint.load_net(weights)  # what ckpt_init= and make export read
    assert info["net_name"] == "tiny" and set(ckpt) == {"state_dict", "bgremover"}
    floats = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert all(v.dtype == (torch.float16 if v.dim() > 1 else torch.float32) for v in floats)  # BN statistics fp32
    assert any(v.dim() == 1 for v in floats) and any(v.dim() > 1 for v in floats)
    source, _, _ = checkpoint.load_net(trained)
    for k, v in source.state_dict().items():
        rounded = v.half().float() if v.is_floating_point() and v.dim() > 1 else v
        torch.testing.assert_close(net.state_dict()[k], rounded, rtol=0, atol=0)


def test_ship_refuses_a_model_that_does_not_beat_the_shipped_one(trained, data, tmp_path):
    """The same checkpoint again ties with itself (100 % on these scenes): not better, so refused; --force
    installs it all the same."""
    models = tmp_path / "models"
    assert run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data)).returncode == 0
    before = listing(models)
    proc = run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("python -m bgremover.ship: error:") and "does not beat the shipped model" in lines[-1]
    assert "mIoU 100.00 vs 100.00" in lines[-1] and "| shipped | 100.00 |" in proc.stdout
    assert listing(models) == before  # nothing changed, nothing left behind

    proc = run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data), "--force")
    assert proc.returncode == 0 and sorted(p.name for p in models.iterdir()) == sorted(NAMES)


def test_a_tie_on_the_class_map_with_worse_edges_is_not_better():
    """The fourth H100 session's train+val run against the shipped model (make ship's own table): it won mIoU by
    0.02 points and cut-out IoU by 0.019 and was installed, though its boundary F and alpha MAE were worse."""
    candidate = {"mIoU": 0.5663, "fg_iou": 0.7330, "boundary_f": 0.5125, "mae": 0.0201}
    shipped = {"mIoU": 0.5661, "fg_iou": 0.7144, "boundary_f": 0.5325, "mae": 0.0196}
    assert ship.losses(candidate, shipped) == ["boundary F 51.25 vs 53.25", "alpha MAE 0.0201 vs 0.0196"]
    assert ship.losses(shipped, candidate) == ["mIoU 56.61 vs 56.63", "cut-out IoU 71.44 vs 73.30"]
    better = {**candidate, "boundary_f": 0.5325, "mae": 0.0196}  # equal edges are enough
    assert ship.losses(better, shipped) == []
    assert ship.losses(shipped, shipped) == ["mIoU 56.61 vs 56.61", "cut-out IoU 71.44 vs 71.44"]


def test_ship_replaces_a_worse_model_of_the_same_net(trained, data, tmp_path):
    models = tmp_path / "models"
    barely = fit(data, tmp_path / "barely", 2)
    assert run_ship("--ckpt", str(barely), "--models-dir", str(models), "--data-root", str(data)).returncode == 0
    before = listing(models)
    proc = run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data))
    assert proc.returncode == 0, proc.stderr[-2000:]
    shipped = next(line for line in proc.stdout.splitlines() if line.startswith("| shipped |"))
    assert float(shipped.split("|")[2]) < 100.0 and "| candidate | 100.00 |" in proc.stdout
    after = listing(models)
    assert sorted(after) == sorted(NAMES) and all(after[n] != before[n] for n in NAMES)


def test_an_int8_copy_there_alone_is_compared_with(trained, data, tmp_path):
    """With the float file deleted (the predictor then loads the int8 copy alone), a worse candidate was installed
    over it with no comparison ("no shipped model"): the shipped int8 copy is now scored against the candidate's."""
    models = tmp_path / "models"
    assert run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data)).returncode == 0
    (models / NAMES[0]).unlink()
    before = listing(models)
    barely = fit(data, tmp_path / "barely", 2)
    proc = run_ship("--ckpt", str(barely), "--models-dir", str(models), "--data-root", str(data))
    assert proc.returncode == 1 and "does not beat the shipped model" in proc.stderr, proc.stderr[-2000:]
    assert "| shipped int8 | 100.00 | 100.00 |" in proc.stdout and "no shipped model" not in proc.stdout
    assert listing(models) == before
    proc = run_ship("--ckpt", str(barely), "--models-dir", str(models), "--data-root", str(data), "--force")
    assert proc.returncode == 0 and sorted(p.name for p in models.iterdir()) == sorted(NAMES)


def scored_ship(trained, data, models, candidate_float, candidate_int8, shipped_scores, monkeypatch, frames=None,
                **kw) -> None:
    """ship.ship with the scores given: the candidate's float and int8 ones (from quantize) and the shipped model's
    (from _score, the number of frames it is given appended to `frames`); the export and the install are real."""
    from bgremover import quantize

    frames = [] if frames is None else frames
    monkeypatch.setattr(quantize, "quantize", lambda *a, **k: {"eval": {"float": candidate_float,
                                                                        "int8": candidate_int8}})
    monkeypatch.setattr(ship, "_score", lambda model, pairs, *a: frames.append(len(pairs)) or shipped_scores)
    ship.ship(trained, models, data, log=lambda *a: None, **kw)


def _s(miou: float, fg: float = 0.7, bf: float = 0.5, mae: float = 0.02) -> dict:
    return {"mIoU": miou, "fg_iou": fg, "boundary_f": bf, "mae": mae, "ms_per_image": 1.0}


def test_a_shipped_int8_copy_alone_is_beaten_only_by_the_candidates_int8_copy(trained, data, tmp_path, monkeypatch):
    """The int8 copy there alone is what the predictor loads: the like to compare with is the candidate's int8 copy
    (the float model scores a little higher). A candidate whose float model beats it and whose int8 copy does not is
    refused, naming the int8 numbers."""
    from bgremover import export

    models = tmp_path / "models"
    models.mkdir()
    net, meta = export.load_checkpoint_net(trained)
    export.export_onnx(net, meta, models / NAMES[1])  # the shipped copy: only its metadata is read, the score is given
    before = listing(models)
    with pytest.raises(ship.ShipError, match=r"does not beat .*\(mIoU 49\.00 vs 50\.00\)"):
        scored_ship(trained, data, models, _s(0.52, 0.75), _s(0.49, 0.75), _s(0.50), monkeypatch)
    assert listing(models) == before


def test_a_trial_on_part_of_the_test_split_scores_the_shipped_model_on_the_same_frames(trained, data, tmp_path,
                                                                                       monkeypatch):
    """--eval-limit 2 (of the 3 test frames): the candidate is scored on 2 frames, so the shipped model must be too,
    or the table's two rows (and the gate) compare scores of different frames."""
    from bgremover import export

    models = tmp_path / "models"
    models.mkdir()
    net, meta = export.load_checkpoint_net(trained)
    export.export_onnx(net, meta, models / NAMES[0])
    frames = []
    with pytest.raises(ship.ShipError, match="scored on 2 of 3 test frames"):  # a trial installs nothing
        scored_ship(trained, data, models, _s(0.6, 0.8), _s(0.6, 0.8), _s(0.5), monkeypatch, frames, eval_limit=2)
    assert frames == [2]


def test_models_of_other_classes_are_refused_before_anything_is_built(trained, data, tmp_path):
    """A shipped model of other classes than CamVid's was refused only after the candidate's export and quantization,
    as "model classes ... are not CamVid's" (which model?), even with --force. Now up front and naming it; --force
    replaces it unscored. A candidate of other classes is refused up front, forced or not."""
    models = tmp_path / "models"
    assert run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data)).returncode == 0
    other = [f"class{i}" for i in range(11)]
    doc = onnx.load(str(models / NAMES[0]))
    prop = next(p for p in doc.metadata_props if p.key == "bgremover")
    prop.value = json.dumps({**json.loads(prop.value), "classes": other, "default_foreground": ["class8"]})
    onnx.save(doc, str(models / NAMES[0]))
    before = listing(models)
    proc = run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data))
    assert proc.returncode == 1 and proc.stdout == "" and listing(models) == before
    assert proc.stderr.startswith(f"python -m bgremover.ship: error: the shipped model {models / NAMES[0]} is not a "
                                  "CamVid model, so it cannot be scored against the candidate (--force replaces it "
                                  "unscored); its classes: class0, class1") and proc.stderr.count("\n") == 1
    ckpt = torch.load(trained, weights_only=True)
    ckpt["bgremover"].update(classes=other, default_foreground=["class8"])
    foreign = tmp_path / "foreign" / "best.ckpt"
    foreign.parent.mkdir()
    torch.save(ckpt, foreign)
    proc = run_ship("--ckpt", str(foreign), "--models-dir", str(models), "--data-root", str(data), "--force")
    assert proc.returncode == 1 and proc.stdout == "" and listing(models) == before
    assert proc.stderr.startswith(f"python -m bgremover.ship: error: {foreign} is not a CamVid model: make ship")
    proc = run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data), "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is not a CamVid model: nothing to compare with" in proc.stdout and "| shipped" not in proc.stdout
    assert BackgroundRemover(models / NAMES[0], threads=1).meta["classes"] == list(CLASSES)


def test_a_partial_score_ships_nothing_without_force(trained, data, tmp_path):
    """--eval-limit 2 of 3 test frames installed the candidate where none was (no --force, no word that nothing was
    compared), and its table said "CamVid test, 2 frames": a trial's score now says PARTIAL and ships nothing."""
    models = tmp_path / "models"
    proc = run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data), "--eval-limit", "2")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "scored on 2 of 3 test frames (PARTIAL)" in proc.stderr and "--force" in proc.stderr
    assert "| CamVid test, 2 of 3 frames (PARTIAL) | mIoU % |" in proc.stdout
    assert "no shipped model in" in proc.stdout
    assert not models.exists() or list(models.iterdir()) == []
    proc = run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data), "--eval-limit", "2",
                    "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in models.iterdir()) == sorted(NAMES)


def test_ship_refuses_another_net_without_force(trained, data, tmp_path):
    """make remover fine-tunes the shipped net from its .pt: a checkpoint of another net (here the shipped file is
    a hand-built two-conv model, worse on these scenes) is refused before anything is built; --force ships it."""
    models = tmp_path / "models"
    models.mkdir()
    build_net(models / "bgremover-camvid.onnx")
    before = listing(models)
    proc = run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "is a tiny, the shipped model a two-conv" in proc.stderr and "--force" in proc.stderr
    assert proc.stdout == "" and listing(models) == before
    proc = run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data), "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in models.iterdir()) == sorted(NAMES)
    assert BackgroundRemover(models / NAMES[0], threads=1).meta["net"] == "tiny"



def test_ship_refuses_another_default_foreground_without_force(trained, data, tmp_path):
    """A candidate that cuts out Car alone was scored on its own foreground against the shipped model's Car,
    Pedestrian and Bicyclist, won, and was installed (make predict stopped cutting out people, unannounced). It is
    refused before anything is built; --force ships it."""
    models = tmp_path / "models"
    assert run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data)).returncode == 0
    before = listing(models)
    ckpt = torch.load(trained, weights_only=True)
    ckpt["bgremover"]["default_foreground"] = ["Car"]
    car_only = tmp_path / "car" / "best.ckpt"
    car_only.parent.mkdir()
    torch.save(ckpt, car_only)
    proc = run_ship("--ckpt", str(car_only), "--models-dir", str(models), "--data-root", str(data))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "cuts out Car by default, the shipped model Car, Pedestrian, Bicyclist" in proc.stderr
    assert "--force" in proc.stderr and proc.stdout == "" and listing(models) == before
    proc = run_ship("--ckpt", str(car_only), "--models-dir", str(models), "--data-root", str(data), "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert BackgroundRemover(models / NAMES[0], threads=1).meta["default_foreground"] == ["Car"]

def old_and_new_sets(tmp_path, examples: bool = True) -> tuple[list, list]:
    """An installed set (models, an example cut-out) reading "old <name>", and its replacement reading "new <name>"."""
    names = [tmp_path / "models" / n for n in NAMES] + [tmp_path / "examples" / "a.nobg.png"] * examples
    new = [tmp_path / "scratch" / n for n in NAMES] + [tmp_path / "examples" / ".a.nobg.png.new"] * examples
    for folder in {f.parent for f in names + new}:
        folder.mkdir()
    for old_file, new_file in zip(names, new, strict=True):
        old_file.write_text(f"old {old_file.name}")
        new_file.write_text(f"new {old_file.name}")
    return names, new


def test_an_install_stopped_half_way_puts_the_old_set_back(tmp_path, monkeypatch):
    names, new = old_and_new_sets(tmp_path)
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 6:  # three moved in already; stopped while installing the fourth of five
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(ship.os, "replace", flaky)
    with pytest.raises(KeyboardInterrupt):
        ship._install(list(zip(new, names, strict=True)))
    monkeypatch.setattr(ship.os, "replace", real)
    assert [p.read_text() for p in names] == [f"old {p.name}" for p in names]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(NAMES)  # no backup left
    assert [p.name for p in (tmp_path / "examples").iterdir()] == ["a.nobg.png"]  # nor the new one


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("at", [1, 2, 6])  # the first backup, the first new file in, the last rename
def test_a_signal_landing_just_after_a_rename_still_puts_the_old_set_back(tmp_path, monkeypatch, signum, at):
    """A real Ctrl-C arriving between a rename and its bookkeeping (Python raises it at the next statement) left
    the old file under its hidden backup name and no file in its place. Signals are held during the renames now,
    the set is put back, and the signal then acts as usual (KeyboardInterrupt; here a SIGTERM handler's exit)."""
    names, new = old_and_new_sets(tmp_path, examples=False)
    real, calls = os.replace, []

    def signalled(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == at:
            os.kill(os.getpid(), signum)  # delivered to Python's handler before the next statement

    def terminated(signum, frame):
        raise SystemExit(143)

    monkeypatch.setattr(ship.os, "replace", signalled)
    before = signal.signal(signal.SIGTERM, terminated)
    try:
        with pytest.raises(KeyboardInterrupt if signum == signal.SIGINT else SystemExit):
            ship._install(list(zip(new, names, strict=True)))
    finally:
        signal.signal(signal.SIGTERM, before)
    monkeypatch.setattr(ship.os, "replace", real)
    assert [p.read_text() for p in names] == [f"old {p.name}" for p in names]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(NAMES)  # no backup left behind
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_while_the_examples_are_redone_changes_nothing(trained, data, tmp_path, monkeypatch, capsys):
    """The example cut-outs were redone after the models were installed: a Ctrl-C there printed "ship:
    interrupted: nothing changed" over three new model files and the old cut-outs (an audit). They are made first
    now, installed with the models as one set, so the line is true."""
    from bgremover import remover

    models, examples = tmp_path / "models", tmp_path / "examples"
    examples.mkdir()
    for i in range(3):
        Image.fromarray(scene(i)[0]).save(examples / f"street{i}.jpg", quality=95)
    args = ["--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data), "--examples",
            str(examples), "--threads", "1", "--quiet", "--force"]
    assert ship.main(args) == 0
    before = {p: p.read_bytes() for folder in (models, examples) for p in folder.iterdir()}
    real, calls = remover.BackgroundRemover.remove, []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second example
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(remover.BackgroundRemover, "remove", interrupted)
    capsys.readouterr()
    assert ship.main(args) == 130
    assert capsys.readouterr().err.strip() == "python -m bgremover.ship: interrupted: nothing changed"
    assert {p: p.read_bytes() for folder in (models, examples) for p in folder.iterdir()} == before  # no temp files


def test_ship_usage_errors_are_one_line(tmp_path, data):
    proc = run_ship("--ckpt", str(tmp_path / "missing.ckpt"), "--models-dir", str(tmp_path / "m"), "--data-root", str(data))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "checkpoint not found" in proc.stderr
    assert not (tmp_path / "m").exists()
    proc = run_ship("--ckpt", "x.ckpt", "--eval-limit", "0")
    assert proc.returncode == 2 and "--eval-limit must be >= 1" in proc.stderr
    proc = run_ship("--ckpt", "x.ckpt", "--data-root", str(tmp_path / "nodata"), "--models-dir", str(tmp_path / "m2"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and not (tmp_path / "m2").exists()
    assert "checkpoint not found: x.ckpt" in proc.stderr  # what the command names comes first, then the data
    afile = tmp_path / "afile"
    afile.write_text("x")  # it exported and scored first, then said "unexpected FileExistsError"
    proc = run_ship("--ckpt", "x.ckpt", "--models-dir", str(afile))
    assert proc.returncode == 1 and proc.stderr.strip() == f"python -m bgremover.ship: error: --models-dir {afile} is a file, not a folder"


def test_ship_with_a_good_checkpoint_and_no_data_names_the_data(trained, tmp_path):
    proc = run_ship("--ckpt", str(trained), "--data-root", str(tmp_path / "nodata"), "--models-dir", str(tmp_path / "m"))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and not (tmp_path / "m").exists()
    assert str(tmp_path / "nodata") in proc.stderr


def test_ship_redoes_the_example_cutouts_with_the_new_default_model(trained, data, tmp_path):
    """tests/test_shipped.py holds examples/*.nobg.png to what the default (int8) predictor makes: shipping a
    model redoes them, and a stale cut-out is replaced."""
    models, examples = tmp_path / "models", tmp_path / "examples"
    examples.mkdir()
    rgb, _ = scene(3)
    Image.fromarray(rgb).save(examples / "street.jpg", quality=95)
    Image.new("RGBA", (8, 8)).save(examples / "street.nobg.png")  # an older model's cut-out
    (examples / "broken.jpg").write_bytes(b"not a jpeg")  # warned about; the model is shipped all the same
    proc = run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data),
                    "--examples", str(examples))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "redid 1 example cut-out in" in proc.stdout
    assert "python -m bgremover.ship: warning: example broken.jpg not redone:" in proc.stderr
    assert sorted(p.name for p in models.iterdir()) == sorted(NAMES)
    assert sorted(p.name for p in examples.iterdir()) == ["broken.jpg", "street.jpg", "street.nobg.png"]  # no temp files
    cut = np.asarray(Image.open(examples / "street.nobg.png"))
    expected = BackgroundRemover(models / NAMES[1], threads=1).mask(examples / "street.jpg")
    assert cut.shape == (*rgb.shape[:2], 4)
    assert np.abs(cut[..., 3].astype(int) - np.asarray(expected, int)).max() <= 1
    assert 0 < (cut[..., 3] > 127).mean() < 1  # a real cut-out: some foreground, some background

    proc = run_ship("--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data),
                    "--examples", str(tmp_path / "nowhere"))  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip() == f"python -m bgremover.ship: error: --examples {tmp_path / 'nowhere'}: no such folder"


def test_the_default_models_folder_redoes_the_examples_beside_it(trained, data, tmp_path, monkeypatch, capsys):
    """With no --examples, shipping into the checkout's models/ redoes the checkout's examples/ (the folder beside
    it), which is what tests/test_shipped.py holds the cut-outs to; any other models folder leaves photos alone."""
    from bgremover import remover

    checkout = tmp_path / "checkout"
    (checkout / "examples").mkdir(parents=True)
    rgb, _ = scene(3)
    Image.fromarray(rgb).save(checkout / "examples" / "street.jpg", quality=95)
    monkeypatch.setattr(remover, "_shipped_models", lambda: checkout / "models")
    args = ["--ckpt", str(trained), "--data-root", str(data), "--threads", "1", "--quiet"]
    assert ship.main([*args, "--models-dir", str(tmp_path / "elsewhere")]) == 0
    assert not (checkout / "examples" / "street.nobg.png").exists()
    assert ship.main([*args, "--models-dir", str(checkout / "models")]) == 0
    assert "redid 1 example cut-out in" in capsys.readouterr().out
    assert (checkout / "examples" / "street.nobg.png").is_file()


def test_an_ignored_signal_stays_ignored_during_an_install(tmp_path, monkeypatch):
    """A process started with SIGINT ignored (a background job of a script: `make ship &`) never stopped on it;
    signals_held replaced the SIG_IGN with its collector, so a SIGINT to the process group aborted the install."""
    names, new = old_and_new_sets(tmp_path, examples=False)
    real, calls = os.replace, []

    def signalled(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ship.os, "replace", signalled)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        try:
            ship._install(list(zip(new, names, strict=True)))
        except KeyboardInterrupt:
            pytest.fail("an ignored SIGINT stopped the install")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert [p.read_text() for p in names] == [f"new {p.name}" for p in names]


def test_both_signals_held_are_delivered(monkeypatch):
    """A Ctrl-C and then a SIGTERM (a supervisor's) while held: the KeyboardInterrupt re-raised for the first
    stopped the delivery loop, and the SIGTERM was dropped (the process went on unwinding as after a Ctrl-C)."""
    from bgremover import files

    got = []

    def term(signum, frame):
        got.append(signum)

    before = signal.signal(signal.SIGTERM, term)
    try:
        with pytest.raises(KeyboardInterrupt), files.signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert got == [signal.SIGTERM]


def test_a_scratch_folder_left_by_a_killed_ship_does_not_block_the_next(trained, data, tmp_path, capsys):
    """A ship the OOM killer ended left models/.ship-<pid>; the next one in a container, under the same pid,
    failed with "unexpected FileExistsError" and shipped nothing. The scratch folder now gets a fresh name."""
    models = tmp_path / "models"
    stale = models / f".ship-{os.getpid()}"
    stale.mkdir(parents=True)
    (stale / "bgremover-camvid.onnx").write_bytes(b"half")
    args = ["--ckpt", str(trained), "--models-dir", str(models), "--data-root", str(data), "--threads", "1", "-q"]
    assert ship.main(args) == 0, capsys.readouterr().err
    assert sorted(p.name for p in models.iterdir()) == sorted([*NAMES, stale.name])  # its own scratch removed
    assert (stale / "bgremover-camvid.onnx").read_bytes() == b"half"  # another run's folder is not ours to touch
