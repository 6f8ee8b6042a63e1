"""The fused bf16 CPU kernels (bgremover.nets.cpu_kernels): each against float64 maths on the layouts the dense
block hands them, the layouts they refuse, and how the library is built, cached, turned off and replaced."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from bgremover.nets import cpu_kernels

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the kernels cannot be built")
CL = torch.channels_last
ULP = 2.0**-8  # relative spacing of bf16 values


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "1")


def _slice(n: int, c: int, h: int, w: int, total: int, gen: torch.Generator, dtype: torch.dtype = torch.bfloat16,
           offset: float = 32.0) -> torch.Tensor:
    """Channels [1, 1 + c) of a channels_last buffer of ``total`` channels: a strided, pixel-major view whose
    values sit far from zero (BN maths that centred in bf16 would cancel badly)."""
    buf = (torch.randn(n, total, h, w, generator=gen) + offset).to(dtype).contiguous(memory_format=CL)
    return buf[:, 1 : 1 + c]


def _dense(n: int, c: int, h: int, w: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(n, c, h, w, dtype=dtype).contiguous(memory_format=CL)


def _ch(v: torch.Tensor) -> torch.Tensor:
    return v.double().view(1, -1, 1, 1)


def _ulp(dtype: torch.dtype) -> float:
    return ULP if dtype == torch.bfloat16 else 2.0**-22  # fp32: a few ulps of fp32 maths


def _within_ulps(got: torch.Tensor, exact: torch.Tensor, floor: float = 1e-6) -> bool:
    return bool(((got.double() - exact).abs() <= _ulp(got.dtype) * exact.abs() + floor).all())


SHAPES = [(2, 7, 5, 6, 9), (1, 33, 3, 17, 40), (3, 1, 4, 4, 3), (2, 16, 9, 11, 17)]  # n, c, h, w, buffer channels (> c)
BF16, FP32 = torch.bfloat16, torch.float32
# (x, out) of the forward, (g, x, grad) of the backward: native bf16, emulated bf16 (bf16 buffer, fp32 kernels),
# fp32 training; the kernels compile every combination, these are the ones the dense block uses
FWD_DTYPES = [(BF16, BF16), (BF16, FP32), (FP32, FP32)]
BWD_DTYPES = [(BF16, BF16, BF16), (FP32, BF16, FP32), (FP32, FP32, FP32)]


@needs_cc
@pytest.mark.parametrize(("n", "c", "h", "w", "total"), SHAPES)
@pytest.mark.parametrize(("x_dtype", "out_dtype"), FWD_DTYPES)
def test_bn_relu_is_fp32_maths_rounded_once(n, c, h, w, total, x_dtype, out_dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x = _slice(n, c, h, w, total, gen, x_dtype)
    scale = torch.rand(c, generator=gen) + 0.5
    shift = torch.randn(c, generator=gen) - 32 * scale  # BN's shift cancels most of scale * x
    out = _dense(n, c, h, w, out_dtype)
    assert cpu_kernels.bn_relu(x, scale, shift, out) is out
    exact = (x.double() * _ch(scale) + _ch(shift)).relu()
    assert (exact == 0).any() and (exact > 0).any()  # both sides of the ReLU are exercised
    assert _within_ulps(out, exact, floor=1e-5)


@needs_cc
@pytest.mark.parametrize(("n", "c", "h", "w", "total"), SHAPES)
@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_channel_stats_match_float64(n, c, h, w, total, dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    x = _slice(n, c, h, w, total, gen, dtype)
    var, mean = cpu_kernels.channel_stats(x)
    exp_var, exp_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    assert var.dtype == mean.dtype == torch.float32
    torch.testing.assert_close(mean.double(), exp_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), exp_var, rtol=1e-5, atol=1e-6)


@needs_cc
def test_channel_stats_keep_fp32_accuracy_over_many_pixels() -> None:
    """300k pixels of values near 1000: a plain fp32 running sum would be off by ~1e-3 relative."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(3, 2, 400, 250, generator=gen) + 1000).bfloat16().contiguous(memory_format=CL)
    var, mean = cpu_kernels.channel_stats(x)
    exp_var, exp_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), exp_mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), exp_var, rtol=1e-3, atol=0)  # var ~ 0.08 next to mean^2 = 1e6


