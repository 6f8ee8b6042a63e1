"""Checkpoint -> verified ONNX: numerics against PyTorch, metadata round-trip, refusal, clean errors."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bgremover import export
from bgremover.export import ExportError, export_onnx, load_checkpoint_net, main, read_metadata
from bgremover.model_format import is_onnx_model

CLASSES = ["Sky", "Building", "Pole", "Road", "Sidewalk", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
           "Bicyclist"]  # fmt: skip
MEAN, STD = [0.41, 0.43, 0.44], [0.30, 0.31, 0.30]
# The smallest net the checkpoint registry builds (nets come from known classes only, never any `_target_`)
TINY_CONFIG = {
    "_target_": "bgremover.nets.FCDenseNet",
    "down_blocks": [1],
    "up_blocks": [1],
    "bottleneck_layers": 1,
    "growth_rate": 4,
    "first_conv_channels": 8,
}
DEEPLAB_CONFIG = {
    "_target_": "segmentation_models_pytorch.DeepLabV3Plus",
    "encoder_name": "resnet18",
    "encoder_weights": "imagenet",  # as a real config says; export must not try to download it
    "encoder_depth": 3,
    "decoder_channels": 16,
    "classes": 11,
}


def bgremover_info(net_config: dict, net_name: str) -> dict:
    return {
        "net_config": net_config, "net_name": net_name, "classes": CLASSES, "mean": MEAN, "std": STD,
        "size_multiple": 32, "default_foreground": ["Car", "Pedestrian", "Bicyclist"], "ignore_index": 11,
    }  # fmt: skip


def write_checkpoint(run_dir: Path, net: nn.Module, net_config: dict, net_name: str, *, compiled: bool = False,
                     miou: float | None = None, extra: dict | None = None) -> Path:  # fmt: skip
    """A Lightning-style checkpoint in the bgremover contract (plus summary.json when `miou` is given)."""
    prefix = "net._orig_mod." if compiled else "net."
    state = {prefix + k: v for k, v in net.state_dict().items()}
    state["criterion.weight"] = torch.ones(11)  # non-net entries must be ignored
    state["val_iou.confmat"] = torch.zeros(11, 11)
    ckpt = {
        "epoch": 3,
        "global_step": 42,
        "state_dict": state,
        "bgremover": bgremover_info(net_config, net_name),
    }
    ckpt.update(extra or {})
    path = run_dir / "checkpoints" / "best.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    if miou is not None:
        summary = {"net": net_name, "params": 0, "metrics": {"test/mIoU": miou, "test/acc": 0.9}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return path


def tiny_net() -> nn.Module:
    """The same seeded tiny FC-DenseNet every call, in eval mode."""
    from bgremover.nets import FCDenseNet

    torch.manual_seed(0)
    return FCDenseNet(**{k: v for k, v in TINY_CONFIG.items() if k != "_target_"}).eval()


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"image": x})[0]


def test_tiny_checkpoint_roundtrip(tmp_path):
    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny", compiled=True)
    net, meta = load_checkpoint_net(ckpt)
    assert not net.training and next(net.parameters()).dtype == torch.float32
    for key, value in tiny_net().state_dict().items():  # `net._orig_mod.` stripped, weights loaded
        torch.testing.assert_close(net.state_dict()[key], value)
    assert meta["test_mIoU"] is None and meta["params"] == sum(p.numel() for p in tiny_net().parameters())

    out = tmp_path / "models" / "conv.onnx"
    result = export_onnx(net, meta, out)
    assert out.is_file() and result["max_abs_diff"] <= 1e-4
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 160)).astype(np.float32)  # unseen batch/size
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ort_logits(out, x), ref, atol=1e-4, rtol=0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["conv.onnx"]  # no temp files left


@pytest.mark.slow
def test_deeplab_checkpoint_export_and_metadata(tmp_path):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    net0 = smp.DeepLabV3Plus(
        **{k: v for k, v in DEEPLAB_CONFIG.items() if k != "_target_"} | {"encoder_weights": None}
    )
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval-mode BN is really exercised
        for m in net0.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    ckpt = write_checkpoint(tmp_path / "run", net0, DEEPLAB_CONFIG, "deeplabv3plus-tiny", miou=0.6125)
    net, meta = load_checkpoint_net(ckpt)
    out = tmp_path / "dl.onnx"
    export_onnx(net, meta, out)

    x = np.random.default_rng(2).standard_normal((2, 3, 96, 128)).astype(np.float32)
    with torch.no_grad():
        ref = net0.eval()(torch.from_numpy(x)).numpy()
    got = ort_logits(out, x)
    assert got.shape == (2, 11, 96, 128)
    assert np.abs(got - ref).max() <= 1e-4

    md = read_metadata(out)
    assert md["format"] == "bgremover-onnx" and md["format_version"] == 1
    assert md["classes"] == CLASSES and md["mean"] == MEAN and md["std"] == STD
    assert md["size_multiple"] == 32 and md["default_foreground"] == ["Car", "Pedestrian", "Bicyclist"]
    assert md["net"] == "deeplabv3plus-tiny" and md["params"] == sum(p.numel() for p in net0.parameters())
    assert md["test_mIoU"] == pytest.approx(0.6125) and md["input"] == "image" and md["output"] == "logits"
    stamp = dt.datetime.fromisoformat(md["exported_at"])
    assert (
        stamp.utcoffset() == dt.timedelta(0)
        and abs(dt.datetime.now(dt.timezone.utc) - stamp).total_seconds() < 600
    )
    assert isinstance(md["bgremover_version"], str) and md["bgremover_version"]

    # The predictor consumes it: same normalization contract, full-size output.
    from bgremover.predict import BackgroundRemover

    remover = BackgroundRemover(out)
    rgb = np.random.default_rng(3).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    assert remover.remove(rgb).size == (70, 50)
    xr = ((rgb.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)).transpose(2, 0, 1)[None]
    xr = np.pad(xr, ((0, 0), (0, 0), (7, 7), (13, 13)), mode="reflect")  # 50->64, 70->96 as predict pads
    with torch.no_grad():
        ref = net0(torch.from_numpy(np.ascontiguousarray(xr))).numpy()[0, :, 7:57, 13:83]
    np.testing.assert_allclose(remover.logits(rgb), ref, atol=1e-4, rtol=0)


class ShapeBranchNet(nn.Module):
    """Takes a Python branch on the batch size: tracing freezes it, so the ONNX graph differs at batch 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 11, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + 1.0 if x.shape[0] > 1 else y


