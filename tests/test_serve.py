"""bgremover-serve through a real uvicorn on 127.0.0.1: cut-outs equal to the library's, every bad request a
4xx JSON error with the server still serving, the queue limit answered 503 at once, and the CLI's exits."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("uvicorn", reason="bgremover-serve needs uvicorn and starlette (pip install -e .)")
import uvicorn  # noqa: E402

from bgremover.images import encode_png  # noqa: E402
from bgremover.predict import BackgroundRemover  # noqa: E402
from bgremover.serve import ApiError, Service, _parser, cors_origins, cpu_count, create_app, server_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "0001TP_008910.jpg"  # a real CamVid test frame, 480x360
MAX_BYTES = 300_000  # small limits so over-limit bodies stay cheap to build and send
MAX_PIXELS = 1_000_000


# ----------------------------------------------------------------------------------------------------------
# A live server and a tiny stdlib HTTP client (no client library: the tests see the wire as curl would)


@contextlib.contextmanager
def live_server(service: Service, cors: tuple[str, ...] = (), page: bool = True):
    """uvicorn serving create_app(service, cors, page) on a free 127.0.0.1 port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound before the thread starts: no race for the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(create_app(service, cors, page), "warning", lifespan="off"))  # as bgremover-serve
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        yield base
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        service.pool.shutdown(wait=False, cancel_futures=True)
        assert not thread.is_alive(), "uvicorn did not stop"


