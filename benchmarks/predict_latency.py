"""End-to-end background-removal latency: ONNX Runtime predictor vs eager PyTorch, on the same model.

    python benchmarks/predict_latency.py [--ckpt runs/x/checkpoints/best.ckpt | --net deeplabv3plus] [--threads 2]

Per image: decode PNG bytes -> infer -> softmax/alpha -> encode PNG, at 480x360 (CamVid size) and 1920x1080
(inferred at --max-side, alpha upsampled back). The PyTorch path reuses the predictor and swaps only the
inference call, so the two rows differ by the inference engine alone. Without --ckpt a freshly initialised
net from conf/model/<--net>.yaml is used (latency does not depend on the weights' values). Also reports the
PNG encoding cost at the predictor's compress_level vs Pillow's default.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bgremover import predict
from bgremover.export import export_onnx, load_checkpoint_net

REPO = Path(__file__).resolve().parents[1]
# A real photo, because PNG cost depends on content; a synthetic scene stands in where CamVid is absent.
CAMVID_SAMPLE = Path("/work/shared/CamVid/test/0001TP_008550.png")
SIZES = ((480, 360), (1920, 1080))  # (width, height)
PILLOW_DEFAULT_PNG_LEVEL = 6  # what Image.save(..., "PNG") uses when compress_level is not given


def fresh_net(name: str) -> tuple[torch.nn.Module, dict]:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from bgremover.data.classes import CLASSES, DEFAULT_FOREGROUND, MEAN, STD

    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    root = OmegaConf.create({"model": cfg})  # net_name interpolates ${model.net...}
    net_cfg = OmegaConf.to_container(root.model.net, resolve=True)
    if "encoder_weights" in net_cfg:
        net_cfg["encoder_weights"] = None  # random init is enough for timing, and needs no download
    torch.manual_seed(0)
    net = instantiate(net_cfg).eval()
    meta = {
        "classes": list(CLASSES), "mean": list(MEAN), "std": list(STD), "size_multiple": 32,
        "default_foreground": list(DEFAULT_FOREGROUND), "net": str(root.model.get("net_name", name)),
        "params": sum(p.numel() for p in net.parameters()), "test_mIoU": None,
    }  # fmt: skip
    return net, meta


class TorchSession:
    """Quacks like the onnxruntime session the predictor calls, but runs the eager PyTorch net."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def run(self, names, feeds):
        (x,) = feeds.values()
        with torch.inference_mode():
            return [self.net(torch.from_numpy(x)).numpy()]


def sample_png(size: tuple[int, int]) -> bytes:
    if CAMVID_SAMPLE.is_file():
        img = Image.open(CAMVID_SAMPLE).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    else:  # smooth synthetic scene: gradients plus a few blocks (noise would make PNG unrealistically slow)
        w, h = size
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=2).astype(np.uint8)
        arr[h // 3 : h // 2, w // 4 : w // 2] = (200, 30, 30)
        img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def time_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="bgremover training checkpoint (default: a fresh --net)")
    p.add_argument("--net", default="deeplabv3plus", help="conf/model/<NET>.yaml for a fresh net")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for both engines")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per cell (median reported)")
    p.add_argument("--max-side", type=int, default=predict.MAX_SIDE)
    args = p.parse_args()

    net, meta = load_checkpoint_net(args.ckpt) if args.ckpt else fresh_net(args.net)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        diff = export_onnx(net, meta, onnx_path)["max_abs_diff"]
        print(f"model: {meta['net']} ({meta['params']:,} params), exported+verified in "
              f"{time.perf_counter() - t0:.1f}s, max |torch-ort| {diff:.1e}; threads={args.threads}, "
              f"max_side={args.max_side}, torch {torch.__version__}, median of {args.reps}")  # fmt: skip
        ort_remover = predict.BackgroundRemover(
            onnx_path, threads=args.threads, max_side=args.max_side, providers=["CPUExecutionProvider"]
        )
        torch_remover = predict.BackgroundRemover(onnx_path, threads=args.threads, max_side=args.max_side)
        torch_remover.session = TorchSession(net)

        print(f"\n{'image':>10} {'infer at':>9} {'onnxruntime ms':>15} {'pytorch ms':>11} {'torch/ort':>10}")
        for w, h in SIZES:
            data = sample_png((w, h))
            scale = min(1.0, args.max_side / max(w, h))
            at = f"{round(w * scale)}x{round(h * scale)}"

            def e2e(remover, data=data):
                return predict.encode_png(remover.remove(io.BytesIO(data)))

            ms_ort = time_ms(lambda: e2e(ort_remover), args.reps)
            ms_torch = time_ms(lambda: e2e(torch_remover), args.reps)
            print(f"{w}x{h:<6} {at:>9} {ms_ort:15.1f} {ms_torch:11.1f} {ms_torch / ms_ort:9.2f}x")

        print(f"\nPNG encode of the RGBA cut-out: compress_level={predict.PNG_COMPRESS_LEVEL} (predictor) "
              f"vs {PILLOW_DEFAULT_PNG_LEVEL} (Pillow default)")  # fmt: skip
        for w, h in SIZES:
            cutout = ort_remover.remove(io.BytesIO(sample_png((w, h))))
            cells = []
            for level in (predict.PNG_COMPRESS_LEVEL, PILLOW_DEFAULT_PNG_LEVEL):
                ms = time_ms(lambda level=level, img=cutout: predict.encode_png(img, level), args.reps)
                kb = len(predict.encode_png(cutout, level)) / 1024
                cells.append(f"level {level}: {ms:7.1f} ms {kb:7.0f} KiB")
            print(f"{w}x{h:<6} " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