def _meta(net: nn.Module) -> dict:
    return {"classes": CLASSES, "mean": MEAN, "std": STD, "size_multiple": 32, "default_foreground": ["Car"],
            "net": "t", "params": sum(p.numel() for p in net.parameters()), "test_mIoU": None}  # fmt: skip


def test_export_refused_when_onnx_differs_from_torch(tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"max abs diff 1 > 0.0001 \(--tol 0.0001\).*refusing"):
        export_onnx(ShapeBranchNet().eval(), _meta(ShapeBranchNet()), out)
    assert list(tmp_path.iterdir()) == []  # neither the model nor a temp file


def test_export_refused_on_small_numeric_drift(tmp_path, monkeypatch):
    real = export._ort_forward
    monkeypatch.setattr(export, "_ort_forward", lambda path, x: real(path, x) + 3e-4)
    net = tiny_net()
    with pytest.raises(ExportError, match="disagrees"):
        export_onnx(net, _meta(net), tmp_path / "m.onnx", torchscript=True)
    assert list(tmp_path.iterdir()) == []
    # The same drift is accepted when the caller allows it.
    assert export_onnx(net, _meta(net), tmp_path / "m.onnx", tol=1e-3)["max_abs_diff"] > 1e-4


@pytest.mark.parametrize("fault", ["one logit of the last class, second image", "one NaN"])
def test_export_refused_when_onnx_is_wrong_in_one_place(tmp_path, monkeypatch, fault):
    """The verification compares every logit: a graph wrong in one value of one class (or NaN there, which
    compares false with any tolerance) is refused, not written."""
    real = export._ort_forward

    def spoiled(path, x):
        y = real(path, x).copy()
        if y.shape[0] == 2:  # the batch-2 verification shape
            y[1, -1, -1, -1] = np.nan if "NaN" in fault else y[1, -1, -1, -1] + 1.0
        return y

    monkeypatch.setattr(export, "_ort_forward", spoiled)
    net = tiny_net()
    with pytest.raises(ExportError, match="disagrees|not finite"):
        export_onnx(net, _meta(net), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_default_foreground_outside_the_classes_is_refused_in_one_line(tmp_path, capsys):
    """The predictor resolves default_foreground by name: a model naming a class it lacks would load nowhere."""
    info = {"bgremover": {**bgremover_info(TINY_CONFIG, "tiny"), "default_foreground": ["Car", "Person"]}}
    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny", extra=info)
    out = tmp_path / "m.onnx"
    assert main([f"ckpt={ckpt}", f"out={out}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "default_foreground ['Person'] not among classes" in err
    assert not out.exists()


def test_the_opset_asked_for_is_the_files_and_the_torchscript_copy_carries_the_metadata(tmp_path):
    """--opset 13 wrote an opset-17 file when the option was dropped on the way; the TorchScript copy must carry
    the same `bgremover` document as the ONNX file (its only description of classes and normalization)."""
    import onnx

    net = tiny_net()
    out = tmp_path / "m.onnx"
    result = export_onnx(net, _meta(net), out, opset=13, torchscript=True)
    opsets = {o.domain: o.version for o in onnx.load(str(out)).opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == 13
    files = {"bgremover.json": ""}
    torch.jit.load(str(result["torchscript"]), _extra_files=files)
    assert json.loads(files["bgremover.json"]) == read_metadata(out) == result["metadata"]


def test_large_logits_are_compared_relative_to_their_size(tmp_path, monkeypatch):
    """A short run's net put out logits of 1.1e7 and the export was refused over a diff of 16 (1e-6 of them,
    float32 rounding). The check allows tol × 0.1 × the largest |logit| when that is more than tol; a real
    disagreement still fails, and a smaller --tol still tightens it."""
    real = export._ort_forward
    net = tiny_net()
    with torch.no_grad():
        net.final_conv.weight.mul_(1e6)
    monkeypatch.setattr(export, "_ort_forward", lambda path, x: real(path, x) * (1 + 2e-6))
    result = export_onnx(net, _meta(net), tmp_path / "big.onnx", torchscript=True)
    assert result["max_abs_diff"] > 1e-4
    # The line printed says on what scale: "max abs diff 2.3e+01" alone read as a broken export.
    top = float(net(torch.randn(1, 3, 64, 64)).abs().max())
    assert result["max_abs_logit"] > 1e5 and 0.1 < result["max_abs_logit"] / top < 10
    assert result["agreement"] == (f"torch vs onnxruntime max abs diff {result['max_abs_diff']:.2e} on logits "
                                   f"up to {result['max_abs_logit']:.3g}")
    monkeypatch.setattr(export, "_ort_forward", lambda path, x: real(path, x) * 1.01)
    with pytest.raises(ExportError, match=r"\(--tol 0.0001 × 0.1 × the largest \|logit\| "):
        export_onnx(net, _meta(net), tmp_path / "bad.onnx", torchscript=True)
    assert not (tmp_path / "bad.onnx").exists()
    monkeypatch.setattr(export, "_ort_forward", lambda path, x: real(path, x) * (1 + 2e-6))
    with pytest.raises(ExportError, match="disagrees"):  # --tol 1e-9: stricter than float32 rounding allows
        export_onnx(net, _meta(net), tmp_path / "strict.onnx", torchscript=True, tol=1e-9)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ExportError, match="checkpoint not found"):
        load_checkpoint_net(tmp_path / "nope.ckpt")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": tiny_net().state_dict()}, plain)
    with pytest.raises(ExportError, match="not a bgremover checkpoint"):
        load_checkpoint_net(plain)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ExportError, match="not a PyTorch checkpoint"):
        load_checkpoint_net(garbage)
    wrong = write_checkpoint(tmp_path / "w", tiny_net(), TINY_CONFIG | {"growth_rate": 6}, "c")
    with pytest.raises(ExportError, match="do not fit bgremover.nets.FCDenseNet"):
        load_checkpoint_net(wrong)
    unknown = write_checkpoint(tmp_path / "u", tiny_net(), {"_target_": "no.such.Net"}, "c")
    with pytest.raises(ExportError, match="unknown net 'no.such.Net'"):
        load_checkpoint_net(unknown)


def test_checkpoint_needing_full_unpickling_is_refused_in_one_line(tmp_path, capsys):
    """Objects that only full unpickling can rebuild (here omegaconf's) are refused, never unpickled: reading a
    checkpoint must not run code from it. bgremover's own checkpoints hold plain values only."""
    from omegaconf import OmegaConf

    hparams = {"hyper_parameters": {"cfg": OmegaConf.create({"lr": 0.1})}}
    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny", miou=0.5, extra=hparams)
    with pytest.raises(ExportError, match="unsafe checkpoint") as info:
        load_checkpoint_net(ckpt)
    assert "weights_only" not in str(info.value)
    cut = tmp_path / "cut.ckpt"  # a cut-off copy is damaged, not unsafe
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ExportError, match=r"unreadable checkpoint \(truncated or damaged\)"):
        load_checkpoint_net(cut)
    assert main([f"ckpt={ckpt}", f"out={tmp_path / 'x.onnx'}"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "x.onnx").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_cli_key_value_and_torchscript(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny", miou=0.25)
    out = tmp_path / "out" / "model.onnx"
    assert main([f"ckpt={ckpt}", f"out={out}", "torchscript=true"]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {out} (") and read_metadata(out)["test_mIoU"] == 0.25
    assert re.search(r"torch vs onnxruntime max abs diff \S+ on logits up to \S+\)$", line, re.M), line
    scripted = torch.jit.load(str(out.with_suffix(".pt")))
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), tiny_net()(x))
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "b.onnx")]) == 0  # flag style works too


