"""Image files in and out for the predictor: decoding any Pillow mode (EXIF-turned, pixel-limited, pipes and
bytes too) to RGB + alpha arrays, and encoding cut-outs as PNG or JPEG. Split from bgremover.remover (which
re-exports what it always offered) so that the predictor file reads in one sitting.

Stdlib, numpy and Pillow only, like bgremover.remover: never torch, lightning or hydra.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bgremover.errors import ImageError, PixelLimitError, UsageError, one_line

MAX_PIXELS = 64_000_000  # refuse larger images (decompression bombs); PIL itself refuses above ~179 Mpx
# zlib level for the output PNGs, measured with benchmarks/predict_latency.py on a CamVid photo's RGBA cut-out:
# 480x360 encodes in ~31-43 ms at level 1 vs ~125-138 ms at Pillow's default 6 (files +15%); 1920x1080 in
# ~175-245 ms vs ~600-1000 ms (+31%). For a small net on a GPU the default level would cost more than the
# inference itself; cut-outs are usually re-edited anyway, so speed wins over a few hundred KiB.
PNG_COMPRESS_LEVEL = 1
# zlib strategy Z_RLE (3) instead of Pillow's Z_FILTERED for PNGs: lossless like any strategy, and on CamVid
# cut-outs 7 % (480x360) to 19 % (1920x1080) smaller files at the same or slightly lower encode time (benchmarks/
# predict_latency.py). After PNG's row filters photos leave few long matches worth searching for; runs remain.
PNG_COMPRESS_TYPE = 3
OUTPUT_SUFFIX = ".nobg.png"  # <stem>.nobg.png: a cut-out or a composite
MASK_SUFFIX = ".mask.png"  # <stem>.mask.png: a mask (--mask-only; the service names its downloads alike)
# how a folder run (and the training's folder reader) recognises earlier outputs: never inputs, skipped if made
PREDICTED_SUFFIXES = (OUTPUT_SUFFIX, MASK_SUFFIX)


def output_suffix(mask_only: bool = False) -> str:
    """A mask and a cut-out of one photo get different names: with one name, a mask run over a folder of earlier
    cut-outs skipped every photo as done."""
    return MASK_SUFFIX if mask_only else OUTPUT_SUFFIX


# what a folder run reads. .jfif (browsers save JPEGs so) and .avif (phones, the web; Pillow >= 11.2 decodes it)
# were skipped without a word in a folder of photos; an .avif a Pillow without the codec cannot read fails in one
# line, named, instead
IMAGE_EXTENSIONS = frozenset(
    {
        ".png",
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".avif",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".tga",
    }
)

ImageInput = Image.Image | np.ndarray | str | os.PathLike | IO[bytes] | bytes | bytearray | memoryview

# ----------------------------------------------------------------------------------------------------------
# Image decoding: any Pillow mode -> (RGB uint8 HxWx3, alpha uint8 HxW or None)


def image_format(path) -> str | None:
    """The image format a file's header names ("JPEG", "PNG"), None for anything else: read, never decoded."""
    try:
        with Image.open(path) as img:
            return img.format
    except Exception:  # not an image (or unreadable): the caller's own error stands
        return None


