"""data=folder: your own image/mask folder — layouts, labels, splits, early one-line errors, training with the
cut-out metrics, export/predict/eval-cutout on the result, fine-tuning from the CamVid net, `make remover`."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf
from PIL import Image
from test_train import compose_cfg

from bgremover import checks, config, cutout_eval
from bgremover.data import folder as fd
from bgremover.errors import UserError

SHIPPED_PT = REPO / "models" / "bgremover-camvid.pt"
SHIPPED_ONNX = REPO / "models" / "bgremover-camvid.onnx"
FAST = ["model=deeplabv3plus", "data.num_workers=0", "data.batch_size=2", "data.crop_size=[32,32]",
        "data.image_size=48", "extras.print_config=false", "measure_inference=false", "logger=csv"]


def square_pair(rng, h: int, w: int, value: int = 255, void: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with a bright rectangle, and its mask (`value` inside, 0 outside, `void` on its border)."""
    img = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = value
    img[mask > 0] += 120
    if void is not None:
        mask[h // 4, :] = void
    return img, mask


def write_folder(root: Path, n: int = 6, size: tuple[int, int] = (40, 56), seed: int = 0, split: str | None = None,
                 value: int = 255) -> Path:
    """`n` pairs in root/images + root/masks (or root/<split>/...): JPEG images, PNG masks."""
    rng = np.random.default_rng(seed)
    base = root / split if split else root
    (base / "images").mkdir(parents=True, exist_ok=True)
    (base / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, mask = square_pair(rng, *size, value=value)
        Image.fromarray(img).save(base / "images" / f"{split or 'im'}{i}.jpg", quality=95)
        Image.fromarray(mask).save(base / "masks" / f"{split or 'im'}{i}.png")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "data")


# --- labels ------------------------------------------------------------------------------------------------------
def test_binary_masks_255_01_antialiased_and_void(tmp_path):
    labels = fd.Labels(fd.BINARY_CLASSES, binary=True, void_value=128)
    p = tmp_path / "m.png"
    assert fd.Labels(fd.BINARY_CLASSES, True).to_label(np.array([[0, 255, 200, 100]], np.uint8), p).tolist() == [[0, 1, 1, 0]]
    assert fd.Labels(fd.BINARY_CLASSES, True).to_label(np.array([[0, 1, 1, 0]], np.uint8), p).tolist() == [[0, 1, 1, 0]]
    # "values > 127 are foreground" (README): a soft edge's 127 is background, its 128 foreground
    assert fd.Labels(fd.BINARY_CLASSES, True).to_label(np.array([[0, 127, 128, 255]], np.uint8), p).tolist() == [[0, 0, 1, 1]]
    # a 0/1 mask with void pixels is still a 0/1 mask: the void value does not make it look like 0/255
    assert labels.to_label(np.array([[0, 1, 128, 0]], np.uint8), p).tolist() == [[0, 1, 2, 0]]
    assert labels.to_label(np.array([[0, 255, 128, 0]], np.uint8), p).tolist() == [[0, 1, 2, 0]]


def test_class_index_masks_without_classes_txt_are_refused(tmp_path):
    """Masks of class indices (0/2) read as binary are all background: a remover trained on them shipped with
    foreground IoU 0.000 and no word of why."""
    write_folder(tmp_path / "d", value=2)
    with pytest.raises(fd.FolderDataError, match="no mask in .* has foreground: .* need a classes.txt beside images/"):
        fd.scan(tmp_path / "d")
    write_folder(tmp_path / "ok", value=1)  # 0/1 masks are binary masks with foreground
    assert fd.scan(tmp_path / "ok").labels.binary


def _rewrite_masks(root: Path, how) -> list[np.ndarray]:
    """Each 0/255 mask of root/masks saved again as how(image RGB, mask) -> PIL image; returns the true masks."""
    truth = []
    for mask_path in sorted((root / "masks").iterdir()):
        mask = np.asarray(Image.open(mask_path))
        rgb = np.asarray(Image.open(root / "images" / f"{mask_path.stem}.jpg").convert("RGB"))
        how(rgb, mask).save(mask_path)
        truth.append(mask > 127)
    return truth


@pytest.mark.parametrize("kind", ["cutout", "black_alpha", "gray_palette_inverted", "voc_palette", "la_cutout",
                                  "coloured_rgb", "instance_colours", "opaque_rgba"])
def test_masks_are_read_as_they_look(tmp_path, kind):
    """A rembg cut-out as the mask gave labels from its colours (IoU 0.002 with its alpha); a palette mask whose
    index 0 is white came out inverted; a black image with the mask in its alpha was refused as having no
    foreground; a labelling tool's coloured mask on black was read by luminance: CVAT's (250, 50, 83) (114) was
    refused as having no foreground, and a red instance (76) beside a green one (150) trained as background. Alpha
    with transparency is the mask; a gray palette is read as it looks, a coloured one (VOC's) as 0/1 indices; an
    RGB mask by its brightest channel."""
    def save(rgb, mask):
        fg = mask > 127
        if kind in ("coloured_rgb", "instance_colours"):
            colour = np.zeros(mask.shape + (3,), np.uint8)
            colour[fg] = (250, 50, 83)  # CVAT's colour of a label
            if kind == "instance_colours":  # two instances: the right part of the subject green, the rest red
                colour[fg] = (255, 0, 0)
                colour[:, mask.shape[1] // 2:][fg[:, mask.shape[1] // 2:]] = (0, 255, 0)
            return Image.fromarray(colour, "RGB")
        if kind == "cutout":
            return Image.fromarray(np.dstack([rgb, mask]), "RGBA")
        if kind == "opaque_rgba":  # a black/white mask an editor saved with an alpha channel, opaque everywhere
            return Image.fromarray(np.dstack([mask, mask, mask, np.full_like(mask, 255)]), "RGBA")
        if kind == "black_alpha":
            return Image.fromarray(np.dstack([np.zeros_like(rgb), mask]), "RGBA")
        if kind == "la_cutout":
            return Image.fromarray(np.dstack([rgb[..., 0], mask]), "LA")
        im = Image.fromarray((~fg).astype(np.uint8) if kind == "gray_palette_inverted" else fg.astype(np.uint8), "P")
        im.putpalette([255, 255, 255, 0, 0, 0] if kind == "gray_palette_inverted" else [0, 0, 0, 128, 0, 0])
        return im

    root = write_folder(tmp_path / "d", n=4)
    truth = _rewrite_masks(root, save)
    folder = fd.scan(root)
    got = [fd.read_mask(m, folder.labels) == 1 for _, m in folder.pairs["all"]]
    assert all((g == t).all() for g, t in zip(got, truth, strict=True))


def test_cut_outs_predict_wrote_beside_the_images_are_not_pairs(tmp_path):
    """`bgremover-predict i images/im0.jpg` writes images/im0.nobg.png; the folder then failed as "image has no
    mask: .../im0.nobg.png". Predict's own outputs are skipped, as predict skips them."""
    root = write_folder(tmp_path / "d", n=4)
    Image.new("RGBA", (56, 40)).save(root / "images" / "im0.nobg.png")
    assert [img.name for img, _ in fd.scan(root).pairs["all"]] == ["im0.jpg", "im1.jpg", "im2.jpg", "im3.jpg"]


def test_files_the_system_writes_into_picture_folders_are_not_pairs(tmp_path):
    """.DS_Store was skipped but Windows' Thumbs.db and desktop.ini stopped a run as "not a supported image
    file"; all of them, and macOS' ._ resource forks, are left out now, and every pair still trains."""
    root = write_folder(tmp_path / "d", n=4)
    for sub in ("images", "masks"):
        for name in (".DS_Store", "Thumbs.db", "desktop.ini", "._im0.jpg"):
            (root / sub / name).write_bytes(b"\0\1junk")
    found = fd.scan(root)
    assert [(img.name, mask.name) for img, mask in found.pairs["all"]] == [(f"im{i}.jpg", f"im{i}.png") for i in range(4)]
    (root / "images" / "notes.txt").write_text("a file of the user's is still refused")
    with pytest.raises(fd.FolderDataError, match="not a supported image file: .*notes.txt"):
        fd.scan(root)


def test_a_photo_turned_by_exif_pairs_with_its_mask_as_shown(tmp_path):
    """A phone photo stored 40x56 with EXIF orientation 6 is shown (and trained, and cut out by predict) 56x40:
    its mask is the shown picture's, as rembg's and labelling tools' are, and lines up with it. A mask made from
    the stored pixels (a script's Image.open ignores EXIF) was refused as "is 56x40 but its mask is 40x56" of
    two files every other tool calls 40x56: the error says what happened now."""
    root = write_folder(tmp_path / "d", n=4)
    photo = root / "images" / "im0.jpg"
    shown = np.asarray(Image.open(photo))  # 40x56: what the photo shows, and its mask (root/masks/im0.png)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to show": stored turned the other way
    Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90).save(photo, exif=exif, quality=95)
    with Image.open(photo) as stored:
        assert stored.size == (40, 56)
    found = fd.scan(root)
    image, label = fd.read_pair(photo, root / "masks" / "im0.png", found.labels)
    assert image.shape == label.shape + (3,) == (40, 56, 3)  # turned back as shown
    assert image[label == 1].mean() > image[label == 0].mean() + 100  # aligned: the bright square is the foreground
    mask = root / "masks" / "im0.png"
    Image.open(mask).transpose(Image.Transpose.ROTATE_90).save(mask)  # the mask of the stored pixels
    with pytest.raises(fd.FolderDataError, match=rf"^size mismatch: {photo} is 56x40 as shown \(its EXIF orientation "
                                                 rf"turns the stored 40x56\) but its mask {mask} is 40x56: the mask "
                                                 "was made from the unturned pixels; make it from the image as shown"):
        fd.scan(root)


def test_the_zero_one_rule_is_one_for_the_whole_folder(tmp_path):
    """Per mask, 0/1/2 masks (class indices without classes.txt) lost their 1s while 0/1 masks beside them kept
    theirs: half the folder trained as all background. One rule per folder: such a folder is refused."""
    root = write_folder(tmp_path / "d", n=4, value=1)
    mask_path = sorted((root / "masks").iterdir())[0]
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[:3] = 2
    Image.fromarray(mask).save(mask_path)
    with pytest.raises(fd.FolderDataError, match=r"im0.png holds values 0-2, neither a 0/1 mask nor a 0/255 one"):
        fd.scan(root)
    root = write_folder(tmp_path / "ok", n=4, value=1)
    folder = fd.scan(root)
    assert folder.labels.zero_one and all((fd.read_mask(m, folder.labels) == 1).any() for _, m in folder.pairs["all"])


@pytest.mark.parametrize("value", [255, 1])
def test_a_one_bit_mask_reads_as_it_looks_beside_0_255_or_0_1_masks(tmp_path, value):
    """A mask saved as a 1-bit image (PIL's convert("1"), a thresholding script's output) beside 0/255 masks was
    refused as "a 0/1 mask" mixed with 0/255 ones; it is black and white, so its white is foreground beside either."""
    root = write_folder(tmp_path / "d", n=4, value=value)
    path = root / "masks" / "im2.png"
    truth = np.asarray(Image.open(path)) > 0
    Image.fromarray(truth).save(path)  # a bool array: a mode "1" PNG
    assert Image.open(path).mode == "1"
    folder = fd.scan(root)
    assert folder.labels.zero_one == (value == 1) and path.resolve() not in folder.empty
    assert ((fd.read_mask(path, folder.labels) == 1) == truth).all() and truth.any()


def test_a_folder_mixing_zero_one_and_zero_255_masks_is_refused(tmp_path):
    """Half the masks saved as 0/1 and half as 0/255: the folder's rule (> 127) read the 0/1 masks as all
    background, and the remover trained on it without a word (held-out foreground IoU 0.105 against 0.271)."""
    root = write_folder(tmp_path / "d", n=6)
    zero_one = sorted((root / "masks").iterdir())[3]
    mask = np.asarray(Image.open(zero_one))
    Image.fromarray((mask > 127).astype(np.uint8)).save(zero_one)
    with pytest.raises(fd.FolderDataError, match=r"im3.png is a 0/1 mask .*/im0.png a 0/255 one"):
        fd.scan(root)
    # an anti-aliased 0/255 mask with 1s on its edge, and an empty mask, stay 0/255 masks
    edge = np.asarray(Image.open(zero_one)).copy() * 255
    edge[0, :5] = 1
    Image.fromarray(edge).save(zero_one)
    Image.fromarray(np.zeros_like(mask)).save(sorted((root / "masks").iterdir())[1])
    folder = fd.scan(root)
    assert not folder.labels.zero_one and len(folder.pairs["all"]) == 6


def test_a_zero_one_jpeg_mask_in_a_zero_255_folder_is_refused(tmp_path):
    """A 0/1 mask saved as JPEG holds 0-3 (compression): in a 0/255 folder it trained as all background without a
    word (an own-data audit); it is refused, named, with the way out."""
    root = write_folder(tmp_path / "d", n=4)
    (root / "masks" / "im2.png").unlink()
    yy, xx = np.mgrid[:40, :56]
    disc = ((yy - 20) ** 2 + (xx - 28) ** 2 < 150).astype(np.uint8)
    Image.fromarray(disc).save(root / "masks" / "im2.jpg", quality=95)
    top = int(np.asarray(Image.open(root / "masks" / "im2.jpg")).max())
    assert 1 < top <= 127  # what JPEG does to a 0/1 mask
    with pytest.raises(fd.FolderDataError, match=rf"im2.jpg holds values 0-{top}, .* would train as all background: "
                                                 r"save 0/1 masks as PNG"):
        fd.scan(root)


def _voc_palette() -> list[int]:
    """PASCAL VOC's colour map (bit-interleaved class index: person 15 = 192,128,128, car 7 = 128,128,128)."""
    out = []
    for i in range(256):
        r = g = b = 0
        for j in range(8):
            r |= ((i >> 3 * j) & 1) << (7 - j)
            g |= ((i >> 3 * j + 1) & 1) << (7 - j)
            b |= ((i >> 3 * j + 2) & 1) << (7 - j)
        out += [r, g, b]
    return out


def _voc_mask(mask: np.ndarray, index: int = 15, border: bool = True) -> Image.Image:
    """A VOC-style mask: class `index` (15 = person) inside, 255 on its border, VOC's coloured palette."""
    fg = mask > 127
    edge = fg & ~np.pad(fg, 1)[2:, 1:-1] | fg & ~np.pad(fg, 1)[:-2, 1:-1]  # the object's top and bottom rows
    out = np.where(fg, index, 0).astype(np.uint8)
    if border:
        out[edge] = 255
    im = Image.fromarray(out, "P")
    im.putpalette(_voc_palette())
    return im


def test_voc_palette_masks_read_objects_as_foreground(tmp_path):
    """VOC masks (class indices in a coloured palette, 255 on object borders) without classes.txt: the borders'
    255 chose the 0/255 rule, so the objects (index 15) read as background and only their borders as foreground;
    and data.void_value=255, VOC's own meaning, was refused (an own-data audit). Every index but 0 is foreground;
    void_value=255 makes the borders void."""
    root = write_folder(tmp_path / "d", n=4)
    truth = []
    for path in sorted((root / "masks").iterdir()):
        mask = np.asarray(Image.open(path))
        truth.append(mask > 127)
        _voc_mask(mask).save(path)
    folder = fd.scan(root)
    for (_, m), fg in zip(folder.pairs["all"], truth, strict=True):
        assert ((fd.read_mask(m, folder.labels) == 1) == fg).all()  # borders included: they are the object's
    voided = fd.scan(root, void_value=255)
    for (_, m), fg in zip(voided.pairs["all"], truth, strict=True):
        label = fd.read_mask(m, voided.labels)
        border = np.asarray(Image.open(m)) == 255
        assert border.any() and (label[border] == 2).all() and (label[~border] == fg[~border]).all()


def test_voc_car_only_masks_and_gray_saved_indices(tmp_path):
    """VOC's car (index 7) is gray in its palette (128,128,128): a folder whose masks hold only cars, no border,
    was read as gray levels, and data.void_value=255 refused it as 0/255 masks (a review). VOC indices saved as
    gray levels ({0, 15, 255}) trained with only their borders as foreground: refused, named."""
    root = write_folder(tmp_path / "cars", n=4)
    truth = []
    for path in sorted((root / "masks").iterdir()):
        mask = np.asarray(Image.open(path))
        truth.append(mask > 127)
        _voc_mask(mask, index=7, border=False).save(path)
    folder = fd.scan(root, void_value=255)
    assert all(((fd.read_mask(m, folder.labels) == 1) == fg).all()
               for (_, m), fg in zip(folder.pairs["all"], truth, strict=True))
    root = write_folder(tmp_path / "gray", n=4)
    path = sorted((root / "masks").iterdir())[1]
    Image.fromarray(np.asarray(_voc_mask(np.asarray(Image.open(path))))).save(path)  # indices as an L image
    assert Image.open(path).mode == "L"
    with pytest.raises(fd.FolderDataError, match=r"im1.png holds 0, 15, 255: class indices saved as gray levels"):
        fd.scan(root)


def test_zero_one_masks_with_255_borders_are_refused_unless_255_is_void(tmp_path):
    """0/1 masks with 255 along each object's top edge (VOC's aeroplane, index 1, saved as gray levels; or 0/1 masks
    whose 255s mark unknown pixels) were read by the 0/255 rule: the edges alone trained as foreground, the objects
    as background, without a word. Refused like {0, 15, 255}, naming data.void_value=255, which reads them right."""
    root = write_folder(tmp_path / "d", n=4, value=1)
    for path in sorted((root / "masks").iterdir()):
        mask = np.asarray(Image.open(path)).copy()
        ys, xs = np.nonzero(mask)
        mask[ys.min(), xs.min():xs.max() + 1] = 255
        Image.fromarray(mask).save(path)
    with pytest.raises(fd.FolderDataError, match=r"im0.png holds 0, 1, 255: class indices saved as gray levels .*; a "
                                                 r"0/1 mask whose 255s mark unknown pixels trains with data.void_value=255$"):
        fd.scan(root)
    folder = fd.scan(root, void_value=255)
    raw = np.asarray(Image.open(root / "masks" / "im0.png"))
    label = fd.read_mask(root / "masks" / "im0.png", folder.labels)
    assert (raw == 1).sum() > 10 * (raw == 255).sum() > 0
    assert ((label == 1) == (raw == 1)).all() and ((label == 2) == (raw == 255)).all()


def test_void_value_255_takes_the_foreground_of_0_255_masks_and_is_refused_there(tmp_path):
    """Allowed for VOC's borders, void_value=255 would make a 0/255 mask's foreground void (its soft edges left as
    the only foreground); 0/1 masks with 255 as unknown keep it."""
    root = write_folder(tmp_path / "d", n=4)
    with pytest.raises(fd.FolderDataError, match=r"data.void_value=255 is the foreground of 0/255 masks: no mask in "
                                                 r".* has foreground left; mark unknown pixels with another value"):
        fd.scan(root, void_value=255)
    path = sorted((root / "masks").iterdir())[1]
    soft = np.asarray(Image.open(path)).copy()
    soft[np.nonzero(soft == 255)[0][0], np.nonzero(soft == 255)[1][0]] = 200  # a soft edge: the only foreground left
    Image.fromarray(soft).save(path)
    with pytest.raises(fd.FolderDataError, match=r"data.void_value=255 is the foreground of 0/255 masks such as "
                                                 r".*im1.png: mark unknown pixels with another value"):
        fd.scan(root, void_value=255)
    root = write_folder(tmp_path / "ok", n=4, value=1)
    path = sorted((root / "masks").iterdir())[0]
    mask = np.asarray(Image.open(path)).copy()
    mask[0] = 255
    Image.fromarray(mask).save(path)
    folder = fd.scan(root, void_value=255)
    label = fd.read_mask(path, folder.labels)
    assert folder.labels.zero_one and (label[0] == 2).all() and (label[1:] == mask[1:]).all()


def test_soft_edged_0_255_masks_stay_binary_and_gray_saved_indices_up_to_20_are_refused(tmp_path):
    """The gray-saved-indices rule ({0, 15, 255}) must not take a 0/255 mask whose few soft-edge pixels are small
    values (it would refuse a good folder), and must reach every VOC index (20 = tvmonitor: 0/20/255 masks trained
    with only their borders as foreground)."""
    root = write_folder(tmp_path / "soft", n=4)
    path = sorted((root / "masks").iterdir())[2]
    mask = np.asarray(Image.open(path)).copy()
    edge = np.argwhere(mask == 255)[:3]
    mask[edge[:, 0], edge[:, 1] - 1] = 20  # three soft-edge pixels just left of the object
    Image.fromarray(mask).save(path)
    folder = fd.scan(root)
    assert ((fd.read_mask(path, folder.labels) == 1) == (mask > 127)).all()
    root = write_folder(tmp_path / "tv", n=4)
    path = sorted((root / "masks").iterdir())[0]
    Image.fromarray(np.asarray(_voc_mask(np.asarray(Image.open(path)), index=20))).save(path)  # as an L image
    with pytest.raises(fd.FolderDataError, match=r"im0.png holds 0, 20, 255: class indices saved as gray levels"):
        fd.scan(root)


def test_a_mask_drawn_in_mid_gray_127_in_a_0_255_folder_is_refused(tmp_path):
    """A mask whose foreground is 127 (one step below the 0/255 rule's > 127) reads as all background: refused,
    named, like any 2-127 mask beside 0/255 ones."""
    root = write_folder(tmp_path / "d", n=4)
    path = sorted((root / "masks").iterdir())[3]
    Image.fromarray(np.asarray(Image.open(path)) // 2).save(path)  # 0/127
    with pytest.raises(fd.FolderDataError, match=r"im3.png holds values 0-127, neither a 0/1 mask nor a 0/255 one"):
        fd.scan(root)


def test_void_value_255_names_a_0_255_mask_whose_soft_edges_are_below_128(tmp_path):
    """void_value=255 on 0/255 masks whose anti-aliased edges are low (1-127) must name the mask it empties, as it
    does for edges above 127, not fall through to a folder-wide message."""
    root = write_folder(tmp_path / "d", n=4)
    path = sorted((root / "masks").iterdir())[1]
    soft = np.asarray(Image.open(path)).copy()
    soft[np.nonzero(soft == 255)[0][0], np.nonzero(soft == 255)[1][0]] = 100
    Image.fromarray(soft).save(path)
    with pytest.raises(fd.FolderDataError, match=r"data.void_value=255 is the foreground of 0/255 masks such as "
                                                 r".*im1.png: mark unknown pixels with another value"):
        fd.scan(root, void_value=255)


def test_a_low_valued_gray_mask_beside_voc_palette_masks_is_refused(tmp_path):
    """VOC palette masks have foreground by their own rule; a gray mask beside them holding a class index (0/5,
    its palette lost on a re-save) would train as all background. It is refused, named, as it is beside 0/255 or
    0/1 masks."""
    root = write_folder(tmp_path / "d", n=4)
    for path in sorted((root / "masks").iterdir()):
        _voc_mask(np.asarray(Image.open(path))).save(path)
    path = root / "masks" / "im2.png"
    Image.fromarray(np.where(np.asarray(Image.open(path)) == 15, 5, 0).astype(np.uint8)).save(path)  # L, 0/5
    with pytest.raises(fd.FolderDataError, match=r"im2.png holds values 0-5, neither a 0/1 mask nor a 0/255 one"):
        fd.scan(root)


def test_voc_palette_masks_whose_objects_are_all_void_have_no_foreground(tmp_path):
    """With data.void_value=255, a VOC palette mask holding only background and 255 (void) has no foreground: a
    folder of such masks is refused, not trained as all background because its raw values were non-zero."""
    root = write_folder(tmp_path / "d", n=4)
    for path in sorted((root / "masks").iterdir()):
        _voc_mask(np.asarray(Image.open(path)), index=255).save(path)
    with pytest.raises(fd.FolderDataError, match=r"^no mask in .* has foreground: binary masks mark it"):
        fd.scan(root, void_value=255)  # not "the foreground of 0/255 masks": it has none
    assert fd.scan(root).pairs["all"]  # without the void value the 255s are objects (foreground)


def test_16bit_images_train_as_they_look(tmp_path):
    """convert("RGB") clipped 16-bit PNGs to white: a remover trained on them learnt nothing (val IoU 0.000)
    while predict, decoding them right, scored 0.375. Training decodes images as the predictor does now."""
    from bgremover.remover import to_rgba_arrays

    root = write_folder(tmp_path / "d", n=3)
    for p in sorted((root / "images").iterdir()):
        gray = np.asarray(Image.open(p).convert("L")).astype(np.uint16) * 257
        Image.fromarray(gray).save(p.with_suffix(".png"))  # a 16-bit grayscale PNG ("I;16")
        p.unlink()
        image = fd.read_image(p.with_suffix(".png"))
        assert Image.open(p.with_suffix(".png")).mode.startswith("I")
        np.testing.assert_array_equal(image, to_rgba_arrays(Image.open(p.with_suffix(".png")))[0])
        assert 60 < image.mean() < 200 and image.flags.writeable


def test_photos_past_pils_pixel_ceiling_train_and_are_scored(tmp_path, monkeypatch):
    """A 200 Mpx phone photo (16320x12240, past PIL's ~179 Mpx ceiling) was refused as "unreadable or truncated
    mask", 90-179 Mpx ones warned of a "decompression bomb DOS attack"; a held-out photo over the predictor's
    64 Mpx guard failed `make remover`'s scoring after the whole training ("raise --max-pixels", an option
    eval-cutout has not). Both limits are lowered here below the 40x56 pairs, as Pillow's ceiling is for such files."""
    import warnings

    root = write_folder(tmp_path / "d", n=4)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2240 px: past 2x the ceiling, PIL's error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning (1x-2x the ceiling) is an error here
        found = fd.scan(root)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 1x-2x: PIL's warning, in every worker
        image, label = fd.read_pair(*found.pairs["all"][0], found.labels, draft_side=48)
    assert image.shape == (40, 56, 3) and label.shape == (40, 56) and label.max() == 1
    assert Image.MAX_IMAGE_PIXELS == 2000  # PIL's own limit is left as it was
    remover = cutout_eval.load_remover(SHIPPED_ONNX)
    remover.max_pixels = 1000  # the predictor's guard, below these images
    result = cutout_eval.evaluate(remover, found.pairs["all"][:1], read_label=lambda p: fd.read_mask(p, found.labels))
    assert result["n_images"] == 1 and 0.0 <= result["pixel_accuracy"] <= 1.0  # scored, whatever the net says


def test_classes_txt_indexed_masks_and_foreground(tmp_path):
    write_folder(tmp_path / "d", value=2)
    (tmp_path / "d" / "classes.txt").write_text("background\ncat\ndog\n")
    f = fd.scan(tmp_path / "d")
    assert f.labels.classes == ("background", "cat", "dog") and not f.labels.binary
    assert f.labels.foreground() == ["cat", "dog"] and f.labels.foreground(["DOG"]) == ["dog"]
    label = fd.read_mask(f.pairs["all"][0][1], f.labels)
    assert set(np.unique(label)) == {0, 2}


def test_a_label_one_past_the_class_list_is_refused_not_read_as_void(tmp_path):
    """With 3 classes the void index is 3: a mask holding 3 (a fourth class the list forgot) must be refused like
    any value beyond the list, not silently left out of loss and metrics; and data.void_value=2, the last class's
    index, is refused as for any class."""
    write_folder(tmp_path / "d", value=3)
    (tmp_path / "d" / "classes.txt").write_text("background\ncat\ndog\n")
    with pytest.raises(fd.FolderDataError, match=r"label beyond the class list: .*im0.png contains 3, but classes.txt "
                                                 r"lists 3 classes \(0-2\)"):
        fd.scan(tmp_path / "d")
    with pytest.raises(fd.FolderDataError, match=r"data.void_value=2 is the index of class 'dog'"):
        fd.read_labels(tmp_path / "d", void_value=2)


def test_class_lists_and_void_values_that_cannot_label_a_mask_are_refused(tmp_path):
    """classes.txt: blank lines (an editor's trailing ones) are no classes; one class is no segmentation; a class
    listed twice is refused. Binary masks: void_value 0 or 1 is a 0/1 mask's own value."""
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n\n\n")
    assert fd.read_labels(tmp_path).classes == ("background", "cat", "dog")
    (tmp_path / "classes.txt").write_text("background\n")
    with pytest.raises(fd.FolderDataError, match=r"lists 1 class\(es\): a segmentation needs at least 2"):
        fd.read_labels(tmp_path)
    (tmp_path / "classes.txt").write_text("background\ncat\ncat\n")
    with pytest.raises(fd.FolderDataError, match=r"lists 'cat' twice"):
        fd.read_labels(tmp_path)
    (tmp_path / "classes.txt").unlink()
    for value in (0, 1):
        with pytest.raises(fd.FolderDataError, match=rf"data.void_value={value} is a binary mask's own value"):
            fd.read_labels(tmp_path, void_value=value)


def test_classes_txt_gives_the_net_its_outputs_and_foreground(tmp_path):
    from bgremover.train import build

    write_folder(tmp_path / "d", value=2)
    (tmp_path / "d" / "classes.txt").write_text("background\ncat\ndog\n")
    cfg = compose_cfg(tmp_path / "run", ["data=folder", f"data.root={tmp_path / 'd'}", *FAST, "data.foreground=[dog]"])
    checks.validate_train(cfg)
    model = build(cfg)["model"]
    assert model.net.segmentation_head[0].out_channels == 3 and model.hparams.ignore_index == 3
    assert model.hparams.default_foreground == ["dog"] and model.cutout["val_"].foreground == [2]
    assert model.export_meta()["classes"] == ["background", "cat", "dog"]


# --- splits ------------------------------------------------------------------------------------------------------
def test_seeded_split_is_reproducible_disjoint_and_reusable(tmp_path):
    write_folder(tmp_path / "d", n=20)
    f = fd.scan(tmp_path / "d")
    a, b = fd.splits(f, seed=3), fd.splits(f, seed=3)
    stems = {s: [i.stem for i, _ in a[s]] for s in fd.SPLITS}
    assert stems == {s: [i.stem for i, _ in b[s]] for s in fd.SPLITS}
    assert [len(stems[s]) for s in fd.SPLITS] == [16, 2, 2]
    assert len(set().union(*stems.values())) == 20
    assert {i.stem for i, _ in fd.splits(f, seed=4)["test"]} != set(stems["test"])  # the seed matters
    path = tmp_path / "split.json"
    fd.write_split(path, fd.split_document(f, a, fd.DEFAULT_FRACTIONS, 3))
    reused = fd.splits(f, seed=99, split_file=path)  # the file wins over the seed
    assert {s: [i.stem for i, _ in reused[s]] for s in fd.SPLITS} == stems


def test_split_sizes_are_the_shares_rounded_to_the_nearest_image():
    """12 images at 0.6/0.3/0.1 are 7.2/3.6/1.2: 7 train, 4 val, 1 test. 6 at equal shares are 2/2/2 (train keeps
    its 2); 5 at equal shares would leave train 1, so val and test take one each."""
    stems = [f"s{i:02d}" for i in range(12)]
    drawn = fd.draw_split(stems, (0.6, 0.3, 0.1), seed=0)
    assert [len(drawn[s]) for s in fd.SPLITS] == [7, 4, 1]
    assert sorted(drawn["train"] + drawn["val"] + drawn["test"]) == stems  # each image once
    assert [len(fd.draw_split(stems[:6], (1, 1, 1), seed=0)[s]) for s in fd.SPLITS] == [2, 2, 2]
    assert [len(fd.draw_split(stems[:5], (1, 1, 1), seed=0)[s]) for s in fd.SPLITS] == [3, 1, 1]


def test_train_keeps_its_only_image_with_foreground():
    """val and test are given an image with foreground from train while train keeps one: with one alone there, the
    draw stays as it was (the val check then says so before training)."""
    stems = ["a", "b", "c", "d"]
    plain = fd.draw_split(stems, fd.DEFAULT_FRACTIONS, seed=0)
    kept = plain["train"][0]
    drawn = fd.draw_split(stems, fd.DEFAULT_FRACTIONS, seed=0, empty=set(stems) - {kept})
    assert drawn == plain and kept in drawn["train"]


def test_a_split_file_that_cannot_be_written_leaves_nothing_behind(tmp_path, monkeypatch):
    """split.json is written through bgremover.files like every output: a failed write (a full disk) left a hidden
    `.split.json.<pid>.tmp` in the run folder, one per attempt; the old split.json stays as it was."""
    import os

    write_folder(tmp_path / "d", n=20)
    f = fd.scan(tmp_path / "d")
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.json").write_text("old\n")

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        fd.write_split(run / "split.json", fd.split_document(f, fd.splits(f, seed=3), fd.DEFAULT_FRACTIONS, 3))
    assert sorted(p.name for p in run.iterdir()) == ["split.json"] and (run / "split.json").read_text() == "old\n"


def test_the_split_is_said_before_training(tmp_path, caplog):
    """How many of the user's images train and how many are held out was written to split.json and said nowhere:
    `make remover` on 8 pairs printed "1 step" per epoch and, at the end, a score of "1 image"."""
    from bgremover.data.folder_datamodule import FolderDataModule

    root = write_folder(tmp_path / "d", n=8)
    out = tmp_path / "run" / "split.json"
    with caplog.at_level("INFO", logger="bgremover.train"):
        fitted = FolderDataModule(str(root), split_out=str(out), seed=3, limit_images=4)
        fitted.prepare_data()
        fitted.prepare_data()  # the test stage's: said once
        FolderDataModule(str(root), split_file=str(out)).prepare_data()
    drawn, reused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("split of ")]
    written = json.loads(out.read_text())
    assert [len(written[s]) for s in fd.SPLITS] == [6, 1, 1]
    assert drawn == (f"split of {root}: 6 train (training on 4: data.limit_images=4), 1 val, 1 test images "
                     f"(drawn with seed 3, shares [0.8, 0.1, 0.1]), written to {out}")
    assert reused == f"split of {root}: 6 train, 1 val, 1 test images (data.split_file={out})"


def test_a_background_only_image_is_not_the_whole_val_split(tmp_path):
    """8 pairs, one a background-only image (a negative example) that the seeded draw made the whole val split:
    val foreground IoU was 0.000 every epoch, so the best epoch stayed the first and make remover exported epoch
    0's weights. The draw now gives val and test an image with foreground; a split file or fixed val/ of only
    background-only masks is refused before training."""
    root = write_folder(tmp_path / "d", n=8)
    stems = [f"im{i}" for i in range(8)]
    seed = next(s for s in range(50) if len(fd.draw_split(stems, fd.DEFAULT_FRACTIONS, s)["val"]) == 1)
    val = fd.draw_split(stems, fd.DEFAULT_FRACTIONS, seed)["val"][0]  # the image the draw puts alone in val
    Image.fromarray(np.zeros((40, 56), np.uint8)).save(root / "masks" / f"{val}.png")
    found = fd.scan(root)
    chosen = fd.splits(found, seed=seed)
    for split in ("val", "test"):
        assert all(fd.read_mask(mask, found.labels).any() for _, mask in chosen[split]), split
    assert found.empty == {root.resolve() / "masks" / f"{val}.png"}
    assert val in [img.stem for img, _ in chosen["train"]] and len(chosen["train"]) == 6
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps({"train": [s for s in stems if s not in (val, "im7" if val != "im7" else "im6")],
                               "val": [val], "test": ["im7" if val != "im7" else "im6"]}))
    with pytest.raises(fd.FolderDataError, match=rf"^the val split of {bad} holds no foreground: its 1 mask "
                                                 rf"\({val}.png\) is all background; .* first epoch would be kept"):
        fd.check_config(OmegaConf.create({"root": str(root), "split_file": str(bad)}))
    fd.check_config(OmegaConf.create({"root": str(root), "split_file": str(bad)}), splits_needed=("test",))