def test_cli_line_flags_a_partial_test_set_as_every_report_does(tmp_path, capsys):
    """The exporter's closing line wrote "on 4 of 233 frames (PARTIAL)", its own wording; now utils.frames_note's,
    the one sweeps, eval and compare use."""
    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny", miou=0.25)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for split, note in (({"frames": 4, "of": 233, "complete": False}, "test mIoU 0.2500 (4 of 233 frames, PARTIAL);"),
                        ({"frames": 233, "of": 233, "complete": True}, "test mIoU 0.2500 (233 frames);")):
        (tmp_path / "run" / "summary.json").write_text(json.dumps({**summary, "test_split": split}))
        assert main([f"ckpt={ckpt}", f"out={tmp_path / 'm.onnx'}"]) == 0
        assert note in capsys.readouterr().out


def test_only_the_runs_best_checkpoint_carries_its_test_miou(tmp_path):
    """The run's test numbers are its best checkpoint's: exporting another checkpoint of the run (a resumed run's
    last.ckpt, an earlier epoch) stamped them into that model too (eval's attach step already refused this)."""
    import shutil

    best = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny", miou=0.25)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (tmp_path / "run" / "summary.json").write_text(json.dumps({**summary, "best_ckpt": "/elsewhere/checkpoints/best.ckpt"}))
    other = best.with_name("last.ckpt")
    shutil.copy(best, other)
    link = best.with_name("link.ckpt")
    link.symlink_to(best.name)
    assert load_checkpoint_net(best)[1]["test_mIoU"] == 0.25  # by name: a run trained on another machine
    assert load_checkpoint_net(link)[1]["test_mIoU"] == 0.25  # last.ckpt as a link to the best file
    assert load_checkpoint_net(other)[1]["test_mIoU"] is None
    # the copied-out <run>/best.ckpt beside summary.json (how GPU runs come back; models/README's make ship CKPT=)
    shutil.copy(best, tmp_path / "run" / "best.ckpt")
    assert load_checkpoint_net(tmp_path / "run" / "best.ckpt")[1]["test_mIoU"] == 0.25
    # where the best file exists, the same training state under another name counts, another state does not
    (tmp_path / "run" / "summary.json").write_text(json.dumps({**summary, "best_ckpt": str(best)}))
    assert load_checkpoint_net(other)[1]["test_mIoU"] == 0.25  # a copy of the best state
    state = torch.load(best, weights_only=True)
    torch.save({**state, "global_step": 99}, other)  # a later state of the run
    assert load_checkpoint_net(other)[1]["test_mIoU"] is None


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main([f"ckpt={tmp_path / 'missing.ckpt'}", f"out={tmp_path / 'x.onnx'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # the prefix its argparse errors carry (it printed a bare "error: ...")
    assert len(err) == 1 and err[0].startswith("python -m bgremover.export: error: checkpoint not found")
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(SystemExit) as exc:
        main([])  # ckpt is required
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("python -m bgremover.export: error: the following arguments")


def test_bad_out_and_opset_are_refused_before_anything_is_read(tmp_path, capsys):
    """--out in a file's place, an existing folder or /proc, and an opset the nets cannot export, each failed only
    after the whole export (a traceback for the first and the last, and 600 lines of graph for --opset 3 or 9)."""
    afile = tmp_path / "a.jpg"
    afile.write_text("x")
    missing = tmp_path / "missing.ckpt"  # the checks come first: the checkpoint is never read
    for extra, message in (([f"--out={afile}/x.onnx"], "is a file, not a folder"), ([f"--out={tmp_path}"], "is a folder"),
                           (["--out=/proc/x.onnx"], "cannot write in /proc")):
        assert main([f"--ckpt={missing}", *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]


def test_out_dash_is_refused_not_written_as_a_file_named_dash(tmp_path, monkeypatch, capsys):
    """`make export CKPT=... OUT=-` exported into a file literally named "-" in the repository (exit 0), while for
    `make predict` OUT=- means stdout: refused in one line before the checkpoint is read; ./- still names the file."""
    monkeypatch.chdir(tmp_path)
    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny")
    assert main(["--ckpt", str(ckpt), "--out", "-"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m bgremover.export: error: --out - would write a file"), err
    assert not (tmp_path / "-").exists()
    assert main(["--ckpt", str(ckpt), "--out", "./-"]) == 0
    assert is_onnx_model(tmp_path / "-")


@pytest.mark.parametrize("args, message", [
    (["--opset", "5"], "argument --opset: the nets export with opsets 11 to 20, got '5'"),
    (["--opset=21"], "argument --opset: the nets export with opsets 11 to 20, got '21'"),
    (["opset=9"], "argument --opset: the nets export with opsets 11 to 20, got '9'"),
    (["--tol", "-1"], "argument --tol: expected a finite number > 0, got '-1'"),
    (["--tol", "nan"], "argument --tol: expected a finite number > 0, got 'nan'"),
    (["tol=inf"], "argument --tol: expected a finite number > 0, got 'inf'"),
    (["--tol", "0"], "argument --tol: expected a finite number > 0, got '0'"),
])
def test_bad_tol_and_opset_are_usage_errors(tmp_path, capsys, args, message):
    """--opset 5 exited 1 though usage errors exit 2; --tol -1 refused every export with a false "ONNX Runtime
    disagrees ... > -0.844", and --tol nan turned the verification off without a word."""
    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny")
    with pytest.raises(SystemExit) as exc:
        main(["--ckpt", str(ckpt), "--out", str(tmp_path / "x.onnx"), *args])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"python -m bgremover.export: error: {message} (see --help)\n"
    assert not (tmp_path / "x.onnx").exists()


def test_tiny_tiramisu_checkpoint_exports_and_matches(tmp_path):
    """Our FC-DenseNet trains through a custom autograd Function; inference and export take plain modules."""
    from bgremover.nets import FCDenseNet

    config = {"_target_": "bgremover.nets.FCDenseNet", "down_blocks": [2, 2], "up_blocks": [2, 2],
              "bottleneck_layers": 2, "growth_rate": 8, "first_conv_channels": 16}
    torch.manual_seed(0)
    net = FCDenseNet(**{k: v for k, v in config.items() if k != "_target_"})
    net.train()
    torch.optim.SGD(net.parameters(), lr=0.1).zero_grad()
    net(torch.randn(2, 3, 32, 32)).square().mean().backward()  # BN running stats move away from 0/1
    ckpt = write_checkpoint(tmp_path / "run", net, config, "tiramisu_tiny", miou=0.42)
    loaded, meta = load_checkpoint_net(ckpt)
    out = tmp_path / "tiramisu.onnx"
    result = export_onnx(loaded, meta, out)
    assert result["max_abs_diff"] <= 1e-4
    assert export_onnx(loaded, meta, tmp_path / "opset11.onnx", opset=11)["max_abs_diff"] <= 1e-4  # --opset's floor
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 96)).astype(np.float32)
    net.eval()
    with torch.enable_grad():  # the training-path Function in eval mode: the reference the export must match
        ref = net(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ort_logits(out, x), ref, atol=1e-4, rtol=0)
    assert read_metadata(out)["net"] == "tiramisu_tiny" and read_metadata(out)["test_mIoU"] == 0.42


def test_a_failed_export_leaves_no_folders_behind(tmp_path, capsys):
    """`--out a/n1/n2/x.onnx` made a/n1/n2 before the export, and a refused export left the empty folders."""
    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("x")
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "a" / "n1" / "n2" / "x.onnx"), "--tol", "1e-12"]) == 1
    assert "disagrees" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep.txt"]  # a folder that was there stays
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "a" / "n1" / "x.onnx")]) == 0  # success keeps its own
    assert (tmp_path / "a" / "n1" / "x.onnx").is_file()


