"""The fast FC-DenseNet dense block: one autograd Function over one preallocated buffer, backward by hand.

Why this file is longer than 400 lines: it is one derivation — the forward, the hand-written backward of the
same maths, and the CPU kernels and DDP statistics sync that backward depends on. Split across files, each
piece would only make sense next to the others. `bgremover.nets.tiramisu` holds the readable architecture
around it; `benchmarks/reference_tiramisu.py` the textbook torch.cat block these outputs and gradients equal
(in float64, tests/test_tiramisu.py).

A textbook dense block concatenates with ``torch.cat`` before every layer, so a block of L layers copies
O(L^2) feature maps and keeps two O(L^2) activations (the concatenation and the BN-ReLU output) alive
for backward. Here a block is one autograd Function that owns a single preallocated buffer: the block's
input is copied in once, every layer reads the channel prefix ``buf[:, :c]`` and writes its new maps into
``buf[:, c:c+g]``. Because every layer sees the same channels, BatchNorm batch statistics are computed
once per channel (when the channel is written) instead of once per layer, and the layer's BN+ReLU becomes
one per-channel affine map plus an in-place ReLU. Backward is written out by hand
(``convolution_backward`` + closed-form BatchNorm backward), and the BN part of the input gradient that
flows through the batch statistics is accumulated per channel and applied once, not once per layer.

On CPU, four kernels that a plain implementation leaves to PyTorch were the real cost (torch.profiler,
FC-DenseNet103 training step) and are routed around: the dense convolutions' weight gradient is a banded
GEMM over an im2col of the 16-map output gradient (``conv3x3_weight_grad``); no convolution is asked for
its bias gradient (that sends oneDNN down a path several times slower; ``Conv2d`` adds the bias after);
batch statistics are a two-pass sum instead of ``var_mean``'s scalar Welford loop; and under bf16 autocast
on a CPU without bf16 units the convolutions run bf16-rounded operands through fp32 kernels instead of
PyTorch's slow bf16 fallback (``kernel_dtype``). On CPUs with bf16 units the convolutions run in bf16 (oneDNN);
there, and on the emulated route, what cost most was elementwise maths mixing bf16 storage with fp32
per-channel BatchNorm terms, which PyTorch's CPU loops run scalar, 10-50x slower than a conversion plus a
same-dtype loop (``_mixed_cpu``): the BN-ReLU goes through an fp32 scratch band by band (``_bn_relu``), the BN
parameter-gradient sums come from PyTorch's fused BN backward on a dense copy, and the gradient buffer is held
in the kernel dtype. Where a C compiler is at hand those passes over channels_last data (bf16 or fp32) run as fused
kernels instead (``bgremover.nets.cpu_kernels``: BN-ReLU, its backward with the BN sums and the input-gradient
update, batch statistics, the statistics-gradient term, dropout with the store of a layer's new maps — one pass
each); the PyTorch ops stay as the fallback and for other layouts and float64.

On CPU, a block's buffer, saved activations and (in 16 bits) gradient buffer come from a ``Workspace`` that
reuses the previous training step's memory once nothing holds it, and a layer's input gradient is computed and
consumed in channel chunks under 24 MiB: glibc maps blocks over 32 MiB afresh on
every allocation, and faulting their pages in is slow (measured: a 2x240x224x224 bf16 input gradient takes
29 ms in fresh pages, 19 ms in reused ones; ``bgremover.nets.workspace``).

Inference on CPU (eval mode, no autograd: `make eval`, the compare report's grid, measured latency) runs the
same Function with nothing kept for backward: `python benchmarks/tiramisu_infer.py --ckpt <the GPU-trained
FC-DenseNet103>` on the 2-core AVX-512-BF16 EPYC, one 384x480 frame: fp32 1460 vs 2383 ms for the textbook
layers (1.63x), bf16 818 vs 1252 ms (1.53x), peak 538 vs 780 MiB and 285 vs 398 MiB (two earlier rounds: 1.70-1.76x
and 1.46-1.57x). Exporters, tracing, compiled inference and inference on other devices take the textbook layers.

``memory_efficient=True`` keeps nothing per layer but the shared buffer (plus per-channel statistics and
the tiny dropout masks); the BN-ReLU output is recomputed in backward from the saved statistics, so
running statistics are updated exactly once per step (unlike ``torch.utils.checkpoint``, which re-runs BN).

Under DDP with ``sync_batchnorm`` (``nn.SyncBatchNorm.convert_sync_batchnorm``, as Lightning applies it) the
batch statistics and their gradient sums are those of every rank's batch together (``_StatSync``), so ranks
compute what one process computes on the combined batch; otherwise nothing is communicated.

Dropout is channel-wise (``Dropout2d``) with p=0.2: the paper uses element-wise dropout, but dropping
whole maps is the usual choice for conv features and its mask is N x g x 1 x 1, cheap to draw and to keep.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from bgremover.nets import cpu_kernels
from bgremover.nets.workspace import Workspace

DROPOUT = 0.2  # paper's dropout probability for dense layers and transitions down

_MIN_GAMMA = 1e-3  # below this |BN weight| the gamma gradient is summed directly (the identity divides by it)
_STRIDE1 = [1, 1]
_PAD1 = [1, 1]
_NO_OUT_PAD = [0, 0]
_GEMM_WGRAD_MIN_PIXELS = 1024  # below this many N*H*W pixels oneDNN's weight gradient is as fast (measured)
# Native bf16 (oneDNN's bf16 kernels): its weight gradient is the faster one up to about this many input values
# N*C*H*W (measured on an AVX-512-BF16 EPYC: 2.5 vs 3.1 ms at 2x464x56x56, equal at 2x192x224x224, 42 vs 27 ms at
# 2x240x224x224).
_GEMM_WGRAD_MIN_BF16_VALUES = 20_000_000
_WGRAD_BAND_PIXELS = 8192  # pixels per GEMM band in conv3x3_weight_grad: the im2col block stays in cache
_STATS_BAND_PIXELS = 8192  # pixels per band of the variance pass in _batch_stats
_MIXED_BAND_ELEMS = 2**22  # values per band where bf16 storage meets fp32 per-channel maths on CPU (_bn_relu)
_CHUNK_BYTES = 24 * 2**20  # CPU input-gradient chunks stay under glibc's 32 MiB ceiling for heap (not mmap) blocks


def _batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Biased per-channel variance and mean, accumulated in at least fp32 (bf16 sums would drift).

    Two passes (sum, then sum of squared deviations over bands of rows through one small scratch): on CPU
    ``torch.var_mean`` over (N, H, W) of a channels-last slice runs a scalar Welford loop, 6x slower
    (measured 187 vs 29 ms at 2x192x224x224; 4x in NCHW).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # GPUs' var_mean kernel is already fast
        return torch.var_mean(x.to(acc), dim=(0, 2, 3), unbiased=False)
    if (stats := cpu_kernels.channel_stats(x)) is not None:  # bf16 / fp32 channels_last, one kernel
        return stats
    n, c, h, w = x.shape
    count = n * h * w
    rows = max(1, min(h, _STATS_BAND_PIXELS // w))
    if x.stride(1) == 1:  # channels innermost: keep the scratch in the same order so reads stay sequential
        scratch = torch.empty((rows, w, c), dtype=acc, device=x.device).permute(2, 0, 1)
    else:
        scratch = torch.empty((c, rows, w), dtype=acc, device=x.device)
    bands = [(b, y0, min(rows, h - y0)) for b in range(n) for y0 in range(0, h, rows)]
    # A bf16 channel slice of the block buffer (a block's input) is converted band by band first: the mixed-dtype
    # sum and subtraction on it ran 3.6x slower (36 vs 10 ms at 2x192x224x224 of a 256-channel buffer). A dense
    # bf16 tensor (a layer's new maps) is faster read directly (4.0 vs 6.5 ms at 2x16x224x224).
    convert = x.dtype != acc and not x.is_contiguous(memory_format=_fmt(x))
    if convert:
        total = torch.zeros(c, dtype=acc, device=x.device)
        for b, y0, r in bands:
            total.add_(scratch[:, :r].copy_(x[b, :, y0 : y0 + r]).sum(dim=(1, 2)))
        mean = total.div_(count)
    else:
        mean = x.sum(dim=(0, 2, 3), dtype=acc).div_(count)
    var = torch.zeros_like(mean)
    centre = mean.view(-1, 1, 1)
    for b, y0, r in bands:
        dev = scratch[:, :r]
        if convert:
            dev.copy_(x[b, :, y0 : y0 + r]).sub_(centre)
        else:
            torch.sub(x[b, :, y0 : y0 + r], centre, out=dev)
        var.add_(dev.mul_(dev).sum(dim=(1, 2)))
    return var.div_(count), mean


class _StatSync:
    """Batch statistics over the combined batch of every rank in ``group``, as ``nn.SyncBatchNorm`` has them.

    The block creates one per training step only when it must sync (``DenseBlock._stat_sync``); without it the
    block runs the single-process code with no collective at all. Forward: one all-gather per statistics
    pass (the block input, then each layer's new maps). Backward: one all-reduce per channel group of the
    per-channel gradient sums that the BatchNorm input gradient needs (SyncBatchNorm's sum_dy / sum_dy_xmu).
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.count = 0  # pixels per channel over all ranks; set by the first batch_stats()

    def batch_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``_batch_stats`` of the union of every rank's ``x``."""
        var, mean = _batch_stats(x)
        n, c, h, w = x.shape
        count = n * h * w
        # Gather (count, mean, variance) rather than sum (count, sum, sum of squares): ranks' counts may differ,
        # and E[x^2] - mean^2 cancels badly in fp32. float64 keeps counts exact and the combination stable.
        local = torch.zeros(1 + 2 * c, dtype=torch.float64, device=x.device)
        local[0] = count
        if count:  # an empty rank still joins the collective, with nothing to add
            local[1 : 1 + c], local[1 + c :] = mean, var
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local, group=self.group)
        table = torch.stack(parts)
        counts, means, variances = table[:, :1], table[:, 1 : 1 + c], table[:, 1 + c :]
        total = counts.sum()
        g_mean = (counts * means).sum(0) / total
        # Chan et al.: spread within each rank plus the spread of the rank means around the global mean.
        g_var = (counts * (variances + (means - g_mean) ** 2)).sum(0) / total
        if not self.count:
            self.count = int(total)  # a host sync, as in nn.SyncBatchNorm; once per block and step
        return g_var.to(var.dtype), g_mean.to(mean.dtype)

    def all_reduce_(self, *sums: Tensor) -> None:
        """Sum per-channel gradient sums over the ranks, in place, in one collective."""
        flat = torch.cat(sums)
        dist.all_reduce(flat, group=self.group)
        for t, total in zip(sums, flat.split([t.numel() for t in sums]), strict=True):
            t.copy_(total)


def _as_channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


class _DenseBlockFn(torch.autograd.Function):
    """Whole dense block as one autograd node; see the module docstring for the scheme.

    ``tensors`` = block inputs (``n_inputs`` of them, concatenated along channels into the buffer), then
    per layer: bn weight, bn bias, conv weight, conv bias, running mean, running var, dropout mask
    (running stats only used in eval mode, mask may be None).
    Returns the full buffer and the fp32 batch mean / biased variance of every channel (train mode), those of
    all ranks' batches together when ``cfg["sync"]`` is a ``_StatSync``.
    """

    @staticmethod
    def forward(ctx: Any, cfg: dict[str, Any], n_inputs: int, *tensors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        inputs, per_layer = tensors[:n_inputs], tensors[n_inputs:]
        growth, n_layers, eps = cfg["growth"], cfg["n_layers"], cfg["eps"]
        training, keep_act, dev_type = cfg["training"], not cfg["memory_efficient"], inputs[0].device.type
        cdtype, kdtype = cfg["dtype"], cfg["kernel_dtype"]
        sync: _StatSync | None = cfg["sync"]
        ws: Workspace = cfg["workspace"]
        batch_stats = _batch_stats if sync is None else sync.batch_stats
        x0 = inputs[0]
        n, _, h, w = x0.shape
        c0 = sum(t.shape[1] for t in inputs)
        c_total = c0 + n_layers * growth
        fmt = _fmt(x0)
        with torch.autocast(dev_type, enabled=False):
            buf = ws.empty("buf", (n, c_total, h, w), cdtype, x0.device, fmt)
            off = 0
            for t in inputs:
                buf[:, off : off + t.shape[1]].copy_(t)
                off += t.shape[1]
            stat_dtype = torch.float64 if cdtype == torch.float64 else torch.float32
            mean = torch.zeros(c_total, dtype=stat_dtype, device=x0.device)
            var = torch.ones(c_total, dtype=stat_dtype, device=x0.device)
            if training:
                var[:c0], mean[:c0] = batch_stats(buf[:, :c0])
            invstd = torch.rsqrt(var + eps)
            saved_acts: list[Tensor] = []
            kernel_weights: list[Tensor] = []  # kept with the activations: backward needs them cast the same way
            # Without saved activations one scratch area serves every layer (fewer fresh pages to fault in).
            scratch = None if keep_act else _flat(n * (c_total - growth) * h * w, kdtype, x0.device)
            for i in range(n_layers):
                gamma, beta, weight, bias, r_mean, r_var, mask = per_layer[7 * i : 7 * i + 7]
                c = c0 + i * growth
                scale, shift = _affine(gamma, beta, mean[:c], invstd[:c], r_mean, r_var, eps, training)
                if scratch is None:  # kept for backward: its own slot
                    act = ws.empty(f"act{i}", (n, c, h, w), kdtype, x0.device, fmt)
                else:
                    act = _front_view(scratch, (n, c, h, w), fmt)
                act = _bn_relu(buf[:, :c], scale, shift, act)
                w_k = _cast(weight, cdtype, kdtype)
                y = torch.ops.aten.convolution(
                    act, w_k, _cast(bias, cdtype, kdtype),
                    _STRIDE1, _PAD1, _STRIDE1, False, _NO_OUT_PAD, 1,
                )
                new = buf[:, c : c + growth]
                # Dropout, rounding and the strided store in one pass (cpu_kernels); PyTorch's ops take the
                # statistics of the dense conv output, cheaper for them than of the strided buffer slice.
                fused = cpu_kernels.scale_maps(y, mask, new) is not None
                if not fused and mask is not None:
                    y.mul_(mask.to(kdtype))
                if training and i + 1 < n_layers:  # the last layer's maps feed no BN inside this block
                    v, m = batch_stats(new if fused else y)
                    var[c : c + growth], mean[c : c + growth] = v, m
                    invstd[c : c + growth] = torch.rsqrt(v + eps)
                if not fused:
                    new.copy_(y)
                del y, new
                if keep_act:
                    saved_acts.append(act)
                    kernel_weights.append(w_k)
                del act, w_k
        ctx.cfg = dict(cfg, c0=c0, split=[t.shape[1] for t in inputs])
        ctx.n_inputs = n_inputs
        ctx.param_needs_grad = [t is not None and t.requires_grad for t in per_layer]
        ctx.save_for_backward(buf, mean, invstd, *per_layer, *saved_acts, *kernel_weights)
        ctx.mark_non_differentiable(mean, var)
        return buf, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_buf: Tensor, _g_mean: Any, _g_var: Any) -> tuple[Any, ...]:
        cfg = ctx.cfg
        growth, n_layers, eps, training, c0 = cfg["growth"], cfg["n_layers"], cfg["eps"], cfg["training"], cfg["c0"]
        saved = ctx.saved_tensors
        buf, mean, invstd = saved[:3]
        per_layer = saved[3 : 3 + 7 * n_layers]
        kept = saved[3 + 7 * n_layers :]  # per layer activation, then kernel-dtype weight (or nothing: memory_efficient)
        saved_acts, kernel_weights = kept[: len(kept) // 2], kept[len(kept) // 2 :]
        cdtype, kdtype = buf.dtype, cfg["kernel_dtype"]
        n, c_total, h, w = buf.shape
        sync: _StatSync | None = cfg["sync"]
        ws: Workspace = cfg["workspace"]
        count = n * h * w if sync is None else sync.count  # the pixels the batch statistics were taken over
        fmt = _fmt(buf)
        # bf16 weight gradients are too coarse for the W * dW identity (it divides by gamma).
        # Under torch.compile the data-dependent gamma check would break the graph, and inductor fuses the
        # direct product-sum anyway.
        exact_identity = kdtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()
        scratch = None if saved_acts else _flat(n * (c_total - growth) * h * w, kdtype, buf.device)
        # Native bf16 on CPU: BatchNorm's parameter-gradient sums come from PyTorch's fused kernel, which is fast
        # on a dense tensor only (6 vs 238 ms at 2x240x224x224), so each layer's input is copied, chunk by
        # chunk, to a dense scratch.
        native_low = buf.device.type == "cpu" and kdtype == cdtype and _mixed_cpu(buf, mean.dtype)
        x_scratch = None  # made when first needed: the fused kernel (cpu_kernels) needs no copy
        # The fused CPU kernels take bf16 and fp32 channels_last data (each call still checks and may decline).
        kernels = buf.device.type == "cpu" and kdtype in (torch.bfloat16, torch.float32) and fmt == torch.channels_last
        param_grads: list[Tensor | None] = [None] * (7 * n_layers)
        with torch.autocast(buf.device.type, enabled=False):
            # A private, writable copy: earlier layers' gradients are accumulated into its prefix. It is held in
            # the kernel dtype, the dtype of every layer's input gradient: same-dtype accumulation (_mixed_cpu).
            # In 16 bits it also comes from the workspace: kept until the next step it adds to the peak, but at half
            # the size of fp32 (+93 MiB on 447 for FC-DenseNet103 bf16 at 2x224x224), and it saves ~5% of a native
            # bf16 step (1.57 vs 1.65 s); in fp32 it added 18% to the peak (1148 vs 970 MiB).
            if kdtype.itemsize == 2:
                grad = ws.empty("grad", buf.shape, kdtype, buf.device, fmt)
            else:
                grad = torch.empty(buf.shape, dtype=kdtype, device=buf.device, memory_format=fmt)
            grad.copy_(grad_buf)
            # Per channel: sum over consumer layers of the gradient reaching the batch mean / variance.
            g_shift = torch.zeros_like(mean)
            g_slope = torch.zeros_like(mean)
            for i in reversed(range(n_layers)):
                gamma, beta, weight, bias, r_mean, r_var, mask = per_layer[7 * i : 7 * i + 7]
                c = c0 + i * growth
                x = buf[:, :c]
                scale, shift = _affine(gamma, beta, mean[:c], invstd[:c], r_mean, r_var, eps, training)
                if saved_acts:
                    act = saved_acts[i]
                else:
                    act = _bn_relu(x, scale, shift, _front_view(scratch, (n, c, h, w), fmt))
                g_y = grad[:, c : c + growth]
                need = ctx.param_needs_grad[7 * i : 7 * i + 7]
                g_b = None
                if kernels:  # dropout, a dense copy for the conv and the bias gradient in one pass (cpu_kernels)
                    dense = torch.empty((n, growth, h, w), dtype=kdtype, device=buf.device, memory_format=fmt)
                    g_b = cpu_kernels.scale_maps(g_y, mask, dense, sums=True)
                    g_y = g_y if g_b is None else dense
                if g_b is None:
                    if mask is not None:
                        g_y = g_y * mask.to(g_y.dtype)
                    g_b = g_y.sum(dim=(0, 2, 3), dtype=mean.dtype) if need[3] else None
                g_y = _cast(g_y, cdtype, kdtype)  # the conv's operand: rounded to the compute dtype
                w_c = kernel_weights[i] if kernel_weights else _cast(weight, cdtype, kdtype)
                # Asking oneDNN for the bias gradient as well makes its backward ~4x slower (measured: 459 vs
                # 116 ms at 2x240x224x224, channels_last); a 16-channel sum costs next to nothing.
                gemm_w = buf.device.type == "cpu" and (
                    n * h * w >= _GEMM_WGRAD_MIN_PIXELS if kdtype in (torch.float32, torch.float64)
                    else n * c * h * w >= _GEMM_WGRAD_MIN_BF16_VALUES
                )
                chunks = _channel_chunks(act)
                g_pre = None
                if len(chunks) == 1:
                    g_pre, g_w, _ = torch.ops.aten.convolution_backward(
                        g_y, act, w_c, [growth], _STRIDE1, _PAD1, _STRIDE1, False, _NO_OUT_PAD, 1,
                        [True, not gemm_w, False],
                    )
                if gemm_w:
                    g_w = conv3x3_weight_grad(g_y, act)
                elif g_pre is None:
                    g_w = torch.ops.aten.convolution_backward(
                        g_y, act, w_c, [growth], _STRIDE1, _PAD1, _STRIDE1, False, _NO_OUT_PAD, 1,
                        [False, True, False],
                    )[1]
                # The input gradient of a stride-1 3x3 conv is the conv of g_y with the flipped, transposed
                # kernel: a chunk of input channels is a chunk of that kernel's output maps.
                w_t = None if g_pre is not None else w_c.flip(2, 3).transpose(0, 1).contiguous()
                gamma_s, beta_s = gamma.to(mean.dtype), beta.to(mean.dtype)
                centre = mean[:c] if training else r_mean.to(mean.dtype)
                std_inv = invstd[:c] if training else torch.rsqrt(r_var.to(mean.dtype) + eps)
                identity = None  # whether sum(g_pre * xhat) comes from the W * dW identity; decided where needed
                g_beta = torch.empty_like(mean[:c])
                g_gamma = torch.empty_like(g_beta)
                for lo, hi in chunks:
                    if w_t is not None:
                        g_pre = torch.ops.aten.convolution(
                            g_y, w_t[lo:hi], None, _STRIDE1, _PAD1, _STRIDE1, False, _NO_OUT_PAD, 1
                        )
                    if kernels and (sums := cpu_kernels.bn_relu_backward(
                        g_pre, x[:, lo:hi], grad[:, lo:hi], scale[lo:hi], shift[lo:hi], centre[lo:hi], std_inv[lo:hi]
                    )) is not None:  # all of the branch below in one pass, with the scale in fp32
                        if hi - lo == c:
                            g_beta, g_gamma = sums
                        else:
                            g_beta[lo:hi], g_gamma[lo:hi] = sums
                        del g_pre
                        continue
                    a_c = act[:, lo:hi]
                    torch.ops.aten.threshold_backward.grad_input(g_pre, a_c, 0, grad_input=g_pre)  # in place
                    if native_low:
                        if x_scratch is None:  # sized for the widest channel chunk of any layer's input
                            widest = max(b - a for k in range(n_layers)
                                         for a, b in _channel_chunks(buf[:, : c0 + k * growth]))
                            x_scratch = _flat(n * widest * h * w, cdtype, buf.device)
                        # sum(g_pre) and sum(g_pre * xhat), accumulated in fp32 by one fused pass over dense
                        # tensors; the input gradient is added in bf16 with a bf16-rounded scale (a mixed-dtype
                        # loop is 50x slower, measured).
                        x_dense = _front_view(x_scratch, (n, hi - lo, h, w), fmt).copy_(x[:, lo:hi])
                        _, g_gamma[lo:hi], g_beta[lo:hi] = torch.ops.aten.native_batch_norm_backward(
                            g_pre, x_dense, gamma_s[lo:hi], None, None, centre[lo:hi], std_inv[lo:hi], True, eps,
                            [False, True, True],
                        )
                    else:
                        torch.sum(g_pre, dim=(0, 2, 3), dtype=mean.dtype, out=g_beta[lo:hi])
                        if identity is None:  # a host sync: only on this route (never native bf16: not fp32)
                            identity = exact_identity and bool(gamma_s.abs().min() >= _MIN_GAMMA)
                        if not identity:
                            g_xc = (g_pre * x[:, lo:hi]).sum(dim=(0, 2, 3), dtype=mean.dtype)
                            g_gamma[lo:hi] = std_inv[lo:hi] * (g_xc - centre[lo:hi] * g_beta[lo:hi])
                    g_scale = scale[lo:hi].to(kdtype) if native_low else scale[lo:hi]
                    grad[:, lo:hi].addcmul_(g_pre, _as_channel(g_scale))
                    del g_pre
                if identity:  # set only where some chunk took the PyTorch route (the kernel sums g * xhat itself)
                    # Adjoint of the conv: sum_pixels(g_act * act) = sum_(out, kh, kw)(W * dW) per input
                    # channel, and act = gamma * xhat + beta where g_pre != 0, so sum(g_pre * xhat) needs
                    # no pass over the activations.
                    g_act_act = (w_c.to(mean.dtype) * g_w.to(mean.dtype)).sum(dim=(0, 2, 3))
                    g_gamma = (g_act_act - beta_s * g_beta) / gamma_s
                del act
                if training:
                    k = -scale / count
                    g_shift[:c].add_(k * g_beta)
                    g_slope[:c].add_(k * g_gamma)
                    # Every consumer of the group written by layer i-1 (or of the block input) is done now.
                    lo = c - growth if i > 0 else 0
                    if sync is not None:
                        # The statistics came from every rank's pixels, so their gradient sums over every
                        # rank's pixels too. g_beta / g_gamma themselves stay local: DDP averages them.
                        sync.all_reduce_(g_shift[lo:c], g_slope[lo:c])
                    _apply_stat_grad(grad, buf, lo, c, g_shift, g_slope, mean, invstd)
                param_grads[7 * i] = g_gamma.to(gamma.dtype) if need[0] else None
                param_grads[7 * i + 1] = g_beta.to(beta.dtype) if need[1] else None
                param_grads[7 * i + 2] = g_w.to(weight.dtype) if need[2] else None
                param_grads[7 * i + 3] = g_b.to(bias.dtype) if need[3] else None
        input_grads = []
        off = 0
        for k in cfg["split"]:
            input_grads.append(grad[:, off : off + k])
            off += k
        return (None, None, *input_grads, *param_grads)


def conv3x3_weight_grad(g_y: Tensor, act: Tensor) -> Tensor:
    """Weight gradient of a stride-1, padding-1 3x3 convolution with few output maps, as banded GEMMs.

    oneDNN's weight-gradient kernel is the slowest part of a dense layer on CPU (2-3x the forward conv for
    the same FLOPs, worst in channels_last). With only ``g`` output maps the im2col of the *output*
    gradient is small (9g values per pixel), so ``dW = im2col(g_y)^T @ act`` is one well-shaped GEMM per
    band of rows (M = 9g, N = c, K = pixels in the band), reading ``act`` in place in either layout.
    Bands keep the im2col block in cache; each band's product is accumulated in at least fp32.
    """
    n, c, h, w = act.shape
    g = g_y.shape[1]
    dtype = act.dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rows = max(1, min(h, _WGRAD_BAND_PIXELS // w))
    cl = not act.is_contiguous() and act.is_contiguous(memory_format=torch.channels_last)
    g_w = torch.zeros((9 * g, c), dtype=acc_dtype, device=act.device)  # rows ordered (2-kh, 2-kw, out map)
    # Tap (kh, kw) of output pixel p reads act at p + (kh-1, kw-1), so the im2col entry for input pixel q
    # is g_y at q - (kh-1, kw-1): with g_y zero-padded by one, that is padded[q + (2-kh, 2-kw)], a window
    # that one as_strided view of the padded map gives for all nine taps at once.
    if cl:
        padded = act.new_zeros((n, h + 2, w + 2, g))
        padded[:, 1 : h + 1, 1 : w + 1].copy_(g_y.permute(0, 2, 3, 1))
        sb, sy, sx = padded.stride()[:3]
        cols = act.new_empty((rows, w, 3, 3, g))
        act_hwc = act.permute(0, 2, 3, 1)  # dense (n, h, w, c) view
    else:
        padded = act.new_zeros((n, g, h + 2, w + 2))
        padded[:, :, 1 : h + 1, 1 : w + 1].copy_(g_y)
        sb, sc, sy = padded.stride()[:3]
        cols = act.new_empty((3, 3, g, rows, w))
    for b in range(n):
        for y0 in range(0, h, rows):
            r = min(rows, h - y0)
            start = padded.storage_offset() + b * sb + y0 * sy
            if cl:
                band = cols[:r]
                band.copy_(padded.as_strided((r, w, 3, 3, g), (sy, sx, sy, sx, 1), start))
                lhs, rhs = band.view(r * w, 9 * g).t(), act_hwc[b, y0 : y0 + r].reshape(r * w, c)
            else:
                band = cols[..., :r, :]
                band.copy_(padded.as_strided((3, 3, g, r, w), (sy, 1, sc, sy, 1), start))
                lhs, rhs = band.reshape(9 * g, r * w), act[b, :, y0 : y0 + r].reshape(c, r * w).t()
            if dtype == acc_dtype:
                g_w.addmm_(lhs, rhs)
            elif _native_low_precision_gemm(act.device):
                g_w.add_(torch.mm(lhs, rhs))
            else:  # an emulated bf16 GEMM is ~5x slower than casting the band and multiplying in fp32
                g_w.addmm_(lhs.to(acc_dtype), rhs.to(acc_dtype))
    return g_w.view(3, 3, g, c).flip(0, 1).permute(2, 3, 0, 1).contiguous()


def _channel_chunks(t: Tensor) -> list[tuple[int, int]]:
    """Channel ranges [lo, hi) of an (N, C, H, W) tensor such that a tensor of one range's shape stays under
    ``_CHUNK_BYTES``: on CPU, a layer's input gradient is computed and consumed one range at a time, so that
    glibc serves it from the heap instead of mapping (and the kernel zeroing) fresh pages every layer and step
    (see ``bgremover.nets.workspace``). One range elsewhere, and for tensors already that small."""
    n, c, h, w = t.shape
    nbytes = n * c * h * w * t.element_size()
    parts = 1 if t.device.type != "cpu" or torch.compiler.is_compiling() else -(-nbytes // _CHUNK_BYTES)
    parts = max(1, min(parts, c))
    step = -(-c // parts)
    return [(lo, min(c, lo + step)) for lo in range(0, c, step)]


def _cast(t: Tensor, dtype: torch.dtype, kernel_dtype: torch.dtype) -> Tensor:
    """``t`` rounded to the compute dtype (as autocast would), then held in the kernel dtype."""
    return t.to(dtype).to(kernel_dtype)


def kernel_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype convolution kernels run in for a dense block computing in ``dtype``.

    Where bf16/fp16 has no hardware support (CPUs without AVX-512-BF16/AMX), PyTorch falls back to a slow
    reference convolution (``_slow_conv2d``, 10-50x slower than oneDNN's fp32 kernel). There the kernels
    take the bf16-rounded operands in fp32: a product of two bf16 numbers is exact in fp32 and native bf16
    kernels accumulate in fp32 too, so the result is what bf16 hardware computes, up to summation order.
    Storage (the block buffer and its output) stays in ``dtype``.
    """
    if dtype in (torch.bfloat16, torch.float16) and not _native_low_precision_gemm(device):
        return torch.float32
    return dtype


def _probe_cpu_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_CPU_NATIVE_BF16 = _probe_cpu_native_bf16()  # probed once: a constant that torch.compile can trace through


def _native_low_precision_gemm(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively here (GPUs; CPUs with AVX-512-BF16/AMX via oneDNN)."""
    return device.type != "cpu" or _CPU_NATIVE_BF16


def _flat(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(numel, dtype=dtype, device=device)


def _front_view(scratch: Tensor, shape: tuple[int, int, int, int], fmt: torch.memory_format) -> Tensor:
    """A dense (N, c, H, W) tensor in ``fmt`` over the front of a flat ``scratch``."""
    n, c, h, w = shape
    flat = scratch[: n * c * h * w]
    return flat.view(n, h, w, c).permute(0, 3, 1, 2) if fmt == torch.channels_last else flat.view(shape)


def _fmt(t: Tensor) -> torch.memory_format:
    if t.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _affine(
    gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor, r_mean: Tensor | None, r_var: Tensor | None,
    eps: float, training: bool,
) -> tuple[Tensor, Tensor]:
    """BatchNorm folded to one per-channel ``scale * x + shift`` (batch stats in train, running in eval)."""
    if not training:
        mean = r_mean.to(mean.dtype)
        invstd = torch.rsqrt(r_var.to(mean.dtype) + eps)
    scale = gamma.to(mean.dtype) * invstd
    return scale, beta.to(mean.dtype) - mean * scale


def _mixed_cpu(t: Tensor, dtype: torch.dtype) -> bool:
    """Whether fp32 per-channel maths on ``t`` must go through a conversion first: on CPU, elementwise loops
    over mixed dtypes (bf16 data with an fp32 operand or output) are scalar and 10-50x slower than a
    conversion copy followed by a same-dtype loop (measured at 2x240x224x224: 338 ms vs 13 ms for
    ``grad += g * scale``). Inductor fuses the mixed maths itself."""
    return t.device.type == "cpu" and t.dtype != dtype and not torch.compiler.is_compiling()


def _row_bands(band_elems: int, *ts: Tensor) -> tuple[list[Tensor], list[tuple[Tensor, ...]]]:
    """Matching bands of rows of same-shape (N, C, H, W) tensors, as (C, rows, W) views, and one fp32 scratch
    per tensor for a band, in the first tensor's memory order.

    In channels_last the images' rows are evenly spaced, so bands run across images (fewer, fuller bands at
    low resolution); otherwise they stay within one image.
    """
    n, c, h, w = ts[0].shape
    if n > 1 and all(t.stride(0) == h * t.stride(2) for t in ts):
        views = [[t.as_strided((c, n * h, w), (t.stride(1), t.stride(2), t.stride(3)), t.storage_offset())]
                 for t in ts]
    else:
        views = [[t[b] for b in range(n)] for t in ts]
    total = views[0][0].shape[1]
    # A band holds ~band_elems values whatever the channel count: per-call overhead dominated small bands of few
    # channels (at 2x160x224x224, 8192-pixel bands took 7.2 ms, 4M-value bands 5.2).
    rows = max(1, min(total, band_elems // (w * c)))
    if ts[0].stride(1) == 1:  # channels innermost: keep the scratch in the same order so copies stay sequential
        scratch = [torch.empty((rows, w, c), dtype=torch.float32, device=t.device).permute(2, 0, 1) for t in ts]
    else:
        scratch = [torch.empty((c, rows, w), dtype=torch.float32, device=t.device) for t in ts]
    bands = [tuple(v[:, y0 : y0 + rows] for v in group) for group in zip(*views, strict=True)
             for y0 in range(0, total, rows)]
    return scratch, bands


def _bn_relu(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    """``out = relu(x * scale + shift)`` per channel: a dense layer's BatchNorm-ReLU, maths in ``scale``'s dtype.

    bf16 storage on CPU avoids mixed-dtype loops (``_mixed_cpu``): fp32 activations (bf16 emulated) are
    converted first and transformed in place; bf16 activations (native bf16) go through an fp32 scratch one
    cache-sized band of rows at a time.
    """
    if cpu_kernels.bn_relu(x, scale, shift, out) is not None:  # one pass, channels_last (cpu_kernels.c)
        return out
    sc, sh = _as_channel(scale), _as_channel(shift)
    if not _mixed_cpu(x, scale.dtype):
        torch.addcmul(sh, x, sc, out=out)
        return out.relu_()
    if out.dtype == scale.dtype:
        out.copy_(x)
        torch.addcmul(sh, out, sc, out=out)
        return out.relu_()
    (tmp, _), bands = _row_bands(_MIXED_BAND_ELEMS, x, out)
    sc, sh = sc[0], sh[0]
    for x_band, out_band in bands:
        t = tmp[:, : x_band.shape[1]]
        torch.addcmul(sh, t.copy_(x_band), sc, out=t)
        out_band.copy_(t.relu_())
    return out


def _apply_stat_grad(
    grad: Tensor, buf: Tensor, lo: int, hi: int, g_shift: Tensor, g_slope: Tensor, mean: Tensor, invstd: Tensor
) -> None:
    """Add the gradient that reaches channels [lo, hi) through their batch mean and variance.

    With xhat = (x - mean) * invstd, BN's input gradient has the per-layer term
    ``-scale/M * (sum(g) + xhat * sum(g * xhat))``; summed over layers it is affine in x per channel.
    """
    slope = g_slope[lo:hi] * invstd[lo:hi]
    offset = g_shift[lo:hi] - slope * mean[lo:hi]
    part, src = grad[:, lo:hi], buf[:, lo:hi]
    if cpu_kernels.stat_grad(part, src, slope, offset) is not None:  # one pass, channels_last (cpu_kernels.c)
        return
    if not _mixed_cpu(src, slope.dtype):
        part.addcmul_(src, _as_channel(slope)).add_(_as_channel(offset))
        return
    # bf16 buffer on CPU: the terms in fp32, band by band through scratch (see _bn_relu); the gradient is fp32
    # (bf16 emulated) or bf16 (native), where it is rounded once after the sum (the offset cancels slope * x).
    (tmp, acc), bands = _row_bands(_MIXED_BAND_ELEMS, src, part)
    sl, off = _as_channel(slope)[0], _as_channel(offset)[0]
    for src_band, part_band in bands:
        r = src_band.shape[1]
        t = tmp[:, :r]
        torch.addcmul(off, t.copy_(src_band), sl, out=t)
        if part.dtype == t.dtype:
            part_band.add_(t)
        else:
            part_band.copy_(acc[:, :r].copy_(part_band).add_(t))


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that adds its bias after the convolution.

    Same parameters and maths; the point is the backward: when the bias gradient is requested from
    ``convolution_backward`` together with the others, oneDNN takes a path that is several times slower
    on CPU (measured 4x on a dense layer, 2x on the transition convs), while the bias gradient of a separate
    add is one channel sum. Under a bf16 autocast on a CPU without bf16 units it convolves in fp32 the way
    the dense blocks do (``kernel_dtype``). Both are CPU workarounds: on other devices it is ``nn.Conv2d``
    itself (cuDNN adds the bias inside the convolution), so a GPU convolves as the reference does (the transitions
    down add their bias after pooling everywhere: tiramisu.TransitionDown).
    """

    def forward(self, x: Tensor, bias: bool = True) -> Tensor:
        """``bias=False``: the convolution alone (a caller that adds the bias later, where it costs less)."""
        b = self.bias if bias else None
        if x.device.type != "cpu":
            return self._conv_forward(x, self.weight, b)
        return _emulated_autocast(x, lambda x_, w_: self._conv_forward(x_, w_, None), self.weight, b)


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` that adds its bias after the convolution on CPU (see ``Conv2d``); no output_size."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if x.device.type != "cpu":
            return super().forward(x)
        def conv(x_: Tensor, w_: Tensor) -> Tensor:
            return F.conv_transpose2d(
                x_, w_, None, self.stride, self.padding, self.output_padding, self.groups, self.dilation
            )

        return _emulated_autocast(x, conv, self.weight, self.bias)


def _emulated_autocast(x: Tensor, conv: Any, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv(x, weight) + bias``; under a low-precision autocast on hardware without it, the operands are
    rounded to that dtype and convolved by the fp32 kernel (see ``kernel_dtype``), the output rounded back."""
    dev_type = x.device.type
    if torch.is_autocast_enabled(dev_type):
        dtype = torch.get_autocast_dtype(dev_type)
        kdtype = kernel_dtype(dtype, x.device)
        if kdtype != dtype:
            with torch.autocast(dev_type, enabled=False):
                y = conv(_cast(x, dtype, kdtype), _cast(weight, dtype, kdtype))
                if bias is not None:
                    y = y.add_(_as_channel(_cast(bias, dtype, kdtype)))
                return y.to(dtype)
    y = conv(x, weight)
    return y if bias is None else y.add_(_as_channel(bias.to(y.dtype)))


class DenseLayer(nn.Module):
    """Parameters of BN -> ReLU -> 3x3 conv (growth maps) -> Dropout2d; the block runs the maths."""

    def __init__(self, in_channels: int, growth_rate: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=True)
        self.dropout = dropout


class DenseBlock(nn.Module):
    """``n_layers`` dense layers; ``forward(*inputs)`` returns concat(inputs, all new maps)."""

    def __init__(
        self, in_channels: int, n_layers: int, growth_rate: int, dropout: float = DROPOUT,
        memory_efficient: bool = False, plain: bool | None = None,
    ) -> None:
        super().__init__()
        if plain and memory_efficient:
            raise ValueError("memory_efficient needs the fused dense block (dense_blocks=fused), not the plain one")
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.memory_efficient = memory_efficient
        # plain: the textbook torch.cat layers in training too (same parameters), for torch.compile to fuse.
        # None: chosen per call by device: fused on CPU, plain elsewhere (faster on an H100: tiramisu.py), fused
        # for memory_efficient (only it recomputes)
        self.plain = plain
        self.workspace = Workspace()  # training-step memory reused across steps on CPU (bgremover.nets.workspace)
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, dropout) for i in range(n_layers)
        )

    @property
    def out_channels(self) -> int:
        return self.in_channels + len(self.layers) * self.growth_rate

    def uses_plain(self, device: torch.device) -> bool:
        """Whether training on ``device`` runs the textbook layers instead of the fused Function."""
        if self.plain is not None:
            return self.plain
        return device.type != "cpu" and not self.memory_efficient

    def forward(self, *inputs: Tensor) -> Tensor:
        if sum(t.shape[1] for t in inputs) != self.in_channels:
            raise ValueError(f"DenseBlock expects {self.in_channels} input channels, got {[t.shape for t in inputs]}")
        x0 = inputs[0]
        grad = torch.is_grad_enabled()
        # Inference on CPU takes the fused Function too (~1.5-1.8x faster: module docstring). Exporters, tracing
        # and compiled inference get the textbook layers, which any of them can follow; so does inference
        # elsewhere, where the fused block was never measured to win.
        if self.uses_plain(x0.device) or (not self.training and (
            torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or (not grad and (x0.device.type != "cpu" or torch.compiler.is_compiling()))
        )):
            return self._forward_plain(inputs)
        dev_type = x0.device.type
        if torch.is_autocast_enabled(dev_type):
            cdtype = torch.get_autocast_dtype(dev_type)
        else:
            cdtype = x0.dtype
            for t in inputs[1:]:
                cdtype = torch.promote_types(cdtype, t.dtype)
        n = x0.shape[0]
        flat: list[Tensor | None] = []
        for layer in self.layers:
            bn = layer.norm
            mask = None
            if self.training and layer.dropout > 0:
                keep = 1.0 - layer.dropout
                mask = torch.empty((n, self.growth_rate, 1, 1), device=x0.device).bernoulli_(keep).div_(keep)
            # Running stats are read only in eval; in train they are updated after the Function returns.
            r_mean, r_var = (None, None) if self.training else (bn.running_mean, bn.running_var)
            flat += [bn.weight, bn.bias, layer.conv.weight, layer.conv.bias, r_mean, r_var, mask]
        eps = self.layers[0].norm.eps if len(self.layers) else 1e-5
        sync = self._stat_sync() if self.training else None
        if self.training and sync is None and len(self.layers) and n * x0.shape[2] * x0.shape[3] == 1:
            # nn.BatchNorm2d's own refusal, as the textbook block and a GPU run give it: one value per channel has no
            # variance, and the fused block trained on, pulling every running variance towards 0 (eval then scaled
            # those channels by 1/sqrt(eps))
            raise ValueError("Expected more than 1 value per channel when training, got input size "
                             f"{torch.Size((n, self.in_channels, *x0.shape[2:]))}")
        cfg = {
            "growth": self.growth_rate, "n_layers": len(self.layers), "eps": eps, "training": self.training,
            # without autograd nothing is kept for a backward: one scratch area serves every layer
            "memory_efficient": self.memory_efficient or not grad, "dtype": cdtype,
            "kernel_dtype": kernel_dtype(cdtype, x0.device), "sync": sync,
            # evaluation keeps no memory by name: a validation pass would otherwise park full-frame buffers
            # in the slots the training steps reuse
            "workspace": self.workspace if self.training else Workspace(),
        }
        buf, mean, var = _DenseBlockFn.apply(cfg, len(inputs), *inputs, *flat)
        if self.training:
            self._update_running_stats(mean, var, n * x0.shape[2] * x0.shape[3] if sync is None else sync.count)
        return buf

    def train(self, mode: bool = True) -> DenseBlock:
        if not mode:  # evaluation allocates nothing by name: give the training steps' memory back
            self.workspace.clear()
        return super().train(mode)

    def _stat_sync(self) -> _StatSync | None:
        """How this training step syncs batch statistics across processes, or None (single-process code).

        The switch is torch's own: ``nn.SyncBatchNorm.convert_sync_batchnorm`` (which Lightning's
        ``sync_batchnorm=True`` applies before wrapping the model in DDP, and reverts after fitting) turns the
        layers' norms into SyncBatchNorm, whose forward the block never calls. So the block syncs exactly when
        a converted model's plain BatchNorms would: as in ``SyncBatchNorm.forward``, only with an initialised
        process group of more than one rank, the norm's ``process_group`` or else the default group.
        """
        norm = self.layers[0].norm if len(self.layers) else None
        if not isinstance(norm, nn.SyncBatchNorm) or not (dist.is_available() and dist.is_initialized()):
            return None
        group = norm.process_group or dist.group.WORLD
        return _StatSync(group) if dist.get_world_size(group) > 1 else None

    def _forward_plain(self, inputs: tuple[Tensor, ...]) -> Tensor:
        """The textbook block on plain modules: ONNX/TorchScript export and tracing (any exporter can follow it),
        compiled inference, inference off the CPU, and training with ``plain=True`` (each layer's BatchNorm takes
        its own batch statistics and running update)."""
        feats = list(inputs)
        for layer in self.layers:
            x = feats[0] if len(feats) == 1 else torch.cat(feats, 1)
            y = layer.conv(F.relu(layer.norm(x)))
            if self.training and layer.dropout > 0:
                y = F.dropout2d(y, layer.dropout, training=True)
            feats.append(y)
        return feats[0] if len(feats) == 1 else torch.cat(feats, 1)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        """Same update as nn.BatchNorm2d in train mode, done once from the shared per-channel stats."""
        unbiased = var * (count / max(count - 1, 1))
        for i, layer in enumerate(self.layers):
            bn = layer.norm
            if not bn.track_running_stats or bn.running_mean is None:
                continue
            c = self.in_channels + i * self.growth_rate
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean[:c].to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_(unbiased[:c].to(bn.running_var.dtype), factor)