def wait_healthy(base: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before answering /health")
        with contextlib.suppress(OSError):
            if request(base, "GET", "/health", timeout=2)[0] == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{base}/health did not answer within {timeout} s")


def request(base, method, path, body=None, headers=None, timeout=60.0, chunked=False):
    """(status, headers dict with lower-case names, body bytes)."""
    host, port = base.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=timeout)
    try:
        if chunked:  # no Content-Length: the server must count the bytes as they arrive
            conn.request(method, path, body=iter([body]), headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def multipart(data: bytes, filename: str | None = "photo.jpg", field: str = "file",
              fields: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    """The upload as `field` (with no filename= when None, as `curl -F "file=<photo.jpg"` sends it), after the
    form fields `fields` (rembg's clients send options so)."""
    boundary = "bgremover-test-boundary-7d1f"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in (fields or {}).items()]
    named = f'; filename="{filename}"' if filename is not None else ""
    body = b"".join(parts) + (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"{named}\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_file(base, data, query="", **kw):
    body, headers = multipart(data, **kw)
    return request(base, "POST", "/remove" + query, body, headers)


def post_raw(base, data, query="", **kw):
    return request(base, "POST", "/remove" + query, data, {"Content-Type": "application/octet-stream"}, **kw)


def png_image(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:80]
    with Image.open(io.BytesIO(data)) as img:
        img.load()
    return img


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG header claiming width x height (1-bit) with a few bytes of data: a decompression bomb."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def remover() -> BackgroundRemover:
    return BackgroundRemover(max_pixels=MAX_PIXELS)  # the shipped model


@pytest.fixture(scope="module")
def server(remover):
    service = Service(remover, workers=2, max_bytes=MAX_BYTES, queue=8)
    with live_server(service) as base:
        yield base


# ----------------------------------------------------------------------------------------------------------
# Good requests


def test_health_and_model(server, remover):
    status, headers, body = request(server, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, headers, body = request(server, "GET", "/model")
    assert status == 200 and headers["content-type"] == "application/json"
    meta = json.loads(body)
    assert meta["classes"] == remover.classes and len(meta["classes"]) == 11
    assert meta["default_foreground"] == ["Car", "Pedestrian", "Bicyclist"]
    # the served int8 file's own test mIoU (it carried the float model's figure, 0.56605, as its own)
    assert meta["net"] == remover.meta["net"]
    assert meta["test_mIoU"] == pytest.approx(remover.meta["quantization"]["eval"]["int8"]["mIoU"])
    assert meta["test_mIoU_float"] == pytest.approx(remover.meta["test_mIoU"]) != meta["test_mIoU"]
    assert meta["model_file"] == "bgremover-camvid.int8.onnx"  # the default: the shipped model's int8 copy
    assert (meta["test_frames"], meta["test_frames_of"]) == (233, 233)  # its record predates "of": not null
    assert meta["limits"] == {"max_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS, "max_side": remover.max_side,
                              "queue": 8, "workers": 2}



def test_model_of_a_partly_scored_int8_copy_gives_its_own_frame_count(tmp_path):
    """An int8 copy scored on `quantize --eval-limit 12` of 233 frames: /model gave its mIoU over those 12 as
    test_mIoU beside the float model's test_frames 233, as if the whole split had been scored."""
    from test_cutout_eval import build_model

    path = build_model(tmp_path / "q.onnx", metadata={
        "test_mIoU": 0.5, "test_frames": 233, "test_frames_of": 233,
        "quantization": {"eval": {"split": "test", "frames": 12, "of": 233, "int8": {"mIoU": 0.6}}}})
    service = Service(BackgroundRemover(path, threads=1), workers=1, max_bytes=MAX_BYTES, queue=2)
    with live_server(service) as base:
        status, _, body = request(base, "GET", "/model")
    meta = json.loads(body)
    assert status == 200 and (meta["test_mIoU"], meta["test_frames"], meta["test_frames_of"]) == (0.6, 12, 233)
    assert (meta["test_mIoU_float"], meta["test_frames_float"], meta["test_frames_of_float"]) == (0.5, 233, 233)

@pytest.mark.parametrize("inherited, expected", [(233, 233), (None, "absent")])
def test_model_of_an_int8_copy_quantized_before_its_record_kept_the_split_size(tmp_path, inherited, expected):
    """The shipped int8 copy's record predates quantize's "of": /model said "test_frames_of": null, as if the
    copy had not been tested. Its scoring covered the float model's test split, whose size the copy inherits;
    where even that is missing, the key is left out rather than null."""
    from test_cutout_eval import build_model

    path = build_model(tmp_path / "q.onnx", metadata={
        "test_mIoU": 0.5, "test_frames": 233, "test_frames_of": inherited,
        "quantization": {"eval": {"split": "test", "frames": 233, "int8": {"mIoU": 0.6}}}})
    service = Service(BackgroundRemover(path, threads=1), workers=1, max_bytes=MAX_BYTES, queue=2)
    with live_server(service) as base:
        status, _, body = request(base, "GET", "/model")
    meta = json.loads(body)
    assert status == 200 and (meta["test_mIoU"], meta["test_frames"]) == (0.6, 233)
    assert meta.get("test_frames_of", "absent") == expected


@pytest.mark.parametrize(
    "upload, query, opts",
    [
        ("multipart", "", {}),
        ("raw", "?classes=Car,Road&refine=1", {"classes": ["Car", "Road"], "refine": True}),
        ("multipart", "?classes=car&classes=pedestrian&threshold=0.4", {"classes": ["car", "pedestrian"], "threshold": 0.4}),
        ("raw", "?mask_only", {"mask_only": True}),
        ("multipart", "?om&a", {"mask_only": True, "refine": True}),
        ("multipart", "?bg_color=255,0,128&refine=false", {"bg_color": (255, 0, 128)}),
        ("multipart", "?bg_color=255,0,128,100", {"bg_color": (255, 0, 128, 100)}),
        # rembg's server names: om (only mask), a (alpha matting: here the guided-filter refine), bgc R,G,B,A
        ("raw", "?om=1", {"mask_only": True}),
        ("multipart", "?bgc=0,0,255,128&a=true", {"bg_color": (0, 0, 255, 128), "refine": True}),
        # as rembg's server (pydantic's bool) takes them: t/f and y/n were a 422 here
        ("raw", "?om=T&a=n", {"mask_only": True}),
        ("multipart", "?a=y&om=f", {"refine": True}),
    ],
)
def test_remove_equals_library(server, remover, upload, query, opts):
    data = EXAMPLE.read_bytes()
    post = post_file if upload == "multipart" else post_raw
    status, headers, body = post(server, data, query)
    assert status == 200, body[:300]
    assert headers["content-type"] == "image/png"
    expected = remover.remove(EXAMPLE, **opts)  # the library on the file itself
    got = png_image(body)
    assert got.size == (480, 360) and got.mode == expected.mode
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert body == encode_png(expected)  # byte for byte what bgremover-predict writes
    if got.mode == "RGBA" and "bg_color" not in opts:  # a real cut-out: both kept and removed pixels
        alpha = np.asarray(got)[:, :, 3]
        assert (alpha >= 192).mean() > 0.05 and (alpha < 64).mean() > 0.5
    name = "photo" if upload == "multipart" else "image"
    assert f'filename="{name}.{"mask" if opts.get("mask_only") else "nobg"}.png"' in headers["content-disposition"]


def test_rembg_path_answers_as_remove(server, remover):
    """`curl -F file=@photo.jpg 'http://host/api/remove?om=true'`, as rembg's server is called, works unchanged."""
    status, headers, body = request(server, "POST", "/api/remove?om=true", *multipart(EXAMPLE.read_bytes()))
    assert status == 200 and headers["content-type"] == "image/png", body[:300]
    assert body == encode_png(remover.remove(EXAMPLE, mask_only=True))
    status, _, body = request(server, "POST", "/api/remove?om=1&mask_only=1", *multipart(EXAMPLE.read_bytes()))
    assert status == 422 and "mask_only given more than once" in json.loads(body)["error"]


def test_rembg_form_fields_are_options(server, remover):
    """rembg's clients send their options as multipart form fields (`curl -F file=@photo.jpg -F om=true`): they
    were ignored (a full cut-out where a mask was asked for, 200). Now they are options like the query's; an
    option of rembg's that we lack (`model`) is refused, not ignored; the same option both ways is a repeat."""
    boundary = "bgremover-test-boundary-fields"

    def form(**fields: str) -> tuple[bytes, dict[str, str]]:
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in fields.items()]
        upload = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="photo.jpg"\r\n'
                  "Content-Type: image/jpeg\r\n\r\n").encode() + EXAMPLE.read_bytes() + b"\r\n"
        return b"".join([*parts, upload, f"--{boundary}--\r\n".encode()]), {
            "Content-Type": f"multipart/form-data; boundary={boundary}"}

    status, _, body = request(server, "POST", "/api/remove", *form(om="true"))
    assert status == 200 and body == encode_png(remover.remove(EXAMPLE, mask_only=True))
    status, _, body = request(server, "POST", "/api/remove", *form(bgc="255,255,255,255"))
    assert status == 200 and body == encode_png(remover.remove(EXAMPLE, bg_color=(255, 255, 255, 255)))
    # empty fields are no options, as rembg's server (FastAPI) takes them: om= gave a mask, bgc= a 422
    status, _, body = request(server, "POST", "/api/remove", *form(om="", a="", bgc=""))
    assert status == 200 and body == encode_png(remover.remove(EXAMPLE))
    # and an empty colour in the query is none too, as rembg's server reads `?bgc=` (it was a 422 here, while the
    # empty form field was no option); an empty flag stays a 422 there and here
    for query in ("?bgc=", "?bg_color=", "?bgc=&a=0"):
        status, _, body = request(server, "POST", f"/api/remove{query}", *form())
        assert status == 200 and body == encode_png(remover.remove(EXAMPLE)), body[:300]
    status, _, body = request(server, "POST", "/api/remove?om=", *form())
    assert status == 422 and "mask_only must be one of" in json.loads(body)["error"]
    status, _, body = request(server, "POST", "/api/remove", *form(model="u2net"))
    assert status == 422 and "unknown parameter model" in json.loads(body)["error"]
    status, _, body = request(server, "POST", "/api/remove?om=1", *form(om="true"))
    assert status == 422 and "mask_only given more than once" in json.loads(body)["error"]
    # two files: the last one was cut out without a word (`curl -F file=@a -F file=@b`)
    one, headers = form()
    end = f"--{boundary}--\r\n".encode()
    twice = one[: -len(end)] * 2 + end
    assert twice.count(b'name="file"') == 2
    status, _, body = request(server, "POST", "/api/remove", twice, headers)
    assert status == 422 and "file given more than once" in json.loads(body)["error"]


def _png_of(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, "PNG")
    return buf.getvalue()


def _utf8_bmp() -> bytes:
    """A BMP whose every byte is valid UTF-8 (an ASCII header, pixels C3 A9 = "é"): Starlette decodes it as UTF-8."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (32, 32), b"\xc3\xa9" * (32 * 32 * 3 // 2)).save(buf, "BMP", dpi=(0, 0))
    data = buf.getvalue()
    data.decode("utf-8")  # the premise
    return data


@pytest.mark.parametrize("image, style", [("jpeg", "curl"), ("jpeg", "aiohttp"), ("png", "curl"), ("bmp", "curl")])
def test_a_file_part_without_filename_is_the_image(server, remover, image, style):
    """`curl -F "file=<photo.jpg"` (no filename=, no Content-Type) and aiohttp's FormData of raw bytes (no filename=)
    were refused with "multipart upload has no file field 'file' (fields: file)"; rembg's server takes them.
    Starlette hands such a part over as text: the bytes are read from the body (a BMP that is valid UTF-8 came back
    changed from that text, a review found)."""
    data = {"jpeg": lambda: JPEG, "png": lambda: _png_of(JPEG), "bmp": _utf8_bmp}[image]()
    body, headers = multipart(data, filename=None)
    if style == "curl":
        body = body.replace(b"Content-Type: application/octet-stream\r\n", b"", 1)
    assert b"filename=" not in body
    status, headers, got = request(server, "POST", "/api/remove", body, headers)
    assert status == 200, got[:300]
    assert got == encode_png(remover.remove(io.BytesIO(data)))
    assert 'filename="image.nobg.png"' in headers["content-disposition"]


def test_a_big_file_part_without_filename_is_the_image(remover):
    """Starlette keeps a part without filename= in memory and refused one over 1 MiB ("Part exceeded maximum
    size"): a camera JPEG is bigger. Such a part may now be as big as --max-bytes allows."""
    noise = np.random.default_rng(1).integers(0, 256, (600, 800, 3), dtype=np.uint8)  # ~1.4 MB as PNG
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    data = buf.getvalue()
    assert len(data) > 1024 * 1024
    service = Service(remover, workers=1, max_bytes=4_000_000)
    with live_server(service) as base:
        status, _, got = request(base, "POST", "/remove", *multipart(data, filename=None))
    assert status == 200, got[:300]
    assert got == encode_png(remover.remove(io.BytesIO(data)))


def test_rembg_alpha_matting_parameters_are_checked_and_ignored(remover, caplog):
    """rembg's clients send af/ab/ae with `a`; they were refused (422 unknown parameter) while bgremover-predict
    takes -af/-ab/-ae and says it ignores them. Now checked as rembg checks them (integers; af, ab up to 255),
    ignored, named in each answer's X-Ignored-Parameters and logged once."""
    service = Service(remover, workers=1, max_bytes=MAX_BYTES)
    refined = encode_png(remover.remove(EXAMPLE, refine=True))
    with live_server(service) as base, caplog.at_level("WARNING", logger="bgremover.serve"):
        status, headers, body = request(base, "POST", "/api/remove?a=1&af=240&ab=10&ae=10", *multipart(JPEG))
        assert status == 200 and body == refined, body[:300]
        assert headers["x-ignored-parameters"] == "af, ab, ae"
        status, headers, body = request(  # as form fields, as rembg's clients send them
            base, "POST", "/api/remove", *multipart(JPEG, fields={"a": "true", "af": "255", "ae": "0"}))
        assert status == 200 and body == refined and headers["x-ignored-parameters"] == "af, ae"
        status, headers, body = post_file(base, JPEG, "?a=1")
        assert status == 200 and "x-ignored-parameters" not in headers
        for query, message in (
            ("?af=abc", "af (rembg's alpha matting, ignored here) must be an integer within 0..255, got 'abc'"),
            ("?ab=256", "ab (rembg's alpha matting, ignored here) must be an integer within 0..255, got '256'"),
            ("?ae=-1", "ae (rembg's alpha matting, ignored here) must be an integer >= 0, got '-1'"),
            ("?ae=1.5", "ae (rembg's alpha matting, ignored here) must be an integer >= 0, got '1.5'"),
            ("?af=1&af=2", "af given more than once"),
        ):
            status, _, body = post_file(base, JPEG, query)
            assert status == 422 and json.loads(body) == {"error": message}, (query, body)
    said = [r.getMessage() for r in caplog.records if "alpha-matting" in r.getMessage()]
    assert said == ["af/ab/ae (rembg's alpha-matting settings) ignored: `a` here refines the mask with a guided "
                    "filter (said once; each answer names them in X-Ignored-Parameters)"], said


def _saved_name(disposition: str) -> str:
    """The name a browser saves: RFC 6266's filename*=UTF-8'' value where there is one."""
    match = re.search(r"filename\*=UTF-8''([^;\s]+)", disposition)
    assert match, disposition
    return unquote(match.group(1), errors="strict")


def test_download_name_keeps_the_uploads_unicode_name(server):
    """`uni ñame é.png` came back as `uni_ame.nobg.png` (an ASCII filename= alone). filename= stays, for old
    clients; filename*= carries the real name, without the folders a client sent or control characters."""
    for sent, fallback, saved in (("uni ñame é.png", "uni_ame.nobg.png", "uni ñame é.nobg.png"),
                                  ("../../etc/évil.jpg", "vil.nobg.png", "évil.nobg.png"),
                                  ("日本.jpg", "image.nobg.png", "日本.nobg.png")):
        status, headers, body = post_file(server, JPEG, filename=sent)
        assert status == 200, body[:300]
        disposition = headers["content-disposition"]
        assert disposition.isascii() and disposition.startswith(f'inline; filename="{fallback}"; ')
        assert _saved_name(disposition) == saved
    status, headers, _ = post_file(server, JPEG, "?om=1", filename="photo.jpg")
    assert headers["content-disposition"] == "inline; filename=\"photo.mask.png\"; filename*=UTF-8''photo.mask.png"
    # what no browser sends, but curl's `-F "file=@x;filename=..."` can: a Windows path, control characters
    from bgremover.serve import content_disposition

    for sent, saved in (("C:\\Users\\me\\été.jpg", "été.nobg.png"), ("a\x00b\x1b\x7fc.jpg", "abc.nobg.png"),
                        (".hidden.jpg", "hidden.nobg.png"), ("", "image.nobg.png")):
        assert _saved_name(content_disposition(sent, {})) == saved


PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type"}


def test_cors_is_off_unless_asked(server, remover):
    """rembg's server allows any origin; here a browser app on another origin got 405 for its preflight, with no
    way to allow it. --cors ORIGINS (create_app's cors) now allows those origins; off by default."""
    status, headers, body = request(server, "OPTIONS", "/api/remove", headers=PREFLIGHT)
    assert status == 405 and "access-control-allow-origin" not in headers
    status, headers, _ = request(server, "POST", "/remove", JPEG, {"Origin": "https://app.example",
                                                                   "Content-Type": "application/octet-stream"})
    assert status == 200 and "access-control-allow-origin" not in headers
    service = Service(remover, workers=1, max_bytes=MAX_BYTES)
    with live_server(service, cors=("https://app.example",)) as base:
        status, headers, _ = request(base, "OPTIONS", "/api/remove", headers=PREFLIGHT)
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in headers["access-control-allow-methods"]
        assert "content-type" in headers["access-control-allow-headers"]
        other = {**PREFLIGHT, "Origin": "https://other.example"}
        status, headers, _ = request(base, "OPTIONS", "/api/remove", headers=other)
        assert status == 400 and "access-control-allow-origin" not in headers
        sent = {"Origin": "https://app.example", "Content-Type": "application/octet-stream"}
        status, headers, body = request(base, "POST", "/api/remove?af=240", JPEG, sent)
        assert status == 200 and body == encode_png(remover.remove(EXAMPLE))
        assert headers["access-control-allow-origin"] == "https://app.example"
        exposed = headers["access-control-expose-headers"].lower()  # what the app's script may read
        assert "content-disposition" in exposed and "x-ignored-parameters" in exposed
        status, headers, body = request(base, "POST", "/api/remove?threshold=2", JPEG, sent)  # errors too
        assert status == 422 and headers["access-control-allow-origin"] == "https://app.example"


# ----------------------------------------------------------------------------------------------------------
# Bad requests: status, JSON error, and the server keeps serving


def _noise_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _flat_png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), 128).save(buf, "PNG")
    return buf.getvalue()