def test_ctrl_c_says_so_and_keeps_the_old_model(tmp_path, monkeypatch, capsys):
    """Ctrl-C exited 130 without a word (quantize and ship each print a line)."""
    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny")
    old = tmp_path / "m.onnx"
    assert main(["--ckpt", str(ckpt), "--out", str(old), "--tol", "1"]) == 0  # an earlier model (only one replaced)
    capsys.readouterr()
    before = old.read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_verify", interrupt)  # after the ONNX temp file is written
    for out in (old, tmp_path / "new" / "m.onnx"):
        assert main(["--ckpt", str(ckpt), "--out", str(out), "--torchscript"]) == 130
        assert capsys.readouterr().err == "python -m bgremover.export: interrupted: nothing written\n"
        assert old.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "run"]  # no temp file, no new folder


def test_paths_with_equals_signs(tmp_path, capsys):
    """Lightning names checkpoints `epoch=N-step=M.ckpt`: `--ckpt <that>` said "argument --ckpt: expected one
    argument", as every word with `=` was taken for a `key=value` option, a flag's value too."""
    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny")
    named = ckpt.rename(ckpt.with_name("epoch=3-step=10.ckpt"))
    outs = tmp_path / "out=dir"
    for args in (["--ckpt", str(named), "--out", str(outs / "a=1.onnx")], [f"ckpt={named}", f"out={outs / 'b=2.onnx'}"],
                 ["--ck", str(named), "--out", str(outs / "c.onnx"), "--tol", "1e-3"]):
        assert main(args) == 0, capsys.readouterr().err
    assert sorted(p.name for p in outs.iterdir()) == ["a=1.onnx", "b=2.onnx", "c.onnx"]
    with pytest.raises(SystemExit) as exc:  # a stray `x=y` word naming none of the options is still refused
        main(["--ckpt", str(named), "epoch=3"])
    assert exc.value.code == 2 and "unrecognized arguments: epoch=3" in capsys.readouterr().err


