"""Fused BatchNorm-ReLU kernels for the dense block on CPU: ``cpu_kernels.c``, built on first use, via ctypes.

Why: a CPU runs the dense block's convolutions near its peak (bf16 with bf16 units, fp32 otherwise), and what was
left of a training step was PyTorch's elementwise passes around them (BN-ReLU forward and backward, batch
statistics, dropout): each a trip through memory, and for bf16 data a mixed bf16/fp32 loop that PyTorch only runs
fast through fp32 scratch copies. The C file does each in one pass over channels-last data (see its header).

Why C through ctypes and not a PyTorch C++ extension: the source compiles in 1.5 s with the system's
``cc`` (a C++ extension takes a minute against PyTorch's headers) and has no ABI to match. It is built with
``-march=native`` into the project's cache folder (``files.cache_dir``: ``$BGREMOVER_CACHE``, else
``$XDG_CACHE_HOME/bgremover``, else ``~/.cache/bgremover``) under a name that hashes the
source, the compiler, the flags and this CPU's instruction sets, so a home directory shared by different CPUs
keeps one build each. Without a C compiler, if the build fails (one warning), or with ``BGREMOVER_CPU_KERNELS=0``
every function here returns None and the dense block runs its PyTorch ops instead: same maths, slower.

Each function takes tensors, checks they fit (CPU, bf16 or fp32, "pixel-major": channels innermost, pixels evenly
spaced — a channels_last tensor or a channel slice of one), and returns None when they do not.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from bgremover.files import cache_dir

ENV = "BGREMOVER_CPU_KERNELS"  # "0": never use these kernels (the dense block's PyTorch ops run instead)
SOURCE = Path(__file__).with_name("cpu_kernels.c")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
BUILD_TIMEOUT_S = 120  # a compiler that hangs must not hang training: past this, the PyTorch ops run

_P, _I = ctypes.c_void_p, ctypes.c_int64
_N = ctypes.c_int
_SIGNATURES = {  # C argument types, in the order of cpu_kernels.c; `types` (_N) after the tensors, thread count last
    "bn_relu_fwd": (_P, _I, _P, _I, _N, _I, _I, _P, _P, _N),
    "channel_stats": (_P, _I, _N, _I, _I, _P, _P, _N),
    "bn_relu_bwd": (_P, _I, _P, _I, _P, _I, _N, _I, _I, _P, _P, _P, _P, _P, _P, _N),
    "stat_grad": (_P, _I, _P, _I, _N, _I, _I, _P, _P, _N),
    "scale_maps": (_P, _I, _P, _I, _P, _I, _N, _I, _I, _P, _N),
}

_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def _build(compiler: list[str]) -> Path:
    """The shared library for this source, compiler, flags and CPU; compiled now if not built before."""
    from bgremover.utils import cpu_info

    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=True,
                             timeout=BUILD_TIMEOUT_S).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(CFLAGS).encode(),
                 " ".join(sorted(cpu_info()[1])).encode()):
        key.update(part)
    path = cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: a concurrent process never loads a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            subprocess.run([*compiler, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, check=True,
                           timeout=BUILD_TIMEOUT_S)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (turned off, no compiler, or the build failed: warned once per process)."""
    if os.environ.get(ENV, "1") == "0":
        return None
    with _lock:
        if "lib" not in _state:
            _state["lib"] = None
            cc = os.environ.get("CC", "cc")
            compiler = shlex.split(cc)  # as make reads $CC: "ccache gcc" and "gcc -m64" work too
            try:
                if not compiler or shutil.which(compiler[0]) is None:
                    raise OSError(f"no C compiler {cc!r} on PATH")
                lib = ctypes.CDLL(str(_build(compiler)))
                for fn, args in _SIGNATURES.items():
                    getattr(lib, fn).argtypes = args
                _state["lib"] = lib
            except (OSError, subprocess.SubprocessError) as e:
                stderr = getattr(e, "stderr", None)  # the compiler's own words, when it ran and failed
                detail = " ".join((stderr if isinstance(stderr, str) and stderr.strip() else str(e)).split())[:300]
                warnings.warn(f"bgremover: fused CPU kernels unavailable ({detail}); the dense blocks use PyTorch "
                              f"ops instead (slower on CPU). {ENV}=0 turns them off without this warning",
                              RuntimeWarning, stacklevel=3)
    return _state["lib"]


