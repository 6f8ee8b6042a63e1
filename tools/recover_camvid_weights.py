"""Recover the shipped CamVid model's PyTorch weights from its ONNX file → models/bgremover-camvid.pt.

    DATA_DIR=../shared/CamVid .venv/bin/python tools/recover_camvid_weights.py [--frames 24] [--out PATH]

Why: the Lightning checkpoint of models/bgremover-camvid.onnx was never kept, and fine-tuning (`ckpt_init=`)
needs PyTorch weights. The ONNX exporter folded every BatchNorm into the convolution before it (W·γ/σ, with the
shift as the conv's bias), so γ, β and the running statistics are not in the file. They are rebuilt so that

  - eval mode is exact: the conv keeps the folded W; its BatchNorm is set to y ↦ y − μ + (b + μ), i.e.
    running_mean μ, running_var σ², weight √(σ² + eps), bias b + μ;
  - train mode (batch statistics) behaves as the original net did on CamVid: μ and σ² are the per-channel mean
    and variance of W·x measured over real CamVid train frames, so normalising a CamVid batch by its own
    statistics gives back (nearly) the same activations.

Convolutions are matched to ONNX Conv nodes in execution order (shapes checked), convs whose weight kept its name
in the ONNX file had no BatchNorm after them. The result is checked against onnxruntime on a real frame (the
script prints the max logit difference and the argmax agreement) and saved as a weights-only checkpoint that
`bgremover.checkpoint` reads: {"state_dict": {"net.<name>": tensor}, "bgremover": meta}. Floats are stored as
float16 (8.8 MB instead of 17.5 MB); the printed check is of the stored file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[1]
ONNX = REPO / "models" / "bgremover-camvid.onnx"
OUT = REPO / "models" / "bgremover-camvid.pt"
FRAME = REPO / "examples" / "0001TP_009180.jpg"  # a real CamVid test frame for the check
# the shipped model's net: conf/model/deeplabv3plus.yaml with 11 classes (experiments/cpu_default.yaml)
NET_CONFIG = {"_target_": "segmentation_models_pytorch.DeepLabV3Plus", "encoder_name": "mobilenet_v2",
              "encoder_weights": None, "encoder_output_stride": 16, "in_channels": 3, "classes": 11}


def onnx_convs(path: Path) -> tuple[list[dict], dict]:
    """[{name, weight, bias, folded}] for every Conv node in graph (= execution) order, and the metadata."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    convs = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w = node.input[1]
        b = node.input[2] if len(node.input) > 2 else None
        convs.append({"node": node.name, "weight": inits[w], "bias": None if b is None else inits[b],
                      "folded": w.startswith("onnx::")})  # a named weight kept its module's name: no BN folded in
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == "bgremover"))
    return convs, meta


def execution_order(net: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]:
    """(name, conv, the BatchNorm applied directly to its output or None) in the order a forward runs them."""
    events: list[tuple[str, nn.Module, int, int]] = []
    hooks = []
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d | nn.BatchNorm2d):
            hooks.append(module.register_forward_hook(
                lambda m, inp, out, name=name: events.append((name, m, id(inp[0]), id(out)))))
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    order = []
    for i, (name, module, _, out_id) in enumerate(events):
        if isinstance(module, nn.Conv2d):
            nxt = events[i + 1] if i + 1 < len(events) else None
            bn = nxt[1] if nxt and isinstance(nxt[1], nn.BatchNorm2d) and nxt[2] == out_id else None
            order.append((name, module, bn))
    return order


def calibration_frames(n: int) -> list[torch.Tensor]:
    from bgremover.data.camvid import list_pairs, resolve_root, select
    from bgremover.data.classes import MEAN, STD

    root = resolve_root(None)
    return [to_input(np.asarray(Image.open(img).convert("RGB")), MEAN, STD)
            for img, _ in select(list_pairs(root, "train"), n)]