def test_the_torchscript_copy_given_where_a_checkpoint_or_a_model_goes_is_named(tmp_path, capsys):
    """export --torchscript writes X.pt beside X.onnx. Given to -m / --info it was called a PyTorch checkpoint with
    'export it first (make export CKPT=X.pt)', and that export said 'unreadable checkpoint (truncated or damaged)'
    under torch's two-line UserWarning: both now say it is the TorchScript copy, in one line."""
    from bgremover import predict

    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny")
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--torchscript"]) == 0
    ts = tmp_path / "m.pt"
    capsys.readouterr()
    assert main(["--ckpt", str(ts), "--out", str(tmp_path / "again.onnx")]) == 1
    assert capsys.readouterr().err == (f"python -m bgremover.export: error: {ts} is a TorchScript model (export's "
                                       "--torchscript copy), not a training checkpoint: give the run's .ckpt or the "
                                       ".pt weights of make ship\n")
    assert not (tmp_path / "again.onnx").exists()
    for argv in (["--info", "-m", str(ts)], ["-m", str(ts), str(Path(__file__).parents[1] / "examples" /
                                                               "0001TP_009180.jpg"), "-o", str(tmp_path / "c.png")]):
        assert predict.main(argv) == 1
        assert capsys.readouterr().err == (f"bgremover-predict: error: model {ts} is a TorchScript model (export's "
                                           "--torchscript copy), not an ONNX model: give the .onnx file exported "
                                           "with it\n")
    assert not (tmp_path / "c.png").exists()


