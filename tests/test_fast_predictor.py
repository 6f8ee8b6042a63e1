"""The faster predictor gives the same answers: its input preparation, softmax and RGBA assembly are bit-identical
to the formulas they replaced; the shipped int8 copy stays within a stated tolerance of the float model; the
default model resolution uses that copy only while it was made from the float file beside it."""

from __future__ import annotations

import importlib.util
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from bgremover import remover as lib
from bgremover.padding import crop, pad_image
from bgremover.remover import BackgroundRemover, encode_png, fg_softmax

_spec = importlib.util.spec_from_file_location("_bgr_test_predict", Path(__file__).with_name("test_predict.py"))
_tp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tp)
build_model = _tp.build_model

SHIPPED = lib.DEFAULT_MODEL
SHIPPED_INT8 = lib.int8_path(SHIPPED)
# int8 vs float on real frames: mean |alpha difference| per image and share of pixels whose alpha crosses 0.5.
# Measured on the shipped pair: 0.0036 and 0.35 % averaged over 30 test frames, 0.011 on the worst frame.
INT8_MAX_MEAN_ALPHA_DIFF = 0.02
INT8_MAX_FLIPPED = 0.02


# The predictor before this change, verbatim: pad the normalized float image, transpose, softmax on a copy.
def old_input(r: BackgroundRemover, rgb: np.ndarray):
    x = (rgb.astype(np.float32) * np.float32(1 / 255) - r.mean) / r.std
    x, box = pad_image(x, r.size_multiple)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), box


def old_probability(z: np.ndarray, fg) -> np.ndarray:
    z = z.astype(np.float32)
    z -= z.max(axis=0, keepdims=True)
    np.exp(z, out=z)
    return z[fg].sum(axis=0) / z.sum(axis=0)