def open_image(
    src: str | os.PathLike | IO[bytes] | bytes | bytearray | memoryview, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Open and fully decode an image (a path, a binary file object, or an encoded file's bytes), EXIF-rotated,
    or raise ImageError with one clear line."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        # A file's contents, as rembg's remove() takes them: Image.open would read bytes as a file *name*.
        name, src = "<bytes>", io.BytesIO(src)
    elif isinstance(src, (str, os.PathLike)):
        name = str(src)
    elif callable(getattr(src, "read", None)):
        name = "<stdin>"
    else:  # None, a number...: say so instead of PIL's "'NoneType' object has no attribute 'read'"
        raise ImageError(
            f"unsupported image input of type {type(src).__name__}: expected a path, bytes, a binary file "
            "object, a PIL image or a numpy array"
        )
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.exists():
            raise ImageError(f"{name}: no such file")
        if path.is_dir():
            raise ImageError(f"{name}: is a directory")
        if stat.S_ISFIFO(path.stat().st_mode):  # a pipe, as `i <(curl -s URL) out.png` gives one: it has no size
            # (it was "empty file") and reads once, where Pillow seeks
            with open(path, "rb") as fh:
                src = io.BytesIO(fh.read())
            if not src.getbuffer().nbytes:
                raise ImageError(f"{name}: no data")
        elif path.stat().st_size == 0:
            raise ImageError(f"{name}: empty file")
    try:
        opened, trouble = _recording(lambda: _open_unbounded(src))  # JPEG's EXIF is parsed here, warnings and all
        with opened:
            w, h = opened.size
            if w * h > max_pixels:
                raise PixelLimitError(
                    f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                    "(raise --max-pixels if you trust this file)"
                )
            opened.load()  # decode now so truncated files fail here, not halfway through the pipeline
            frames = getattr(opened, "n_frames", 1)
            # an animated GIF/WebP/PNG or a multi-page TIFF: rembg too takes the first, without a word; not a camera
            # JPEG carrying a second picture (MPF: a gain map, a depth map), which Pillow opens as 2-frame MPO
            if frames > 1 and opened.format != "MPO":
                warnings.warn(f"{name}: {frames} frames, only the first is cut out", stacklevel=2)
            # a decoded copy: usable after the file is closed
            img, later = _recording(lambda: ImageOps.exif_transpose(opened))
            if img.mode == "I" and opened.format == "PPM":  # a 16-bit PGM, its maxval scaled by Pillow to 65535:
                img = img.convert("I;16")  # 16-bit, as its kin I;16 is, even where no pixel is above 255 (dark)
        # inside the try: under an error filter (-W error) a damaged file is an ImageError, not a traceback
        _report_metadata(name, trouble + later)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise PixelLimitError(
            f"{name}: too many pixels, possible decompression bomb ({one_line(err, 200)})"
        ) from err
    except UnidentifiedImageError as err:
        raise ImageError(f"{name}: not a recognised image file") from err
    except Exception as err:  # truncated data, corrupt chunks, broken EXIF...: all "cannot decode"
        raise ImageError(f"{name}: cannot decode image ({one_line(err, 200)})") from err
    return img


# warnings.catch_warnings swaps process-wide state (filters, the show function) on entry and back on exit: two
# server threads interleaving left the process recording every later warning into a finished request's list
_RECORDING = threading.Lock()


def _recording(call):
    """(call(), the warnings it raised), recorded instead of shown; PIL's DecompressionBombWarning dropped (our
    max_pixels check decides; its hard error stays). Only the cheap header parse and EXIF rotation run under it."""
    with _RECORDING, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return call(), list(caught)

def _open_unbounded(src) -> Image.Image:
    """Image.open without PIL's own pixel ceiling (an error past ~179 Mpx, whatever --max-pixels allowed): the
    max_pixels check right after it decides, naming the option. Called under _RECORDING's lock, so no other open
    of ours sees the limit lifted."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return Image.open(src)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _report_metadata(name: str, caught: list) -> None:
    """PIL's warnings about a file's metadata (EXIF cut short: "Truncated File Read", twice, naming PIL's own
    source line) as one warning naming the file; any other warning as it came."""
    for w in caught:
        if not issubclass(w.category, UserWarning):
            warnings.warn(w.message, stacklevel=3)
    damaged = [w for w in caught if issubclass(w.category, UserWarning)]
    if damaged:
        warnings.warn(f"{name}: damaged metadata ({one_line(damaged[0].message, 200)}): the pixels decoded fine, an "
                      "EXIF rotation may be missing", stacklevel=3)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale pixel data to uint8: 16-bit by /257 (65535 -> 255), floats as 0..1 (or 0..255 if above 1)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float32))
        if arr.size and float(arr.max()) > 1.0:
            arr = arr / 255.0  # float data already on a 0..255 scale (e.g. PIL "F" images)
        return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.dtype == np.uint16 or arr.dtype == np.dtype(">u2"):
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    # Wider ints (PIL mode "I"): 8-bit data stays, anything larger is assumed to be 16-bit.
    top = 255 if arr.size == 0 or int(arr.max()) <= 255 else 65535
    arr = np.clip(arr.astype(np.int64), 0, top)
    return ((arr * 255 + top // 2) // top).astype(np.uint8)


def to_rgba_arrays(img: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB uint8 HxWx3, alpha uint8 HxW or None when the image is opaque by construction)."""
    if isinstance(img, np.ndarray):
        arr = _to_uint8(np.asarray(img))
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or min(arr.shape[:2]) == 0:
            raise ImageError(f"array of shape {np.asarray(img).shape} is not an HxW, HxWx3 or HxWx4 image")
        if arr.shape[2] in (1, 2):
            rgb = np.repeat(arr[:, :, :1], 3, axis=2)
        else:
            rgb = arr[:, :, :3]
        alpha = arr[:, :, -1] if arr.shape[2] in (2, 4) else None
        return np.ascontiguousarray(rgb), None if alpha is None else np.ascontiguousarray(alpha)

    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        raw = np.asarray(img)
        gray = np.ascontiguousarray(np.repeat(_to_uint8(raw)[:, :, None], 3, axis=2))
        key = img.info.get("transparency")  # a 16-bit gray PNG's tRNS colour key: transparent, as L's below
        return gray, None if not isinstance(key, int) else np.where(raw == key, 0, 255).astype(np.uint8)
    has_alpha = "A" in img.getbands() or "a" in img.getbands()
    if not has_alpha and mode in ("P", "PA", "L", "LA", "RGB", "1"):
        has_alpha = "transparency" in img.info  # palette or tRNS transparency
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"))
        return np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3])
    rgb = img if mode == "RGB" else img.convert("RGB")  # CMYK, YCbCr, L, 1, P, LAB, HSV ...
    return np.asarray(rgb), None


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H×W×3 uint8 image at `size` (width, height): area-averaged down, bilinear up. The one rule for an image's
    scale, in training (data=folder's image_size) and in the predictor: a net scoring bilinear-shrunk (softer)
    frames where it had learnt area-averaged ones gave another class on 2-3 % of the pixels."""
    w, h = size
    if rgb.shape[:2] == (h, w):
        return rgb
    down = rgb.shape[0] > h
    # np.array: a writable copy (Pillow's array view is read-only, and training's ToTensorV2 warned about it)
    return np.array(Image.fromarray(rgb).resize((w, h), Image.Resampling.BOX if down else Image.Resampling.BILINEAR))


def _rgb_profile(img: Image.Image) -> bytes | None:
    """The image's embedded ICC profile when it describes RGB data (its header's colour space is 'RGB '), else None.

    Cut-outs pass the RGB values through unchanged, so an RGB profile still describes them and must travel with
    the output (a Display P3 or Adobe RGB photo would otherwise be shown as sRGB: dull or shifted colours). A
    CMYK or gray profile does not describe the RGB we convert such inputs to, so it is dropped."""
    icc = img.info.get("icc_profile")
    return icc if isinstance(icc, bytes) and icc[16:20] == b"RGB " else None


def _load_any(src: ImageInput, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None, bytes | None]:
    """(RGB, alpha or None, the input's RGB ICC profile or None) for any supported input."""
    if isinstance(src, np.ndarray):
        if src.ndim >= 2 and src.shape[0] * src.shape[1] > max_pixels:
            raise PixelLimitError(
                f"array of {src.shape[0]}x{src.shape[1]} pixels exceeds the limit of {max_pixels:,}"
            )
        return (*to_rgba_arrays(src), None)
    if isinstance(src, Image.Image):
        if src.width * src.height > max_pixels:
            raise PixelLimitError(f"image of {src.width}x{src.height} pixels exceeds the limit of {max_pixels:,}")
        try:
            return (*to_rgba_arrays(ImageOps.exif_transpose(src)), _rgb_profile(src))
        except (OSError, ValueError) as err:
            raise ImageError(f"cannot convert image: {one_line(err, 200)}") from err
    img = open_image(src, max_pixels)
    return (*to_rgba_arrays(img), _rgb_profile(img))


def load_background(src: ImageInput, max_pixels: int) -> Image.Image:
    """A background to composite over (--bg-image, bg_image): RGB when opaque (an RGBA file all opaque too), RGBA
    when it has transparent areas, which the composite keeps. Reading it as RGB showed the colours hidden under
    its alpha 0 (a red half of alpha 0 came out red)."""
    rgb, alpha, _ = _load_any(src, max_pixels)
    img = Image.fromarray(rgb)
    if alpha is not None and bool((alpha < 255).any()):
        img.putalpha(Image.fromarray(alpha))
    return img

def encode_png(
    img: Image.Image, compress_level: int = PNG_COMPRESS_LEVEL, compress_type: int = PNG_COMPRESS_TYPE
) -> bytes:
    """PNG bytes; compress_type is zlib's strategy (-1: Pillow's default)."""
    buf = io.BytesIO()
    # The input's colour profile that remove() keeps on the image, written as the PNG's iCCP chunk.
    img.save(buf, format="PNG", compress_level=compress_level, compress_type=compress_type,
             icc_profile=img.info.get("icc_profile"))
    return buf.getvalue()


JPEG_SUFFIXES = (".jpg", ".jpeg")  # an output with no transparency (an opaque background, a mask) may be a JPEG
OUTPUT_SUFFIXES = (".png", *JPEG_SUFFIXES)  # what a named output file may end in
JPEG_QUALITY = 95


def encode_image(img: Image.Image, suffix: str = ".png") -> bytes:
    """PNG bytes (encode_png), or JPEG ones for a .jpg/.jpeg name: the caller checked that `img` is opaque."""
    if suffix.lower() not in JPEG_SUFFIXES:
        return encode_png(img)
    buf = io.BytesIO()
    img.convert("L" if img.mode == "L" else "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY,
                                                        icc_profile=img.info.get("icc_profile"))
    return buf.getvalue()


def parse_color(value: str | Sequence[int]) -> tuple[int, ...]:
    """'R,G,B' or 'R,G,B,A' (0..255), '#rrggbb' or '#rrggbbaa', or those numbers -> 3 or 4 ints; UsageError
    otherwise. A is the background's opacity (rembg's `-bgc R G B A`): 255 opaque, 0 none at all (the plain cut-out)."""
    text = value.strip() if isinstance(value, str) else None
    try:
        if text is None:
            vals = [int(v) for v in value]
        elif text.startswith("#") and len(text) in (7, 9):
            vals = [int(text[i : i + 2], 16) for i in range(1, len(text), 2)]
        else:
            vals = [int(v) for v in text.split(",")]
    except (TypeError, ValueError):
        vals = []
    if len(vals) not in (3, 4) or not all(0 <= v <= 255 for v in vals):
        raise UsageError(f"bad colour {value!r}: expected R,G,B or R,G,B,A with values 0..255 (or #rrggbb[aa])")
    return tuple(vals)