def test_outputs_never_replace_the_checkpoint_or_a_users_file(tmp_path, monkeypatch, capsys):
    """`--ckpt X/m.pt --out X/m.onnx --torchscript` wrote the TorchScript file over its own checkpoint (X.pt is
    the shipped weights' name too), and `--out` equal to `--ckpt` replaced the checkpoint with ONNX; --out replaces
    only an earlier ONNX model."""
    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny")
    d = tmp_path / "d"
    d.mkdir()
    pt = d / "m.pt"
    pt.write_bytes(ckpt.read_bytes())
    (d / "link.ckpt").symlink_to(pt)
    (d / "notes.pt").write_text("a user's file")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    real_load = export.load_checkpoint_net
    monkeypatch.setattr(export, "load_checkpoint_net", lambda path: pytest.fail("checkpoint read before refusing"))
    for args, message in (
        ([pt, d / "m.onnx", "--torchscript"], f"--torchscript writes {pt}, which would overwrite the checkpoint"),
        ([d / "link.ckpt", d / "m.onnx", "--torchscript"], f"--torchscript writes {pt}, which would overwrite the checkpoint"),
        ([pt, d / "notes.onnx", "--torchscript"], f"--torchscript writes {d / 'notes.pt'}, which exists and is not a TorchScript file"),
        ([pt, d / ".." / "d" / "m.pt"], f"--out {d / '..' / 'd' / 'm.pt'} would overwrite the checkpoint"),
        ([d / "link.ckpt", pt], f"--out {pt} would overwrite the checkpoint"),
        ([ckpt, d / "x.pt", "--torchscript"], f"--torchscript writes {d / 'x.pt'}, the --out file itself"),
        # a user audit: a mistyped --out replaced a text file (or other weights) with a model, and `--out new/`
        # wrote a file named "new"
        ([ckpt, d / "notes.pt"], f"--out {d / 'notes.pt'} exists and is not an ONNX model: not replacing it"),
        ([ckpt, f"{d / 'new'}/"], f"--out {d / 'new'}/ names a folder: give a file name in it"),
    ):
        assert main(["--ckpt", str(args[0]), "--out", str(args[1]), *args[2:]]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"python -m bgremover.export: error: {message}") and err.count("\n") == 1, err
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing replaced, nothing added
    monkeypatch.setattr(export, "load_checkpoint_net", real_load)
    # an earlier TorchScript export is replaced as before
    assert main(["--ckpt", str(ckpt), "--out", str(d / "ts.onnx"), "--torchscript"]) == 0
    assert main(["--ckpt", str(ckpt), "--out", str(d / "ts.onnx"), "--torchscript"]) == 0
    assert (d / "ts.pt").is_file()