def test_fixed_splits_are_used_as_they_are(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        write_folder(tmp_path / "d", n=n, split=split)
    f = fd.scan(tmp_path / "d")
    chosen = fd.splits(f, seed=0)
    assert f.fixed and [len(chosen[s]) for s in fd.SPLITS] == [4, 2, 3]
    assert all(img.parent.parent.name == s for s in fd.SPLITS for img, _ in chosen[s])


def test_images_are_scaled_by_their_long_side_and_masks_by_nearest_neighbour():
    """data.image_size=48 on a 47x100 image: the long side (100) becomes 48, the short one 47*0.48 = 22.56 -> 23
    (portrait too); null keeps the size. A mask scaled up keeps its values (nearest): 0 beside 2 (void) never
    becomes a 1, a class the mask did not hold."""
    assert fd.resized_shape(47, 100, 48) == (23, 48) and fd.resized_shape(100, 47, 48) == (48, 23)
    assert fd.resized_shape(47, 100, None) == (47, 100)
    label = np.array([[0, 2], [2, 0]], np.uint8)
    image, scaled = fd.resize_pair(np.zeros((2, 2, 3), np.uint8), label, (4, 4))
    assert image.shape == (4, 4, 3) and (scaled == np.kron(label, np.ones((2, 2), np.uint8))).all()


def _fixed_folder(root: Path, masks: dict[str, list[np.ndarray]]) -> Path:
    """root/{split}/images + masks: one noise image per mask given, named i0, i1, ..."""
    rng = np.random.default_rng(0)
    for split, split_masks in masks.items():
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for i, mask in enumerate(split_masks):
            Image.fromarray(rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)).save(root / split / "images" / f"i{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"i{i}.png")
    return root


def test_folder_loaders_flip_train_only_scale_val_and_trim_train_only(tmp_path):
    """Masks whose left quarter is foreground, hflip=1 (every train image mirrored), image_size=28: a val image is
    not mirrored, is scaled to 20x28 (40x56 by its long side) and padded to 32x32 (6 rows above, 2 columns left),
    so its foreground is columns 2-8 of rows 6-25. limit_images=2 trims train (one batch of 2, not dropped as
    short of batch_size 8: that left no step at all) and never val/test; limit_eval_images trims those."""
    from bgremover.data.folder_datamodule import FolderDataModule

    left = np.zeros((40, 56), np.uint8)
    left[:, :14] = 255
    root = _fixed_folder(tmp_path / "d", {"train": [left] * 3, "val": [left] * 3, "test": [left] * 2})
    kw = {"batch_size": 8, "num_workers": 0, "image_size": 28, "crop_size": None, "hflip": 1.0, "split_out": None}
    dm = FolderDataModule(str(root), limit_images=2, **kw)
    dm.setup("fit")
    assert [len(dm.datasets[s]) for s in ("train", "val")] == [2, 3] and len(dm.train_dataloader()) == 1
    _, y = next(iter(dm.val_dataloader()))
    want = torch.zeros(32, 32, dtype=torch.long)
    want[:6], want[26:], want[:, :2], want[:, 30:] = 2, 2, 2, 2  # void padding
    want[6:26, 2:9] = 1
    assert torch.equal(y[0], want)
    _, y = next(iter(dm.train_dataloader()))
    assert (y[:, 6:26, 23:30] == 1).all() and (y[:, 6:26, 2:23] == 0).all()  # train is mirrored
    trimmed = FolderDataModule(str(root), limit_eval_images=1, **kw)
    trimmed.setup("fit")
    trimmed.setup("test")
    assert [len(trimmed.datasets[s]) for s in fd.SPLITS] == [3, 1, 1]


def test_a_ddp_ranks_share_smaller_than_a_batch_trains_as_one_short_batch(tmp_path):
    """Under DDP each rank trains its share of the train split (len // world frames), but a short last batch was
    dropped when the whole split filled a batch: 16 images on 2 ranks with data.batch_size=9 trained no step
    ("training took no step: the train split fills no batch", of a split that fills one). Each rank's share is a
    short batch now, as a one-process split smaller than a batch is; a share of one image (BatchNorm) is refused."""
    from types import SimpleNamespace

    from bgremover.data.folder_datamodule import FolderDataModule

    root = _fixed_folder(tmp_path / "d", {"train": [np.full((20, 28), 255, np.uint8)] * 16,
                                          "val": [np.full((20, 28), 255, np.uint8)] * 2,
                                          "test": [np.full((20, 28), 255, np.uint8)]})
    kw = {"batch_size": 9, "num_workers": 0, "image_size": 28, "crop_size": [16, 16], "split_out": None}

    def batches(world: int, rank: int = 0, **more) -> list[int]:
        dm = FolderDataModule(str(root), **kw, **more)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=0)  # what the loader reads
        return [len(y) for _, y in dm.train_dataloader()]

    assert batches(1) == [9]  # one process: the short last batch of 7 dropped, as before
    assert batches(2, 0) == batches(2, 1) == [8]  # each rank's 8 frames: one batch each (none before)
    with pytest.raises(fd.FolderDataError, match=r"^the train split holds 3 image/mask pairs: 2 DDP processes get "
                                                 r"1 each, and BatchNorm cannot train on one image; give at least 4 "
                                                 r"train images or fewer trainer.devices$"):
        batches(2, limit_images=3)


