"""BackgroundRemover on hand-built ONNX models whose every output value is known in advance (no torch needed).

The controllable model is a 1x1 convolution: bright red pixels -> Car, bright green -> Pedestrian, everything
else -> Sky, each with a logit margin of >= 50 so softmax gives exactly 1.0 / 0.0 in float32 and the expected
alpha is exactly 255 / 0. A 1x1 conv has no spatial mixing, so any padding/cropping/rotation mistake shows up
as alpha in the wrong place.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from bgremover import images, predict
from bgremover.predict import BackgroundRemover, ImageError, ModelError, UsageError

CLASSES = ["Sky", "Building", "Pole", "Road", "Sidewalk", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
           "Bicyclist"]  # fmt: skip
RED, GREEN, BLUE, GRAY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)


def build_model(
    path: Path,
    *,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    size_multiple: int = 32,
    default_foreground=("Car",),
    metadata: dict | None | bool = True,
) -> Path:
    """A 1x1-conv 'segmentation net' in the bgremover ONNX format. `metadata=False` leaves it out entirely."""
    k = len(CLASSES)
    weight = np.zeros((k, 3, 1, 1), np.float32)
    bias = np.full(k, -100.0, np.float32)
    bias[CLASSES.index("Sky")] = 0.0
    car, ped = CLASSES.index("Car"), CLASSES.index("Pedestrian")
    weight[car, :, 0, 0], bias[car] = [100.0, -100.0, -100.0], -50.0  # normalized red=1 -> +50 over Sky
    weight[ped, :, 0, 0], bias[ped] = [-100.0, 100.0, -100.0], -50.0  # normalized green=1 -> +50 over Sky
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "W", "B"], ["logits"])],
        "controllable",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k, "H", "W"])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any onnxruntime >= 1.14
    if metadata is not False:
        meta = {
            "format": "bgremover-onnx", "format_version": 1, "classes": CLASSES, "mean": list(mean),
            "std": list(std), "size_multiple": size_multiple, "default_foreground": list(default_foreground),
            "net": "conv1x1", "params": int(weight.size + bias.size), "test_mIoU": None,
            "exported_at": "2025-01-01T00:00:00+00:00", "bgremover_version": "test", "input": "image",
            "output": "logits",
        }  # fmt: skip
        if isinstance(metadata, dict):
            meta.update(metadata)
        entry = model.metadata_props.add()
        entry.key, entry.value = "bgremover", json.dumps(meta)
    onnx.save(model, str(path))
    return path


def halves(h: int, w: int, left=RED, right=BLUE) -> np.ndarray:
    """HxWx3 uint8: left half (floor) `left`, the rest `right`."""
    img = np.empty((h, w, 3), np.uint8)
    img[:, : w // 2] = left
    img[:, w // 2 :] = right
    return img


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("model") / "ctl.onnx")


@pytest.fixture(scope="session")
def remover(model_path) -> BackgroundRemover:
    return BackgroundRemover(model_path, threads=1)


def alpha_of(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGBA"
    return np.asarray(img)[:, :, 3]


# ------------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("hw", [(37, 45), (32, 64), (1, 1), (5, 3), (90, 33)])
def test_alpha_exact_and_full_size_at_any_size(remover, hw):
    h, w = hw
    out = remover.remove(halves(h, w))
    assert out.size == (w, h)
    expected = np.zeros((h, w), np.uint8)
    expected[:, : w // 2] = 255  # red (Car) half is foreground, blue (Sky) half background
    np.testing.assert_array_equal(alpha_of(out), expected)
    np.testing.assert_array_equal(np.asarray(out)[:, :, :3], halves(h, w))  # colours untouched


@pytest.mark.parametrize("hw", [(37, 45), (5, 3), (91, 33)])
def test_alpha_exact_where_the_top_and_bottom_differ(remover, hw):
    """The left/right halves above cannot see the frame shifted a row by the padding (an odd number of rows to
    add, the extra one below): red on top, blue below, the alpha's edge must stay on the same row."""
    h, w = hw
    top_red = np.ascontiguousarray(halves(w, h).transpose(1, 0, 2))  # rows < h // 2 red
    assert (top_red[: h // 2] == RED).all() and (top_red[h // 2 :] == BLUE).all()
    expected = np.zeros((h, w), np.uint8)
    expected[: h // 2] = 255
    np.testing.assert_array_equal(alpha_of(remover.remove(top_red)), expected)


def test_large_image_is_inferred_downscaled_and_alpha_upsampled(model_path):
    remover = BackgroundRemover(model_path, max_side=64)
    seen = []
    real_logits = remover.logits
    remover.logits = lambda rgb: seen.append(rgb.shape) or real_logits(rgb)
    out = remover.remove(halves(150, 300))
    assert seen == [(32, 64, 3)]  # long side capped at max_side, aspect kept
    assert out.size == (300, 150)
    a = alpha_of(out)
    assert (a[:, :140] == 255).all() and (a[:, 160:] == 0).all()  # away from the interpolated boundary band
    band = a[:, 140:160]
    assert band.min() == 0 and band.max() == 255 and ((band > 0) & (band < 255)).any()  # soft, bilinear


def test_the_upsampled_alpha_is_the_bilinear_ramp(model_path):
    """Inferred at 32x64, the 300-wide image's alpha is the small step (columns 0..31 Car, 32.. Sky) upsampled
    bilinearly with pixel centres aligned: at output column x the source position is (x + 0.5) * 64/300 - 0.5
    and alpha falls linearly from 255 at source 31 to 0 at source 32 (no cubic overshoot, no shift)."""
    a = alpha_of(BackgroundRemover(model_path, max_side=64).remove(halves(150, 300))).astype(float)
    src = (np.arange(300) + 0.5) * 64 / 300 - 0.5
    want = np.clip(32 - src, 0, 1) * 255
    assert np.abs(a - want[None, :]).max() <= 1


def test_the_default_max_side_is_1024(model_path):
    """As the README says: a long side of 1024 is inferred as it is, 1025 downscaled to 1024 (aspect kept)."""
    remover = BackgroundRemover(model_path)
    seen = []
    real_logits = remover.logits
    remover.logits = lambda rgb: seen.append(rgb.shape[:2]) or real_logits(rgb)
    remover.mask(np.zeros((8, 1024, 3), np.uint8))
    remover.mask(np.zeros((10, 1025, 3), np.uint8))
    assert seen == [(8, 1024), (10, 1024)]


def test_a_model_trained_at_one_scale_infers_every_image_there(tmp_path):
    """A folder-trained remover saw every image scaled to its image_size, small ones up too; the predictor only
    scaled down, so a 96-px image was inferred at 96 px (held-out IoU 0.304 where the test stage said 0.760).
    Now images of any size are inferred at the trained long side; a max_side the caller names only caps."""
    path = build_model(tmp_path / "m.onnx", metadata={"image_size": 64})
    remover = BackgroundRemover(path)
    seen = []
    real_logits = remover.logits
    remover.logits = lambda rgb: seen.append(rgb.shape) or real_logits(rgb)
    for h, w in ((24, 16), (150, 300), (64, 40)):
        out = remover.remove(halves(h, w))
        assert out.size == (w, h)
    assert seen == [(64, 43, 3), (32, 64, 3), (64, 40, 3)]
    a = alpha_of(remover.remove(halves(24, 16)))
    assert (a[:, :7] == 255).all() and (a[:, 9:] == 0).all()  # back at the image's own size
    capped = BackgroundRemover(path, max_side=100)
    capped.logits = lambda rgb: seen.append(rgb.shape) or real_logits(rgb)
    capped.remove(halves(24, 16))
    assert seen[-1] == (24, 16, 3)  # named: never scaled up
    plain = BackgroundRemover(build_model(tmp_path / "p.onnx"))  # no image_size (CamVid nets): own size
    plain.logits = lambda rgb: seen.append(rgb.shape) or real_logits(rgb)
    plain.remove(halves(24, 16))
    assert seen[-1] == (24, 16, 3)


def test_a_model_trained_above_1024_px_infers_at_its_own_scale(tmp_path):
    """The trained scale is the default whatever it is: a remover trained at data.image_size=1536 was inferred at
    1024 (two thirds of the scale it learnt), while the README, --max-side's help and eval-cutout's report said
    every image is scaled to the size the model was trained at."""
    remover = BackgroundRemover(build_model(tmp_path / "m.onnx", metadata={"image_size": 1536}))
    seen = []
    real_logits = remover.logits
    remover.logits = lambda rgb: seen.append(rgb.shape) or real_logits(rgb)
    assert remover.remove(halves(30, 40)).size == (40, 30)
    assert remover.max_side == 1536 and seen == [(1152, 1536, 3)]



def test_images_are_shrunk_by_area_averaging():
    """resize_rgb, the one scaling rule of training (data=folder's image_size) and the predictor, averages each
    output pixel's whole block of input pixels: a bilinear shrink gives softer images than the net learnt on."""
    from bgremover.images import resize_rgb

    rgb = np.random.default_rng(1).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    blocks = rgb.astype(np.float64).reshape(2, 4, 3, 4, 3).mean(axis=(1, 3))  # 4x4 blocks -> 2x3
    got = resize_rgb(rgb, (3, 2))
    assert got.shape == (2, 3, 3) and got.dtype == np.uint8
    assert np.abs(got - blocks).max() <= 1  # the block mean, to Pillow's fixed-point rounding (bilinear: 14 off)


def test_a_model_trained_at_one_scale_sees_its_images_scaled_as_in_training(tmp_path):
    """data=folder trains on images area-averaged down to image_size (and its test stage scores them so); the
    predictor shrank them bilinearly, which is softer: on CamVid test frames halved, 2-3 % of the pixels got another
    class. The net input is now the training's, pixel for pixel."""
    from bgremover.data import folder as fd

    remover = BackgroundRemover(build_model(tmp_path / "m.onnx", metadata={"image_size": 64}))
    seen = []
    real_logits = remover.logits
    remover.logits = lambda rgb: seen.append(rgb) or real_logits(rgb)
    rgb = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)  # detail a filter changes
    for image in (rgb, rgb[:30, :40]):  # scaled down, and up
        remover.remove(image)
        h, w = fd.resized_shape(*image.shape[:2], 64)
        trained = fd.resize_pair(image, np.zeros(image.shape[:2], np.uint8), (h, w))[0]
        np.testing.assert_array_equal(seen[-1], trained)

def test_exif_orientation_is_honoured(remover, tmp_path):
    src = Image.fromarray(halves(40, 80))  # 80 wide x 40 high, red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": displayed 40 wide x 80 high, red on top
    path = tmp_path / "rot.jpg"
    src.save(path, quality=95, exif=exif)
    with Image.open(path) as opened:  # a PIL image (rembg's users pass Image.open(...)) is turned alike
        outs = [remover.remove(path), remover.remove(opened)]
    for out in outs:
        assert out.size == (40, 80)
        a = alpha_of(out)
        assert (a[:32] == 255).all() and (a[48:] == 0).all()


def test_normalization_comes_from_metadata(tmp_path):
    # With mean=std=0.5 black becomes (-1,-1,-1): Car and Pedestrian logits 100*(-1+1+1)-50 = +50 each, so
    # P(Car)+P(Pedestrian) = 1 -> foreground; with mean 0 / std 1 black is (0,0,0): both -50 -> background.
    black = np.zeros((8, 8, 3), np.uint8)
    fg = ["Car", "Pedestrian"]
    shifted = BackgroundRemover(build_model(tmp_path / "n.onnx", mean=(0.5,) * 3, std=(0.5,) * 3), classes=fg)
    plain = BackgroundRemover(build_model(tmp_path / "p.onnx"), classes=fg)
    assert (alpha_of(shifted.remove(black, classes=["Car"])) == 128).all()  # a 50/50 split, not normalization
    assert (alpha_of(shifted.remove(black)) == 255).all()
    assert (alpha_of(plain.remove(black)) == 0).all()


# ------------------------------------------------------------------------------------------------ classes
def test_class_selection_by_name_case_insensitive(model_path):
    img = halves(10, 20, left=RED, right=GREEN)
    a_ped = alpha_of(BackgroundRemover(model_path, classes=["pedestrian"]).remove(img))
    assert (a_ped[:, :10] == 0).all() and (a_ped[:, 10:] == 255).all()
    a_both = alpha_of(BackgroundRemover(model_path, classes=["CAR", "Pedestrian"]).remove(img))
    assert (a_both == 255).all()
    a_default = alpha_of(BackgroundRemover(model_path).remove(img))  # metadata default: Car only
    assert (a_default[:, :10] == 255).all() and (a_default[:, 10:] == 0).all()
    a_override = alpha_of(BackgroundRemover(model_path).remove(img, classes=["Pedestrian"]))
    np.testing.assert_array_equal(a_override, a_ped)


def test_unknown_class_lists_valid_names(model_path):
    with pytest.raises(UsageError, match=r"unknown class name\(s\) Dog.*valid names: Sky, Building"):
        BackgroundRemover(model_path, classes=["Car", "Dog"])


# ------------------------------------------------------------------------------------------------ output modes
def test_soft_alpha_and_threshold(remover):
    # Red 128: Car logit = 100*128/255 - 50 = 0.196 against Sky's 0 -> P(Car) = sigmoid(0.196) ~ 0.549.
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0] = 128
    p = 1 / (1 + np.exp(-(100 * np.float32(128 / 255) - 50)))
    soft = alpha_of(remover.remove(img))
    assert np.abs(soft.astype(int) - round(255 * p)).max() <= 1 and 130 < soft[0, 0] < 150
    assert (alpha_of(remover.remove(img, threshold=0.5)) == 255).all()
    assert (alpha_of(remover.remove(img, threshold=0.6)) == 0).all()
    # Pure red: Car logit 50, P(Car) = 1 in float32; --threshold keeps P >= T, as its help says, so T=1 keeps it
    assert np.float32(1) / (np.float32(1) + np.exp(np.float32(-50))) == 1.0
    img[..., 0] = 255
    assert (alpha_of(remover.remove(img, threshold=1.0)) == 255).all()
    with pytest.raises(UsageError):
        remover.remove(img, threshold=1.5)


def test_mask_only_and_mask(remover):
    img = halves(6, 10)
    m = remover.remove(img, mask_only=True)
    assert m.mode == "L" and m.size == (10, 6)
    np.testing.assert_array_equal(np.asarray(m), alpha_of(remover.remove(img)))
    np.testing.assert_array_equal(np.asarray(remover.mask(img)), np.asarray(m))


def test_bg_color_composite(remover):
    out = remover.remove(halves(6, 10), bg_color=(10, 20, 30))
    assert out.mode == "RGB" and out.size == (10, 6)
    arr = np.asarray(out)
    assert (arr[:, :5] == RED).all() and (arr[:, 5:] == (10, 20, 30)).all()
    assert (np.asarray(remover.remove(halves(6, 10), bg_color="#0a141e")) == arr).all()


def test_bg_color_composite_of_a_soft_edge_rounds_to_nearest(remover):
    """Alpha ~0.55 over an opaque colour: each channel is rgb*a + bg*(1-a), rounded (truncating lost up to 1)."""
    soft = np.zeros((4, 4, 3), np.uint8)
    soft[..., 0] = 128
    a = alpha_of(remover.remove(soft)).astype(np.float64)[..., None] / 255
    want = soft * a + np.array([0.0, 201.0, 77.0]) * (1 - a)
    got = np.asarray(remover.remove(soft, bg_color=(0, 201, 77))).astype(np.float64)
    assert np.abs(got - want).max() <= 0.5 + 1e-3


def test_bg_color_with_opacity(remover):
    """rembg's `-bgc R G B A`: the cut-out over a colour of opacity A (RGBA out); A=255 is the opaque RGB
    composite, A=0 no background at all (the plain cut-out), as rembg's default 0 0 0 0 is."""
    img = halves(6, 10)
    out = remover.remove(img, bg_color=(10, 20, 30, 128))
    arr = np.asarray(out)
    assert out.mode == "RGBA" and out.size == (10, 6)
    assert (arr[:, :5] == (*RED, 255)).all() and (arr[:, 5:] == (10, 20, 30, 128)).all()
    assert (np.asarray(remover.remove(img, bg_color="#0a141e80")) == arr).all()
    opaque = remover.remove(img, bg_color=(10, 20, 30, 255))
    assert opaque.mode == "RGB" and (np.asarray(opaque) == np.asarray(remover.remove(img, bg_color=(10, 20, 30)))).all()
    assert (np.asarray(remover.remove(img, bg_color=(10, 20, 30, 0))) == np.asarray(remover.remove(img))).all()
    # a soft edge (alpha ~0.55 over a half-opaque colour): the "over" operator, alpha and colour
    soft = np.zeros((4, 4, 3), np.uint8)
    soft[..., 0] = 128
    cut = np.asarray(remover.remove(soft)).astype(np.float64)
    a, b = cut[..., 3:] / 255, (1 - cut[..., 3:] / 255) * (100 / 255)
    want_rgb = (cut[..., :3] * a + np.array([0.0, 200.0, 0.0]) * b) / (a + b)
    got = np.asarray(remover.remove(soft, bg_color=(0, 200, 0, 100))).astype(np.float64)
    assert np.abs(got[..., 3:] - 255 * (a + b)).max() <= 1 and np.abs(got[..., :3] - want_rgb).max() <= 1
    for bad in ((1, 2, 3, 256), (1, 2), "1,2,3,4,5"):
        with pytest.raises(UsageError):
            remover.remove(img, bg_color=bad)


def test_bg_image_composite(remover, tmp_path):
    bg = tmp_path / "bg.png"
    Image.new("RGB", (7, 3), (0, 200, 0)).save(bg)  # other size and aspect: scaled to cover
    out = remover.remove(halves(6, 10), bg_image=bg)
    arr = np.asarray(out)
    assert out.mode == "RGB" and (arr[:, :5] == RED).all() and (arr[:, 5:] == (0, 200, 0)).all()
    with pytest.raises(UsageError):
        remover.remove(halves(6, 10), bg_image=bg, bg_color=(1, 2, 3))


def test_a_bg_image_with_transparency_keeps_it_as_alpha_composite_does(remover, tmp_path):
    """A bg.png whose top half is red at alpha 0 came out red there (read as RGB, its hidden colour shown): the
    composite is Pillow's Image.alpha_composite of the cut-out over the background, RGBA, its transparency kept.
    An RGBA background with no transparent pixel stays the opaque RGB composite."""
    bg = np.zeros((6, 10, 4), np.uint8)
    bg[:3] = (255, 0, 0, 0)  # red, hidden
    bg[3:, :, :3], bg[3:, :, 3] = (0, 200, 0), np.linspace(40, 255, 10).astype(np.uint8)  # green, half-seen to opaque
    Image.fromarray(bg, "RGBA").save(tmp_path / "bg.png")
    img = halves(6, 10)
    out = remover.remove(img, bg_image=tmp_path / "bg.png")
    want = np.asarray(Image.alpha_composite(Image.fromarray(bg, "RGBA"), remover.remove(img))).astype(int)
    got = np.asarray(out).astype(int)
    seen = want[..., 3] > 0  # under alpha 0 a colour is no colour (Pillow leaves the background's there)
    assert out.mode == "RGBA" and np.abs(got[..., 3] - want[..., 3]).max() <= 1
    assert np.abs(got[seen] - want[seen]).max() <= 1
    assert (got[:3, 5:, 3] == 0).all()  # the hidden red stays hidden: fully transparent there
    assert (got[:, :5] == (*RED, 255)).all()  # the cut-out itself over it, opaque
    opaque = bg.copy()
    opaque[..., 3] = 255
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    flat = remover.remove(img, bg_image=tmp_path / "opaque.png")
    assert flat.mode == "RGB" and (np.asarray(flat)[:3, 5:] == RED).all()


def test_bg_image_of_another_aspect_covers_the_frame_without_distortion(remover, tmp_path):
    """-bi: scaled to cover the frame, the overflow cropped evenly from both sides (as CSS object-fit: cover), not
    stretched. A 30x10 background of red, green and blue thirds behind a 10x10 frame: the green middle third."""
    bg = np.zeros((10, 30, 3), np.uint8)
    bg[:, :10], bg[:, 10:20], bg[:, 20:] = RED, (0, 255, 0), (0, 0, 255)
    Image.fromarray(bg).save(tmp_path / "thirds.png")
    frame = np.full((10, 10, 3), GRAY, np.uint8)  # no foreground: the output is the background
    out = np.asarray(remover.remove(frame, bg_image=tmp_path / "thirds.png"))
    assert (out == (0, 255, 0)).all(), out[0]


def test_refine_is_the_guided_filter_on_the_luma_of_the_image(remover):
    """`refine` filters the soft alpha with He et al.'s guided filter, guided by the image's ITU-R 601 luma
    (0.299 R + 0.587 G + 0.114 B, not BGR's order), of radius min(H, W) / 90 (at least 2): on a 360x720 image,
    4 px, not the 8 of its long side."""
    from bgremover.remover import guided_filter

    rng = np.random.default_rng(0)
    img = np.zeros((360, 720, 3), np.uint8)
    img[:, :300] = RED
    img[100:200, 400:500] = (40, 200, 220)  # a cyan patch: its luma differs under the swapped weights
    img = np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    prob = remover.foreground_probability(img)
    luma = (img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114) / 255.0
    want = np.clip(guided_filter(luma.astype(np.float32), prob, 4), 0, 1)
    got = alpha_of(remover.remove(img, refine=True)).astype(int)
    assert np.abs(got - (want * 255 + 0.5).astype(int)).max() <= 1


def test_refine_with_a_threshold_thresholds_the_refined_alpha(remover):
    """--refine --threshold T: the guided filter first, then the cut at T (a threshold alone ignored the refine)."""
    rng = np.random.default_rng(1)
    img = np.zeros((90, 180, 3), np.uint8)
    img[:, :75] = RED
    img = np.clip(img.astype(int) + rng.integers(-60, 61, img.shape), 0, 255).astype(np.uint8)
    soft = alpha_of(remover.remove(img, refine=True)).astype(int)
    hard = alpha_of(remover.remove(img, refine=True, threshold=0.5)).astype(int)
    np.testing.assert_array_equal(hard, np.where(soft >= 128, 255, 0))  # round(255 p) >= 128 exactly when p >= 0.5
    assert (hard != alpha_of(remover.remove(img, threshold=0.5))).any()  # the refine did change the cut


def test_refine_keeps_flat_regions_and_range(remover):
    img = halves(60, 80)
    img[20:40, 10:30] = GRAY  # a background hole inside the red half
    plain = alpha_of(remover.remove(img)).astype(int)
    refined = alpha_of(remover.remove(img, refine=True)).astype(int)
    assert refined.shape == plain.shape
    # The guided filter follows the (sharp) colour edges of the guide: flat areas keep their values.
    assert (
        (refined[:, :15][:10] >= 250).all()
        and (refined[:, 50:] <= 5).all()
        and (refined[25:35, 15:25] <= 5).all()
    )
    assert np.abs(refined - plain).mean() < 10
    assert (refined != plain).any()  # and it did something: the alpha near the colour edges moved
    flat = alpha_of(remover.remove(np.full((30, 30, 3), RED, np.uint8), refine=True))
    assert (flat == 255).all()


def test_guided_filter_is_he_et_als_by_hand():
    """The filter against its definition (He et al. 2010), each window mean taken over the window itself, clipped
    at the borders: a wrong eps or window would still leave flat regions flat (the test above)."""
    from bgremover.remover import guided_filter

    rng = np.random.default_rng(0)
    guide, src = rng.random((9, 11), dtype=np.float32), rng.random((9, 11), dtype=np.float32)
    r, eps = 2, 1e-2

    def mean(x: np.ndarray) -> np.ndarray:
        return np.array([[x[max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].mean() for j in range(x.shape[1])]
                         for i in range(x.shape[0])])

    mean_i, mean_p = mean(guide), mean(src)
    a = (mean(guide * src) - mean_i * mean_p) / (mean(guide * guide) - mean_i**2 + eps)
    b = mean_p - a * mean_i
    np.testing.assert_allclose(guided_filter(guide, src, r, eps), mean(a) * guide + mean(b), atol=1e-5)


# ------------------------------------------------------------------------------------------------ input modes
def _rgb_alpha(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(img)
    return arr[:, :, :3], arr[:, :, 3]


def test_rgba_input_alpha_is_kept(remover):
    arr = np.zeros((4, 6, 4), np.uint8)
    arr[:, :3, :3], arr[:, 3:, :3] = RED, BLUE
    arr[..., 3] = 255
    arr[0, :, 3] = 100  # half-transparent first row
    rgb, a = _rgb_alpha(remover.remove(Image.fromarray(arr, "RGBA")))
    np.testing.assert_array_equal(rgb, arr[:, :, :3])
    assert (a[0, :3] == 100).all() and (a[1:, :3] == 255).all() and (a[:, 3:] == 0).all()
    np.testing.assert_array_equal(_rgb_alpha(remover.remove(arr))[1], a)  # same through an ndarray
    # premultiplied (RGBa) and gray + alpha arrays (HxWx2) keep theirs too: the first row's 100 on a red pixel
    np.testing.assert_array_equal(_rgb_alpha(remover.remove(Image.fromarray(arr, "RGBA").convert("RGBa")))[1], a)
    gray_alpha = np.stack([np.full((4, 6), 200, np.uint8), arr[..., 3]], axis=2)
    sky = BackgroundRemover(remover.model_path, classes=["Sky"])  # gray is Sky: only the input's alpha is below 255
    np.testing.assert_array_equal(_rgb_alpha(sky.remove(gray_alpha))[1], arr[..., 3])


def test_palette_inputs_with_and_without_transparency(remover, tmp_path):
    idx = np.array([[0, 1, 2, 1]], np.uint8).repeat(3, axis=0)
    pal = Image.fromarray(idx, "P")
    pal.putpalette([*RED, *RED, *BLUE] + [0] * 759)
    rgb, a = _rgb_alpha(remover.remove(pal))
    assert (a == np.array([255, 255, 0, 255])).all() and (rgb[:, 0] == RED).all()
    path = tmp_path / "t.png"
    pal.save(path, transparency=0)  # palette entry 0 fully transparent
    _, a = _rgb_alpha(remover.remove(path))
    assert (a == np.array([0, 255, 0, 255])).all()


def test_a_colour_key_transparency_is_kept_in_gray_and_rgb_pngs(model_path, tmp_path):
    """A PNG's tRNS colour key (one gray level, 8- or 16-bit, or one RGB colour, fully transparent) is the input's
    alpha as a palette's transparent entry is: never revealed by the cut-out (a 16-bit gray one was). Sky (what
    gray and blue are) is the foreground here, so only the input's own transparency can make a pixel transparent."""
    sky = BackgroundRemover(model_path, classes=["Sky"])
    gray = np.array([[0, 128, 0, 30]], np.uint8).repeat(2, axis=0)
    Image.fromarray(gray, "L").save(tmp_path / "g.png", transparency=0)
    colours = np.array([[GRAY, BLUE, GRAY, BLUE]], np.uint8).repeat(2, axis=0)
    Image.fromarray(colours, "RGB").save(tmp_path / "c.png", transparency=BLUE)
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png", transparency=0)  # 16-bit gray
    for name, want in (("g.png", [0, 255, 0, 255]), ("c.png", [255, 0, 255, 0]), ("g16.png", [0, 255, 0, 255])):
        with Image.open(tmp_path / name) as on_disk:
            assert "transparency" in on_disk.info  # really a colour key, not an alpha channel
        assert (alpha_of(sky.remove(tmp_path / name)) == np.array(want, np.uint8)).all(), name


@pytest.mark.parametrize("mode", ["L", "LA", "1"])
def test_gray_inputs(remover, mode):
    gray = np.array([[0, 255, 128, 30]], np.uint8).repeat(2, axis=0)
    img = Image.fromarray(gray, "L")
    if mode == "LA":
        img = Image.merge("LA", [img, Image.fromarray(np.full_like(gray, 77))])
    elif mode == "1":
        img = img.convert("1", dither=Image.Dither.NONE)
        gray = np.where(gray >= 128, 255, 0).astype(np.uint8)
    rgb, a = _rgb_alpha(remover.remove(img))
    np.testing.assert_array_equal(rgb, np.repeat(gray[:, :, None], 3, axis=2))
    assert (a == 0).all()  # gray is never red: background everywhere
    if mode == "LA":
        assert remover.remove(img, bg_color=(0, 0, 0)).size == (4, 2)


def test_cmyk_input(remover):
    cmyk = Image.fromarray(np.array([[[0, 255, 255, 0], [255, 255, 0, 0]]], np.uint8), "CMYK")
    rgb, a = _rgb_alpha(remover.remove(cmyk))
    assert tuple(rgb[0, 0]) == RED and tuple(rgb[0, 1]) == BLUE
    assert list(a[0]) == [255, 0]


def test_16bit_png_is_scaled_to_8bit(remover, tmp_path):
    values = np.array([[0, 65535, 32896, 257, 255]], np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as on_disk:
        assert on_disk.mode.startswith("I")  # really a 16-bit image on disk
    rgb, a = _rgb_alpha(remover.remove(path))
    assert list(rgb[0, :, 0]) == [0, 255, 128, 1, 1] and (a == 0).all()  # 255/257 rounds to 1, not down to 0
    rgb16, _ = _rgb_alpha(remover.remove(np.stack([values * 0 + 65535, values * 0, values * 0], axis=2)))
    assert (rgb16 == RED).all()  # 16-bit RGB array: 65535 -> 255


def test_a_dark_16bit_image_stays_dark_whatever_its_byte_order_or_format(remover, tmp_path):
    """16-bit pixels no brighter than 255 (of 65535) are nearly black, in a big-endian TIFF (Pillow's I;16B) and a
    16-bit PGM too: the PGM (Pillow's mode I, its maxval scaled to 65535) came out as 8-bit values 0..255, 257x
    too bright, as the whole image whenever no pixel was above 255. An image in mode I holding 8-bit values
    (Pillow's convert("I")) keeps them."""
    dark = [0, 100, 200, 255]
    want = [round(v * 255 / 65535) for v in dark]  # [0, 0, 1, 1]
    tiff, pgm = tmp_path / "be16.tif", tmp_path / "g16.pgm"
    Image.fromarray(np.array([dark], ">u2")).save(tiff)
    pgm.write_bytes(b"P5\n4 1\n65535\n" + np.array(dark, ">u2").tobytes())
    for path, mode in ((tiff, "I;16B"), (pgm, "I")):
        with Image.open(path) as on_disk:
            assert on_disk.mode == mode
        for given in (path, path.read_bytes()):
            assert list(_rgb_alpha(remover.remove(given))[0][0, :, 0]) == want, path.name
    eight_bit = Image.fromarray(np.array([dark], np.uint8)).convert("I")
    assert list(_rgb_alpha(remover.remove(eight_bit))[0][0, :, 0]) == dark
    wide = Image.fromarray(np.array([[0, 255, 32896, 65535]], np.int32))  # mode I past 255: 16-bit, rounded
    assert wide.mode == "I" and list(_rgb_alpha(remover.remove(wide))[0][0, :, 0]) == [0, 1, 128, 255]


def test_float_and_file_like_inputs(remover, model_path):
    img = halves(4, 8).astype(np.float32) / 255.0
    np.testing.assert_array_equal(alpha_of(remover.remove(img)), alpha_of(remover.remove(halves(4, 8))))
    between = np.array([[0.5, 0.25, 0.999, 0.001]], np.float32)[:, :, None].repeat(3, axis=2)
    assert list(_rgb_alpha(remover.remove(between))[0][0, :, 0]) == [128, 64, 255, 0]  # 127.5, 63.75, ... rounded
    assert list(_rgb_alpha(remover.remove(np.array([[True, False]])))[0][0, :, 0]) == [255, 0]  # a bool mask
    buf = io.BytesIO()
    Image.fromarray(halves(4, 8)).save(buf, format="PNG")
    buf.seek(0)
    assert (alpha_of(remover.remove(buf))[:, :4] == 255).all()


def test_bytes_inputs_and_unsupported_types(remover):
    """remove(open(p, "rb").read()) raised "<stdin>: cannot decode image (embedded null byte)" (PIL took the bytes
    for a file name), and None or 5 gave "'NoneType' object has no attribute 'read'"."""
    buf = io.BytesIO()
    Image.fromarray(halves(4, 8)).save(buf, format="PNG")
    data = buf.getvalue()
    expected = alpha_of(remover.remove(halves(4, 8)))
    for given in (data, bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(alpha_of(remover.remove(given)), expected)
    with pytest.raises(ImageError, match=r"^<bytes>: not a recognised image file"):
        remover.remove(b"not an image")
    for bad in (None, 5):
        with pytest.raises(ImageError, match=rf"unsupported image input of type {type(bad).__name__}: expected a "
                           "path, bytes"):
            remover.remove(bad)


def test_rgb_colour_profile_is_kept(remover, tmp_path):
    """A JPEG with an embedded ICC profile gave a cut-out without it (outputs are rebuilt from arrays), so a wide-gamut
    photo's unchanged RGB values were then read as sRGB. RGB(A) outputs keep an RGB profile; masks and profiles
    that do not describe the RGB values (CMYK, gray) get none."""
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = tmp_path / "photo.jpg"
    Image.fromarray(halves(8, 16)).save(path, quality=95, icc_profile=icc)
    with Image.open(path) as opened:
        pil = opened.copy()
    for given in (path, path.read_bytes(), pil):
        assert remover.remove(given).info.get("icc_profile") == icc
        assert remover.remove(given, bg_color="0,0,255").info.get("icc_profile") == icc
        assert "icc_profile" not in remover.mask(given).info
    with Image.open(io.BytesIO(images.encode_png(remover.remove(path)))) as png:
        assert png.info.get("icc_profile") == icc
    gray = Image.fromarray(halves(8, 16)).convert("L")
    gray.info["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # not RGB
    assert "icc_profile" not in remover.remove(gray).info


# ------------------------------------------------------------------------------------------------ errors
def test_bad_image_files(remover, tmp_path):
    # Incompressible content, so that cutting the file in half really cuts pixel data.
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = io.BytesIO()
    Image.fromarray(noise).save(good, format="PNG")
    jpg = io.BytesIO()
    Image.fromarray(noise).save(jpg, format="JPEG")
    cases = {  # what each line says of its file: the README's list of bad input
        "missing.png": (None, "no such file"),
        "empty.jpg": (b"", "empty file"),
        "text.jpg": (b"this is not an image\n" * 10, "not a recognised image file"),
        "trunc.png": (good.getvalue()[: len(good.getvalue()) // 2], r"cannot decode image \("),
        "trunc.jpg": (jpg.getvalue()[: len(jpg.getvalue()) // 2], r"cannot decode image \("),
    }
    for name, (data, says) in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ImageError, match=rf"^{re.escape(str(tmp_path / name))}: {says}"):
            remover.remove(path)
    with pytest.raises(ImageError, match=rf"^{re.escape(str(tmp_path))}: is a directory$"):
        remover.remove(tmp_path)


def test_pixel_limits(model_path, tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(halves(50, 50)).save(path)
    small_limit = BackgroundRemover(model_path, max_pixels=1000)
    with pytest.raises(ImageError, match="exceeds the limit of 1,000"):
        small_limit.remove(path)
    with pytest.raises(ImageError, match="exceeds"):
        small_limit.remove(halves(50, 50))
    # exactly the limit is allowed, one pixel over it refused: a file, an array and a PIL image alike
    for given in (path, halves(50, 50), Image.fromarray(halves(50, 50))):
        assert BackgroundRemover(model_path, max_pixels=2500).remove(given).size == (50, 50)
        with pytest.raises(ImageError, match="exceeds the limit of 2,499"):
            BackgroundRemover(model_path, max_pixels=2499).remove(given)
    # Pillow's own ceiling (an error past 2x MAX_IMAGE_PIXELS, ~179 Mpx) stopped files --max-pixels allowed
    # (`--max-pixels 300000000` on a 200 Mpx PNG: "possible decompression bomb"): ours decides, PIL's is restored.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert BackgroundRemover(model_path, max_pixels=2500).remove(path).size == (50, 50)
    with pytest.raises(ImageError, match="exceeds the limit of 2,499 .*raise --max-pixels"):
        BackgroundRemover(model_path, max_pixels=2499).remove(path)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_model_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="model file not found"):
        BackgroundRemover(tmp_path / "nope.onnx")
    from bgremover import remover as library

    monkeypatch.delenv(predict.MODEL_ENV, raising=False)
    monkeypatch.setattr(library, "DEFAULT_MODEL", tmp_path / "models" / "bgremover-camvid.onnx")
    with pytest.raises(ModelError, match="no model found.*--model"):
        BackgroundRemover()
    with pytest.raises(ModelError, match="not a bgremover model"):
        BackgroundRemover(build_model(tmp_path / "plain.onnx", metadata=False))
    with pytest.raises(ModelError, match="not a bgremover model"):
        BackgroundRemover(build_model(tmp_path / "other.onnx", metadata={"format": "something-else"}))
    with pytest.raises(ModelError, match="upgrade bgremover"):
        BackgroundRemover(build_model(tmp_path / "v9.onnx", metadata={"format_version": 9}))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not onnx at all")
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        BackgroundRemover(garbage)


def test_a_model_whose_output_disagrees_with_its_class_list_is_refused(tmp_path):
    """11 output channels but 12 classes in the metadata: the softmax would quietly run over the wrong classes."""
    remover = BackgroundRemover(build_model(tmp_path / "m.onnx", metadata={"classes": [*CLASSES, "Extra"]}))
    with pytest.raises(ModelError, match=r"model returned shape \(1, 11, 32, 32\), expected 1x12xHxW"):
        remover.remove(halves(4, 6))


def test_model_path_from_environment(model_path, monkeypatch):
    monkeypatch.setenv(predict.MODEL_ENV, str(model_path))
    assert BackgroundRemover().model_path == model_path


def test_a_bad_model_from_the_environment_is_said_to_come_from_it(tmp_path, monkeypatch, capsys):
    """$BGREMOVER_MODEL naming a file since moved gave "model file not found: /old/m.onnx" and nothing on where
    that path came from (no --model was given): the variable is named now, by the library and both commands."""
    from bgremover import serve

    monkeypatch.setenv(predict.MODEL_ENV, str(tmp_path / "moved.onnx"))
    with pytest.raises(ModelError, match=r"model file not found: .*moved\.onnx \(named by \$BGREMOVER_MODEL"):
        BackgroundRemover()
    src = tmp_path / "a.png"
    Image.fromarray(halves(8, 8)).save(src)
    assert predict.main([str(src)]) == 1
    assert serve.main(["--port", "0"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": error: ")[1] for line in lines] == [
        f"model file not found: {tmp_path / 'moved.onnx'} (named by $BGREMOVER_MODEL; unset it for the shipped model)"
    ] * 2
    assert not (tmp_path / "a.nobg.png").exists()
    # a --model named on the command line is the user's own: nothing about the variable
    with pytest.raises(ModelError) as err:
        BackgroundRemover(tmp_path / "other.onnx")
    assert "BGREMOVER_MODEL" not in str(err.value)


def test_png_encoding_roundtrips(remover):
    out = remover.remove(halves(9, 11))
    back = Image.open(io.BytesIO(images.encode_png(out)))  # in-memory: nothing to close
    assert back.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(back), np.asarray(out))


# ------------------------------------------------------------------------------------------------ isolation
def test_predict_imports_no_torch_lightning_or_hydra(model_path):
    code = (
        "import sys, numpy as np\n"
        "import bgremover.predict as p\n"
        f"p.BackgroundRemover({str(model_path)!r}).remove(np.zeros((8, 8, 3), np.uint8))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'torchvision'})\n"
        "print(','.join(bad))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"bgremover.predict pulled in: {res.stdout.strip()}"


def _damaged_exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "x" * 40
    buf = io.BytesIO()
    Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(buf, format="JPEG", exif=exif.tobytes()[:-30])
    return buf.getvalue()


def test_open_image_from_threads_leaves_pythons_warnings_as_they_were():
    """The server decodes in worker threads: recording PIL's warnings per image (warnings.catch_warnings swaps
    process-wide state) interleaved between threads and could leave the process recording every later warning
    into a finished request's list, its filters set to "always" (1 run in 3 in the review's reproduction)."""
    import threading
    import warnings

    from bgremover.remover import open_image

    damaged, plain = _damaged_exif_jpeg(), io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(plain, format="PNG")
    before = (list(warnings.filters), warnings.showwarning, warnings._showwarnmsg_impl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the damaged file's own warning, 4 x 100 times

        def work():
            for i in range(100):
                open_image(damaged if i % 2 else plain.getvalue())

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        inside = (list(warnings.filters)[1:], warnings.showwarning, warnings._showwarnmsg_impl)
    assert inside == before and (list(warnings.filters), warnings.showwarning, warnings._showwarnmsg_impl) == before


def test_damaged_metadata_under_an_error_filter_is_an_image_error():
    """With warnings as errors (-W error), the re-issued metadata warning escaped as a bare UserWarning."""
    import warnings

    from bgremover.remover import ImageError, open_image

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match=r"^<bytes>: cannot decode image \(<bytes>: damaged metadata"):
            open_image(_damaged_exif_jpeg())
    with pytest.warns(UserWarning, match=r"^<bytes>: damaged metadata \(Truncated File Read\)"):
        assert open_image(_damaged_exif_jpeg()).size == (20, 12)


def test_an_animated_image_says_only_its_first_frame_is_cut_out(tmp_path):
    """An animated GIF was cut out from its first frame without a word (a user audit)."""
    for n in (2, 3):
        frames = [Image.new("RGB", (40, 30), (i * 80, 0, 0)) for i in range(n)]
        frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
        with pytest.warns(UserWarning, match=rf"anim.gif: {n} frames, only the first is cut out"):
            img = images.open_image(tmp_path / "anim.gif")
        assert img.size == (40, 30)


def test_writing_into_a_missing_folder_names_the_output_not_a_temp_file(tmp_path):
    """write_atomic into a folder that is not there said "No such file or directory: .../.a.png.x1y2.tmp" (its temp
    file); through a dangling link it names the link and its target (test_predict_cli)."""
    from bgremover.remover import write_atomic

    with pytest.raises(FileNotFoundError, match=r"a\.png: its folder does not exist$"):
        write_atomic(b"x", tmp_path / "missing" / "a.png")
    assert not (tmp_path / "missing").exists()


def test_a_new_output_gets_the_umasks_mode_and_a_rewritten_one_keeps_its_own(tmp_path):
    """Outputs are written to a temp file (mkstemp: 0600) and renamed: a new cut-out or model must still get the
    mode any new file gets (0644 under umask 022), or a web server or another user could not read it; a file
    rewritten keeps the mode its owner gave it."""
    import os
    import stat

    from bgremover.remover import write_atomic

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    before = os.umask(0o022)
    try:
        write_atomic(b"new", tmp_path / "a.png")
        os.umask(0o027)
        write_atomic(b"new", tmp_path / "b.png")
        (tmp_path / "c.png").write_bytes(b"old")
        (tmp_path / "c.png").chmod(0o604)
        write_atomic(b"rewritten", tmp_path / "c.png")
    finally:
        os.umask(before)
    assert [mode(tmp_path / n) for n in ("a.png", "b.png", "c.png")] == [0o644, 0o640, 0o604]
    assert (tmp_path / "c.png").read_bytes() == b"rewritten"