def test_outputs_are_written_through_links_and_keep_their_mode(tmp_path, capsys):
    """Five writers made temp files and renamed them five ways (an audit): `export --out link.onnx` replaced the
    link with a file, where cut-outs and reports were written through it. One way now (bgremover.files)."""
    import os

    from bgremover import checkpoint

    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny", miou=0.25)
    store = tmp_path / "store"
    store.mkdir()
    assert main(["--ckpt", str(ckpt), "--out", str(store / "model.onnx")]) == 0  # an earlier model, replaced below
    capsys.readouterr()
    os.chmod(store / "model.onnx", 0o640)
    (tmp_path / "model.onnx").symlink_to(store / "model.onnx")
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "model.onnx")]) == 0
    assert (tmp_path / "model.onnx").is_symlink() and read_metadata(store / "model.onnx")["test_mIoU"] == 0.25
    assert (store / "model.onnx").stat().st_mode & 0o777 == 0o640
    (tmp_path / "w.pt").symlink_to(store / "w.pt")  # a link to a file still to be made: made there
    checkpoint.save_weights(ckpt, tmp_path / "w.pt")
    assert (tmp_path / "w.pt").is_symlink() and checkpoint.load_net(store / "w.pt")[1]["net_name"] == "tiny"
    assert sorted(p.name for p in store.iterdir()) == ["model.onnx", "w.pt"]  # no temp files left


def test_a_bad_option_is_answered_before_torch_loads():
    """export imported torch at its top: a bad option waited seconds for it, and a Ctrl-C while it loaded printed
    a traceback before main() could say "interrupted"."""
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            "sys.argv = ['export', '--ckpt', 'x.ckpt', '--tol', '-1']\n"
            "try:\n"
            "    runpy.run_module('bgremover.export', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert "argument --tol: expected a finite number > 0, got '-1'" in proc.stderr