def old_alpha(r: BackgroundRemover, rgb: np.ndarray) -> np.ndarray:
    x, box = old_input(r, rgb)
    z = crop(r.session.run([r.output_name], {r.input_name: x})[0][0], box)
    return (np.clip(old_probability(z, r.foreground), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def frames(rng: np.random.Generator) -> list[np.ndarray]:
    """Odd sizes (1x1, thinner than the padding, not multiples of 32) and a smooth photo-like 360x480 scene."""
    sizes = [(1, 1), (5, 7), (33, 65), (97, 31), (360, 480)]
    out = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes[:-1]]
    yy, xx = np.mgrid[0:360, 0:480]
    scene = np.stack([xx * 255 // 480, yy * 255 // 360, (xx + yy) * 255 // 840], axis=2).astype(np.uint8)
    scene[100:200, 150:300] = (230, 20, 20)
    return out + [scene]


@pytest.fixture(scope="module")
def shipped() -> BackgroundRemover:
    return BackgroundRemover(SHIPPED, threads=2)


@pytest.mark.parametrize("which", ["hand-built", "shipped"])
def test_prepare_and_softmax_are_bit_identical_to_the_old_formulas(which, shipped, tmp_path):
    r = shipped if which == "shipped" else BackgroundRemover(
        build_model(tmp_path / "m.onnx", mean=(0.41, 0.42, 0.43), std=(0.31, 0.3, 0.29)))
    for rgb in frames(np.random.default_rng(0)):
        x_old, box_old = old_input(r, rgb)
        x_new, box_new = r.prepare(rgb)
        assert box_new == box_old and x_new.dtype == np.float32 and x_new.flags.c_contiguous
        np.testing.assert_array_equal(x_new, x_old)
        z = r.logits(rgb)
        z_before = z.copy()
        for fg in (r.foreground, [0], [3, 1, 10]):
            np.testing.assert_array_equal(fg_softmax(z, fg), old_probability(z, fg))
        np.testing.assert_array_equal(z, z_before)  # the logits a caller holds are left untouched
        _, alpha, _ = r.alpha(rgb)
        np.testing.assert_array_equal(alpha, old_alpha(r, rgb))


def test_cutout_and_png_match_the_old_assembly(shipped):
    rgb = frames(np.random.default_rng(1))[-1]
    cutout = shipped.remove(rgb)
    _, alpha, _ = shipped.alpha(rgb)
    assert cutout.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(cutout), np.dstack([rgb, alpha]))  # what remove() built before
    for img in (cutout, shipped.mask(rgb), Image.fromarray(rgb)):
        decoded = Image.open(io.BytesIO(encode_png(img)))  # lossless whatever the zlib strategy
        assert decoded.mode == img.mode
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(img))


def test_shipped_int8_copy_is_fresh_and_the_default(shipped, monkeypatch):
    assert SHIPPED_INT8.is_file(), "models/bgremover-camvid.int8.onnx is missing: python -m bgremover.quantize"
    monkeypatch.delenv(lib.MODEL_ENV, raising=False)
    default = BackgroundRemover()
    assert default.model_path == SHIPPED_INT8
    q = default.meta["quantization"]
    assert q["source_sha256"] == lib.file_sha256(SHIPPED)  # made from the float file now shipped
    ev = q["eval"]
    assert ev["frames"] == 233 and ev["split"] == "test"
    assert abs(ev["int8"]["mIoU"] - ev["float"]["mIoU"]) <= 0.005
    assert abs(ev["int8"]["fg_iou"] - ev["float"]["fg_iou"]) <= 0.01
    ops = {n.op_type for n in onnx.load(str(SHIPPED_INT8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert SHIPPED_INT8.stat().st_size < SHIPPED.stat().st_size / 3  # int8 weights: about a quarter of float32
    assert default.classes == shipped.classes and default.foreground == shipped.foreground


def test_shipped_int8_alpha_stays_close_to_the_float_model(shipped, camvid_root):
    int8 = BackgroundRemover(SHIPPED_INT8, threads=2)
    images = sorted((camvid_root / "test").glob("*.png"))[::47]  # 5 frames across the test sequences
    for path in images:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        a, b = shipped.foreground_probability(rgb), int8.foreground_probability(rgb)
        assert np.abs(a - b).mean() <= INT8_MAX_MEAN_ALPHA_DIFF, path.name
        assert ((a >= 0.5) != (b >= 0.5)).mean() <= INT8_MAX_FLIPPED, path.name


def _stamp_int8(float_path: Path, out: Path, sha: str) -> Path:
    """A stand-in int8 file: a different model whose metadata claims to be made from a float file of `sha`."""
    build_model(out, default_foreground=("Pedestrian",),
                metadata={"quantization": {"source_sha256": sha, "source": float_path.name}})  # fmt: skip
    return out


def test_default_model_prefers_a_fresh_int8_copy_and_skips_a_stale_one(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    float_path = build_model(models / "bgremover-camvid.onnx")
    monkeypatch.setattr(lib, "DEFAULT_MODEL", float_path)
    monkeypatch.delenv(lib.MODEL_ENV, raising=False)
    assert BackgroundRemover().model_path == float_path  # no copy: the float model

    int8 = _stamp_int8(float_path, lib.int8_path(float_path), lib.file_sha256(float_path))
    fresh = BackgroundRemover()
    assert fresh.model_path == int8 and fresh.meta["default_foreground"] == ["Pedestrian"]
    # explicit paths and $BGREMOVER_MODEL are taken as given
    assert BackgroundRemover(float_path).model_path == float_path
    monkeypatch.setenv(lib.MODEL_ENV, str(float_path))
    assert BackgroundRemover().model_path == float_path
    monkeypatch.delenv(lib.MODEL_ENV)

    build_model(float_path, metadata={"net": "re-exported"})  # the float model changes; the copy is now stale
    with pytest.warns(UserWarning, match="not made from the current"):
        stale = BackgroundRemover()
    assert stale.model_path == float_path and stale.meta["net"] == "re-exported"

    float_path.unlink()  # only the copy is there: it is used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert BackgroundRemover().model_path == int8


def test_model_info_on_a_stale_int8_copy_warns_in_one_line_and_describes_the_float_model(tmp_path, monkeypatch,
                                                                                          capsys):
    """`make model-info` with an int8 copy left from an earlier float model: the warning came as Python's
    '.../predict.py:361: UserWarning: ...' with the source line under it, where a cut-out says it in one line."""
    from bgremover import predict

    (tmp_path / "models").mkdir()
    float_path = build_model(tmp_path / "models" / "bgremover-camvid.onnx", metadata={"net": "re-exported"})
    _stamp_int8(float_path, lib.int8_path(float_path), "0" * 64)  # made from another float file
    monkeypatch.setattr(lib, "DEFAULT_MODEL", float_path)
    monkeypatch.delenv(lib.MODEL_ENV, raising=False)
    assert predict.main(["--info"]) == 0
    out, err = capsys.readouterr()
    assert err == ("bgremover-predict: warning: bgremover-camvid.int8.onnx was not made from the current "
                   "bgremover-camvid.onnx: using the float model (re-run python -m bgremover.quantize to refresh it)\n")
    assert out.startswith(f"model: {float_path} (") and "net: re-exported, " in out and "quantized:" not in out


def test_default_model_missing_still_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr(lib, "DEFAULT_MODEL", tmp_path / "models" / "bgremover-camvid.onnx")
    monkeypatch.delenv(lib.MODEL_ENV, raising=False)
    with pytest.raises(lib.ModelError, match="no model found.*--model"):
        BackgroundRemover()


def test_shipped_pair_recorded_in_models_readme():
    text = (SHIPPED.parent / "README.md").read_text()
    meta = json.loads(
        {p.key: p.value for p in onnx.load(str(SHIPPED_INT8), load_external_data=False).metadata_props}["bgremover"]
    )
    ev = meta["quantization"]["eval"]
    assert SHIPPED_INT8.name in text
    for model in ("float", "int8"):  # the README quotes the numbers the file itself records
        assert f"{100 * ev[model]['mIoU']:.2f}" in text and f"{ev[model]['fg_iou']:.4f}" in text



def test_the_int8_file_reports_its_own_test_miou():
    """The int8 copy inherits the float model's test_mIoU in its metadata: `/model` and `make eval-cutout`
    reported 0.5661 for the int8 file, whose own score (in its quantization record) is 0.5651."""
    from bgremover.remover import BackgroundRemover

    int8 = BackgroundRemover(SHIPPED_INT8, threads=1)
    own = int8.meta["quantization"]["eval"]["int8"]["mIoU"]
    assert int8.test_miou == own != int8.meta["test_mIoU"]
    assert BackgroundRemover(SHIPPED, threads=1).test_miou == int8.meta["test_mIoU"]  # the float file: its own