JPEG = EXAMPLE.read_bytes()
BAD = [  # (id, send, data, query, status, substring of the error)
    ("empty-raw", post_raw, b"", "", 400, "empty request body"),
    ("empty-file", post_file, b"", "", 400, "uploaded file is empty"),
    ("no-file-field", lambda b, d, q: request(b, "POST", "/remove", *multipart(d, field="image")), JPEG, "", 400,
     "no file field 'file'"),
    ("not-an-image", post_file, b"hello, I am a text file\n" * 10, "", 400, "not a recognised image file"),
    ("truncated-jpeg", post_raw, _noise_jpeg()[:9000], "", 400, "cannot decode image"),
    ("truncated-png", post_file, _flat_png(300, 200)[:60], "", 400, "cannot decode image"),
    ("over-bytes", post_raw, os.urandom(MAX_BYTES + 1), "", 413, "over the limit of 300,000"),
    ("over-bytes-multipart", post_file, os.urandom(MAX_BYTES + 1), "", 413,
     "image of 300,001 bytes is over the limit of 300,000 bytes (--max-bytes)"),
    ("over-bytes-chunked", lambda b, d, q: post_raw(b, d, chunked=True), os.urandom(MAX_BYTES + 10), "", 413,
     "--max-bytes"),
    ("over-pixels", post_file, _flat_png(1250, 801), "", 413, "1250x801 = 1,001,250 pixels exceeds the limit of 1,000,000 (raise --max-pixels"),
    ("decompression-bomb", post_raw, png_bomb(100_000, 100_000), "", 413, "pixels"),
    ("unknown-class", post_raw, JPEG, "?classes=Car,Dog", 422,
     "unknown class name(s) Dog; valid names: Sky, Building, Pole, Road, Sidewalk, Tree, SignSymbol, Fence, Car, "
     "Pedestrian, Bicyclist"),
    ("no-class", post_raw, JPEG, "?classes=", 422, "no foreground class given"),
    ("threshold-text", post_raw, JPEG, "?threshold=half", 422, "threshold must be a number within 0..1"),
    ("threshold-range", post_file, JPEG, "?threshold=1.5", 422, "threshold must be a number within 0..1"),
    ("threshold-nan", post_raw, JPEG, "?threshold=nan", 422, "threshold"),
    ("bool-value", post_raw, JPEG, "?refine=maybe", 422, "refine must be one of"),
    # a template's empty value, as rembg's server (FastAPI) answers it: was a mask (`?om` alone stays true)
    ("bool-empty", post_raw, JPEG, "?om=", 422, "mask_only must be one of 1/0, true/false (t/f), yes/no (y/n), "
     "on/off; got ''"),
    ("bool-empty-refine", post_file, JPEG, "?a=&om", 422, "refine must be one of"),
    ("bad-colour", post_raw, JPEG, "?bg_color=300,0,0", 422, "bad colour '300,0,0'"),
    ("mask-and-colour", post_raw, JPEG, "?mask_only=1&bg_color=0,0,0", 422, "either mask_only or bg_color"),
    ("unknown-option", post_raw, JPEG, "?treshold=0.5", 422, "unknown parameter treshold; valid: classes, threshold, refine, mask_only, bg_color (rembg's om, a, bgc for some; its af, ab, ae accepted and ignored)"),
    ("twice", post_raw, JPEG, "?threshold=0.1&threshold=0.2", 422, "threshold given more than once"),
    # rembg's fetch-by-URL: was "empty request body" (400) or "unknown parameter(s) url"
    ("url-no-body", post_raw, b"", "?url=http://example.com/x.jpg", 422, "url= is not supported"),
    ("url-with-file", post_file, JPEG, "?url=http://example.com/x.jpg", 422, "url= is not supported"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_request_gets_json_error(server, case):
    _, send, data, query, want_status, want_text = case
    status, headers, body = send(server, data, query)
    assert status == want_status, body[:300]
    assert headers["content-type"] == "application/json"
    error = json.loads(body)
    assert list(error) == ["error"] and want_text in error["error"], error


def test_an_image_of_max_bytes_is_taken_as_an_upload_and_as_a_raw_body(server):
    """--max-bytes is the image's limit, as the page checks it (the file's size): counted on the multipart body, a
    file a few hundred bytes under the limit passed the page's check and got the server's 413."""
    whole = JPEG + b"\0" * (MAX_BYTES - len(JPEG))  # a JPEG decoder stops at its end marker: the padding is ignored
    assert len(whole) == MAX_BYTES
    for send in post_file, post_raw:
        status, headers, body = send(server, whole, "", **({"fields": {"om": "false"}} if send is post_file else {}))
        assert status == 200 and headers["content-type"] == "image/png", (send.__name__, body[:300])


def test_wrong_route_and_method_are_json(server):
    for method, path, want in (("GET", "/remove", 405), ("GET", "/nope", 404), ("POST", "/model", 405)):
        status, headers, body = request(server, method, path)
        assert status == want and headers["content-type"] == "application/json"
        assert json.loads(body)["error"]
    status, _, body = request(server, "GET", "/api/remove?url=http://example.com/x.jpg")  # rembg's GET form
    assert status == 405 and "url= is not supported" in json.loads(body)["error"]


def test_the_docs_paths_lead_to_the_apis_usage(server):
    """rembg's server documents its API at /api (FastAPI's /docs in older ones); here both answered a bare JSON
    404 "not found: /docs". They now lead to the page's usage section, and any 404 names the routes."""
    for path in ("/docs", "/api"):
        status, headers, _ = request(server, "GET", path)
        assert status == 307 and headers["location"] == "/#api", (path, status, headers)
    status, _, body = request(server, "GET", "/")
    assert status == 200 and b'id="api"' in body and b"/remove" in body
    status, headers, body = request(server, "GET", "/openapi.json")
    assert status == 404 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == ("not found: /openapi.json; the API is POST /remove (or /api/remove), "
                                         "GET /model, GET /health; its usage is on the page at /")


def test_still_serving_after_bad_requests(server, remover):
    for case in BAD:  # all of them again, back to back on one server
        assert case[1](server, case[2], case[3])[0] == case[4]
    status, _, body = request(server, "GET", "/health")
    assert status == 200 and json.loads(body)["busy"] == 0  # every failed request released its queue slot
    status, _, body = post_file(server, JPEG)
    assert status == 200 and np.array_equal(np.asarray(png_image(body)), np.asarray(remover.remove(EXAMPLE)))


def test_pixel_limit_is_the_predictors(remover, monkeypatch):
    """--max-pixels decides in the server as in bgremover-predict: Pillow's own ceiling (an error past 2x
    MAX_IMAGE_PIXELS, ~179 Mpx) answered 413 "possible decompression bomb" for images --max-pixels allowed, which
    bgremover-predict cut out; one check (the remover's), one limit, one message."""
    buf = io.BytesIO()
    Image.fromarray(np.full((50, 50, 3), 90, np.uint8)).save(buf, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses past 2,000 px; 50x50 is 2,500
    allowed = Service(BackgroundRemover(max_pixels=2500), workers=1)
    png, _ = allowed.cutout(buf.getvalue(), {})
    expected = np.asarray(allowed.remover.remove(io.BytesIO(buf.getvalue())))
    with monkeypatch.context() as m:  # the test's own decoding of the answer
        m.setattr(Image, "MAX_IMAGE_PIXELS", None)
        assert np.array_equal(np.asarray(png_image(png)), expected)
    assert allowed.max_pixels == 2500  # what /model reports is the limit applied
    refused = Service(BackgroundRemover(max_pixels=2499), workers=1)
    with pytest.raises(ApiError) as err:
        refused.cutout(buf.getvalue(), {})
    assert err.value.status == 413 and err.value.message == (
        "50x50 = 2,500 pixels exceeds the limit of 2,499 (raise --max-pixels if you trust this file)")
    for service in (allowed, refused):
        service.pool.shutdown()


CLOSE = {"Content-Type": "application/octet-stream", "Connection": "close"}  # what urllib sends


def test_a_big_refused_body_still_gets_its_json_error(remover):
    """A client that sends its whole body before reading the answer and asks the server to close the connection
    after it (urllib: `Connection: close`, no `Expect: 100-continue`) reads the 413 of an upload far over
    --max-bytes, declared or chunked, instead of a connection reset (seen with urllib on a 30 MB upload)."""
    big = os.urandom(100 * MAX_BYTES)  # 30 MB: far more than loopback socket buffers take in before the answer
    service = Service(remover, workers=1, max_bytes=MAX_BYTES)
    with live_server(service) as base:
        for chunked in (False, True):
            status, _, body = request(base, "POST", "/remove", big, CLOSE, chunked=chunked)
            assert status == 413 and "--max-bytes" in json.loads(body)["error"], (chunked, body[:200])
        # chunked with `Expect: 100-continue`: reading the body sent the 100, so the client is uploading it all
        status, _, body = request(base, "POST", "/remove", big, {**CLOSE, "Expect": "100-continue"}, chunked=True)
        assert status == 413 and "--max-bytes" in json.loads(body)["error"], body[:200]
        assert post_raw(base, JPEG)[0] == 200


# ----------------------------------------------------------------------------------------------------------
# Queue limit: a request beyond --queue gets 503 at once while the event loop keeps answering


class GatedRemover:
    """The real remover, held inside `remove` until the test opens the gate: a deterministic slow request."""

    def __init__(self, inner: BackgroundRemover) -> None:
        self.inner, self.entered, self.gate = inner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def remove(self, img, **opts):
        self.entered.set()
        assert self.gate.wait(30), "test never opened the gate"
        return self.inner.remove(img, **opts)


def test_queue_full_answers_503_at_once(remover):
    gated = GatedRemover(remover)
    service = Service(gated, workers=1, max_bytes=MAX_BYTES, queue=1)
    with live_server(service) as base:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(r=post_file(base, JPEG)))
        worker.start()
        try:
            assert gated.entered.wait(30), "first request never reached the model"
            start = time.monotonic()
            status, headers, body = post_file(base, JPEG)  # the queue (1) is full
            assert status == 503 and time.monotonic() - start < 5
            assert "server busy" in json.loads(body)["error"] and headers["retry-after"] == "1"
            status, _, body = request(base, "POST", "/remove", os.urandom(100 * MAX_BYTES), CLOSE)  # answered, not reset
            assert status == 503 and "server busy" in json.loads(body)["error"]
            status, _, body = request(base, "GET", "/health", timeout=5)  # the event loop is not blocked
            assert status == 200 and json.loads(body)["busy"] == 1
        finally:
            gated.gate.set()
            worker.join(60)
        assert first["r"][0] == 200 and png_image(first["r"][2]).size == (480, 360)
        assert post_raw(base, JPEG)[0] == 200  # the slot is free again


def test_a_request_in_flight_when_the_server_stops_still_gets_its_cutout(remover):
    """SIGTERM (docker stop) or Ctrl-C with a cut-out in progress: after uvicorn's graceful timeout of 5 s the
    request was cancelled and its client got a 500 (a 48 MP photo takes ~8 s here). Requests in flight now get
    serve.GRACEFUL_S to finish; the server stops accepting new ones at once."""
    gated = GatedRemover(remover)
    service = Service(gated, workers=1, max_bytes=MAX_BYTES, queue=2)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(server_config(create_app(service), "warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    got: dict = {}
    try:
        wait_healthy(base)
        client = threading.Thread(target=lambda: got.update(r=post_file(base, JPEG)))
        client.start()
        assert gated.entered.wait(30), "the request never reached the model"
        server.should_exit = True  # what uvicorn's SIGTERM / SIGINT handler does
        time.sleep(6.0)  # past the old 5 s
        gated.gate.set()
        client.join(60)
        thread.join(30)
    finally:
        gated.gate.set()
        server.should_exit = True
        thread.join(15)
        sock.close()
        service.pool.shutdown(wait=False, cancel_futures=True)
    assert got["r"][0] == 200 and png_image(got["r"][2]).size == (480, 360)
    assert not thread.is_alive()


def test_a_forced_stop_answers_the_request_in_flight_with_a_json_503(remover, caplog):
    """A second Ctrl-C (uvicorn's force quit) with a cut-out in progress: its client got uvicorn's plain-text 500
    and the log two CancelledError tracebacks (the request's and the lifespan task's). Now a JSON 503 to retry
    on, no traceback, and the count for the server's last line."""
    gated = GatedRemover(remover)
    service = Service(gated, workers=1, max_bytes=MAX_BYTES, queue=2)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(server_config(create_app(service), "info"))  # the CLI's config, lifespan included
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    got: dict = {}
    with caplog.at_level(logging.INFO):
        thread.start()
        try:
            wait_healthy(base)
            client = threading.Thread(target=lambda: got.update(r=post_file(base, JPEG)))
            client.start()
            assert gated.entered.wait(30), "the request never reached the model"
            server.should_exit = True  # the first Ctrl-C
            time.sleep(0.5)
            server.force_exit = True  # the second
            thread.join(30)
            client.join(30)
        finally:
            gated.gate.set()
            server.should_exit = server.force_exit = True
            thread.join(15)
            sock.close()
            service.pool.shutdown(wait=False, cancel_futures=True)
    status, headers, body = got["r"]
    assert status == 503 and json.loads(body) == {"error": "the server was stopped before this cut-out finished; retry"}
    assert service.cancelled == 1 and not thread.is_alive()
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()], caplog.text


def _stalled_upload(base: str) -> socket.socket:
    """A client that announces a 100 kB body, sends 2 bytes and then nothing."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /remove HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Length: 100000\r\n\r\nab")
    return sock


def test_a_stalled_upload_is_refused_and_frees_its_slot(remover, monkeypatch):
    """Uploads that stop sending held their --queue slots for good: two stalled sockets locked out every client
    of a --queue 2 server (503 for 70 s and counting, measured). A body idle for BODY_IDLE_S now gets 408."""
    from bgremover import serve_requests

    monkeypatch.setattr(serve_requests, "BODY_IDLE_S", 1.0)
    service = Service(remover, workers=1, max_bytes=MAX_BYTES, queue=2)
    with live_server(service) as base:
        stalled = [_stalled_upload(base) for _ in range(2)]
        try:
            time.sleep(0.3)
            assert post_raw(base, JPEG)[0] == 503  # both slots held by the stalled uploads
            time.sleep(1.5)
            for sock in stalled:
                answer = sock.recv(4096).decode()
                assert answer.startswith("HTTP/1.1 408") and "request body stalled" in answer, answer
            assert post_raw(base, JPEG)[0] == 200  # the slots are free again
        finally:
            for sock in stalled:
                sock.close()


def test_a_trickling_upload_is_refused_at_the_body_deadline_and_frees_its_slot(remover, monkeypatch):
    """A client sending a byte just inside every BODY_IDLE_S never went idle, so it held its --queue slot for as
    long as it liked (16 such clients locked out a --queue 16 server). The whole body now has BODY_TOTAL_S."""
    from bgremover import serve_requests

    monkeypatch.setattr(serve_requests, "BODY_IDLE_S", 2.0)
    monkeypatch.setattr(serve_requests, "BODY_TOTAL_S", 3.0)
    service = Service(remover, workers=1, max_bytes=MAX_BYTES, queue=1)
    with live_server(service) as base:
        sock = _stalled_upload(base)
        try:
            start = time.monotonic()
            sock.settimeout(0.3)
            answer = ""
            while not answer and time.monotonic() - start < 10:  # without the deadline: no answer at all
                with contextlib.suppress(OSError):  # once answered, the server may have closed its side
                    sock.sendall(b"x")  # a byte every 0.3 s: never idle for BODY_IDLE_S
                with contextlib.suppress(TimeoutError):
                    answer = sock.recv(4096).decode()
            # the headers and the body can come in two packets (seen under load): read until the body is whole
            while answer and not answer.endswith("}") and time.monotonic() - start < 10:
                with contextlib.suppress(TimeoutError):
                    more = sock.recv(4096).decode()
                    answer += more
                    if not more:  # closed
                        break
            assert answer.startswith("HTTP/1.1 408") and "not all received in 3 s" in answer, answer
            assert 2.5 < time.monotonic() - start < 8.0
            assert post_raw(base, JPEG)[0] == 200  # the slot is free again
        finally:
            sock.close()


def test_a_client_hanging_up_mid_upload_is_no_error(remover, caplog):
    """A client that disconnects mid-upload logged two ERROR tracebacks (ClientDisconnect fell to the catch-all)."""
    service = Service(remover, workers=1, max_bytes=MAX_BYTES, queue=2)
    with live_server(service) as base, caplog.at_level("INFO", logger="bgremover.serve"):
        _stalled_upload(base).close()
        time.sleep(0.5)
        status, _, body = request(base, "GET", "/health", timeout=5)
        assert status == 200 and json.loads(body)["busy"] == 0
    errors = [r for r in caplog.records if r.name.startswith("bgremover") and r.levelname == "ERROR"]
    assert not errors, [r.getMessage() for r in errors]
    assert any("client disconnected" in r.getMessage() for r in caplog.records)


def test_a_request_whose_client_left_while_queued_is_not_cut_out(remover, caplog):
    """The page aborts its request at every option change, and a client that gave up leaves too; each one's cut-out
    was still computed, ahead of the request that is waited for (one worker, 24 Mpx photos: after four abandoned
    requests the next took 18.2 s, now 9.0 s; 6.6 s alone). One whose client has gone before a worker takes it is
    skipped."""
    calls = []

    class Counting(GatedRemover):
        def remove(self, img, **opts):
            calls.append(opts)
            return super().remove(img, **opts)

    gated = Counting(remover)
    service = Service(gated, workers=1, max_bytes=MAX_BYTES, queue=4)
    with live_server(service) as base, caplog.at_level("INFO", logger="bgremover.serve"):
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(r=post_raw(base, JPEG)))
        worker.start()
        try:
            assert gated.entered.wait(30), "the first request never reached the model"
            host, port = base.removeprefix("http://").split(":")
            left = socket.create_connection((host, int(port)), timeout=10)  # sends all, then hangs up unanswered
            left.sendall(b"POST /remove?mask_only=1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                         + f"Content-Length: {len(JPEG)}\r\n\r\n".encode() + JPEG)
            deadline = time.monotonic() + 10
            while json.loads(request(base, "GET", "/health")[2])["busy"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            left.close()
            time.sleep(0.5)  # the server sees the connection close
        finally:
            gated.gate.set()
            worker.join(60)
        assert first["r"][0] == 200
        status, _, body = post_raw(base, JPEG, "?threshold=0.5")  # the next one is served as usual
        assert status == 200 and png_image(body).size == (480, 360)
        assert json.loads(request(base, "GET", "/health")[2])["busy"] == 0
    assert calls == [{}, {"threshold": 0.5}], calls  # not {"mask_only": True}: its client had left
    assert any("left before its cut-out started" in r.getMessage() for r in caplog.records), caplog.text


# ----------------------------------------------------------------------------------------------------------
# The bgremover-serve command itself


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bgremover.serve", *args]


def test_cli_serves_then_stops_on_sigint(tmp_path):
    proc = subprocess.Popen(
        serve_cmd("--port", "0", "--threads", "1", "--log-level", "warning", "--cors", "*"),
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    try:
        line = proc.stderr.readline()  # "bgremover-serve: ... on http://127.0.0.1:PORT/ ..."
        match = re.search(r"http://(127\.0\.0\.1:\d+)/", line)
        assert match, line
        base = f"http://{match.group(1)}"
        wait_healthy(base, proc=proc)
        status, _, body = post_raw(base, JPEG, "?classes=Car&threshold=0.5")
        assert status == 200
        # Same options, same intra-op thread count as the server (all cores for one worker).
        lib = BackgroundRemover(threads=cpu_count()).remove(EXAMPLE, classes=["Car"], threshold=0.5)
        assert np.array_equal(np.asarray(png_image(body)), np.asarray(lib))
        assert json.loads(request(base, "GET", "/model")[2])["limits"]["workers"] == 1
        status, headers, _ = request(base, "OPTIONS", "/api/remove", headers=PREFLIGHT)  # --cors "*": any origin
        assert status == 200 and headers["access-control-allow-origin"] == "*"
        assert post_raw(base, JPEG, "?a=1&af=240")[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        # the service's own warning as `bgremover-serve: ...`, as its other lines (Python printed it bare)
        rest = proc.stderr.read().splitlines()
        assert any(x.startswith("bgremover-serve: af (rembg's alpha-matting") for x in rest), rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# bgremover-serve with a 1 s grace period and a cut-out that takes 10 s: a stop always runs past the grace period
SLOW_SERVE = """import sys, time
from bgremover import remover, serve
serve.GRACEFUL_S = 1
slow = remover.BackgroundRemover.remove
remover.BackgroundRemover.remove = lambda self, *a, **k: (time.sleep(10), slow(self, *a, **k))[1]
sys.exit(serve.main())
"""


@contextlib.contextmanager
def slow_server_busy(post):
    """SLOW_SERVE (1 s grace period, 10 s cut-outs) with one cut-out running in its worker, `post(base)` sent from
    a thread: yields (process, client thread); the process is killed on the way out if the test left it running."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVE, "--port", "0", "--threads", "1", "--log-level",
                             "warning"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        match = re.search(r"http://(127\.0\.0\.1:\d+)/", proc.stderr.readline())
        assert match
        base = f"http://{match.group(1)}"
        wait_healthy(base, proc=proc)
        client = threading.Thread(target=post, args=(base,))
        client.start()
        deadline = time.monotonic() + 20
        while json.loads(request(base, "GET", "/health")[2])["busy"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # past the upload: in the worker, inside the 10 s
        yield proc, client
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_past_the_grace_period_answers_503_and_says_so():
    """SIGTERM (systemd, docker stop) with a cut-out still running when the grace period ran out: its client's
    connection was dropped (no answer at all) and nothing said so, where the README promises a JSON 503 to retry
    on and one line with the count, as a second Ctrl-C gives. The process still ends by SIGTERM (a clean stop to
    systemd, 143 in a shell)."""
    got: dict = {}

    def post(base: str) -> None:
        try:
            got["r"] = post_raw(base, JPEG)
        except OSError as err:  # what it got: the connection dropped, no answer
            got["r"] = (None, {}, repr(err).encode())

    with slow_server_busy(post) as (proc, client):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == -signal.SIGTERM
        client.join(20)
        stderr = proc.stderr.read()
    status, headers, body = got["r"]
    assert status == 503 and headers.get("retry-after") == "1", (status, body)
    assert json.loads(body) == {"error": "the server was stopped before this cut-out finished; retry"}
    assert "bgremover-serve: stopped with 1 cut-out in progress, answered 503" in stderr, stderr
    assert "Traceback" not in stderr, stderr


def test_a_stop_that_cuts_a_cutout_short_ends_the_process_at_once():
    """Ctrl-C with a cut-out running past the grace period (or a second Ctrl-C): its client got the 503 at once,
    but the process waited for the cut-out still running on its worker (Python joins the pool's threads at exit),
    up to a large photo's seconds after the README's "stops it at once", and a further Ctrl-C in that wait printed
    a threading traceback. The cut-out here takes 10 s: the process must end well before it would finish."""
    got: dict = {}
    with slow_server_busy(lambda base: got.setdefault("r", post_raw(base, JPEG))) as (proc, client):
        stopped = time.monotonic()
        proc.send_signal(signal.SIGINT)
        client.join(20)
        assert proc.wait(20) == 0
        took = time.monotonic() - stopped
        stderr = proc.stderr.read()
    assert got["r"][0] == 503
    assert took < 6, f"the process took {took:.1f} s to end after the 503 (the cut-out's 10 s)"
    assert "bgremover-serve: stopped with 1 cut-out in progress, answered 503" in stderr, stderr
    assert "Traceback" not in stderr, stderr


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(serve_cmd(*args), capture_output=True, text=True, timeout=60)


def test_cli_model_load_failure_is_one_error_line(tmp_path):
    missing = _run_cli("--model", str(tmp_path / "nope.onnx"), "--port", "0")
    junk = tmp_path / "junk.onnx"
    junk.write_text("not an onnx file")
    broken = _run_cli("--model", str(junk), "--port", "0")
    for result, text in ((missing, "model file not found"), (broken, "cannot load ONNX model")):
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bgremover-serve: error:") and text in lines[0], result.stderr
        assert "Traceback" not in result.stderr


def test_cli_usage_errors_and_busy_port():
    for queue in ("-1", "0"):  # 0 started, then answered every request 503
        bad = _run_cli("--queue", queue)
        assert bad.returncode == 2 and bad.stderr.strip() == f"bgremover-serve: error: --queue must be positive, got {queue}"
    # --threads 0 is the default here as in bgremover-predict (serve refused it, predict took it)
    bad = _run_cli("--threads", "-1")
    assert bad.returncode == 2 and bad.stderr.strip() == "bgremover-serve: error: --threads must be >= 0 (0 = the default), got -1"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = _run_cli("--port", str(taken.getsockname()[1]))
    lines = busy.stderr.strip().splitlines()
    assert busy.returncode == 1 and len(lines) == 1 and "cannot listen on 127.0.0.1:" in lines[0], busy.stderr


def test_cli_bad_option_is_one_error_line():
    """`--port abc` printed argparse's usage block before the error; bgremover-predict prints one `error:` line for
    the same mistake, and now so does bgremover-serve, also as `bgremover-predict s`."""
    predict_s = [sys.executable, "-m", "bgremover.predict", "s"]
    for cmd, prog in ((serve_cmd(), "bgremover-serve"), (predict_s, "bgremover-predict s")):
        for args, error in ((["--port", "abc"], "argument --port/-p: invalid int value: 'abc'"),
                            (["--cors", "http://app.example/"], "argument --cors: an origin is "
                             "scheme://host[:port], no path, or *; got 'http://app.example/'"),
                            (["-l", "loud"], "argument --log-level/-l/--log_level: invalid choice: 'loud'")):
            bad = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)
            assert bad.returncode == 2 and bad.stdout == "", (args, bad.stderr)
            line = bad.stderr.strip()
            assert "\n" not in line and line.startswith(f"{prog}: error: {error}"), line
            assert line.endswith("(see --help)"), line


def test_cli_takes_rembgs_option_spellings():
    """rembg s's -l/--log_level, beside --log-level; --cors's origins, comma-separated."""
    for args in (["-l", "debug"], ["--log_level", "debug"], ["--log-level", "debug"]):
        assert _parser().parse_args(args).log_level == "debug"
    assert _parser().parse_args([]).cors is None
    cors = _parser().parse_args(["--cors", "https://a.example, http://localhost:3000"]).cors
    assert cors == ["https://a.example", "http://localhost:3000"]
    # a page opened from a file sends `Origin: null`: refused by name (any sandboxed frame can claim it), and the
    # message says what works instead (it said "an origin is scheme://host[:port]" as if null were a typo)
    with pytest.raises(argparse.ArgumentTypeError, match=r"file:// pages .* --cors '\*' allows every origin"):
        cors_origins("null")


def test_no_ui_serves_the_api_alone_as_rembgs_flag_does(remover):
    """`rembg s --host 0.0.0.0 --port 7000 --no-ui` (its flag to leave out the UI), copied into a service file, was
    refused here ("unrecognized arguments: --no-ui", exit 2) and the service never came up. It is taken now: the
    API alone, no page."""
    assert _parser("bgremover-predict s").parse_args(["--port", "7000", "--no-ui"]).no_ui is True
    assert _parser().parse_args([]).no_ui is False
    with live_server(Service(remover, workers=1), page=False) as base:
        for path in ("/", "/static/page.js", "/docs"):
            status, headers, body = request(base, "GET", path)
            assert status == 404 and headers["content-type"] == "application/json", path
            assert json.loads(body)["error"] == (f"not found: {path}; the API is POST /remove (or /api/remove), "
                                                 "GET /model, GET /health")
        status, _, body = post_file(base, JPEG)
        assert status == 200 and body == encode_png(remover.remove(EXAMPLE))


def test_cli_takes_rembgs_dash_h_for_the_host(capsys):
    """`rembg s -h 0.0.0.0 -p 7000` (click's -h/--host) printed our help and exited 0 without serving: -h with an
    address is the host now; -h alone (or before another option) is still the help."""
    for args in (["-h", "0.0.0.0", "-p", "7000"], ["-p", "7000", "-h0.0.0.0"], ["--host", "0.0.0.0", "-p", "7000"]):
        parsed = _parser("bgremover-predict s").parse_args(args)
        assert (parsed.host, parsed.port) == ("0.0.0.0", 7000)
    assert _parser().parse_args([]).host == "127.0.0.1"
    for args in (["-h"], ["-h", "-p", "7000"], ["--help"]):
        with pytest.raises(SystemExit) as exit_:
            _parser().parse_args(args)
        assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: bgremover-serve")


def test_an_unexpected_failure_is_a_json_500_a_browser_app_can_read(remover, caplog):
    """A cut-out failing in an unforeseen way (onnxruntime's own error, out of memory) went past the route to
    Starlette's outermost handler, outside the CORS middleware: the 500 carried no Access-Control-Allow-Origin,
    so a page on an allowed origin saw only an opaque network error. Now the route answers it, logged once."""
    service = Service(remover, workers=1, max_bytes=MAX_BYTES)

    def broken(data, opts, gone):
        raise RuntimeError("onnxruntime: bad allocation")

    service.cutout = broken
    sent = {"Origin": "https://app.example", "Content-Type": "application/octet-stream"}
    with caplog.at_level("ERROR", logger="bgremover.serve"), live_server(service, cors=("https://app.example",)) as base:
        status, headers, body = request(base, "POST", "/api/remove", JPEG, sent)
        assert status == 500 and headers["access-control-allow-origin"] == "https://app.example"
        assert json.loads(body) == {"error": "internal error: RuntimeError"}
        assert request(base, "GET", "/health")[0] == 200  # still serving, nothing left admitted
        assert json.loads(request(base, "GET", "/health")[2])["busy"] == 0
    assert "onnxruntime: bad allocation" in caplog.text  # the cause, for whoever runs the server


# ----------------------------------------------------------------------------------------------------------
# Answers a mutation audit found unpinned: each test fails on a plausible slip in serve.py / serve_requests.py


def test_every_switch_word_rembgs_server_takes_and_the_threshold_ends(remover):
    """om/a (mask_only/refine) take the words rembg's server (pydantic's bool) takes, in any case and with spaces
    around; a word dropped from either list turned a valid request into a 422 (or a mask into none) unnoticed.
    The threshold's ends 0 and 1 are valid and kept exactly as sent."""
    from starlette.datastructures import QueryParams

    from bgremover.serve import parse_options

    for words, value in ((("1", "true", "t", "yes", "y", "on", "TRUE", " On "), True),
                         (("0", "false", "f", "no", "n", "off", "OFF", " No "), False)):
        for word in words:
            assert parse_options(QueryParams([("om", word), ("refine", word)]), remover) == {
                "mask_only": value, "refine": value}, word
    for raw, value in (("0", 0.0), ("1", 1.0), ("0.45", 0.45), ("1e-3", 0.001)):
        assert parse_options(QueryParams([("threshold", raw)]), remover) == {"threshold": value}, raw
    for raw in ("-0.001", "1.0001", "inf"):
        with pytest.raises(ApiError) as err:
            parse_options(QueryParams([("threshold", raw)]), remover)
        assert err.value.status == 422 and err.value.message == f"threshold must be a number within 0..1, got {raw!r}"


def test_an_over_limit_declared_body_is_refused_before_it_is_sent(server):
    """curl sends `Expect: 100-continue` before a large upload and waits: a Content-Length over --max-bytes is
    answered 413 at once, so a 1 GB file is never uploaded (without the check the server asked for the body)."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /remove HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert json.loads(body) == {"error": f"request body of 1,000,000,000 bytes is over the limit of {MAX_BYTES:,} "
                                         "(--max-bytes)"}


class FaultyRemover:
    """The real remover whose cut-out fails as a broken model does (BgRemoverError: wrong output shape)."""

    def __init__(self, inner: BackgroundRemover) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def remove(self, img, **opts):
        from bgremover.errors import BgRemoverError

        raise BgRemoverError("model output has shape (1, 3, 8, 8), expected 11 classes")


def test_a_model_fault_is_a_json_500_not_the_clients_error(remover, caplog):
    """A model that fails in a known way is the server's fault: 500 with the reason (a 4xx would tell the client to
    change a request that is fine), logged, and the slot freed."""
    service = Service(FaultyRemover(remover), workers=1, max_bytes=MAX_BYTES)
    with caplog.at_level("ERROR", logger="bgremover.serve"), live_server(service) as base:
        status, headers, body = post_raw(base, JPEG)
        assert status == 500 and headers["content-type"] == "application/json"
        assert json.loads(body) == {"error": "internal error: model output has shape (1, 3, 8, 8), expected 11 classes"}
        assert json.loads(request(base, "GET", "/health")[2]) == {
            "status": "ok", "model": "bgremover-camvid.int8.onnx", "busy": 0, "served": 0}
    assert "cut-out failed: model output has shape" in caplog.text


def test_a_cutouts_answer_headers_and_the_health_counts(server):
    """A cut-out is never cached (a proxy or browser replaying one photo's cut-out for another upload to the same
    URL), says its time in Server-Timing's milliseconds, and /health counts each one served, once."""
    before = json.loads(request(server, "GET", "/health")[2])["served"]
    start = time.perf_counter()
    status, headers, body = post_raw(server, JPEG)
    took_ms = (time.perf_counter() - start) * 1000
    assert status == 200 and headers["cache-control"] == "no-store"
    match = re.fullmatch(r"cutout;dur=(\d+\.\d)", headers["server-timing"])
    assert match and 5 < float(match.group(1)) <= took_ms, (headers["server-timing"], took_ms)
    assert post_raw(server, JPEG, "?threshold=2")[0] == 422  # refused: not served
    health = json.loads(request(server, "GET", "/health")[2])
    assert health["served"] == before + 1 and health["busy"] == 0


def test_the_pages_files_are_answered_with_their_types_and_policy(server):
    """The page, its script and its style: each with its media type (a script served as text/plain is refused by
    the browser under nosniff rules), the CSP that keeps the page from loading anything from elsewhere, and
    no-cache, so an upgraded server's page is not mixed with an old cached script."""
    from bgremover.serve import CSP

    for path, media, name in (("/", "text/html; charset=utf-8", "index.html"),
                              ("/static/page.css", "text/css; charset=utf-8", "page.css"),
                              ("/static/page.js", "text/javascript; charset=utf-8", "page.js")):
        status, headers, body = request(server, "GET", path)
        assert status == 200 and headers["content-type"] == media, path
        assert headers["content-security-policy"] == CSP and headers["cache-control"] == "no-cache", path
        assert body == (REPO / "src" / "bgremover" / "static" / name).read_bytes(), path


def test_cli_limits_reach_the_service():
    """--max-bytes, --max-pixels and --queue are the limits the running server applies and /model reports (the
    startup line alone said them: a value dropped on the way left the default 20 MB / 25 Mpx / 16 in force), and
    --no-ui leaves the page out of the running server, not only out of the parsed options."""
    proc = subprocess.Popen(serve_cmd("--port", "0", "--threads", "1", "--log-level", "warning", "--max-bytes",
                                      "123456", "--max-pixels", "65432", "--queue", "3", "--no-ui"),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        match = re.search(r"http://(127\.0\.0\.1:\d+)/", proc.stderr.readline())
        assert match
        base = f"http://{match.group(1)}"
        wait_healthy(base, proc=proc)
        limits = json.loads(request(base, "GET", "/model")[2])["limits"]
        assert (limits["max_bytes"], limits["max_pixels"], limits["queue"], limits["workers"]) == (123456, 65432, 3, 1)
        status, _, body = post_raw(base, os.urandom(123457))
        assert status == 413 and "over the limit of 123,456 (--max-bytes)" in json.loads(body)["error"]
        status, _, body = post_raw(base, _flat_png(256, 256))
        assert status == 413 and "256x256 = 65,536 pixels exceeds the limit of 65,432" in json.loads(body)["error"]
        status, _, body = request(base, "GET", "/")
        assert status == 404 and json.loads(body)["error"].startswith("not found: /; the API is POST /remove")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_rembgs_matting_bounds_and_a_bare_option_that_is_no_switch(server, remover):
    """af and ab are rembg's 0..255, ae has no top (rembg takes any erode size): af=256 is a 422 as ab=256 is, and
    ae=1000 is taken and ignored. A bare `?classes` or `?threshold` is an empty value (only a switch means true when
    bare): `classes` empty is "no foreground class", not a class named 'true'."""
    from starlette.datastructures import QueryParams

    from bgremover.serve import parse_options

    assert parse_options(QueryParams("af=255&ab=255&ae=1000"), remover) == {}
    for query in ("af=256", "ab=256"):
        with pytest.raises(ApiError) as err:
            parse_options(QueryParams(query), remover)
        assert err.value.status == 422 and "must be an integer within 0..255, got '256'" in err.value.message
    for query, message in (("?classes", "classes: no foreground class given"),
                           ("?threshold", "threshold must be a number within 0..1, got ''")):
        status, _, body = post_raw(server, JPEG, query)
        assert status == 422 and json.loads(body)["error"].startswith(message), (query, body)


def test_a_file_part_without_filename_after_an_option_field_is_the_image(server, remover):
    """`curl -F om=1 -F "file=<photo.jpg"`: the image is the part named file, not the first part of the body."""
    body, headers = multipart(JPEG, filename=None, fields={"om": "1"})
    status, _, got = request(server, "POST", "/api/remove", body, headers)
    assert status == 200 and got == encode_png(remover.remove(EXAMPLE, mask_only=True)), got[:300]


def test_a_malformed_multipart_upload_is_a_400(server):
    """A multipart body its parser cannot read (a client's broken boundary) is an unusable body: 400 with the
    reason, as an empty or non-image body is, not a 422 (an option to change) or a 500."""
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
    for body in (b"no boundary here at all", b"--xyz\r\nNoColonHeader\r\n\r\nabc\r\n--xyz--\r\n",
                 b"--xyz\r\nContent-Type: text/plain\r\n\r\nabc\r\n--xyz--\r\n"):  # the last: a part with no name
        status, headers_, got = request(server, "POST", "/remove", body, headers)
        assert status == 400 and headers_["content-type"] == "application/json", (body, got)
        assert json.loads(got)["error"].startswith("malformed multipart upload: "), got


def test_an_unusable_upload_is_named_as_the_upload_and_a_missing_page_file_is_a_json_404(server, monkeypatch):
    """The remover names in-memory input "<stdin>"; a client never sent a stdin, so its error is about the upload
    alone. A page file missing from an installation (a wheel built without static/) is a JSON 404 naming it."""
    status, _, body = post_raw(server, b"hello, I am a text file\n" * 10)
    assert status == 400 and json.loads(body) == {"error": "not a recognised image file"}
    status, _, body = post_raw(server, _noise_jpeg()[:9000])
    assert status == 400 and not json.loads(body)["error"].startswith("<stdin>"), body
    from bgremover import serve

    monkeypatch.setattr(serve, "STATIC", Path("/nonexistent/static"))
    status, headers, body = request(server, "GET", "/static/page.js")
    assert status == 404 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "page file page.js is missing from the installation"}


def test_a_second_file_field_is_refused_not_ignored(server):
    """`curl -F file=@photo.jpg -F mask=@mask.png` (a client that expects a mask upload, as some removers take):
    the second file would be dropped without a word and the photo cut out as if no mask were sent."""
    body, headers = multipart(JPEG)
    boundary = headers["Content-Type"].split("boundary=")[1]
    extra = (f'--{boundary}\r\nContent-Disposition: form-data; name="mask"; filename="mask.png"\r\n'
             "Content-Type: image/png\r\n\r\n").encode() + _flat_png(8, 8) + b"\r\n"
    status, _, got = request(server, "POST", "/remove", extra + body, headers)
    assert status == 422 and json.loads(got) == {"error": "unexpected file field(s) mask: send one image as 'file'"}


def test_a_remover_refusal_of_an_option_is_a_422(remover):
    """Service.cutout answers the remover's own refusal of an option (UsageError) as the client's to fix (422), as
    it answers an unusable image (400): parse_options catches these first today, the worker must not turn one that
    slips past it into a 400 or a 500."""
    service = Service(remover, workers=1)
    try:
        with pytest.raises(ApiError) as err:
            service.cutout(JPEG, {"threshold": 2.0})
        assert err.value.status == 422 and err.value.message == "threshold must be within 0..1, got 2.0"
        with pytest.raises(ApiError) as err:
            service.cutout(JPEG, {"classes": ["Dog"]})
        assert err.value.status == 422 and err.value.message.startswith("unknown class name(s) Dog; valid names:")
    finally:
        service.pool.shutdown()


class MetaFaultRemover(FaultyRemover):
    """The real remover whose metadata cannot be read: /model fails outside any route's own error handling."""

    @property
    def meta(self):
        raise RuntimeError("cannot read /home/someone/private/model.onnx")


def test_an_error_outside_a_cutout_is_a_json_500_that_names_only_its_kind(remover, caplog):
    """The last-resort handler answers JSON, as every other error here, and says the error's kind alone: the
    message (a path on the server, here) is for the log, not for any client that asks."""
    service = Service(MetaFaultRemover(remover), workers=1)
    with caplog.at_level("ERROR", logger="bgremover.serve"), live_server(service) as base:
        status, headers, body = request(base, "GET", "/model")
        assert status == 500 and headers["content-type"] == "application/json"
        assert json.loads(body) == {"error": "internal error: RuntimeError"}
        assert request(base, "GET", "/health")[0] == 200
    assert "unhandled error on /model" in caplog.text


def test_a_multipart_content_type_in_capitals_is_still_the_upload_form(server, remover):
    """Media types are case-insensitive (RFC 9110): `Multipart/Form-Data` is the upload form, not a raw body (a
    400 "not a recognised image file" for the whole form)."""
    body, headers = multipart(JPEG)
    headers = {"Content-Type": headers["Content-Type"].replace("multipart/form-data", "Multipart/Form-Data")}
    status, _, got = request(server, "POST", "/remove", body, headers)
    assert status == 200 and got == encode_png(remover.remove(EXAMPLE)), got[:300]