def test_sigterm_during_an_export_leaves_nothing_behind(tmp_path):
    """`kill` (or `timeout`, a job scheduler) during `make export` ended the process outright: a 16 MiB hidden
    .m.onnx.*.tmp stayed beside --out, in the folders the export had made. It now unwinds as Ctrl-C does."""
    import signal
    import subprocess
    import sys

    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny")
    out = tmp_path / "new" / "deeper" / "m.onnx"
    code = ("import os, signal, sys, time\n"
            "from bgremover import export\n"
            "def verify(*args, **kwargs):  # the ONNX temp file is written: a SIGTERM comes\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n"
            "export._verify = verify\n"
            f"sys.exit(export.main(['--ckpt', {str(ckpt)!r}, '--out', {str(out)!r}]))\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert proc.stderr == "python -m bgremover.export: interrupted by SIGTERM: nothing written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temp file, no folder made for it


def test_an_ignored_sigterm_stays_ignored_while_a_command_runs():
    """sigterm_raises (export, quantize, ship, predict) must not turn on a SIGTERM its parent chose to ignore."""
    import os
    import signal

    from bgremover import files

    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with files.sigterm_raises():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)  # ignored: the block goes on
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with files.sigterm_raises():
            assert signal.getsignal(signal.SIGTERM) is files.raise_terminated
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_exported_model_says_where_it_came_from_and_a_slim_copy_keeps_it(small_camvid, tmp_path, capsys):
    """The ONNX metadata's `trained`: the checkpoint's epochs and steps, and its run's experiment, folder, seed,
    data, training time, hardware and code commit (summary.json); save_weights' slim copy (models/*.pt) carries it
    to a later export; `bgremover-predict --info` prints it. Files exported before it have none and still load."""
    from test_runs import TINY_RUN
    from test_train import compose_cfg

    from bgremover import checkpoint, predict
    from bgremover.train import train

    run = tmp_path / "run"
    train(compose_cfg(run, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=2", "seed=7",
                            "+experiment_name=provenance_test"]))
    summary = json.loads((run / "summary.json").read_text())
    import subprocess

    import bgremover

    # the commit the code was at (the suite runs in a checkout: CI's fresh clone, a developer's): not a vacuous
    # None == None where source_commit found nothing
    head = subprocess.run(["git", "-C", str(Path(bgremover.__file__).parent), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:
        assert summary["commit"] in (head.stdout.strip(), head.stdout.strip() + "-dirty"), summary["commit"]
    best = Path(summary["best_ckpt"])
    out = tmp_path / "m.onnx"
    export_onnx(*load_checkpoint_net(best), out)
    trained = read_metadata(out)["trained"]
    ckpt = torch.load(best, weights_only=True)
    assert trained == {
        "checkpoint": best.name, "epochs": checkpoint.epochs_trained(ckpt), "global_step": ckpt["global_step"],
        "run": "run", "experiment": "provenance_test", "seed": 7, "data": "CamVid", "train_split": "train",
        "run_wall_time_s": summary["wall_time_s"], "run_epochs": summary["epochs"], "hardware": summary["hardware"],
        **({"commit": summary["commit"]} if summary["commit"] else {})}
    assert trained["epochs"] in (1, 2) and trained["global_step"] == trained["epochs"] * 2  # 4 frames, batch 2

    (tmp_path / "elsewhere").mkdir()
    slim = checkpoint.save_weights(best, tmp_path / "elsewhere" / "slim.pt")  # away from the run's summary.json
    export_onnx(*load_checkpoint_net(slim), tmp_path / "slim.onnx")
    # and the float16 copy its weights came through: not the checkpoint's own numbers
    assert read_metadata(tmp_path / "slim.onnx")["trained"] == {**trained, "via": "slim.pt (float16 weights)"}

    capsys.readouterr()  # the training's and export's own output
    assert predict.main(["--info", "-m", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"model: {out} (")
    said = next(line for line in lines if line.startswith("trained: "))
    assert said.startswith("trained: experiment provenance_test; run run; seed 7; data CamVid (train); ")
    assert f"{trained['epochs']} epoch" in said and f"checkpoint {best.name}" in said

    import onnx

    from bgremover import model_format

    old = onnx.load(str(out))  # as exported before `trained` existed
    for prop in old.metadata_props:
        if prop.key == model_format.METADATA_KEY:
            doc = json.loads(prop.value)
            del doc["trained"]
            prop.value = json.dumps(doc)
    onnx.save(old, str(tmp_path / "old.onnx"))
    assert predict.main(["--info", "-m", str(tmp_path / "old.onnx")]) == 0
    assert "trained: not recorded" in capsys.readouterr().out
    assert predict.main(["--info", "-m", str(tmp_path / "nope.onnx")]) == 1
    assert capsys.readouterr().err.strip() == f"bgremover-predict: error: model file not found: {tmp_path / 'nope.onnx'}"


def test_the_trained_size_multiple_travels_into_the_model(tmp_path, capsys):
    """A net trained with model.size_multiple=16 is scored on frames padded to 16; the predictor pads to what the
    exported model records, so the checkpoint's value (not the default 32) must be the one written."""
    from bgremover.remover import BackgroundRemover

    info = {"bgremover": {**bgremover_info(TINY_CONFIG, "tiny"), "size_multiple": 16}}
    ckpt = write_checkpoint(tmp_path / "run", tiny_net(), TINY_CONFIG, "tiny", extra=info)
    out = tmp_path / "m.onnx"
    assert main([f"ckpt={ckpt}", f"out={out}"]) == 0
    assert read_metadata(out)["size_multiple"] == 16
    padded, box = BackgroundRemover(out).prepare(np.zeros((40, 50, 3), np.uint8))
    assert padded.shape == (1, 3, 48, 64) and box == (4, 7, 40, 50)  # 40 -> 48 (4 + 4), 50 -> 64 (7 + 7)
