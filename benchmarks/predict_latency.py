"""End-to-end background-removal latency: the ONNX Runtime predictor (float32 and int8) vs eager PyTorch.

    python benchmarks/predict_latency.py [--model models/bgremover-camvid.onnx] [--int8 PATH]
                                         [--ckpt runs/x/checkpoints/best.ckpt | --net deeplabv3plus]
                                         [--threads 2] [--reps 15]

Per image: decode PNG bytes -> pad/normalize -> infer -> softmax/alpha -> encode PNG, at 480x360 (CamVid size)
and 1920x1080, each inferred at the predictor's scale (alpha upsampled back): at most 1024 on the long side, or
the long side a folder-trained remover was trained at, as bgremover-predict and bgremover-serve infer (--max-side
caps it instead, as their --max-side does). Every row goes through the same predictor code and
differs only in the inference call. Models:
  - default: the shipped model itself (--model, default models/bgremover-camvid.onnx), its int8 copy when it
    exists (--int8, default <model>.int8.onnx; `python -m bgremover.quantize` writes it), and eager PyTorch
    rebuilt from the ONNX file's own weights (DeepLabV3+ from segmentation-models-pytorch, each exported
    Conv's folded BatchNorm restored as a BatchNorm with unit scale; the logits are checked against
    onnxruntime's before timing);
  - --ckpt / --net: a training checkpoint or a freshly initialised conf/model/<NET>.yaml net (latency does not
    depend on the weights' values), exported to a temporary ONNX file.
The engines run round-robin within each repetition so a busy shared CPU slows them alike; medians are printed
with the load average before and after. Then a per-stage profile of one 480x360 image, and the PNG encoder
settings.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Both engines' idle threads sleep (as `make` runs everything): set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bgremover import remover as lib  # noqa: E402
from bgremover.errors import OneLineParser, UserError, report  # noqa: E402
from bgremover.padding import crop  # noqa: E402
from bgremover.utils import cpu_kind  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# A real photo, because PNG cost depends on content; a synthetic scene stands in where CamVid is absent.
CAMVID_SAMPLE = Path("/work/shared/CamVid/test/0001TP_008550.png")
SIZES = ((480, 360), (1920, 1080))  # (width, height)
PILLOW_DEFAULT_PNG_LEVEL = 6  # what Image.save(..., "PNG") uses when compress_level is not given
MAX_TORCH_DIFF = 1e-3  # max |eager PyTorch - onnxruntime| logit difference accepted for the rebuilt net


# ----------------------------------------------------------------------------------------------------------
# Eager PyTorch nets


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


def net_from_onnx(path: Path) -> torch.nn.Module:
    """The eager DeepLabV3+ whose forward pass is the ONNX file's: Conv weights copied in execution order (shapes
    checked), each folded BatchNorm turned back into a BatchNorm that only adds the folded bias, so eager
    PyTorch does the work an eager user's net does (conv, BN, activation)."""
    import onnx
    import segmentation_models_pytorch as smp
    from onnx import numpy_helper

    meta = lib.model_format.parse(
        {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}.get(
            lib.model_format.METADATA_KEY
        )
    )
    net_name = str(meta.get("net", ""))
    if not net_name.startswith("deeplabv3plus_"):
        raise SystemExit(f"error: can rebuild DeepLabV3+ ONNX files only (this is {net_name!r}); use --ckpt")
    net = smp.DeepLabV3Plus(
        encoder_name=net_name.removeprefix("deeplabv3plus_"), encoder_weights=None,
        encoder_output_stride=16, in_channels=3, classes=len(meta["classes"]),
    ).eval()  # fmt: skip

    order: list[torch.nn.Module] = []  # leaf modules in execution order
    hooks = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net(torch.zeros(1, 3, 64, 64))
    for h in hooks:
        h.remove()

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    onnx_convs = [n for n in model.graph.node if n.op_type == "Conv"]
    torch_convs = [i for i, m in enumerate(order) if isinstance(m, torch.nn.Conv2d)]
    if len(onnx_convs) != len(torch_convs):
        raise SystemExit(f"error: {len(onnx_convs)} Conv nodes in {path} but {len(torch_convs)} in the rebuilt net")
    with torch.no_grad():
        for node, i in zip(onnx_convs, torch_convs, strict=True):
            conv, w = order[i], inits[node.input[1]]
            if tuple(conv.weight.shape) != w.shape:
                raise SystemExit(f"error: {node.name}: ONNX weight {w.shape} vs PyTorch {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(np.array(w)))
            b = torch.from_numpy(np.array(inits[node.input[2]])) if len(node.input) > 2 else None
            nxt = order[i + 1] if i + 1 < len(order) else None
            if conv.bias is not None:
                conv.bias.copy_(b if b is not None else torch.zeros_like(conv.bias))
            elif isinstance(nxt, torch.nn.BatchNorm2d):
                nxt.running_mean.zero_()
                nxt.running_var.fill_(1.0 - nxt.eps)  # (x - 0) / sqrt(var + eps) = x
                nxt.weight.fill_(1.0)
                nxt.bias.copy_(b if b is not None else torch.zeros_like(nxt.bias))
            elif b is not None:
                raise SystemExit(f"error: {node.name} has a bias but its PyTorch conv has neither bias nor BatchNorm")
    return net


class TorchSession:
    """Quacks like the onnxruntime session the predictor calls, but runs the eager PyTorch net."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def run(self, names, feeds):
        (x,) = feeds.values()
        with torch.inference_mode():
            return [self.net(torch.from_numpy(x)).numpy()]


# ----------------------------------------------------------------------------------------------------------
# Timing


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


def round_robin(fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """ms per call for each fn, the fns interleaved within every repetition."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1000)
    return times


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"



def stage_profile(remover: lib.BackgroundRemover, data: bytes, reps: int) -> list[tuple[str, list[float]]]:
    """ms of each step of BackgroundRemover.remove + encode_png for one image (the same code, split up).
    Inferred at another size (a folder-trained remover's scale), the image is scaled first and the alpha back:
    two more steps."""
    rgb = lib.to_rgba_arrays(lib.open_image(io.BytesIO(data)))[0]
    h, w = rgb.shape[:2]
    size = remover.inference_size(w, h)
    small = rgb if size == (w, h) else lib.resize_rgb(rgb, size)
    x, box = remover.prepare(small)
    out = remover.session.run([remover.output_name], {remover.input_name: x})[0]
    logits = crop(out[0], box)
    prob = lib.fg_softmax(logits, remover.foreground)
    full = lib._resize_plane(prob, (w, h)) if small is not rgb else prob  # as foreground_probability does
    alpha = (np.clip(full, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    cutout = remover.remove(Image.fromarray(rgb))

    def assemble():
        img = Image.fromarray(rgb)
        img.putalpha(Image.fromarray(alpha))

    steps = {
        "decode PNG": lambda: lib.to_rgba_arrays(lib.open_image(io.BytesIO(data))),
        **({f"scale to {size[0]}x{size[1]}": lambda: lib.resize_rgb(rgb, size)} if small is not rgb else {}),
        "pad + normalize": lambda: remover.prepare(small),
        "inference": lambda: remover.session.run([remover.output_name], {remover.input_name: x}),
        "softmax -> alpha": lambda: (np.clip(lib.fg_softmax(logits, remover.foreground), 0, 1) * 255 + 0.5).astype(np.uint8),
        **({f"alpha to {w}x{h}": lambda: lib._resize_plane(prob, (w, h))} if small is not rgb else {}),
        "RGBA assembly": assemble,
        "PNG encode": lambda: lib.encode_png(cutout),
    }  # fmt: skip
    return list(round_robin(steps, reps).items())


# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a bgremover ONNX file (default: the shipped models/bgremover-camvid.onnx)")
    src.add_argument("--ckpt", help="bgremover training checkpoint, exported to a temporary ONNX file")
    src.add_argument("--net", help="conf/model/<NET>.yaml, freshly initialised and exported")
    p.add_argument("--int8", help="int8 model to time too (default with --model: <model>.int8.onnx if present)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for both engines")
    p.add_argument("--reps", type=int, default=15, help="timed repetitions per cell (median reported)")
    p.add_argument("--max-side", type=int, help="infer at most at this long side (default: the predictor's scale)")
    args = p.parse_args(argv)
    if args.reps < 1 or args.threads < 1 or (args.max_side is not None and args.max_side < 32):
        p.error("--reps and --threads must be >= 1, --max-side >= 32")
    for flag, path in (("--model", args.model), ("--int8", args.int8), ("--ckpt", args.ckpt)):
        if path and not Path(path).is_file():
            p.error(f"{flag} not found: {path}")
    if args.net and not (REPO / "conf" / "model" / f"{args.net}.yaml").is_file():
        names = sorted(f.stem for f in (REPO / "conf" / "model").glob("*.yaml"))
        p.error(f"--net {args.net}: no conf/model/{args.net}.yaml; choose one of: {', '.join(names)}")

    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_kind()}; load average {load_average()}")
    try:
        return measure(args)
    except UserError as e:  # a file that is not a model or not a checkpoint: one line, not a traceback
        return report(e)


def measure(args: argparse.Namespace) -> int:
    def make(path, session=None):
        r = lib.BackgroundRemover(path, threads=args.threads, max_side=args.max_side,
                                  providers=["CPUExecutionProvider"])  # fmt: skip
        if session is not None:
            r.session = session
        return r

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.ckpt or args.net:
            from bgremover.export import export_onnx, load_checkpoint_net

            net, meta = load_checkpoint_net(args.ckpt) if args.ckpt else fresh_net(args.net)
            onnx_path = Path(tmp) / "model.onnx"
            diff = export_onnx(net, meta, onnx_path)["max_abs_diff"]
            fp32 = make(onnx_path)
            how = f"{meta['net']} ({meta['params']:,} params), exported+verified"
        else:
            onnx_path = Path(args.model) if args.model else lib.DEFAULT_MODEL
            fp32 = make(onnx_path)  # the predictor's checks first: net_from_onnx assumes a bgremover ONNX file
            net = net_from_onnx(onnx_path)
            how = f"{onnx_path} ({sum(q.numel() for q in net.parameters()):,} params), eager net rebuilt"
            diff = None
        int8 = Path(args.int8) if args.int8 else None
        if int8 is None and not (args.ckpt or args.net) and lib.int8_path(onnx_path).is_file():
            int8 = lib.int8_path(onnx_path)

        removers = {"onnxruntime fp32": fp32}
        if int8 is not None:
            removers["onnxruntime int8"] = make(int8)
        removers["eager PyTorch"] = make(onnx_path, TorchSession(net))
        if diff is None:  # the rebuilt net must compute what the ONNX file computes
            rgb = np.asarray(Image.open(io.BytesIO(sample_png(SIZES[0]))).convert("RGB"))
            diff = float(np.abs(removers["eager PyTorch"].logits(rgb) - removers["onnxruntime fp32"].logits(rgb)).max())
            if diff > MAX_TORCH_DIFF:
                raise SystemExit(f"error: rebuilt PyTorch net differs from the ONNX file by {diff:.1e} in the logits")
        print(f"model: {how} in {time.perf_counter() - t0:.1f}s, max |torch-ort| logits {diff:.1e}; "
              f"int8: {int8 or 'none'}; threads={args.threads}, max_side={fp32.max_side}{' (the training scale)' * fp32.upscale}, torch {torch.__version__}, "
              f"onnxruntime {lib_ort_version()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, median of {args.reps}")  # fmt: skip

        names = list(removers)
        head = f"{'image':>10} {'infer at':>9} " + " ".join(f"{n:>22}" for n in names)
        head += "".join(f" {'torch/' + n.split()[-1]:>12}" for n in names if n != "eager PyTorch")
        print("\nend to end (decode -> infer -> alpha -> PNG encode), ms: median (fastest of the repetitions, "
              "what the CPU gives when no other job takes it); ratios of medians\n" + head)  # fmt: skip
        for w, h in SIZES:
            data = sample_png((w, h))
            at = "x".join(map(str, fp32.inference_size(w, h)))
            fns = {n: (lambda r=r, d=data: lib.encode_png(r.remove(io.BytesIO(d)))) for n, r in removers.items()}
            times = round_robin(fns, args.reps)
            med = {n: statistics.median(t) for n, t in times.items()}
            row = f"{w}x{h:<6} {at:>9} " + " ".join(f"{f'{med[n]:.1f} ({min(times[n]):.1f})':>22}" for n in names)
            row += "".join(f" {med['eager PyTorch'] / med[n]:11.2f}x" for n in names if n != "eager PyTorch")
            print(row)
        print(f"load average after: {load_average()}")

        default = "onnxruntime int8" if int8 is not None else "onnxruntime fp32"
        print(f"\nstages of one 480x360 image ({default}), ms: median (fastest) of {args.reps}")
        for step, times in stage_profile(removers[default], sample_png(SIZES[0]), args.reps):
            print(f"  {step:<18} {statistics.median(times):7.2f} ({min(times):.2f})")

        print(f"\nPNG encode of the RGBA cut-out: the predictor's settings (level {lib.PNG_COMPRESS_LEVEL}, "
              f"strategy {lib.PNG_COMPRESS_TYPE}) vs Pillow's defaults (level {PILLOW_DEFAULT_PNG_LEVEL}, filtered)")  # fmt: skip
        for w, h in SIZES:
            cutout = removers[default].remove(io.BytesIO(sample_png((w, h))))
            settings = {"predictor": {}, "Pillow default": {"compress_level": PILLOW_DEFAULT_PNG_LEVEL, "compress_type": -1}}
            encoders = {k: (lambda kw=kw, img=cutout: lib.encode_png(img, **kw)) for k, kw in settings.items()}
            med = {k: statistics.median(t) for k, t in round_robin(encoders, args.reps).items()}
            print(f"{w}x{h:<6} " + " | ".join(
                f"{k}: {med[k]:7.1f} ms {len(encoders[k]()) / 1024:7.0f} KiB" for k in settings))  # fmt: skip
    return 0


def lib_ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C in `make benchmark` (~12 min): one line, not a traceback
        from bgremover.errors import report

        sys.exit(report("interrupted", "benchmarks/predict_latency.py", 130))