def to_input(rgb: np.ndarray, mean, std) -> torch.Tensor:
    from bgremover.padding import pad_image

    x = (rgb.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x, _ = pad_image(x, 32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def recover(frames: int) -> tuple[nn.Module, dict]:
    from bgremover.checkpoint import build_net

    convs, meta = onnx_convs(ONNX)
    net = build_net(NET_CONFIG)
    order = execution_order(net)
    if len(order) != len(convs):
        raise SystemExit(f"error: {len(order)} convolutions in the net, {len(convs)} Conv nodes in {ONNX}")
    folded: list[tuple[nn.BatchNorm2d, np.ndarray]] = []
    with torch.no_grad():
        for (name, conv, bn), c in zip(order, convs, strict=True):
            if tuple(conv.weight.shape) != c["weight"].shape:
                raise SystemExit(f"error: {name} {tuple(conv.weight.shape)} vs {c['node']} {c['weight'].shape}")
            conv.weight.copy_(torch.from_numpy(np.array(c["weight"])))
            if c["folded"]:
                if bn is None or conv.bias is not None:
                    raise SystemExit(f"error: {c['node']} has a folded BatchNorm but {name} is not conv→BN")
                folded.append((bn, c["bias"]))
                # identity BatchNorm carrying the folded shift: eval is exact while the statistics are measured
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
                bn.weight.fill_(1.0)
                bn.bias.copy_(torch.from_numpy(c["bias"]))
            elif c["bias"] is not None:
                conv.bias.copy_(torch.from_numpy(c["bias"]))
        # per-channel mean/variance of each folded conv's output W·x over real frames (the BN's input)
        sums = {id(bn): [0.0, 0.0, 0] for bn, _ in folded}

        def stats(module, inp, _out):
            x = inp[0].double()
            s = sums[id(module)]
            s[0] = s[0] + x.sum((0, 2, 3))
            s[1] = s[1] + (x * x).sum((0, 2, 3))
            s[2] += x.numel() // x.shape[1]

        hooks = [bn.register_forward_hook(stats) for bn, _ in folded]
        net.eval()
        for x in calibration_frames(frames):
            net(x)
        for h in hooks:
            h.remove()
        for bn, bias in folded:
            total, total_sq, n = sums[id(bn)]
            mean = total / n
            var = (total_sq / n - mean * mean).clamp_min(0.0)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(torch.from_numpy(bias).double() + mean)
    info = {"net_config": NET_CONFIG, "net_name": meta["net"], "classes": meta["classes"], "mean": meta["mean"],
            "std": meta["std"], "size_multiple": meta["size_multiple"],
            "default_foreground": meta["default_foreground"], "ignore_index": len(meta["classes"])}
    return net.eval(), info


def check(path: Path, meta: dict) -> tuple[float, float]:
    """(max |logit difference|, argmax agreement) of the stored file against onnxruntime on a real frame."""
    import onnxruntime as ort

    from bgremover.checkpoint import load_net

    net, _, _ = load_net(path)
    x = to_input(np.asarray(Image.open(FRAME).convert("RGB")), meta["mean"], meta["std"])
    with torch.no_grad():
        ref = net(x).numpy()
    got = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    return float(np.abs(ref - got).max()), float((ref.argmax(1) == got.argmax(1)).mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=24, help="CamVid train frames for the BatchNorm statistics")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--fp32", action="store_true", help="store float32 (17.5 MB) instead of float16")
    args = p.parse_args()
    torch.manual_seed(0)
    net, info = recover(args.frames)
    state = {f"net.{k}": (v.half() if v.is_floating_point() and not args.fp32 else v)
             for k, v in net.state_dict().items()}
    ckpt = {"state_dict": state, "bgremover": info,
            "source": {"onnx": ONNX.name, "calibration_frames": args.frames,
                       "how": "tools/recover_camvid_weights.py: folded BatchNorms rebuilt from CamVid statistics"}}
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, args.out)
    diff, agree = check(args.out, info)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB); on {FRAME.name} vs onnxruntime: "
          f"max |logit diff| {diff:.2e}, argmax agreement {agree * 100:.3f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