@needs_cc
@pytest.mark.parametrize(("n", "c", "h", "w", "total"), SHAPES)
@pytest.mark.parametrize(("g_dtype", "x_dtype", "grad_dtype"), BWD_DTYPES)
def test_bn_relu_backward_matches_float64(n, c, h, w, total, g_dtype, x_dtype, grad_dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    x = _slice(n, c, h, w, total, gen, x_dtype)
    scale = torch.rand(c, generator=gen) + 0.5
    shift = torch.randn(c, generator=gen) - 32 * scale
    mean = x.double().mean(dim=(0, 2, 3)).float()
    invstd = torch.rand(c, generator=gen) + 0.5
    g = torch.randn(n, c, h, w, generator=gen).to(g_dtype).contiguous(memory_format=CL)
    grad_buf = torch.randn(n, total, h, w, generator=gen).to(grad_dtype).contiguous(memory_format=CL)
    before = grad_buf.double()
    sum_g, sum_gxhat = cpu_kernels.bn_relu_backward(g, x, grad_buf[:, 1 : 1 + c], scale, shift, mean, invstd)
    live = (x.double() * _ch(scale) + _ch(shift)) > 0  # the forward's ReLU mask
    gm = g.double() * live
    xhat = (x.double() - _ch(mean)) * _ch(invstd)
    torch.testing.assert_close(sum_g.double(), gm.sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sum_gxhat.double(), (gm * xhat).sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-4)
    exact = before[:, 1 : 1 + c] + gm * _ch(scale)
    assert _within_ulps(grad_buf[:, 1 : 1 + c], exact, floor=1e-4)
    untouched = torch.cat([grad_buf[:, :1], grad_buf[:, 1 + c :]], 1).double()
    assert torch.equal(untouched, torch.cat([before[:, :1], before[:, 1 + c :]], 1))


@needs_cc
@pytest.mark.parametrize(("n", "c", "h", "w", "total"), SHAPES)
@pytest.mark.parametrize(("grad_dtype", "x_dtype"), [(BF16, BF16), (FP32, BF16), (FP32, FP32)])
def test_stat_grad_adds_the_affine_term_rounding_once(n, c, h, w, total, grad_dtype, x_dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    x = _slice(n, c, h, w, total, gen, x_dtype)
    grad = torch.randn(n, c, h, w, generator=gen).to(grad_dtype).contiguous(memory_format=CL)
    slope = torch.randn(c, generator=gen)
    offset = -32 * slope + torch.randn(c, generator=gen)  # the offset cancels slope * x, as in the block
    before = grad.double()
    assert cpu_kernels.stat_grad(grad, x, slope, offset) is grad
    assert _within_ulps(grad, before + x.double() * _ch(slope) + _ch(offset), floor=1e-3)


@needs_cc
@pytest.mark.parametrize(("src_dtype", "dst_dtype"), [(BF16, BF16), (FP32, BF16), (FP32, FP32)])
@pytest.mark.parametrize("with_mask", [True, False])
def test_scale_maps_applies_the_per_image_mask_and_sums(src_dtype, dst_dtype, with_mask) -> None:
    gen = torch.Generator().manual_seed(6)
    n, c, h, w = 3, 5, 4, 7
    src = torch.randn(n, c, h, w, generator=gen).to(src_dtype).contiguous(memory_format=CL)
    mask = (torch.rand(n, c, 1, 1, generator=gen) > 0.3).float() / 0.7 if with_mask else None
    buf = torch.zeros(n, 9, h, w, dtype=dst_dtype).contiguous(memory_format=CL)
    out = buf[:, 2 : 2 + c]  # the block buffer's strided slice, as the forward writes new maps
    assert cpu_kernels.scale_maps(src, mask, out) is out
    exact = (src.float() * (mask if with_mask else 1.0)).to(dst_dtype)  # one rounding of the fp32 product
    assert torch.equal(out, exact)
    assert torch.equal(buf[:, :2].double(), torch.zeros(n, 2, h, w, dtype=torch.float64))
    sums = cpu_kernels.scale_maps(src, mask, _dense(n, c, h, w, dst_dtype), sums=True)
    torch.testing.assert_close(sums.double(), out.double().sum(dim=(0, 2, 3)), rtol=1e-6, atol=1e-5)


@needs_cc
def test_layouts_the_kernels_cannot_read_fall_back() -> None:
    gen = torch.Generator().manual_seed(7)
    scale, shift = torch.ones(4), torch.zeros(4)
    nchw = torch.randn(2, 4, 3, 3, generator=gen).bfloat16()  # channels not innermost
    assert cpu_kernels.bn_relu(nchw, scale, shift, torch.empty_like(nchw)) is None
    cl = torch.randn(2, 4, 6, 3, generator=gen).bfloat16().contiguous(memory_format=CL)
    rows = cl[:, :, :3]  # a band of rows: images no longer evenly spaced
    assert cpu_kernels.bn_relu(rows, scale, shift, _dense(2, 4, 3, 3)) is None
    assert cpu_kernels.channel_stats(rows) is None
    f64 = cl.double()  # float64 (the exactness tests' dtype) stays with PyTorch
    assert cpu_kernels.bn_relu(f64, scale, shift, torch.empty_like(f64)) is None
    assert cpu_kernels.channel_stats(f64) is None
    assert cpu_kernels.bn_relu(cl, scale, shift, _dense(2, 4, 6, 2)) is None  # shapes differ
    assert cpu_kernels.bn_relu(cl, scale, shift, _dense(2, 4, 6, 3)) is not None  # and the same call that fits


def test_env_switch_turns_the_kernels_off(monkeypatch) -> None:
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    x = torch.randn(1, 3, 4, 4).bfloat16().contiguous(memory_format=CL)
    assert cpu_kernels.library() is None
    assert cpu_kernels.channel_stats(x) is None


@needs_cc
def test_build_is_cached_by_content_and_loaded_again(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BGREMOVER_CACHE", str(tmp_path / "bgremover"))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    lib = cpu_kernels.library()
    assert lib is not None and cpu_kernels.library() is lib
    built = list((tmp_path / "bgremover").iterdir())
    assert [p.suffix for p in built] == [".so"] and built[0].name.startswith("cpu_kernels-")  # no temp left over
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernels, "_state", {})  # a new process: finds the build, compiles nothing
    assert cpu_kernels.library() is not None
    assert list((tmp_path / "bgremover").iterdir()) == built and built[0].stat().st_mtime_ns == stamp


@needs_cc
def test_cc_with_arguments_is_split_as_make_does(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CC", "env cc")  # a wrapper before the compiler, like "ccache gcc"
    monkeypatch.setenv("BGREMOVER_CACHE", str(tmp_path / "bgremover"))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert cpu_kernels.library() is not None
    assert list((tmp_path / "bgremover").glob("cpu_kernels-*.so"))


@pytest.mark.parametrize("cc", ["false", "no-such-compiler-here"])
def test_no_working_compiler_warns_once_and_falls_back(cc, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("BGREMOVER_CACHE", str(tmp_path / "bgremover"))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    x = torch.randn(1, 3, 4, 4).bfloat16().contiguous(memory_format=CL)
    with pytest.warns(RuntimeWarning, match="fused CPU kernels unavailable"):
        assert cpu_kernels.channel_stats(x) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels.channel_stats(x) is None
    assert not list(tmp_path.rglob("*.so"))


def test_the_compilers_error_is_quoted_in_the_warning(tmp_path, monkeypatch) -> None:
    broken = tmp_path / "brokencc"
    broken.write_text("#!/bin/sh\necho 'cc1: error: unrecognized option' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("BGREMOVER_CACHE", str(tmp_path / "bgremover"))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    x = torch.randn(1, 3, 4, 4).bfloat16().contiguous(memory_format=CL)
    with pytest.warns(RuntimeWarning, match="cc1: error: unrecognized option"):
        assert cpu_kernels.channel_stats(x) is None


def test_a_hanging_compiler_times_out_into_the_fallback(tmp_path, monkeypatch) -> None:
    slow = tmp_path / "slowcc"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")  # exec: the timeout kills the sleeper itself
    slow.chmod(0o755)
    monkeypatch.setenv("CC", str(slow))
    monkeypatch.setenv("BGREMOVER_CACHE", str(tmp_path / "bgremover"))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "BUILD_TIMEOUT_S", 0.5)
    x = torch.randn(1, 3, 4, 4).bfloat16().contiguous(memory_format=CL)
    with pytest.warns(RuntimeWarning, match="timed out"):
        assert cpu_kernels.channel_stats(x) is None


def test_work_the_kernels_cannot_take_never_builds_anything(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BGREMOVER_CACHE", str(tmp_path / "bgremover"))
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert cpu_kernels.channel_stats(torch.randn(1, 3, 4, 4).double().contiguous(memory_format=CL)) is None
    assert cpu_kernels.channel_stats(torch.randn(1, 3, 4, 4).bfloat16()) is None  # NCHW
    assert cpu_kernels._state == {} and not tmp_path.joinpath("bgremover").exists()


@needs_cc
def test_bf16_stores_round_as_pytorch_does_ties_nan_and_overflow() -> None:
    """Every fp32 -> bf16 store of the kernels is PyTorch's own rounding, bit for bit: ties to even (rounding ties
    up biases every tie upwards), NaN stays NaN (rounding a NaN's payload up must not carry it into inf or, from
    0x7FFFFFFF, into -0.0: a NaN loss would vanish), the largest fp32 values overflow to inf. Random data almost
    never holds a tie or a NaN, so the tests above pass on either rounding; here the bit patterns are chosen."""
    bits = [0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3F807FFF, 0x3F808001, 0x00008000, 0x00018000,
            0x7F800001, 0xFF800001, 0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF,
            0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x00000000]
    signed = torch.tensor([b - 2**32 if b >= 2**31 else b for b in bits], dtype=torch.int32)
    src = signed.view(torch.float32).view(1, -1, 1, 1).expand(2, -1, 1, 3).contiguous(memory_format=CL)
    out = _dense(*src.shape)
    assert cpu_kernels.scale_maps(src, None, out) is out
    exact = src.to(torch.bfloat16)
    nan = exact.isnan()
    assert torch.equal(out.isnan(), nan) and nan.sum() == 5 * 2 * 3
    assert torch.equal(out[~nan].view(torch.int16), exact[~nan].view(torch.int16))