def _pixel_stride(t: Tensor) -> int | None:
    """Distance between pixels of an (N, C, H, W) tensor whose channels are innermost and whose N*H*W pixels are
    evenly spaced (a channels_last tensor, or a channel slice of one), else None."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    ps = sw if w > 1 else (sh if h > 1 else sn)
    if (c > 1 and sc != 1) or ps < c:
        return None
    if (h > 1 and sh != w * ps) or (n > 1 and sn != h * w * ps):
        return None
    return ps


def _fits(*ts: Tensor) -> tuple[list[int], int] | None:
    """Pixel strides of same-shape bf16 or fp32 CPU tensors, and their dtypes as the C code's ``types`` bits (bit k:
    the k-th is fp32), or None if any does not fit the kernels (checked before the library is loaded: nothing is
    built for a GPU or float64 run)."""
    if torch.compiler.is_compiling():
        return None
    strides, types = [], 0
    for k, t in enumerate(ts):
        if t.device.type != "cpu" or t.shape != ts[0].shape or t.dtype not in (torch.bfloat16, torch.float32):
            return None
        ps = _pixel_stride(t)
        if ps is None:
            return None
        strides.append(ps)
        types |= int(t.dtype == torch.float32) << k
    return (strides, types) if library() is not None else None


def _f32(v: Tensor) -> Tensor:
    """A per-channel vector as the C code reads it (fp32, contiguous); most already are (no new dispatch)."""
    return v if v.dtype == torch.float32 and v.is_contiguous() else v.detach().to(torch.float32).contiguous()


def _pixels(t: Tensor) -> int:
    return t.shape[0] * t.shape[2] * t.shape[3]


def _two_tensor(fn: str, a: Tensor, b: Tensor, u: Tensor, v: Tensor) -> bool:
    """Run an elementwise kernel over tensors ``a`` and ``b`` with per-channel vectors ``u`` and ``v`` (the C
    functions bn_relu_fwd and stat_grad share this signature); False where the tensors do not fit."""
    fit = _fits(a, b)
    if fit is None:
        return False
    (sa, sb), types = fit
    u, v = _f32(u), _f32(v)
    getattr(library(), fn)(a.data_ptr(), sa, b.data_ptr(), sb, types, _pixels(a), a.shape[1], u.data_ptr(),
                           v.data_ptr(), torch.get_num_threads())
    return True


def bn_relu(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> Tensor | None:
    """``out = relu(x * scale + shift)`` per channel (x, out bf16 or fp32); None where the kernels do not fit."""
    return out if _two_tensor("bn_relu_fwd", x, out, scale, shift) else None


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """Biased per-channel (variance, mean) of ``x`` in fp32, accumulated in fp64; None where it does not fit."""
    fit = _fits(x)
    if fit is None:
        return None
    (xs,), types = fit
    mean = torch.empty(x.shape[1], dtype=torch.float32)
    var = torch.empty_like(mean)
    library().channel_stats(x.data_ptr(), xs, types, _pixels(x), x.shape[1], mean.data_ptr(), var.data_ptr(),
                            torch.get_num_threads())
    return var, mean


def bn_relu_backward(
    g: Tensor, x: Tensor, grad: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, invstd: Tensor
) -> tuple[Tensor, Tensor] | None:
    """BN-ReLU backward of one layer's input channels ``x``, given the gradient ``g`` at the ReLU's output: with
    ``gm = g * (x * scale + shift > 0)`` (the forward's mask, as ``bn_relu`` computes it), adds ``gm * scale`` to
    ``grad`` in place and returns (sum(gm), sum(gm * xhat)) per channel in fp32; None where it does not fit."""
    fit = _fits(g, x, grad)
    if fit is None:
        return None
    (gs, xs, grs), types = fit
    scale, shift, mean, invstd = _f32(scale), _f32(shift), _f32(mean), _f32(invstd)
    sum_g = torch.empty(x.shape[1], dtype=torch.float32)
    sum_gxhat = torch.empty_like(sum_g)
    library().bn_relu_bwd(
        g.data_ptr(), gs, x.data_ptr(), xs, grad.data_ptr(), grs, types, _pixels(x), x.shape[1], scale.data_ptr(),
        shift.data_ptr(), mean.data_ptr(), invstd.data_ptr(), sum_g.data_ptr(), sum_gxhat.data_ptr(),
        torch.get_num_threads(),
    )
    return sum_g, sum_gxhat


def stat_grad(grad: Tensor, x: Tensor, slope: Tensor, offset: Tensor) -> Tensor | None:
    """``grad += x * slope + offset`` per channel, rounded once; None where it does not fit."""
    return grad if _two_tensor("stat_grad", grad, x, slope, offset) else None


def scale_maps(src: Tensor, mask: Tensor | None, out: Tensor, sums: bool = False) -> Tensor | None:
    """``out = src * mask`` (an (N, C, 1, 1) dropout mask; None: a copy), one rounding; returns ``out``, or with
    ``sums`` the per-channel fp32 sums of ``out``; None where it does not fit."""
    fit = _fits(src, out)
    if fit is None:
        return None
    (ss, ds), types = fit
    n, c, h, w = src.shape
    m = None if mask is None else _f32(mask.expand(n, c, 1, 1))
    total = torch.empty(c, dtype=torch.float32) if sums else None
    library().scale_maps(src.data_ptr(), ss, None if m is None else m.data_ptr(), h * w, out.data_ptr(), ds, types,
                         _pixels(src), c, None if total is None else total.data_ptr(), torch.get_num_threads())
    return total if sums else out