def test_folder_val_images_of_different_sizes_are_evaluated_one_at_a_time(tmp_path):
    """data.eval_batch_size=4 with val images that pad to 32x64 and 64x32: they cannot be stacked (a collate error
    at the first validation), so they come one per batch, each whole."""
    from bgremover.data.folder_datamodule import FolderDataModule

    wide, tall = np.full((20, 50), 255, np.uint8), np.full((50, 20), 255, np.uint8)
    root = _fixed_folder(tmp_path / "d", {"train": [wide, wide], "val": [wide, tall], "test": [wide]})
    dm = FolderDataModule(str(root), image_size=None, eval_batch_size=4, num_workers=0, split_out=None)
    assert sorted(tuple(y.shape) for _, y in dm.val_dataloader()) == [(1, 32, 64), (1, 64, 32)]


def test_whole_image_training_needs_one_train_size_and_val_may_hold_a_background_only_image(tmp_path):
    """data.crop_size=null stacks whole train images, so they must share one size after data.image_size: 40x56 and
    40x60 do not (refused before training), 40x56 and 80x112 both become 20x28 and do. A val split holding a
    background-only image beside one with foreground is fine (only an all-background val split is refused)."""
    def mask(h, w, fg=True):
        m = np.zeros((h, w), np.uint8)
        m[h // 4: h // 2, w // 4: w // 2] = 255 if fg else 0
        return m

    root = _fixed_folder(tmp_path / "d", {"train": [mask(40, 56), mask(40, 60)],
                                          "val": [mask(40, 56), mask(40, 56, fg=False)], "test": [mask(40, 56)]})
    whole = {"root": str(root), "crop_size": None, "image_size": 28}
    with pytest.raises(fd.FolderDataError, match=r"data.crop_size=null trains on whole images, which then must share "
                                                 r"one size; 2 sizes found"):
        fd.check_config(OmegaConf.create(whole))
    Image.fromarray(mask(80, 112)).save(root / "train" / "masks" / "i1.png")
    Image.fromarray(np.zeros((80, 112, 3), np.uint8)).save(root / "train" / "images" / "i1.png")
    fd.check_config(OmegaConf.create(whole))
    fd.check_config(OmegaConf.create({**whole, "crop_size": [32, 32], "image_size": None}))


def test_folder_class_weights_are_median_frequency_over_the_train_masks_void_left_out(tmp_path):
    """data.class_weights=median_freq by hand. Train: mask a has a 4x4 foreground block and a void row (8 px) in
    8x8, mask b is background. Background: 40 + 64 px over 56 + 64 non-void px of the images holding it = 104/120;
    foreground 16/56. Median of two = their mean; weight = median / freq: 0.6648 and 2.0167. The val mask (all
    foreground) is not counted."""
    from bgremover.data.folder_datamodule import FolderDataModule

    a = np.zeros((8, 8), np.uint8)
    a[2:6, 2:6] = 255
    a[7] = 128
    b = np.zeros((8, 8), np.uint8)
    root = _fixed_folder(tmp_path / "d", {"train": [a, b], "val": [np.full((8, 8), 255, np.uint8)], "test": [a]})
    dm = FolderDataModule(str(root), void_value=128, class_weights="median_freq", num_workers=0, split_out=None)
    bg, fg = 104 / 120, 16 / 56
    median = (bg + fg) / 2
    assert dm.class_weights().tolist() == pytest.approx([median / bg, median / fg], abs=1e-4)


def test_same_file_name_in_two_splits_keeps_each_its_size(tmp_path):
    from bgremover.data.folder_datamodule import FolderDataModule

    rng = np.random.default_rng(0)
    for split, size in (("train", (40, 56)), ("val", (40, 56)), ("test", (32, 32))):
        for sub in ("images", "masks"):
            (tmp_path / "d" / split / sub).mkdir(parents=True)
        for name in ("a", "b"):
            img, mask = square_pair(rng, *size)
            Image.fromarray(img).save(tmp_path / "d" / split / "images" / f"{name}.png")
            Image.fromarray(mask).save(tmp_path / "d" / split / "masks" / f"{name}.png")
    dm = FolderDataModule(str(tmp_path / "d"), image_size=None, num_workers=0, split_out=None)
    dm.setup()
    assert dm.datasets["train"].shapes == [(40, 56)] * 2 and dm.datasets["test"].shapes == [(32, 32)] * 2
    x, y = dm.datasets["test"][0]
    assert tuple(x.shape) == (3, 32, 32) and tuple(y.shape) == (32, 32)


# --- every bad pair: one line naming the file, before anything is built ---------------------------------------------
def _bad(tmp_path, case: str) -> tuple[Path, str]:
    root = write_folder(tmp_path / "bad", n=4)
    masks, images = root / "masks", root / "images"
    if case == "no_mask":
        (masks / "im2.png").unlink()
        return root, "image has no mask: " + str(images / "im2.jpg")
    if case == "no_image":
        (images / "im1.jpg").unlink()
        return root, "mask has no image: " + str(masks / "im1.png")
    if case == "size":
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(masks / "im3.png")
        return root, f"size mismatch: {images / 'im3.jpg'} is 56x40 but its mask {masks / 'im3.png'} is 40x40"
    if case == "truncated":
        data = (images / "im0.jpg").read_bytes()
        (images / "im0.jpg").write_bytes(data[: len(data) // 2])
        return root, f"unreadable or truncated image: {images / 'im0.jpg'}"
    if case == "not_image":
        (masks / "im1.png").write_text("hello")
        return root, f"unreadable or truncated mask: {masks / 'im1.png'}"
    if case == "beyond_classes":
        (root / "classes.txt").write_text("background\nthing\n")
        return root, f"label beyond the class list: {masks / 'im0.png'} contains 255"
    if case == "empty":
        for p in [*images.iterdir(), *masks.iterdir()]:
            p.unlink()
        return root, f"empty folder: no images in {images}"
    if case == "layout":
        return tmp_path / "nowhere", "dataset folder not found"
    if case == "file":  # was "dataset folder not found" for a path that exists
        return images / "im0.jpg", f"not a folder: {images / 'im0.jpg'} (a dataset folder holds images/ and masks/"
    if case == "nested":  # its pairs were skipped without a word
        (images / "sub").mkdir()
        (images / "im3.jpg").rename(images / "sub" / "im3.jpg")
        return root, f"a folder inside {images}: {images / 'sub'} (images sit directly in images/; sub-folders"
    if case == "nested_split":  # moved up as the line said, train and val pairs lost their split
        (images / "train").mkdir()
        return root, (f"a folder inside {images}: {images / 'train'} (images sit directly in images/; fixed splits "
                      f"are laid out as {root}/train/images + train/masks, and the same for val/ and test/)")
    if case == "both_layouts":  # the pooled pairs were ignored
        write_folder(root, n=1, split="train")
        return root, f"{root} holds both layouts: images/ and masks/, and train/; keep one"
    if case == "three":  # split 1/1/1: training then failed mid-run inside BatchNorm ("Expected more than 1 value")
        (images / "im3.jpg").unlink()
        (masks / "im3.png").unlink()
        return root, "3 image/mask pairs: a train/val/test split needs at least 4 (2 to train on, 1 to validate"
    if case == "one_train":
        fixed = tmp_path / "fixed"
        for split, n in (("train", 1), ("val", 1), ("test", 1)):
            write_folder(fixed, n=n, split=split)
        return fixed, f"the train split of {fixed} holds 1 image/mask pair: training needs at least 2 (BatchNorm"
    raise AssertionError(case)


BAD_CASES = ["no_mask", "no_image", "size", "truncated", "not_image", "beyond_classes", "empty", "layout", "file",
             "three", "one_train", "nested", "nested_split", "both_layouts"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_folder_fails_config_check_naming_the_file(tmp_path, case):
    root, expected = _bad(tmp_path, case)
    cfg = compose_cfg(tmp_path / "run", ["data=folder", f"data.root={root}", *FAST])
    with pytest.raises(fd.FolderDataError) as err:
        checks.validate_train(cfg)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_images_without_masks_are_counted(tmp_path):
    """A folder labelled half-way by another tool (3 of 6 images without a mask) was refused one image a run,
    "image has no mask: im1.jpg", then im3, then im5: the line says how many there are now."""
    root = write_folder(tmp_path / "d", n=6)
    for i in (1, 3, 5):
        (root / "masks" / f"im{i}.png").unlink()
    with pytest.raises(fd.FolderDataError) as err:
        fd.scan(root)
    assert str(err.value) == (f"image has no mask: {root / 'images' / 'im1.jpg'} (expected {root / 'masks'}/im1.png; "
                              f"3 such images of 6 in {root / 'images'})")


def test_folder_data_without_a_root_says_to_set_it(tmp_path):
    """data=folder without data.root (its config's null): one line saying what to give, not a scan of the
    folder the command was started in."""
    for root in ([], ["data.root=''"]):
        with pytest.raises(UserError) as err:
            checks.validate_train(compose_cfg(tmp_path / "run", ["data=folder", *root, *FAST]))
        assert str(err.value) == "data.root is not set: data=folder data.root=path/to/your/folder"


def test_limit_images_below_two_train_pairs_is_refused_up_front(folder, tmp_path):
    """data.limit_images=1 passed the two-pair minimum (counted before the limit) and the run then failed in
    BatchNorm at its first step ("Expected more than 1 value per channel"), an own-data audit found."""
    cfg = compose_cfg(tmp_path / "run", ["data=folder", f"data.root={folder}", *FAST, "data.limit_images=1"])
    with pytest.raises(fd.FolderDataError, match=r"^the train split of .* holds 1 image/mask pair with "
                                                 r"data.limit_images=1: training needs at least 2 \(BatchNorm"):
        checks.validate_train(cfg)
    checks.validate_train(compose_cfg(tmp_path / "run2", ["data=folder", f"data.root={folder}", *FAST,
                                                          "data.limit_images=2"]))


def test_bad_folder_cli_one_error_line_no_run_left(tmp_path):
    root, expected = _bad(tmp_path, "size")
    proc = subprocess.run([sys.executable, "-m", "bgremover.train", "data=folder", f"data.root={root}",
                           f"paths.log_dir={tmp_path / 'logs'}", *FAST],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and errors == [f"error: {expected}"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "logs").exists()  # no run left, nor the folders made for it


# --- training, export, predict, eval-cutout -----------------------------------------------------------------------
def test_binary_training_logs_cutout_metrics_exports_and_predicts(folder, tmp_path):
    from bgremover.train import train

    run = tmp_path / "run"
    cfg = compose_cfg(run, ["data=folder", f"data.root={folder}", *FAST, "trainer.max_epochs=2",
                            "data.void_value=128"])
    metrics, objects = train(cfg)
    model = objects["model"]
    assert model.hparams.class_names == ["background", "foreground"] and model.hparams.ignore_index == 2
    assert model.net.segmentation_head[0].out_channels == 2
    for stage in ("val", "test"):
        assert 0.0 <= metrics[f"{stage}/fg_iou"] <= 1.0 and 0.0 <= metrics[f"{stage}/alpha_mae"] <= 1.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_split"] == {"frames": 1, "of": 1, "complete": True}
    assert len(summary["history"]["val/fg_iou"]) == 2  # per epoch, in summary.json (and the loggers)
    csv = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert all(k in csv for k in ("val/fg_iou", "val/boundary_f", "val/alpha_mae", "test/fg_iou"))
    split = json.loads((run / "split.json").read_text())
    assert [len(split[s]) for s in fd.SPLITS] == [4, 1, 1] and split["void_value"] == 128

    from bgremover.export import export_onnx, load_checkpoint_net, read_metadata
    from bgremover.remover import BackgroundRemover

    net, meta = load_checkpoint_net(summary["best_ckpt"])
    out = export_onnx(net, meta, tmp_path / "remover.onnx")["path"]
    md = read_metadata(out)
    assert md["classes"] == ["background", "foreground"] and md["default_foreground"] == ["foreground"]
    # the model says the scale it was trained at (data.image_size=48), and the predictor infers there by default
    assert md["image_size"] == 48 and BackgroundRemover(out).max_side == 48
    assert BackgroundRemover(out, max_side=500).max_side == 500
    rgb = np.asarray(Image.open(next((folder / "images").iterdir())))
    assert max(rgb.shape[:2]) > 48  # so the downscaled inference (and eval-cutout's rescaling below) is exercised
    alpha = np.asarray(BackgroundRemover(out).mask(rgb))
    assert alpha.shape == rgb.shape[:2] and alpha.dtype == np.uint8

    # `eval` without data.image_size scores the checkpoint at its training scale: the test stage's number
    from bgremover.eval import evaluate

    ecfg = compose_cfg(tmp_path / "eval", ["data=folder", f"data.root={folder}", "data.num_workers=0",
                                           "data.void_value=128", f"data.split_file={run / 'split.json'}",
                                           f"ckpt_path={summary['best_ckpt']}"], config_name="eval")
    emetrics, _ = evaluate(ecfg)
    assert ecfg.data.image_size == 48
    assert emetrics["test/fg_iou"] == pytest.approx(metrics["test/fg_iou"], abs=1e-6)

    from bgremover import cutout_eval as ce

    js = tmp_path / "eval.json"
    assert ce.main(["--model", str(out), "--data-root", str(folder), "--split-file", str(run / "split.json"),
                    "--json", str(js), "--quiet"]) == 0
    r = json.loads(js.read_text())
    assert r["max_side"] == 48  # scored as predict runs the model: at its training scale
    assert r["n_images"] == 1 and r["foreground"] == ["foreground"] and r["per_image"][0]["image"] == split["test"][0] + ".jpg"


def test_a_folder_checkpoint_tested_on_camvid_names_its_own_data(folder, small_camvid, tmp_path):
    """`make eval CKPT=<a make remover run's checkpoint>` (no data= override: CamVid) scored the 2-class net
    against CamVid's labels and failed in torch's words, "error: IndexError: Target 11 is out of bounds", after
    loading the data and starting the test loop. One line now: the classes on each side and the command that
    evaluates it on its own folder."""
    from bgremover.train import train

    run = tmp_path / "run"
    train(compose_cfg(run, ["data=folder", f"data.root={folder}", *FAST, "trainer.max_epochs=1", "test=false"]))
    best = json.loads((run / "summary.json").read_text())["best_ckpt"]
    line = (f"error: checkpoint {best} segments background, foreground, but the data's classes are Sky, Building, "
            "Pole, Road, Sidewalk, Tree, SignSymbol, Fence, Car, Pedestrian, Bicyclist: use it on its own folder, "
            f'ARGS="data=folder data.root={folder.resolve()}"')
    # make eval, and train=false ckpt_path=X (which tests X; it said "RuntimeError: Error(s) in loading state_dict")
    for module, *args in (("bgremover.eval",), ("bgremover.train", "train=false", "logger=csv", "measure_inference=false")):
        proc = subprocess.run([sys.executable, "-m", module, *args, f"ckpt_path={best}", f"data.root={small_camvid}",
                               "data.num_workers=0", f"hydra.run.dir={tmp_path / module}"],
                              capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == line, module



def test_a_folder_checkpoint_where_no_camvid_is_names_its_folder_not_the_download(tmp_path):
    """`make eval CKPT=<a make remover run's checkpoint>` without data=folder, on a machine without CamVid (a
    remover's user has none), said "dataset folder not found: data/CamVid (run `make data` to download CamVid there,
    ...)": a download for a net that segments no CamVid class, where the README promises the data to give it named.
    Its folder is named now, in the config checks (no run folder left), quoted so that a folder with a space is one
    word; a CamVid run's checkpoint still gets the download hint."""
    def run_with(data: dict) -> Path:
        run = tmp_path / data["_target_"].rsplit(".", 1)[-1]
        (run / "checkpoints").mkdir(parents=True)
        torch.save({"state_dict": {}}, run / "checkpoints" / "epoch_000.ckpt")
        (run / "summary.json").write_text(json.dumps({"status": "ok", "config": {"data": data}}))
        return run / "checkpoints" / "epoch_000.ckpt"

    mine = tmp_path / "my folder"
    folder_ckpt = run_with({"_target_": "bgremover.data.FolderDataModule", "root": str(mine)})
    camvid_ckpt = run_with({"_target_": "bgremover.data.CamVidDataModule", "root": "data/CamVid"})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    folder_hint = (f"checkpoint {folder_ckpt} was trained on an image/mask folder: use it on its own folder, "
                   f"ARGS=\"data=folder data.root='{mine}'\"")
    for ckpt, hint in ((folder_ckpt, folder_hint),
                       (camvid_ckpt, "run `make data` to download CamVid there, or point DATA_DIR (or data.root) at a "
                                     "copy")):
        # make eval CKPT=X, and train=false ckpt_path=X (which tests X)
        for module, *args in (("bgremover.eval",), ("bgremover.train", "train=false")):
            proc = subprocess.run([sys.executable, "-m", module, *args, f"ckpt_path={ckpt}", "data.root=data/CamVid"],
                                  capture_output=True, text=True, timeout=120, cwd=cwd,
                                  env={**os.environ, "WANDB_MODE": "offline"})
            assert proc.returncode == 1 and proc.stderr == f"error: dataset folder not found: data/CamVid ({hint})\n", \
                (module, proc.stderr[-2000:])
    assert not any(cwd.iterdir())  # no run folder left behind
    # the folder the hint names reaches Hydra as one word, its space and all
    assert shlex.split(folder_hint.split('ARGS="', 1)[1].rstrip('"')) == ["data=folder", f"data.root={mine}"]


def test_a_resumed_or_evaluated_run_keeps_its_split_when_the_folder_grew(tmp_path, caplog):
    """The split was drawn again on a resume (and in eval): after 10 more pairs, held-out images moved into
    training and trained-on ones were scored as held out. The checkpoint's run's split.json is used now, unless
    data.split_file names another."""
    from bgremover.eval import evaluate
    from bgremover.train import train

    data = write_folder(tmp_path / "data", n=8)
    run = tmp_path / "run"
    base = ["data=folder", f"data.root={data}", *FAST, "test=false"]
    train(compose_cfg(run, [*base, "trainer.max_epochs=1"]))
    first = json.loads((run / "split.json").read_text())
    write_folder(tmp_path / "more", n=10, seed=1)
    for sub in ("images", "masks"):
        for p in (tmp_path / "more" / sub).iterdir():
            p.rename(data / sub / f"new_{p.name}")
    assert fd.draw_split([p.stem for p in (data / "images").iterdir()], fd.DEFAULT_FRACTIONS, 0)["test"] != first["test"]
    last = run / "checkpoints" / "last.ckpt"
    with caplog.at_level("INFO", logger="bgremover.train"):
        train(compose_cfg(tmp_path / "resumed", [*base, "trainer.max_epochs=2", f"ckpt_path={last}"]))
    again = json.loads((tmp_path / "resumed" / "split.json").read_text())
    assert {s: again[s] for s in fd.SPLITS} == {s: first[s] for s in fd.SPLITS}
    assert f"data.split_file={run / 'split.json'}: the split of the checkpoint's run" in caplog.text
    ecfg = compose_cfg(tmp_path / "eval", ["data=folder", f"data.root={data}", "data.num_workers=0",
                                           f"ckpt_path={last}"], config_name="eval")
    _, objects = evaluate(ecfg)
    assert [img.stem for img, _ in objects["datamodule"].split_pairs["test"]] == first["test"]
    named = tmp_path / "mine.json"  # a split the user names still wins
    named.write_text(json.dumps({**first, "test": first["val"], "val": first["test"]}))
    ecfg = compose_cfg(tmp_path / "eval2", ["data=folder", f"data.root={data}", "data.num_workers=0",
                                            f"ckpt_path={last}", f"data.split_file={named}"], config_name="eval")
    _, objects = evaluate(ecfg)
    assert [img.stem for img, _ in objects["datamodule"].split_pairs["test"]] == first["val"]



def test_a_run_on_fixed_split_folders_resumes(tmp_path):
    """A folder laid out as train/ val/ test/ has no drawn split to keep: its run's split.json (fixed) is not
    handed on as data.split_file, which such a folder refuses ("drop data.split_file"): it resumes and trains."""
    from bgremover.train import train

    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        write_folder(tmp_path / "d", n=n, split=split)
    base = ["data=folder", f"data.root={tmp_path / 'd'}", *FAST, "test=false"]
    train(compose_cfg(tmp_path / "run", [*base, "trainer.max_epochs=1"]))
    assert json.loads((tmp_path / "run" / "split.json").read_text())["fixed"] is True
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    _, objects = train(compose_cfg(tmp_path / "resumed", [*base, "trainer.max_epochs=2", f"ckpt_path={last}"]))
    assert objects["trainer"].global_step == 4  # 4 train pairs, batch 2: two steps an epoch, two epochs


def test_eval_cutout_folder_needs_the_split_and_matching_classes(folder, tmp_path, capsys):
    from bgremover import cutout_eval as ce

    assert ce.main(["--model", str(SHIPPED_ONNX), "--data-root", str(folder), "--quiet"]) == 1
    assert "--split-file" in capsys.readouterr().err
    for split, n in (("train", 2), ("val", 1), ("test", 2)):
        write_folder(tmp_path / "fixed", n=n, split=split)
    assert ce.main(["--model", str(SHIPPED_ONNX), "--data-root", str(tmp_path / "fixed"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "are not the dataset's (background, foreground)" in err and len(err.strip().splitlines()) == 1


def test_perfect_prediction_scores_one(tmp_path):
    """CutoutMetric (training) agrees with CutoutStats (eval-cutout) and is exact on known answers."""
    from bgremover.cutout_metrics import CutoutStats
    from bgremover.lit.cutout import CutoutMetric

    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.integers(0, 3, (2, 20, 24))).long()  # 0 bg, 1 fg, 2 void
    logits = torch.randn(2, 2, 20, 24)
    metric = CutoutMetric([1], ignore_index=2)
    metric.update(logits, target)
    got = {k: float(v) for k, v in metric.compute().items()}
    stats = CutoutStats()
    prob = logits.softmax(1)[:, 1].numpy()
    for a, t in zip(prob, target.numpy(), strict=True):
        stats.update(a, t == 1, t != 2)
    ref = stats.summary()
    assert got["fg_iou"] == pytest.approx(ref["fg_iou"]) and got["alpha_mae"] == pytest.approx(ref["mae"])
    assert got["boundary_f"] == pytest.approx(ref["boundary_f"])
    perfect = CutoutMetric([1], ignore_index=2)
    perfect.update(torch.where(target == 1, 1.0, -1.0).unsqueeze(1) * torch.tensor([-50.0, 50.0]).view(1, 2, 1, 1), target)
    assert {k: float(v) for k, v in perfect.compute().items()} == pytest.approx(
        {"fg_iou": 1.0, "boundary_f": 1.0, "alpha_mae": 0.0}, abs=1e-6)


def test_cutout_metric_sums_every_foreground_class_over_every_batch():
    """CamVid's foreground is several classes (car, pedestrian, …): alpha is their summed probability, a pixel of
    any of them is foreground, void (ignore_index, or a label ≥ the classes) is left out, and an epoch's batches
    add up. The test above has one foreground class and one batch. Expected numbers worked out by hand."""
    from bgremover.lit.cutout import CutoutMetric

    def batch(probs: list[list[float]], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.tensor(probs, dtype=torch.float64)  # 3 pixels × 4 classes, as one 1×3 image
        return p.log().T.reshape(1, 4, 1, 3), torch.tensor(labels).reshape(1, 1, 3)

    metric = CutoutMetric([1, 3], ignore_index=4)
    # alpha = P(1) + P(3): 0.6 on background (fp), 0.7 on class 1 (tp), 0.7 on class 3 (tp)
    metric.update(*batch([[0.3, 0.3, 0.1, 0.3], [0.2, 0.5, 0.1, 0.2], [0.1, 0.1, 0.2, 0.6]], [0, 1, 3]))
    # 0.2 on class 2 (tn); then void pixels predicted foreground: ignore_index 4 and label 7 (≥ 4 classes)
    metric.update(*batch([[0.1, 0.1, 0.7, 0.1], [0.1, 0.4, 0.1, 0.4], [0.1, 0.4, 0.1, 0.4]], [2, 4, 7]))
    got = {k: float(v) for k, v in metric.compute().items()}
    assert got["fg_iou"] == pytest.approx(2 / 3)  # tp 2, fp 1, fn 0
    assert got["alpha_mae"] == pytest.approx((0.6 + 0.3 + 0.3 + 0.2) / 4, abs=1e-6)  # the 4 labelled pixels


# --- fine-tuning from the shipped CamVid net ----------------------------------------------------------------------
def test_shipped_weights_match_the_onnx_model_on_a_real_frame():
    """models/bgremover-camvid.pt is what `make ship` saved from the checkpoint the ONNX file was exported from:
    the same net (conv weights stored as float16)."""
    import onnxruntime as ort

    from bgremover import checkpoint
    from bgremover.padding import pad_image

    net, info, _ = checkpoint.load_net(SHIPPED_PT)
    rgb = np.asarray(Image.open(REPO / "examples" / "0001TP_009180.jpg").convert("RGB"))
    x = (rgb / 255.0 - np.asarray(info["mean"])) / np.asarray(info["std"])
    x = np.ascontiguousarray(pad_image(x.astype(np.float32), 32)[0].transpose(2, 0, 1)[None])
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(SHIPPED_ONNX), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert np.abs(ref - got).max() < 0.05  # float16 storage
    assert (ref.argmax(1) == got.argmax(1)).mean() > 0.995


def test_ckpt_init_from_camvid_net_reinitialises_only_the_classifier(folder, tmp_path):
    from bgremover import checkpoint
    from bgremover.train import build

    cfg = compose_cfg(tmp_path, ["data=folder", f"data.root={folder}", *FAST, f"ckpt_init={SHIPPED_PT}"])
    checks.validate_train(cfg)
    model = build(cfg)["model"]
    shipped, _, _ = checkpoint.load_net(SHIPPED_PT)
    own, ref = model.net.state_dict(), shipped.state_dict()
    head = {"segmentation_head.0.weight", "segmentation_head.0.bias"}
    assert own["segmentation_head.0.weight"].shape[0] == 2
    assert all(torch.equal(own[k], ref[k]) for k in own if k not in head)
    assert all(own[k].shape != ref[k].shape for k in head)


def finished_training(run: Path, best: Path) -> type:
    """A stand-in for make remover's training process, finished: its run folder, best checkpoint and summary."""

    class Done:
        def __init__(self, *args, **kwargs):
            best.parent.mkdir(parents=True)
            best.write_bytes(b"")
            (run / "summary.json").write_text(json.dumps({"status": "ok", "best_ckpt": str(best)}))

        def wait(self):
            return 0

        def send_signal(self, signum):
            """To a finished process: nothing happens."""

    return Done


def test_ctrl_c_while_make_remover_exports_says_how_to_finish(folder, tmp_path, monkeypatch, capsys):
    """Ctrl-C after the training, while the model was exported or scored, was a bare traceback with no word of
    the finished training; now one line with the commands that finish it (export, then score), exit 130."""
    from bgremover import export, train_remover

    run = tmp_path / "a run"
    best = run / "checkpoints" / "epoch_003.ckpt"
    monkeypatch.setattr(subprocess, "Popen", finished_training(run, best))
    monkeypatch.setattr(export, "load_checkpoint_net", lambda path: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert train_remover.main([str(folder), "--run-dir", str(run)]) == 130
    (line,) = capsys.readouterr().err.strip().splitlines()[1:]
    q = shlex.quote
    assert line == (f"error: interrupted after training finished; finish with: make export CKPT={q(str(best))} "
                    f"OUT={q(str(run / 'remover.onnx'))} && make eval-cutout MODEL={q(str(run / 'remover.onnx'))} "
                    f"ARGS=\"--data-root {q(str(folder))} --split-file {q(str(run / 'split.json'))}\"")
    assert not (run / "remover.onnx").exists()


@pytest.mark.parametrize("child_rc", [254, 0])
def test_ctrl_c_just_after_the_training_finished_says_how_to_finish(folder, tmp_path, monkeypatch, capsys, child_rc):
    """A Ctrl-C landing just after the training wrote its "ok" summary: the training exited 254 without a word
    and make remover passed that on, silently, with no remover.onnx (an own-data audit); or the training ended
    normally and the export went on though the user had pressed Ctrl-C. Now the finish line, exit 130."""
    from bgremover import train_remover

    run = tmp_path / "run"
    best = run / "checkpoints" / "epoch_002.ckpt"

    class Finished:  # the training: done, then the Ctrl-C reaches both processes while make remover waits
        def __init__(self, *args, **kwargs):
            best.parent.mkdir(parents=True)
            best.write_bytes(b"")
            (run / "summary.json").write_text(json.dumps({"status": "ok", "best_ckpt": str(best)}))
            self.waited = 0

        def wait(self):
            self.waited += 1
            if self.waited == 1:
                raise KeyboardInterrupt
            return child_rc

    monkeypatch.setattr(subprocess, "Popen", Finished)
    assert train_remover.main([str(folder), "--run-dir", str(run)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"remover: checking {folder.resolve()}, then training remover → {run}"
    assert err[1:] == [f"error: interrupted after training finished; finish with: "
                       f"{train_remover.finish_command(run, folder.resolve(), str(best))}"]
    assert not (run / "remover.onnx").exists()


def test_a_second_ctrl_c_while_the_training_stops_is_no_traceback(folder, tmp_path, monkeypatch, capsys):
    """The training stops where its step ends at the first Ctrl-C, at once at a second: that second reached make
    remover too, waiting for it, and ended it with a KeyboardInterrupt traceback. It waits on for the training's
    exit, whose resume line is what the user reads."""
    from bgremover import train_remover

    class Stopping:
        def __init__(self, *args, **kwargs):
            self.waited = 0

        def wait(self):
            self.waited += 1
            if self.waited <= 2:
                raise KeyboardInterrupt
            return 254

    monkeypatch.setattr(subprocess, "Popen", Stopping)
    try:
        rc = train_remover.main([str(folder), "--run-dir", str(tmp_path / "run")])
    except KeyboardInterrupt:
        pytest.fail("a second Ctrl-C ended make remover with a traceback")
    assert rc == 254 and capsys.readouterr().err.strip().splitlines()[1:] == []


@pytest.mark.parametrize("summary", [{"status": "interrupted", "best_ckpt": "B"}, {"status": "ok", "last_ckpt": "L"},
                                     {"status": "ok", "best_ckpt": "B", "last_ckpt": "L"},
                                     {"status": "failed", "best_ckpt": "B"}, None])
def test_ctrl_c_during_the_training_passes_on_its_exit_unless_it_finished(folder, tmp_path, monkeypatch, capsys,
                                                                           summary):
    """A Ctrl-C that stopped the training itself (summary "interrupted": it printed its own resume line) must not
    be taken for a finished training and told to export, nor must a failed one; a finished run finishes from its
    best checkpoint, or last_ckpt without one (validation off); and a training that exited 0 without any summary
    is still an interruption (130), never make remover's success."""
    from bgremover import train_remover

    run = tmp_path / "run"

    class Stopped:
        def __init__(self, *args, **kwargs):
            if summary is not None:
                run.mkdir(parents=True)
                (run / "summary.json").write_text(json.dumps({k: str(run / v) if k.endswith("ckpt") else v
                                                              for k, v in summary.items()}))
            self.waited = 0

        def wait(self):
            self.waited += 1
            if self.waited == 1:
                raise KeyboardInterrupt
            return 254 if summary and summary["status"] == "interrupted" else 0

    monkeypatch.setattr(subprocess, "Popen", Stopped)
    rc = train_remover.main([str(folder), "--run-dir", str(run)])
    err = capsys.readouterr().err.strip().splitlines()[1:]
    if summary is None or summary["status"] == "failed":
        assert rc == 130 and err == []
    elif summary["status"] == "interrupted":
        assert rc == 254 and err == []  # the training's own resume line is what the user reads
    else:
        best = run / ("B" if "best_ckpt" in summary else "L")
        assert rc == 130 and err == [f"error: interrupted after training finished; finish with: "
                                     f"{train_remover.finish_command(run, folder.resolve(), str(best))}"]


def test_make_remover_exports_the_best_epoch_and_reports_its_held_out_test_scores(folder, tmp_path, monkeypatch,
                                                                                  capsys):
    """After the training: the best checkpoint is exported (not the last), the images scored are the split's
    test images (not val), and the report prints those scores (an undefined one as n/a) and the best val
    foreground IoU of the history, skipping its NaN epochs. The training, export and scoring are stand-ins."""
    from bgremover import export, train_remover

    run, data = tmp_path / "run", folder.resolve()
    found = fd.scan(data)
    split = fd.splits(found, seed=0)
    fd.write_split(run / "split.json", fd.split_document(found, split, fd.DEFAULT_FRACTIONS, 0))

    class Trained:
        def __init__(self, *args, **kwargs):
            (run / "summary.json").write_text(json.dumps({
                "status": "ok", "best_ckpt": str(run / "best.ckpt"), "last_ckpt": str(run / "last.ckpt"),
                "net": "deeplabv3plus", "epochs": 4, "global_step": 8, "wall_time_s": 12,
                "history": {"val/fg_iou": [float("nan"), 0.2, 0.6, 0.4]},
                "config": {"model": {"class_names": ["background", "foreground"], "default_foreground": ["foreground"]}}}))

        def wait(self):
            return 0

    exported, scored = [], []
    monkeypatch.setattr(subprocess, "Popen", Trained)
    monkeypatch.setattr(export, "load_checkpoint_net", lambda path: exported.append(Path(path)) or (None, {}))
    monkeypatch.setattr(export, "export_onnx", lambda net, meta, out: {"path": out, "agreement": "agrees"})
    monkeypatch.setattr(cutout_eval, "load_remover", lambda path, expected: None)

    def evaluate(remover, pairs, read_label):
        scored.extend(img.stem for img, _ in pairs)
        return {"cutout": {"fg_iou": 0.75, "boundary_f": float("nan"), "mae": 0.125}, "n_images": len(pairs),
                "boundary_tol": 2, "mIoU": 0.625}

    monkeypatch.setattr(cutout_eval, "evaluate", evaluate)
    assert train_remover.main([str(folder), "--run-dir", str(run)]) == 0
    assert exported == [run / "best.ckpt"] and scored == [img.stem for img, _ in split["test"]]
    out = capsys.readouterr().out
    assert (f"held-out test set ({len(split['test'])} image, as `score it` below scores it): foreground IoU 0.750, "
            "boundary F n/a (2 px), alpha MAE 0.125, mIoU 0.625") in out
    assert "best val foreground IoU 0.600" in out


def test_a_resumed_make_remover_says_how_to_resume_with_one_ckpt_path(folder, tmp_path, monkeypatch):
    """make remover ... ckpt_path=<run>/checkpoints/last.ckpt, stopped again: its resume line names the checkpoint
    the training fills in, once, not also the old one given (two ckpt_path= values in one command)."""
    from bgremover import config, train_remover

    seen = {}

    class Stopped:
        def __init__(self, cmd, env):
            seen.update(env)

        def wait(self):
            return 254

    monkeypatch.setattr(subprocess, "Popen", Stopped)
    run = tmp_path / "run"
    assert train_remover.main([str(folder), "--run-dir", str(run), "ckpt_path=/old/last.ckpt", "seed=3"]) == 254
    resume = seen[config.RESUME_ENV]
    assert resume.count("ckpt_path=") == 1 and "ckpt_path={ckpt_path}" in resume and "/old/" not in resume
    assert "seed=3" in resume  # the other overrides stay


def test_eval_cutout_on_a_fixed_folder_reads_the_split_file_it_is_given(tmp_path):
    """`--split-file` with a fixed train/val/test folder was read for its void value and otherwise ignored (an
    own-data audit): a pooled folder's split scored the wrong images without a word, and images added to test/
    since the training were scored with it. Now it keeps the trained test set, and a foreign split is refused."""
    root = tmp_path / "fixed"
    for split, n in (("train", 3), ("val", 2), ("test", 3)):
        write_folder(root, n=n, split=split)
    trained = {"fixed": True, "void_value": None, "train": ["train0", "train1", "train2"], "val": ["val0", "val1"],
               "test": ["test0", "test2"]}  # test1 was added after the training
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps(trained))
    pairs, _, _ = cutout_eval.find_folder_pairs(root, "test", None, split_file)
    assert [img.name for img, _ in pairs] == ["test0.jpg", "test2.jpg"]
    split_file.write_text(json.dumps({**trained, "fixed": False}))
    with pytest.raises(cutout_eval.EvalError, match=r"split.json splits a pooled folder, but .*fixed has fixed "
                                                    r"train/val/test folders: drop --split-file"):
        cutout_eval.find_folder_pairs(root, "test", None, split_file)
    split_file.write_text(json.dumps({**trained, "test": ["test0", "test7"]}))
    with pytest.raises(cutout_eval.EvalError, match=r"names 'test7' \(test\), which is not in .*fixed/test/images"):
        cutout_eval.find_folder_pairs(root, "test", None, split_file)


def test_eval_cutout_on_a_fixed_folder_refuses_a_split_file_that_does_not_say_fixed(tmp_path):
    """A split file without "fixed": true (a pooled run's, or one written by hand) is no record of this fixed
    folder's training: refused, not used to pick the test images."""
    root = tmp_path / "fixed"
    for split, n in (("train", 3), ("val", 2), ("test", 3)):
        write_folder(root, n=n, split=split)
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": ["train0"], "val": ["val0"], "test": ["test1"]}))
    with pytest.raises(cutout_eval.EvalError, match=r"split.json splits a pooled folder, but .*fixed has fixed"):
        cutout_eval.find_folder_pairs(root, "test", None, split_file)


def test_make_remover_into_a_taken_run_dir_names_its_own_option(folder, tmp_path, capsys):
    """`--run-dir <an earlier run>` was refused by the training as `hydra.run.dir=... already holds a run`, an
    option the user never typed, after make remover said it was training."""
    from bgremover import train_remover

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    # stopped before its first checkpoint (Ctrl-C in its first seconds): it was said to resume from a last.ckpt
    # that is not there, and doing so failed as "checkpoint not found"
    assert train_remover.main([str(folder), "--run-dir", str(run)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: --run-dir {run} already holds a run: its config, log and results would be overwritten; "
                    "choose a new folder (it holds no checkpoint to resume from)")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint")
    assert train_remover.main([str(folder), "--run-dir", str(run)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: --run-dir {run} already holds a run: its config, log and results would be overwritten; "
                    "choose a new folder (or resume it in place with ckpt_path=<that run>/checkpoints/last.ckpt)")


def test_make_remover_takes_hydra_run_dir_as_its_run_folder(folder, tmp_path, monkeypatch, capsys):
    """`make remover ARGS="hydra.run.dir=X"` (as make train takes it): the training went to X (Hydra's last value
    wins) and, its whole budget later, the export read the default folder: "No such file or directory:
    .../logs/remover/runs/<time>/summary.json", exit 1, no remover.onnx."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from bgremover import export, train_remover

    run = tmp_path / "my run"
    seen: list[list[str]] = []

    class Training:  # writes its run where Hydra would put it: the command's last hydra.run.dir
        def __init__(self, cmd, env):
            seen.append(cmd)
            parsed = OverridesParser.create().parse_overrides(cmd[3:])
            where = Path([o.value() for o in parsed if o.key_or_group == "hydra.run.dir"][-1])
            (where / "checkpoints").mkdir(parents=True)
            (where / "checkpoints" / "epoch_000.ckpt").write_bytes(b"")
            (where / "summary.json").write_text(json.dumps({"status": "ok", "best_ckpt": str(
                where / "checkpoints" / "epoch_000.ckpt")}))

        def wait(self):
            return 0

        def send_signal(self, signum):
            """To a finished process: nothing happens."""

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "Popen", Training)
    monkeypatch.setattr(export, "load_checkpoint_net", lambda path: (None, {"path": path}))
    monkeypatch.setattr(export, "export_onnx", lambda net, meta, out: {"path": out, "agreement": meta["path"]})
    monkeypatch.setattr(train_remover, "score_held_out", lambda *a: None)
    assert train_remover.main([str(folder), f"hydra.run.dir={run}", "remover_budget_s=60"]) == 0
    out = capsys.readouterr().out
    assert f"remover: {run / 'remover.onnx'} " in out and f"run folder {run}" in out, out
    assert str(run / "checkpoints" / "epoch_000.ckpt") in out  # the checkpoint of the run that trained
    assert not (tmp_path / "logs").exists()  # nothing went to the default folder
    assert sum(a.startswith("hydra.run.dir=") for a in seen[0]) == 1 and "remover_budget_s=60" in seen[0]
    # both ways at once: one line, before anything runs
    assert train_remover.main([str(folder), "--run-dir", str(tmp_path / "a"), f"hydra.run.dir={run}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: --run-dir {tmp_path / 'a'} and hydra.run.dir={run} both name the run folder: give one"
    # a taken folder is refused in the words the command used
    assert train_remover.main([str(folder), f"hydra.run.dir={run}"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: hydra.run.dir={run} already holds a run"), line
    assert len(seen) == 1


def test_train_remover_without_its_folder_names_only_the_folder(capsys):
    """With no arguments the usage error said "required: data, overrides": argparse counts a `*` positional
    without a default as required, though no override is needed. Only the folder is named."""
    from bgremover import train_remover

    with pytest.raises(SystemExit) as exit_:
        train_remover.main([])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "python -m bgremover.train_remover: error: the following arguments are required: data (see --help)\n")


def test_make_remover_refuses_a_data_root_that_is_not_its_folder(folder, tmp_path, monkeypatch, capsys):
    """`make remover DATA=A ARGS="data.root=B"` trained on B (Hydra's last value wins) and printed the held-out
    scores of A's images as the model's. Two folders are refused in one line before anything starts; the same
    folder typed twice trains it, given to the training once."""
    from bgremover import train_remover

    other = write_folder(tmp_path / "other", seed=1)
    seen: list[list[str]] = []

    class Started(Exception):
        """The training would have started here."""

    def training(cmd, env):
        seen.append(cmd)
        raise Started

    monkeypatch.setattr(subprocess, "Popen", training)
    run = tmp_path / "run"
    for override in (f"data.root={other}", f"+data.root={other}"):
        assert train_remover.main([str(folder), "--run-dir", str(run), override]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == (f"error: data.root={other} and the folder {folder.resolve()} both name the data to train "
                        "on: give the folder once, as make remover DATA=path")
    assert seen == [] and not run.exists()
    with pytest.raises(Started):
        train_remover.main([str(folder), "--run-dir", str(run), f"data.root={folder}/."])
    assert [a for a in seen[0] if a.startswith("data.root=")] == [f"data.root={config.quoted(folder.resolve())}"]


def test_experiment_remover_composes_with_budget_and_camvid_init(folder, tmp_path):
    cfg = compose_cfg(tmp_path, ["experiment=remover", f"data.root={folder}"])
    assert cfg.data._target_.endswith("FolderDataModule")
    assert Path(cfg.ckpt_init).resolve() == SHIPPED_PT
    assert cfg.callbacks.time_budget.budget_s == cfg.remover_budget_s == 1800
    assert cfg.callbacks.model_checkpoint.monitor == "val/fg_iou"
    OmegaConf.to_container(cfg, resolve=True)  # everything resolves


@pytest.mark.slow
def test_make_remover_trains_exports_and_prints_how_to_use_it(folder, tmp_path):
    run = tmp_path / "my run"  # the printed commands quote their paths: unquoted, `score it` broke on the space
    proc = subprocess.run([sys.executable, "-m", "bgremover.train_remover", str(folder), "--run-dir", str(run),
                           *FAST, "trainer.max_epochs=1", "remover_budget_s=600"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "remover.onnx").is_file() and (run / "split.json").is_file()
    out = proc.stdout
    assert f"make predict IMG=photo.jpg MODEL={shlex.quote(str(run / 'remover.onnx'))}" in out
    assert "--max-side" not in out  # the model carries its training scale
    assert "foreground IoU" in out and "boundary F" in out and "held-out test set (1 image," in out and "1 epoch (" in out
    assert re.search(r"best val foreground IoU \d\.\d{3} \(\d+ (of \d+ )?frames?", out), out  # its frame count
    assert "plan: deeplabv3plus_mobilenet_v2" in proc.stdout + proc.stderr  # the run says what it will do
    fg = float(out.split("foreground IoU ")[1].split(",")[0])
    assert 0.0 <= fg <= 1.0 and not math.isnan(fg)
    # The printed numbers are the printed `score it` command's: they were the test stage's, at the training scale
    # (48 px here, the images are 56 px wide), and the command, scoring at full resolution, disagreed.
    score = next(line for line in out.splitlines() if line.startswith("score it: make eval-cutout MODEL="))
    model, args = score.split("MODEL=")[1].split(" ARGS=")
    assert cutout_eval.main(["--model", *shlex.split(model), *shlex.split(args.strip('"')), "--json",
                             str(tmp_path / "e.json"), "--quiet"]) == 0
    scored = json.loads((tmp_path / "e.json").read_text())
    printed = next(line for line in out.splitlines() if line.startswith("held-out test set"))
    from bgremover.train_remover import _fmt

    c = scored["cutout"]
    assert printed.endswith(f"foreground IoU {_fmt(c['fg_iou'])}, boundary F {_fmt(c['boundary_f'])} (2 px), alpha MAE "
                            f"{_fmt(c['mae'])}, mIoU {_fmt(scored['mIoU'])}"), (printed, c, scored["mIoU"])


def test_sigterm_to_make_remover_stops_its_training_too(folder, tmp_path):
    """A scheduler's SIGTERM reaches train_remover only: the training it started must save, say how to resume and
    end with it (it ran on, orphaned, before)."""
    import os
    import signal
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "bgremover.train_remover", str(folder), "--run-dir", str(run),
                             *FAST, "trainer.max_epochs=1000", "callbacks.progress_bar.refresh_rate=0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WANDB_MODE": "offline"})
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert last.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)  # to train_remover alone, not its process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.count(f"ckpt_path={last}") == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    left = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run}"], capture_output=True, text=True).stdout
    assert not left.strip()  # no orphaned training
    # The hint was `make train ARGS="experiment=remover data.root=... task_name=remover ..."`: a new run folder, no
    # export, no scores. Now make remover's own command, resuming in this run folder (run here as what make runs).
    hint = line.split("resume with: ")[1]
    assert hint.startswith(f'make remover DATA={folder} EXP=remover ARGS="--run-dir {run} '), hint
    epochs = torch.load(last, weights_only=True)["epoch"] + 2  # one more epoch than the interrupted one
    args = shlex.split(hint.split("ARGS=")[1])[0].replace("trainer.max_epochs=1000", f"trainer.max_epochs={epochs}")
    done = subprocess.run([sys.executable, "-m", "bgremover.train_remover", str(folder), "--exp", "remover",
                           *shlex.split(args)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["status"] == "ok" and resumed["global_step"] > summary["global_step"]
    assert (run / "remover.onnx").is_file() and "held-out test set (1 image," in done.stdout


def test_make_remover_bad_folder_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bgremover.train_remover", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: dataset folder not found: {tmp_path / 'missing'}"
    # a folder without images/ and masks/: the layout's one line, before "remover: training ..." was printed
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "bgremover.train_remover", str(tmp_path / "empty")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 1 and proc.stderr.strip().startswith(f"error: folder missing: {tmp_path / 'empty' / 'images'}")


# --- the worked example's builder ---------------------------------------------------------------------------------
def fake_camvid(root: Path, frames: dict) -> Path:
    """A CamVid-layout folder: every split holds the frames {name: (make_photo(), label)}."""
    for split in fd.SPLITS:
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for name, (make_photo, label) in frames.items():
            Image.fromarray(make_photo()).save(root / split / f"{name}.png")
            Image.fromarray(label).save(root / f"{split}annot" / f"{name}.png")
    return root


def test_make_folder_writes_whole_subject_crops_split_like_camvid(tmp_path, capsys, monkeypatch):
    from bgremover.data.make_folder import main

    rng = np.random.default_rng(0)
    label = np.zeros((96, 128), np.uint8)
    label[30:60, 40:90] = 8  # a whole car
    label[10:40, 110:128] = 8  # a car cut off by the right border
    label[0:5, 0:5] = 11  # void
    root = fake_camvid(tmp_path / "CamVid", {"f": (lambda: rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), label)})
    out = tmp_path / "cars"
    assert main([str(out), "--data-root", str(root), "--min-side", "16", "--size", "32"]) == 0
    for split in fd.SPLITS:
        masks = sorted((out / split / "masks").iterdir())
        assert [m.name for m in masks] == ["f_0.png"]  # only the whole car
        m = np.asarray(Image.open(masks[0]))
        assert m.shape == (32, 32) and set(np.unique(m)) == {0, 255}
        assert Image.open(out / split / "images" / "f_0.jpg").size == (32, 32)
    f = fd.scan(out)  # what it writes is a valid data=folder folder with fixed splits
    assert f.fixed and f.labels.binary
    assert main([str(out), "--data-root", str(root)]) == 1 and "exists" in capsys.readouterr().err
    both = tmp_path / "cars2"
    assert main([str(both), "--data-root", str(root), "--min-side", "16", "--size", "32", "--keep-truncated"]) == 0
    assert len(list((both / "test" / "masks").iterdir())) == 2
    # Ctrl-C while it writes: one line and 130 (was a bare traceback), and no folder, whole or half
    from bgremover.data import make_folder

    capsys.readouterr()
    real = make_folder.build
    monkeypatch.setattr(make_folder, "build", lambda *a, **k: real(*a, **k) and (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main([str(tmp_path / "cars3"), "--data-root", str(root), "--min-side", "16", "--size", "32"]) == 130
    assert capsys.readouterr().err.strip() == f"python -m bgremover.data.make_folder: error: interrupted: {tmp_path / 'cars3'} was not written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CamVid", "cars", "cars2"]
    # an output it cannot write (under a file here; a full disk, a read-only folder): was a traceback
    (tmp_path / "afile").write_text("x")
    assert main([str(tmp_path / "afile" / "sub"), "--data-root", str(root), "--min-side", "16", "--size", "32"]) == 1
    assert capsys.readouterr().err.strip() == (f"python -m bgremover.data.make_folder: error: cannot write "
                                               f"{tmp_path / 'afile' / 'sub'}: Not a directory")


def test_make_folder_killed_by_sigterm_leaves_no_hidden_half_folder(tmp_path):
    """`kill` or `timeout` while it writes: one line, exit 143, and neither OUT nor its hidden temp folder."""
    label = np.zeros((96, 128), np.uint8)
    label[30:60, 40:90] = 8
    root = fake_camvid(tmp_path / "CamVid", {"f": (lambda: np.zeros((96, 128, 3), np.uint8), label)})
    out = tmp_path / "cars"
    code = ("import os, signal, sys\n"
            "from bgremover.data import make_folder\n"
            "real = make_folder.build\n"
            "def build_then_sigterm(*a, **k):\n"
            "    counts = real(*a, **k)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return counts\n"
            "make_folder.build = build_then_sigterm\n"
            f"sys.exit(make_folder.main([{str(out)!r}, '--data-root', {str(root)!r}, '--min-side', '16', '--size', '32']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip() == f"python -m bgremover.data.make_folder: error: interrupted by SIGTERM: {out} was not written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CamVid"]


def test_make_folder_prints_a_make_remover_command_that_pastes_whole(tmp_path, capsys):
    """`make example-data EXAMPLES="my data"` printed `make remover DATA=/…/my data/cars`: pasted, make took
    `data/cars` for a second target. The command is quoted for the shell now, as `make remover`'s own are."""
    import shlex

    from bgremover.data.make_folder import main

    label = np.zeros((96, 128), np.uint8)
    label[30:60, 40:90] = 8
    root = fake_camvid(tmp_path / "CamVid", {"f": (lambda: np.zeros((96, 128, 3), np.uint8), label)})
    out = tmp_path / "my data" / "cars"
    assert main([str(out), "--data-root", str(root), "--min-side", "16", "--size", "32"]) == 0
    command = capsys.readouterr().out.strip().split("train a remover on it: ")[1]
    assert shlex.split(command) == ["make", "remover", f"DATA={out}"]


def test_make_folder_composites_subjects_onto_subject_free_windows(tmp_path, capsys):
    """--composite: each whole subject pasted per_subject times onto windows without the class, same split only."""
    import cv2

    from bgremover.data.make_folder import main

    rng = np.random.default_rng(1)
    label = np.full((96, 128), 1, np.uint8)  # building
    label[10:40, 10:50] = 8  # a whole car, painted pure red in the photo

    def photo():
        image = rng.integers(0, 100, (96, 128, 3), dtype=np.uint8)  # never red
        image[10:40, 10:50] = (255, 0, 0)
        return image

    root = fake_camvid(tmp_path / "CamVid", {"a": (photo, label), "b": (photo, label)})
    out = tmp_path / "comp"
    assert main([str(out), "--data-root", str(root), "--composite", "--min-side", "16", "--size", "64",
                 "--per-subject", "3"]) == 0
    assert "6 train, 6 val, 6 test composites of Car" in capsys.readouterr().out
    for split in fd.SPLITS:
        names = sorted(p.stem for p in (out / split / "images").iterdir())
        assert names == sorted(f"{f}_0_{j}" for f in "ab" for j in range(3))
        for name in names:
            img = np.asarray(Image.open(out / split / "images" / f"{name}.jpg")).astype(int)
            mask = np.asarray(Image.open(out / split / "masks" / f"{name}.png"))
            assert img.shape == (64, 64, 3) and set(np.unique(mask)) == {0, 255}
            ys, xs = np.nonzero(mask)
            long_side = max(np.ptp(ys), np.ptp(xs)) + 1
            assert 0.5 * 64 - 2 <= long_side <= 0.9 * 64 + 2  # the subject's scale range
            red = (img[..., 0] > 180) & (img[..., 1] < 90) & (img[..., 2] < 90)
            inner = mask == 255
            assert red[inner].mean() > 0.9  # the subject is where the mask says
            # and nowhere else: the background windows hold no car (allow the one-pixel soft edge)
            near = cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0
            assert not red[~near].any()
    assert fd.scan(out).fixed
    assert main([str(tmp_path / "x"), "--data-root", str(root), "--composite", "--per-subject", "0"]) == 1
    assert "--per-subject >= 1" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_make_folder_subjects_are_8_connected_regions_with_a_long_side_of_at_least_min_side():
    from bgremover.data.make_folder import subjects

    label = np.zeros((40, 60), np.uint8)
    label[5:10, 5:21] = 8  # 16 wide, 5 high: its long side is exactly min_side
    label[20:25, 30:38] = 8  # two 8x5 blocks meeting only corner to corner: one 8-connected 16x10 subject
    label[25:30, 38:46] = 8
    label[28, 31] = 8  # a lone pixel inside that subject's box, of another region
    label[32:37, 0:20] = 8  # touches the left border: cut off by the frame
    found = subjects(label, [8], 16)
    assert [box for box, _ in found] == [(5, 5, 16, 5), (30, 20, 16, 10)]
    region = found[1][1]
    assert region.shape == (10, 16) and region.sum() == 80 and not region[28 - 20, 31 - 30]  # its own pixels only
    assert (0, 32, 20, 5) in [box for box, _ in subjects(label, [8], 16, whole=False)]
    assert subjects(label, [8], 17) == []


def test_make_folder_square_crop_adds_the_margin_and_stays_inside_the_frame():
    from bgremover.data.make_folder import square_crop

    # box x, y, w, h = 100, 50, 40, 20; margin 0.25: side 40 * 1.5 = 60 around the centre (120, 60)
    assert square_crop((100, 50, 40, 20), 0.25, 100, 150) == (30, 90, 60)
    # centre (140, 85), side 40: shifted left and up to end at the frame's right (150) and bottom (100) edges
    assert square_crop((130, 75, 20, 20), 0.5, 100, 150) == (60, 110, 40)
    # wider than the frame is high: the side is the frame's short side, still centred on the box (x 75)
    assert square_crop((0, 0, 150, 10), 0.0, 100, 150) == (0, 25, 100)


def test_make_folder_masks_every_chosen_class_and_marks_void_with_void_value(tmp_path, capsys):
    from bgremover.data.make_folder import main

    label = np.zeros((96, 128), np.uint8)  # Sky
    label[30:60, 40:70] = 8  # Car
    label[30:60, 70:90] = 9  # Pedestrian beside it: one subject of Car+Pedestrian, box x 40-89, y 30-59
    label[20:25, 40:90] = 11  # void above it
    root = fake_camvid(tmp_path / "CamVid", {"f": (lambda: np.zeros((96, 128, 3), np.uint8), label)})
    out = tmp_path / "people-and-cars"
    assert main([str(out), "--data-root", str(root), "--classes", "Car, Pedestrian", "--min-side", "16",
                 "--margin", "0", "--size", "50", "--void-value", "128"]) == 0
    # side 50 around the centre (65, 45): rows 20-69, columns 40-89, written at its own size
    want = np.zeros((50, 50), np.uint8)
    want[10:40] = 255
    want[0:5] = 128
    for split in fd.SPLITS:
        assert (np.asarray(Image.open(out / split / "masks" / "f_0.png")) == want).all()
    capsys.readouterr()
    for bad in (["--void-value", "256"], ["--min-side", "0"], ["--margin", "nan"], ["--margin", "inf"]):
        assert main([str(tmp_path / "x"), "--data-root", str(root), *bad]) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "--min-side >= 1" in line and "--void-value 0-255" in line and not (tmp_path / "x").exists()


def test_make_folder_refuses_a_split_without_subjects_and_writes_nothing(tmp_path, capsys):
    from bgremover.data.make_folder import main

    label = np.zeros((96, 128), np.uint8)
    label[30:60, 40:90] = 8
    root = fake_camvid(tmp_path / "CamVid", {"f": (lambda: np.zeros((96, 128, 3), np.uint8), label)})
    Image.fromarray(np.zeros((96, 128), np.uint8)).save(root / "valannot" / "f.png")  # no car in val
    assert main([str(tmp_path / "cars"), "--data-root", str(root), "--min-side", "16", "--size", "32"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("error: too few subjects for a split ({'train': 1, 'val': 0, 'test': 1}): lower --min-side")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CamVid"]


def test_make_folder_composites_are_seeded_whole_subjects_on_drawn_backgrounds(tmp_path, capsys):
    """Same --seed, same files; another seed, others. Only whole subjects are pasted (the border-cut one is not),
    flipped or not, onto windows drawn from the frames (or parts of frames) without a car, never the all-void one."""
    from bgremover.data.make_folder import main

    label = np.ones((96, 128), np.uint8)  # Building
    label[10:40, 10:50] = 8  # a whole car: left half red, right half yellow in the photo
    label[50:96, 100:128] = 8  # a car cut off by the frame's corner

    def photo():
        image = np.full((96, 128, 3), 128, np.uint8)
        image[10:40, 10:30] = (255, 0, 0)
        image[10:40, 30:50] = (255, 255, 0)
        return image

    plain = np.ones((96, 128), np.uint8)
    frames = {"a": (photo, label), "blue": (lambda: np.full((96, 128, 3), (0, 0, 255), np.uint8), plain),
              "green": (lambda: np.full((96, 128, 3), (0, 255, 0), np.uint8), plain),
              "void": (lambda: np.full((96, 128, 3), (255, 0, 255), np.uint8), np.full((96, 128), 11, np.uint8))}
    root = fake_camvid(tmp_path / "CamVid", frames)
    args = ["--data-root", str(root), "--composite", "--min-side", "16", "--size", "64", "--per-subject", "8"]
    for name, seed in (("one", "3"), ("same", "3"), ("other", "4")):
        assert main([str(tmp_path / name), *args, "--seed", seed]) == 0
    assert "8 train, 8 val, 8 test composites" in capsys.readouterr().out

    def files(name):
        return {p.relative_to(tmp_path / name): p.read_bytes() for p in sorted((tmp_path / name).rglob("*.*"))
                if p.name != "SOURCE.txt"}

    assert files("one") == files("same") and files("one").keys() == files("other").keys()
    assert files("one") != files("other")
    backgrounds, red_left = set(), set()
    for path in sorted((tmp_path / "one" / "train" / "images").iterdir()):
        img = np.asarray(Image.open(path)).astype(int)
        mask = np.asarray(Image.open(tmp_path / "one" / "train" / "masks" / f"{path.stem}.png"))
        assert path.stem.startswith("a_0_")  # the whole car only (the cut-off one would be a_1_*)
        corner = img[0, 0] if not mask[0, 0] else img[-1, -1]  # a background pixel (the car spans < 90 %)
        colours = {"blue": (0, 0, 255), "green": (0, 255, 0), "magenta": (255, 0, 255), "gray": (128, 128, 128)}
        backgrounds.add(min(colours, key=lambda c: np.abs(corner - colours[c]).sum()))
        cols = np.nonzero(mask.any(0))[0]
        left, right = img[:, cols[0] + 2], img[:, cols[-1] - 2]  # red (G low) or yellow (G high) edge columns
        red_left.add(bool(left[mask[:, cols[0] + 2] > 0, 1].mean() < right[mask[:, cols[-1] - 2] > 0, 1].mean()))
    assert {"blue", "green"} <= backgrounds and "magenta" not in backgrounds and red_left == {True, False}


def test_make_folder_composite_mask_is_where_the_subject_covers_at_least_half_a_pixel():
    from bgremover.data.make_folder import paste

    bg = Image.new("RGB", (64, 64))
    subject, alpha = Image.new("RGB", (30, 20), (255, 255, 255)), Image.new("L", (30, 20))
    alpha.paste(255, (5, 5, 25, 15))  # a subject smaller than its box: its outline is blended
    image, mask = paste(bg, subject, alpha, np.random.default_rng(0))
    coverage = np.asarray(image)[..., 0]  # white over black: the pixel's value is 255 x the subject's cover
    assert 0 < ((coverage > 0) & (coverage < 255)).sum()  # the soft edge is there
    assert ((mask == 255) == (coverage >= 128)).all() and set(np.unique(mask)) == {0, 255}


def test_ddp_evaluation_counts_every_folder_frame_once(tmp_path):
    """Under DDP the test split is spread over the ranks without repeats (Lightning's default sampler pads)."""
    from types import SimpleNamespace

    from bgremover.data.folder_datamodule import FolderDataModule

    write_folder(tmp_path / "d", n=30)
    dm = FolderDataModule(str(tmp_path / "d"), image_size=None, num_workers=0, split_out=None, eval_batch_size=1)
    assert len(dm.split_pairs["test"]) >= 3
    dm.setup("test")
    n = len(dm.datasets["test"])
    seen = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        seen += list(dm.test_dataloader().sampler)
    assert sorted(seen) == list(range(n))


def test_make_example_data_builds_both_folders_once(camvid_root, tmp_path):
    """The make target itself (it had no test): two image/mask folders from the real CamVid, and a second call
    keeps them, saying so, instead of rebuilding or failing."""
    import subprocess

    from conftest import REPO

    out = tmp_path / "examples"
    cmd = ["make", "-s", "example-data", f"EXAMPLES={out}", f"DATA_DIR={camvid_root}"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    for name in ("cars-composite", "cars"):
        for split in ("train", "val", "test"):
            images = sorted((out / name / split / "images").iterdir())
            masks = sorted((out / name / split / "masks").iterdir())
            assert images and [p.stem for p in images] == [p.stem for p in masks], (name, split)
    stamp = (out / "cars" / "SOURCE.txt").stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert again.stdout.splitlines() == [f"{out}/cars-composite exists: kept (remove it to rebuild)",
                                         f"{out}/cars exists: kept (remove it to rebuild)"]
    assert (out / "cars" / "SOURCE.txt").stat().st_mtime_ns == stamp


def test_a_time_budget_ends_the_first_epoch_too(tmp_path):
    """The base trainer's min_epochs=1 made Lightning ignore the budget's stop inside the first epoch: a 2 s budget
    ran 8.3 s, a whole epoch (on a large folder, the first epoch is the whole run)."""
    from bgremover.train import train

    folder = write_folder(tmp_path / "data", n=12)
    cfg = compose_cfg(tmp_path / "run", ["experiment=remover", f"data.root={folder}", *FAST,
                                         "remover_budget_s=0.001", "test=false"])
    _, objects = train(cfg)
    per_epoch = objects["trainer"].num_training_batches
    assert per_epoch >= 3 and objects["trainer"].global_step == 1


def test_make_remover_scores_a_fixed_split_folder_with_its_void_value(tmp_path):
    """A fixed train/val/test folder whose class-index masks hold the void value (data.void_value=255): make
    remover trained and exported, then its scoring failed ("label beyond the class list ... contains 255") and it
    exited 1 without its report: the run's split.json, which records the void value, was read for pooled
    folders only."""
    from bgremover import train_remover

    root = tmp_path / "data"
    for split in ("train", "val", "test"):
        write_folder(root, n=2, split=split, value=2)
    for mask in root.glob("*/masks/*.png"):
        m = np.array(Image.open(mask))
        m[0, :] = 255
        Image.fromarray(m).save(mask)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    found = fd.scan(root, 255)
    run = tmp_path / "run"
    fd.write_split(run / "split.json", fd.split_document(found, fd.splits(found), None, 0))
    pairs, read_label, classes = cutout_eval.find_folder_pairs(root, "test", None, train_remover._split_file(run))
    assert classes == ["background", "cat", "dog"] and len(pairs) == 2
    assert set(np.unique(read_label(pairs[0][1]))) == {0, 2, 3}  # 255 read as void (index 3), not an error


@pytest.mark.parametrize("name", ["poolé", "pool,v2", "pool=v2", "it's [x]"])
def test_make_remover_takes_any_folder_name(tmp_path, monkeypatch, name):
    """`make remover DATA=/data/poolé` (or pool,v2 / pool=v2) was refused in Hydra's words ("LexerNoViableAlt
    Exception", "Ambiguous value ... add --multirun"): the folder went into `data.root=` unquoted (an audit)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from bgremover import train_remover

    data, run = tmp_path / name, tmp_path / f"run {name}"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    seen: list[list[str]] = []

    class FakeTraining:  # records the command the training process would get
        def __init__(self, cmd, env):
            seen.append(cmd)

        def wait(self):
            return 3

    monkeypatch.setattr(train_remover.subprocess, "Popen", FakeTraining)
    assert train_remover.main([str(data), "--run-dir", str(run)]) == 3
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(seen[0][3:])}
    assert parsed["data.root"] == str(data.resolve()) and parsed["hydra.run.dir"] == str(run.resolve())
    # its resume line (the shell drops the quotes) names the run's last.ckpt: a grammar error in that folder too,
    # until the training's command line quoted it (config.hydra_command_line, as for any path typed to train)
    last = run.resolve() / "checkpoints" / "last.ckpt"
    assert train_remover.main([str(data), "--run-dir", str(run), f"ckpt_path={last}"]) == 3
    argv = [config.path_override(a) for a in seen[1][3:]]
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(argv)}
    assert parsed["ckpt_path"] == str(last)


def test_a_split_file_without_a_split_or_naming_a_missing_image_is_one_line(tmp_path):
    """A split.json without its "test" list, or naming an image the folder no longer holds, is a FolderDataError
    that names the file (a KeyError traceback otherwise)."""
    f = fd.scan(write_folder(tmp_path / "d", n=6))
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["im0", "im1", "im2", "im3"], "val": ["im4"]}))
    with pytest.raises(fd.FolderDataError, match=r"not a split file \(JSON with train/val/test lists"):
        fd.splits(f, split_file=path)
    path.write_text(json.dumps({"train": ["im0", "im1", "im2", "im3"], "val": ["im4"], "test": ["gone"]}))
    with pytest.raises(fd.FolderDataError, match=rf"^{path} names 'gone' \(test\), which is not in .*d/images$"):
        fd.splits(f, split_file=path)


def test_a_split_file_naming_an_image_in_two_splits_is_refused(tmp_path):
    """A hand-edited split.json listing im1 in train and in test too was used as it was: the model trained on the
    image it was then scored on, and the held-out numbers were quietly too good."""
    f = fd.scan(write_folder(tmp_path / "d", n=6))
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["im0", "im1", "im2", "im3"], "val": ["im4"], "test": ["im5", "im1"]}))
    with pytest.raises(fd.FolderDataError, match=rf"^{path} names 'im1' in both train and test: each image belongs "
                                                 r"to one split"):
        fd.splits(f, split_file=path)
    with pytest.raises(cutout_eval.EvalError, match="names 'im1' in both train and test"):  # nor scored with it
        cutout_eval.find_folder_pairs(tmp_path / "d", "test", None, path)


def test_a_split_file_that_is_not_there_is_said_so(tmp_path):
    """`eval-cutout --split-file <missing>` (and a folder) said "not a split file (JSON with train/val/test
    lists ...)" of a path that does not exist (a user audit)."""
    with pytest.raises(fd.FolderDataError, match="split file not found: .*nothere.json"):
        fd.read_split(tmp_path / "nothere.json")
    with pytest.raises(fd.FolderDataError, match="is a folder"):
        fd.read_split(tmp_path)
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(fd.FolderDataError, match="not a split file"):
        fd.read_split(tmp_path / "bad.json")
