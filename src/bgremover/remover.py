"""BackgroundRemover: background removal with an exported bgremover ONNX model (the library behind
`bgremover-predict`, `bgremover-serve` and `make eval-cutout`).

    from bgremover.remover import BackgroundRemover     # also importable from bgremover.predict
    cutout = BackgroundRemover().remove("street.jpg")           # RGBA, transparent background
    mask = BackgroundRemover(classes=["Car"]).mask("street.jpg")  # L-mode alpha

Stdlib, numpy, Pillow and onnxruntime only: this module must never import torch, lightning, hydra or a bgremover
module that does — it is what people install to cut out images, and a test enforces it. One BackgroundRemover
keeps no per-call state, so threads may share it (the service does). With no model named it loads the shipped
model's int8 copy (`python -m bgremover.quantize`) while that copy was made from the float file beside it.
Image decoding and encoding live in bgremover.images (re-exported here, the names a user imports). Past 400
lines: one class, whose model loading, inference and output (cut-out, mask, composites) a user meets as one.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from bgremover import model_format
from bgremover.errors import BgRemoverError, ImageError, ModelError, PixelLimitError, UsageError, one_line  # noqa: F401
from bgremover.files import is_stream, write_atomic  # noqa: F401  (re-exported: predict, ship, cutout_eval)
from bgremover.images import (  # noqa: F401  (re-exported: the library's image names since before the split)
    MAX_PIXELS,
    OUTPUT_SUFFIX,
    PNG_COMPRESS_LEVEL,
    PNG_COMPRESS_TYPE,
    ImageInput,
    _load_any,
    encode_image,
    encode_png,
    load_background,
    open_image,
    output_suffix,
    parse_color,
    resize_rgb,
    to_rgba_arrays,
)
from bgremover.padding import crop, pad_image

MODEL_ENV = "BGREMOVER_MODEL"  # environment variable naming the default model file
def _shipped_models() -> Path:
    """models/ of the checkout (editable install), else <prefix>/share/bgremover/models (`pip install .`)."""
    checkout = Path(__file__).resolve().parents[2] / "models"
    return checkout if checkout.is_dir() else Path(sys.prefix) / "share" / "bgremover" / "models"


# shipped with the package (float32: the reference, what export writes and fine-tuning reads)
DEFAULT_MODEL = _shipped_models() / "bgremover-camvid.onnx"
INT8_SUFFIX = ".int8.onnx"  # python -m bgremover.quantize writes <stem>.int8.onnx beside its float model
MAX_SIDE = 1024  # longer image side above which inference runs on a downscaled copy (alpha upsampled back)
REFINE_EPS = 1e-3  # guided-filter regularizer: smaller follows image edges more closely (and noise too)


def threads_problem(threads: int | None) -> str | None:
    """What is wrong with a thread count (the library's, bgremover-predict's and bgremover-serve's rule), or None:
    0 means onnxruntime's default (all cores)."""
    return None if threads is None or threads >= 0 else f"threads must be >= 0 (0 = the default), got {threads}"


# ----------------------------------------------------------------------------------------------------------
# Numeric helpers (numpy only)


def _box_mean(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window, clipped at the borders (divides by the in-image count), via summed areas."""
    h, w = x.shape
    c = np.zeros((h + 1, w + 1), dtype=np.float64)
    np.cumsum(np.cumsum(x, axis=0, dtype=np.float64), axis=1, out=c[1:, 1:])
    y0 = np.clip(np.arange(h) - r, 0, h)
    y1 = np.clip(np.arange(h) + r + 1, 0, h)
    x0 = np.clip(np.arange(w) - r, 0, w)
    x1 = np.clip(np.arange(w) + r + 1, 0, w)
    s = c[y1][:, x1] - c[y0][:, x1] - c[y1][:, x0] + c[y0][:, x0]
    area = np.outer(y1 - y0, x1 - x0)
    return (s / area).astype(np.float32)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float = REFINE_EPS) -> np.ndarray:
    """He et al.'s guided filter with a grayscale guide: smooths `src` while snapping it to edges in `guide`."""
    mean_i = _box_mean(guide, radius)
    mean_p = _box_mean(src, radius)
    cov_ip = _box_mean(guide * src, radius) - mean_i * mean_p
    var_i = _box_mean(guide * guide, radius) - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return _box_mean(a, radius) * guide + _box_mean(b, radius)


def _resize_plane(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float32 HxW plane to (width, height) with Pillow's 32-bit float mode."""
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(x, dtype=np.float32), mode="F").resize(
            size, Image.Resampling.BILINEAR
        ),
        dtype=np.float32,
    )


def fg_softmax(logits: np.ndarray, fg: Sequence[int]) -> np.ndarray:
    """Summed softmax probability of the channels `fg` (float32 HxW) from K x H x W logits (left untouched).

    Same float32 operations, in the same order, as `e = exp(z - max); e[fg].sum(0) / e.sum(0)`, so the result
    is bit-identical to that formula, with one K x H x W temporary instead of three (a copy, the exp, the
    fancy-indexed foreground planes) and the foreground sum taken from planes already computed.
    """
    e = np.subtract(logits, logits.max(axis=0), dtype=np.float32)  # stable softmax; a new contiguous array
    np.exp(e, out=e)
    total = e[0].copy()
    for k in range(1, e.shape[0]):
        total += e[k]
    num = e[fg[0]].copy()
    for k in fg[1:]:
        num += e[k]
    return np.divide(num, total, out=num)


# ----------------------------------------------------------------------------------------------------------
# The predictor


def default_model_path() -> Path:
    """$BGREMOVER_MODEL, else the shipped float model (see `BackgroundRemover`: its int8 copy is preferred)."""
    env = os.environ.get(MODEL_ENV)
    return Path(env) if env else DEFAULT_MODEL


def int8_path(model: str | os.PathLike) -> Path:
    """Where `python -m bgremover.quantize` writes the int8 copy of `model`: <stem>.int8.onnx beside it."""
    model = Path(model)
    return model.with_name(model.name.removesuffix(".onnx") + INT8_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class BackgroundRemover:
    """Cuts foreground classes (by default the model's, e.g. Car/Pedestrian/Bicyclist) out of images."""

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        classes: Sequence[str] | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        max_side: int | None = None,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        if (max_side is not None and max_side < 1) or max_pixels < 1:
            raise UsageError("max_side and max_pixels must be positive")
        if problem := threads_problem(threads):
            raise UsageError(problem)
        self.max_pixels = int(max_pixels)
        self.model_path = Path(model_path) if model_path is not None else default_model_path()
        self.session = self.meta = None
        if model_path is None and not os.environ.get(MODEL_ENV):  # an explicitly named file is taken as given
            self._try_int8(providers, threads)
        if self.session is None:
            try:
                self.session = self._open_session(self.model_path, providers, threads)
                self.meta = self._read_metadata(self.session, self.model_path)
            except ModelError as err:
                if model_path is None and os.environ.get(MODEL_ENV):  # often set long ago, in a shell profile: the
                    # bare "model file not found: /old/path.onnx" left the user wondering where that path came from
                    raise ModelError(f"{err} (named by ${MODEL_ENV}; unset it for the shipped model)") from None
                raise
        # None: the scale the net was trained at (a folder-trained remover's image_size, whatever it is: capped at
        # MAX_SIDE, one trained at 1536 saw its images at two thirds of that scale), else at most MAX_SIDE
        self.max_side = int(max_side) if max_side is not None else int(self.meta.get("image_size") or MAX_SIDE)
        # such a net saw every image scaled to that long side, small ones up too: inferred at their own size they
        # scored 0.304 foreground IoU where the test stage said 0.760. A max_side the caller names only caps.
        self.upscale = max_side is None and bool(self.meta.get("image_size"))
        self.classes: list[str] = list(self.meta["classes"])
        self.mean = np.asarray(self.meta["mean"], dtype=np.float32)
        self.std = np.asarray(self.meta["std"], dtype=np.float32)
        # uint8 -> normalized float32 for each channel, computed with exactly the float32 operations the
        # per-pixel formula (v/255 - mean)/std would use: a table lookup gives bit-identical inputs at a third
        # of the cost (no HxWx3 float temporaries, no float transpose).
        levels = np.arange(256, dtype=np.float32)[:, None]
        self._lut = np.ascontiguousarray(((levels * np.float32(1 / 255) - self.mean) / self.std).T)
        self.size_multiple = int(self.meta["size_multiple"])
        self.input_name = str(self.meta.get("input", "image"))
        self.output_name = str(self.meta.get("output", "logits"))
        self.foreground = self.resolve_classes(
            classes if classes is not None else self.meta["default_foreground"]
        )

    # -- model loading ---------------------------------------------------------------------------------
    def _try_int8(self, providers: Sequence[str] | None, threads: int | None) -> None:
        """Use the shipped model's int8 copy when it exists and was made from the float file now beside it.

        The copy passed bgremover.quantize's accuracy gate (CamVid test mIoU and cut-out IoU against this very
        float file) and runs ~2x faster on CPU. A float model re-exported or retrained since then no longer
        matches the sha256 the copy records, so the stale copy is skipped (with a warning), never used.
        """
        path = int8_path(DEFAULT_MODEL)
        if not path.is_file():
            return
        session = self._open_session(path, providers, threads)
        meta = self._read_metadata(session, path)
        source = (meta.get("quantization") or {}).get("source_sha256")
        if DEFAULT_MODEL.is_file() and source != file_sha256(DEFAULT_MODEL):
            warnings.warn(
                f"{path.name} was not made from the current {DEFAULT_MODEL.name}: using the float model "
                "(re-run python -m bgremover.quantize to refresh it)",
                stacklevel=3,
            )
            return
        self.model_path, self.session, self.meta = path, session, meta

    @property
    def test_miou(self) -> float | None:
        """This file's own test mIoU: an int8 copy's from its quantization record (its metadata's test_mIoU is the
        float model's, which the copy inherits)."""
        own = self._quantization_eval().get("int8", {}).get("mIoU")
        return own if own is not None else (self.meta or {}).get("test_mIoU")

    @property
    def test_frames(self) -> tuple[int | None, int | None]:
        """(frames, of the split's) behind `test_miou`: an int8 copy's scoring may have covered fewer frames than
        the float model's test stage (`quantize --eval-limit`), and was reported with the float model's count."""
        own, meta = self._quantization_eval(), self.meta or {}
        if own.get("int8", {}).get("mIoU") is not None:
            of = own.get("of")
            inherited = meta.get("test_frames_of")
            if of is None and own.get("split", "test") == "test" and (own.get("frames") or 0) <= (inherited or -1):
                # a record written before quantize kept the split's size (the shipped copy's): it scored the
                # float model's test split (CamVid test, as quantize always does), whose size the copy's metadata
                # inherits from that model; /model said "test_frames_of": null, which reads as "not tested"
                of = inherited
            return own.get("frames"), of
        return meta.get("test_frames"), meta.get("test_frames_of")

    def _quantization_eval(self) -> dict:
        return (((self.meta or {}).get("quantization") or {}).get("eval")) or {}

    @staticmethod
    def _open_session(path: Path, providers: Sequence[str] | None, threads: int | None):
        import onnxruntime as ort

        if not path.is_file():
            if path == DEFAULT_MODEL and not os.environ.get(MODEL_ENV):
                raise ModelError(
                    f"no model found at {path}: train and export one (make export CKPT=...), "
                    f"or pass --model / set {MODEL_ENV}"
                )
            # `-m u2net`, `-m isnet-general-use`: rembg's model names, typed from habit, read as file names
            hint = (" (rembg's model names are no models here: give an exported .onnx file, or leave -m out for "
                    "the shipped model)" if not path.suffix and path.name == str(path) and not path.exists() else "")
            raise ModelError(model_format.missing_model_problem(path) + hint)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        # Idle intra-op threads sleep instead of spinning (as OpenMP does with OMP_WAIT_POLICY=PASSIVE, which the
        # Makefile sets for torch): on a shared or oversubscribed CPU, and in the server where requests run
        # side by side, spinning threads steal the cores the busy ones need. Measured with the int8 model at
        # 480x360 on the 2-core EPYC under load ~5: median 135 ms vs 190 ms spinning. OMP_WAIT_POLICY=ACTIVE
        # turns spinning back on for a dedicated machine.
        spin = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "ACTIVE"
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        opts.log_severity_level = 3  # ORT's warnings (e.g. unused initializers) are not the user's business
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            return ort.InferenceSession(str(path), opts, providers=list(providers))
        except Exception as err:  # a .pt/.ckpt, TorchScript or image file said onnxruntime's "INVALID_PROTOBUF"
            raise ModelError(model_format.not_a_model_problem(path)
                             or f"cannot load ONNX model {path}: {one_line(err, 200)}") from err

    def _read_metadata(self, session, path: Path) -> dict[str, Any]:
        try:
            meta = model_format.parse(session.get_modelmeta().custom_metadata_map.get(model_format.METADATA_KEY))
        except model_format.FormatError as err:
            raise ModelError(f"{err}: {path}") from None
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if meta.get("input", "image") not in inputs or meta.get("output", "logits") not in outputs:
            raise ModelError(f"{path}: model inputs {inputs} / outputs {outputs} do not match its metadata")
        return meta

    def resolve_classes(self, names: Sequence[str] | str) -> list[int]:
        """Class names (case-insensitive) -> channel indices; UsageError listing valid names otherwise."""
        if isinstance(names, str):
            names = [n for n in names.split(",")]
        lookup = {c.lower(): i for i, c in enumerate(self.classes)}
        wanted = [n.strip() for n in names if n.strip()]
        unknown = [n for n in wanted if n.lower() not in lookup]
        if unknown or not wanted:
            what = f"unknown class name(s) {', '.join(unknown)}" if unknown else "no foreground class given"
            raise UsageError(f"{what}; valid names: {', '.join(self.classes)}")
        return sorted({lookup[n.lower()] for n in wanted})

    # -- inference -------------------------------------------------------------------------------------
    def prepare(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """(1x3xHxW float32 net input, crop box) for an RGB uint8 image: padded to the size multiple by the
        project's one rule (bgremover.padding), then normalized. Padding the uint8 image before normalizing
        gives the same values as the other way round (reflection copies pixels) on a quarter of the bytes."""
        padded, box = pad_image(rgb, self.size_multiple)
        planes = np.ascontiguousarray(padded.transpose(2, 0, 1))  # uint8 CHW
        x = np.empty((1, *planes.shape), dtype=np.float32)
        for c in range(3):
            np.take(self._lut[c], planes[c], out=x[0, c])
        return x, box

    def logits(self, rgb: np.ndarray) -> np.ndarray:
        """K x h x w logits for an RGB uint8 image at its own size (padded to the size multiple, then cropped)."""
        x, box = self.prepare(rgb)
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        if out.ndim != 4 or out.shape[1] != len(self.classes):
            raise ModelError(f"model returned shape {out.shape}, expected 1x{len(self.classes)}xHxW")
        return crop(out[0], box)

    def inference_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) a w x h image is inferred at: its long side scaled to max_side, down only, or up too for
        a net trained at one size (upscale). The image's own size means no scaling (a scaled long side is max_side)."""
        scale = self.max_side / max(h, w) if self.upscale else min(1.0, self.max_side / max(h, w))
        return (w, h) if scale == 1.0 else (max(1, round(w * scale)), max(1, round(h * scale)))

    def foreground_probability(self, rgb: np.ndarray, classes: Sequence[str] | None = None) -> np.ndarray:
        """Soft alpha in 0..1 (float32 HxW at the image's full size): summed softmax of the foreground classes."""
        fg = self.foreground if classes is None else self.resolve_classes(classes)
        h, w = rgb.shape[:2]
        size = self.inference_size(w, h)
        small = rgb if size == (w, h) else resize_rgb(rgb, size)  # as training scaled its images (image_size)
        prob = fg_softmax(self.logits(small), fg)
        if size != (w, h):
            # Upsampling the summed probability equals summing upsampled per-class probabilities (bilinear is
            # linear) at 1/K of the memory, which matters at tens of megapixels.
            prob = _resize_plane(prob, (w, h))
        return np.clip(prob, 0.0, 1.0)

    def alpha(
        self,
        img: ImageInput,
        classes: Sequence[str] | None = None,
        threshold: float | None = None,
        refine: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(RGB uint8, alpha uint8 HxW, input alpha or None) for any supported input."""
        return self._arrays(img, classes, threshold, refine)[:3]

    def _arrays(
        self, img: ImageInput, classes: Sequence[str] | None, threshold: float | None, refine: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, bytes | None]:
        """alpha()'s arrays and the input's RGB colour profile (remove() keeps it on its output)."""
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise UsageError(f"threshold must be within 0..1, got {threshold}")
        rgb, in_alpha, icc = _load_any(img, self.max_pixels)
        prob = self.foreground_probability(rgb, classes)
        if refine:
            guide = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
            radius = max(2, round(min(rgb.shape[:2]) / 90))  # ~4 px at 360 lines: about one object edge band
            prob = np.clip(guided_filter(guide, prob, radius), 0.0, 1.0)
        if threshold is not None:
            prob = (prob >= threshold).astype(np.float32)
        alpha = (prob * 255.0 + 0.5).astype(np.uint8)
        if in_alpha is not None:
            alpha = np.minimum(alpha, in_alpha)  # never reveal what the input had already made transparent
        return rgb, alpha, in_alpha, icc

    def mask(self, img: ImageInput, **opts: Any) -> Image.Image:
        """L-mode alpha mask (255 = foreground) at the input's full, EXIF-corrected size."""
        return self.remove(img, mask_only=True, **opts)

    def remove(
        self,
        img: ImageInput,
        *,
        classes: Sequence[str] | None = None,
        threshold: float | None = None,
        refine: bool = False,
        mask_only: bool = False,
        bg_color: Sequence[int] | str | None = None,
        bg_image: ImageInput | None = None,
    ) -> Image.Image:
        """Cut-out at the input's full size: RGBA (default), L mask (`mask_only`) or RGB over a background.

        `bg_color` (R, G, B) is opaque; (R, G, B, A) puts the cut-out over that colour at opacity A (RGBA out;
        A=255 is the opaque RGB composite, A=0 the plain cut-out). A `bg_image` with transparent areas keeps them
        (RGBA out, as Pillow's Image.alpha_composite of the cut-out over it)."""
        if sum([mask_only, bg_color is not None, bg_image is not None]) > 1:
            raise UsageError("choose at most one of mask_only, bg_color, bg_image")
        if bg_color is not None:
            bg_color = parse_color(bg_color)
            if len(bg_color) == 4 and bg_color[3] in (0, 255):
                bg_color = bg_color[:3] if bg_color[3] == 255 else None
        rgb, alpha, _, icc = self._arrays(img, classes, threshold, refine)
        if mask_only:
            return Image.fromarray(alpha, mode="L")
        out = self._colour_output(rgb, alpha, bg_color, bg_image)
        if icc is not None:  # the RGB values are the input's, so its profile still describes them (encode_png writes it)
            out.info["icc_profile"] = icc
        return out

    def _colour_output(
        self, rgb: np.ndarray, alpha: np.ndarray, bg_color: tuple[int, ...] | None, bg_image: ImageInput | None
    ) -> Image.Image:
        """The RGBA cut-out, or the cut-out over bg_color / bg_image (see remove): RGB over an opaque background,
        RGBA over one with transparency, whose transparency it keeps (Pillow's Image.alpha_composite)."""
        if bg_color is None and bg_image is None:
            cutout = Image.fromarray(rgb)  # putalpha interleaves in C: 5x cheaper than np.dstack + fromarray
            cutout.putalpha(Image.fromarray(alpha))
            return cutout
        h, w = alpha.shape
        bg_a: np.ndarray | float | None = None  # the background's opacity, 0..1; None: opaque
        if bg_image is not None:
            # Cover the whole frame without distortion: scale to fill, centre-crop the overflow (Pillow resizes
            # RGBA premultiplied: a transparent pixel's hidden colour does not bleed into its neighbours)
            fitted = np.asarray(ImageOps.fit(load_background(bg_image, self.max_pixels), (w, h),
                                             Image.Resampling.BILINEAR), np.float32)
            bg = fitted[:, :, :3]
            if fitted.shape[2] == 4:
                bg_a = fitted[:, :, 3:] / 255.0
        else:
            bg = np.broadcast_to(np.asarray(bg_color[:3], np.float32), (h, w, 3))
            if len(bg_color) == 4:
                bg_a = bg_color[3] / 255.0
        a = alpha.astype(np.float32)[:, :, None] / 255.0
        if bg_a is not None:  # over a translucent background: "over" with both alphas; where neither covers, the
            # background's hidden colour stays hidden (alpha 0), as Image.alpha_composite keeps it
            b = (1.0 - a) * bg_a
            out_a = a + b
            out = (rgb.astype(np.float32) * a + bg * b) / np.maximum(out_a, 1e-6)
            return Image.fromarray(np.dstack([out + 0.5, out_a[:, :, 0] * 255.0 + 0.5]).astype(np.uint8), mode="RGBA")
        out = rgb.astype(np.float32) * a + bg * (1.0 - a)
        return Image.fromarray((out + 0.5).astype(np.uint8), mode="RGB")
