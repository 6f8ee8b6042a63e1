"""Cut-outs over HTTP, like rembg's `rembg s`: a Starlette app on uvicorn over one shared BackgroundRemover.
(Past 400 lines on purpose: the routes, the request checks they share and the command line read as one unit.)

    bgremover-serve [--model M] [--host 127.0.0.1] [--port 8000] [--threads N] [--max-bytes B]
                    [--max-pixels P] [--queue Q] [--cors ORIGINS] [--no-ui]   (also: bgremover-predict s ...,
                    as `rembg s`)

    POST /remove   image as multipart field `file` or as the raw body; options `classes=Car,Road`,
                   `threshold=0.5`, `refine=1`, `mask_only=1`, `bg_color=R,G,B[,A]` in the query or as form
                   fields -> image/png (rembg's path /api/remove and names om, a, bgc work too; its
                   alpha-matting af, ab, ae are checked and ignored, as bgremover-predict does)
    GET  /model    the model's metadata (classes, default foreground, net, test mIoU, ...) and the limits
    GET  /health   {"status": "ok", ...}
    GET  /         a page to drop a photo on and download its cut-out (static/, no build step; --no-ui: none)
    GET  /docs     (and /api, where rembg's server has its API docs) redirect to the page's usage section, /#api

Errors are JSON `{"error": "..."}`: 400 unusable body (empty, not an image, truncated), 408 a body that stalls
for BODY_IDLE_S, 413 over --max-bytes or --max-pixels, 422 bad or unknown option (unknown class, threshold
outside 0..1, rembg's `model=...`, ...), 503 more than --queue requests at once (answered at once, never queued
further), 404/405 wrong route or method.

Decoding, inference and PNG encoding run in a thread pool of --threads workers (default: one per core), so
the event loop only moves bytes and keeps answering /health under load. onnxruntime's Run is thread-safe on
one session, so the workers share one model; each run gets cores/workers intra-op threads so the workers
never oversubscribe the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import QueryParams, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from bgremover.errors import OneLineParser, count, one_line, one_line_warnings, report
from bgremover.files import Terminated, sigterm_raises
from bgremover.images import encode_png, output_suffix, parse_color
from bgremover.remover import (
    MODEL_ENV,
    BackgroundRemover,
    BgRemoverError,
    ImageError,
    PixelLimitError,
    UsageError,
    threads_problem,
)

DEFAULT_HOST = "127.0.0.1"  # loopback: exposing the service is an explicit choice (--host 0.0.0.0)
DEFAULT_PORT = 8000
MAX_BYTES = 20 * 1024 * 1024  # image size limit: a 20 MiB upload covers any camera JPEG
# A multipart upload's body is its image plus part headers, boundaries and option fields: the body may exceed
# --max-bytes by this much, and the image itself is held to the limit (the page checks the file's size against it;
# counted on the body alone, a file a few hundred bytes under the limit got the server's 413)
MULTIPART_ALLOWANCE = 64 * 1024
# Decoded-pixel limit against decompression bombs (a few KiB of PNG can claim gigapixels). 25 Mpx admits a
# 6000x4000 photo; at that size one request peaks around 0.75 GB, 2.1 GB with `a` (refine: full-size float
# planes), measured; two workers on such photos with refine peaked at 3.9 GB RSS.
MAX_PIXELS = 25_000_000
QUEUE = 16  # /remove requests at once (reading, waiting or running); the next one gets 503 immediately
# A refused upload (413, 503) is read and dropped up to this many bytes before the answer: a client that sends its
# whole body first and asked for `Connection: close` (urllib) otherwise gets a connection reset, not the error.
DRAIN_BYTES = 64 * 1024 * 1024
STATIC = Path(__file__).with_name("static")
PAGES = {  # the only files served from static/ (no directory listing, no path traversal to worry about)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/page.css": ("page.css", "text/css; charset=utf-8"),
    "/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
}
# The page may load nothing from elsewhere: this makes "no external resources" a browser-enforced fact.
CSP = "default-src 'self'; img-src 'self' blob: data:; connect-src 'self' blob:; object-src 'none'; base-uri 'none'"
OPTIONS = ("classes", "threshold", "refine", "mask_only", "bg_color")
BODY_IDLE_S = 30.0  # a request body that sends nothing for this long is refused (408): it would hold a --queue slot
# ...and one that has not all come in this long (408): a byte every 29 s never went idle and held its slot for
# good. 20 MiB (--max-bytes) in 5 min is ~0.6 Mbit/s, a slow mobile uplink.
BODY_TOTAL_S = 300.0
REMBG_NAMES = {"om": "mask_only", "a": "refine", "bgc": "bg_color"}  # rembg's server's names for the same options
# rembg's alpha-matting settings, which its clients send along with `a`: checked as rembg checks them (integer,
# at most this; None = no maximum) so a typo is still a 422, then ignored as bgremover-predict's -af/-ab/-ae are
# (`a` here is a guided filter, which has no such settings); the answer names them in IGNORED_HEADER.
MATTING = {"af": 255, "ab": 255, "ae": None}
IGNORED_HEADER = "X-Ignored-Parameters"
# what rembg's server (FastAPI, pydantic's bool) takes, t/f and y/n included
TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
FALSE = frozenset({"0", "false", "f", "no", "n", "off"})

log = logging.getLogger("bgremover.serve")


class ApiError(Exception):
    """A request the client must change: answered as {"error": message} with this HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


URL_UNSUPPORTED = "url= is not supported: this server fetches nothing; POST the image (multipart field 'file' or the raw body)"


FLAGS = frozenset({"refine", "mask_only", *(k for k, v in REMBG_NAMES.items() if v in ("refine", "mask_only"))})


def query_items(request) -> list[tuple[str, str]]:
    """The query's options, a bare switch (`?mask_only`, `?om`) as true, as a flag would be. `?om=` with nothing
    after the `=` stays empty, and so a 422 as in rembg's server (FastAPI): taken as true, a client filling in a
    template (`?om=${maskOnly ? 1 : ''}`) got a mask where it asked for none. (Starlette reads both as "".)"""
    from urllib.parse import unquote_plus

    raw = request.scope.get("query_string", b"").decode("latin-1")
    bare = {unquote_plus(part) for part in raw.split("&") if part and "=" not in part}
    return [(k, "true" if v == "" and k in bare and k in FLAGS else v) for k, v in request.query_params.multi_items()]


def parse_options(query: Any, remover: BackgroundRemover) -> dict[str, Any]:
    """Query parameters -> BackgroundRemover.remove keyword arguments; ApiError(422) on any bad value."""
    query = QueryParams([(REMBG_NAMES.get(k, k), v) for k, v in query.multi_items()])
    unknown = sorted(set(query.keys()) - set(OPTIONS) - set(MATTING))
    if "url" in unknown:  # rembg's fetch-by-URL: said as such, not as "unknown parameter" or "empty body"
        raise ApiError(422, URL_UNSUPPORTED)
    if unknown:
        raise ApiError(422, f"unknown {'parameter' if len(unknown) == 1 else 'parameters'} {', '.join(unknown)}; valid: "
                            f"{', '.join(OPTIONS)} (rembg's {', '.join(REMBG_NAMES)} for some; its {', '.join(MATTING)} "
                            "accepted and ignored)")
    for key in (*OPTIONS, *MATTING):
        if key != "classes" and len(query.getlist(key)) > 1:
            raise ApiError(422, f"{key} given more than once")
    for key, top in MATTING.items():
        if key in query:
            try:
                value = int(query[key])
            except ValueError:
                value = -1
            if value < 0 or (top is not None and value > top):
                raise ApiError(422, f"{key} (rembg's alpha matting, ignored here) must be an integer "
                               f"{f'within 0..{top}' if top is not None else '>= 0'}, got {query[key]!r}")
    opts: dict[str, Any] = {}
    if "classes" in query:  # classes=Car,Road and classes=Car&classes=Road mean the same
        names = [n for value in query.getlist("classes") for n in value.split(",")]
        try:
            remover.resolve_classes(names)  # UsageError names the valid classes
        except UsageError as err:
            raise ApiError(422, f"classes: {err}") from err
        opts["classes"] = names
    if "threshold" in query:
        raw = query["threshold"]
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not 0.0 <= value <= 1.0:  # also rejects nan and inf
            raise ApiError(422, f"threshold must be a number within 0..1, got {raw!r}")
        opts["threshold"] = value
    for key in ("refine", "mask_only"):
        if key in query:
            raw = query[key].strip().lower()
            if raw not in TRUE | FALSE:
                raise ApiError(422, f"{key} must be one of 1/0, true/false (t/f), yes/no (y/n), on/off; "
                                    f"got {query[key]!r}")
            opts[key] = raw in TRUE
    if "bg_color" in query:
        try:
            opts["bg_color"] = parse_color(query["bg_color"])
        except UsageError as err:
            raise ApiError(422, f"bg_color: {err}") from err
        if opts.get("mask_only"):
            raise ApiError(422, "choose either mask_only or bg_color, not both")
    return opts


def content_disposition(filename: str | None, opts: dict[str, Any]) -> str:
    """The answer's file name, as an ASCII `filename=` for old clients and RFC 5987's `filename*=UTF-8''...` that
    browsers prefer, so `uni ñame é.png` is saved as `uni ñame é.nobg.png`, not `uni_ame.nobg.png`. The folders a
    client may send (C:\\photos\\a.jpg), control characters and leading dots (a hidden file) are dropped."""
    base = re.sub(r"[\x00-\x1f\x7f-\x9f]+", "", re.split(r"[/\\]", filename or "")[-1])
    stem = Path(base).stem.strip(" .")[:100] or "image"
    suffix = output_suffix(bool(opts.get("mask_only")))  # as bgremover-predict names its files
    fallback = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:100] or "image"
    return f"inline; filename=\"{fallback}{suffix}\"; filename*=UTF-8''{quote(stem + suffix, safe='')}"


def part_bytes(body: bytes, content_type: str, name: str = "file") -> bytes:
    """The bytes of the multipart part `name` as sent, for a part without `filename=` (`curl -F "file=<photo.jpg"`,
    aiohttp's FormData of bytes), which Starlette hands over as text. Read from the body itself: the text cannot be
    turned back into the bytes (Starlette decodes a part as UTF-8 where that succeeds, else as latin-1, and a BMP
    whose pixels happen to be valid UTF-8 came back changed)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary", b"")
    parts: list[tuple[bytes, bytearray]] = []
    header: dict[str, bytearray] = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header.setdefault("field", bytearray()).extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header.setdefault("value", bytearray()).extend(data[start:end])

    def on_header_end() -> None:
        if bytes(header.get("field", b"")).lower() == b"content-disposition":
            parts.append((parse_options_header(bytes(header.get("value", b"")))[1].get(b"name", b""), bytearray()))
        header.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1][1].extend(data[start:end])

    parser = MultipartParser(boundary, {"on_header_field": on_header_field, "on_header_value": on_header_value,
                                        "on_header_end": on_header_end, "on_part_data": on_part_data})
    parser.write(body)
    parser.finalize()
    return next((bytes(data) for key, data in parts if key == name.encode()), b"")


class Service:
    """The state shared by all requests: the model, the worker pool and the count of admitted requests."""

    def __init__(
        self,
        remover: BackgroundRemover,
        workers: int,
        max_bytes: int = MAX_BYTES,
        queue: int = QUEUE,
        model_file: str | None = None,
    ) -> None:
        self.remover = remover
        self.workers = workers
        self.max_bytes = max_bytes
        self.max_pixels = remover.max_pixels  # the one limit: the remover's (bgremover-predict's) check applies it
        self.queue = queue
        self.model_file = model_file if model_file is not None else Path(remover.model_path).name
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bgremover")
        self.admitted = 0  # only touched on the event loop thread, so no lock is needed
        self.served = 0
        self.cancelled = 0  # cut-outs a stop cut short (a second Ctrl-C, or the grace period's end)
        self.matting_logged = False  # rembg's clients send af/ab/ae with every request: logged once, not each time

    def cutout(self, data: bytes, opts: dict[str, Any], gone: threading.Event | None = None) -> tuple[bytes, float]:
        """Decode, cut out and encode one image (runs on a worker thread): (PNG bytes, seconds). ClientGone when
        `gone` was set (its client left) while the request waited for a worker."""
        if gone is not None and gone.is_set():
            raise ClientGone
        start = time.perf_counter()
        try:  # the remover checks --max-pixels on the header, before decoding (decompression bombs)
            png = encode_png(self.remover.remove(io.BytesIO(data), **opts))
        except PixelLimitError as err:
            raise ApiError(413, str(err).removeprefix("<stdin>: ")) from err
        except ImageError as err:
            # The predictor names in-memory input "<stdin>"; here it is simply the upload.
            raise ApiError(400, str(err).removeprefix("<stdin>: ")) from err
        except UsageError as err:
            raise ApiError(422, str(err)) from err
        return png, time.perf_counter() - start

    async def read_image(self, request) -> tuple[bytes, str | None, list[tuple[str, str]]]:
        """The uploaded bytes (multipart field `file`, or the raw body) within max_bytes, the file name, and the
        multipart upload's other fields (rembg's clients send their options as form fields)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        limit = self.max_bytes + (MULTIPART_ALLOWANCE if ctype == "multipart/form-data" else 0)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await drain(request)
            raise ApiError(413, f"request body of {int(declared):,} bytes is over the limit of {self.max_bytes:,} "
                                f"(--max-bytes{', plus the upload form' if limit > self.max_bytes else ''})")
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + BODY_TOTAL_S
        while more:  # counted as it arrives: chunked uploads have no Content-Length
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(request.receive(), max(min(BODY_IDLE_S, left), 0))
            except TimeoutError:
                if left <= BODY_IDLE_S:
                    raise ApiError(408, f"request body too slow: not all received in {BODY_TOTAL_S:g} s "
                                        f"({size:,} bytes came)") from None
                raise ApiError(408, f"request body stalled: nothing received for {BODY_IDLE_S:g} s") from None
            if message["type"] != "http.request":
                raise ClientDisconnect()
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            if size > limit:
                if more:  # the body was asked for (a 100 Continue went out): the client is sending all of it
                    await drain(request, asked=True)
                raise ApiError(413, f"request body is over the limit of {self.max_bytes:,} bytes "
                                    f"(--max-bytes{', plus the upload form' if limit > self.max_bytes else ''})")
            chunks.append(chunk)
        body = b"".join(chunks)
        if ctype != "multipart/form-data":  # any other type (curl --data-binary says urlencoded) is the image
            if not body:
                if "url" in request.query_params:
                    raise ApiError(422, URL_UNSUPPORTED)
                raise ApiError(400, "empty request body: send an image as multipart field 'file' or as the raw body")
            return body, None, []
        return await self._multipart_file(request, body)

    async def _multipart_file(self, request, body: bytes) -> tuple[bytes, str | None, list[tuple[str, str]]]:
        sent = False

        async def replay() -> dict[str, Any]:  # hands the body we already read (and bounded) to the parser
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:  # a part without filename= is text to Starlette, held whole: up to the body's limit, not its 1 MiB
            form = await Request(request.scope, replay).form(max_files=4, max_fields=16,
                                                             max_part_size=self.max_bytes)
        except HTTPException as err:
            raise ApiError(400, f"malformed multipart upload: {err.detail}") from err
        except Exception as err:
            raise ApiError(400, f"malformed multipart upload: {err}") from err
        try:
            if len(form.getlist("file")) > 1:  # form.get took the last one without a word
                raise ApiError(422, "file given more than once: send one image per request")
            upload = form.get("file")
            if isinstance(upload, str):  # sent without filename=, as rembg's `file: bytes = File()` takes it too
                data, filename = part_bytes(body, request.headers.get("content-type", "")), None
            elif isinstance(upload, UploadFile):
                data, filename = await upload.read(), upload.filename
            else:
                fields = ", ".join(form.keys()) or "none"
                raise ApiError(400, f"multipart upload has no file field 'file' (fields: {fields})")
            if not data:
                raise ApiError(400, "the uploaded file is empty")
            if len(data) > self.max_bytes:
                raise ApiError(413, f"image of {len(data):,} bytes is over the limit of {self.max_bytes:,} bytes "
                                    "(--max-bytes)")
            # an empty form field is no option, as in rembg's server (FastAPI gives such a field its default): a
            # client that sends every field, `om=` among them, got a mask here (`?om` alone in a query stays true)
            fields = [(k, v) for k, v in form.multi_items() if k != "file" and isinstance(v, str) and v != ""]
            extra_files = sorted({k for k, v in form.multi_items() if k != "file" and not isinstance(v, str)})
            if extra_files:
                raise ApiError(422, f"unexpected file field(s) {', '.join(extra_files)}: send one image as 'file'")
            return data, filename, fields
        finally:
            await form.close()


class ClientGone(Exception):
    """The client of a request still waiting for a worker has disconnected: nobody would read its cut-out."""


async def watch_disconnect(request, gone: threading.Event) -> None:
    """Set `gone` when the client disconnects. Run once the body is read: uvicorn's receive() then waits until the
    connection closes (or the answer is sent, when this task is cancelled)."""
    if (await request.receive())["type"] == "http.disconnect":
        gone.set()


async def drain(request, asked: bool = False, limit: int = DRAIN_BYTES) -> None:
    """Read and drop what is left of a refused request's body, at most `limit` bytes, so that the error is what
    the client reads. A client that sent `Expect: 100-continue` (curl, for large bodies) and was not yet asked for
    the body (`asked`: the server's first read sends the 100) waits for the answer instead: nothing to read."""
    if not asked and request.headers.get("expect", "").lower() == "100-continue":
        return
    size = 0
    while size <= limit:
        message = await request.receive()
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(service: Service, cors: Sequence[str] = (), page: bool = True) -> Starlette:
    """The ASGI app. Tests build it around their own (e.g. slowed) remover and run it on a real uvicorn. `cors`:
    the origins whose pages may call it from a browser (--cors; "*" = any); `page`: serve the page at / (off:
    --no-ui, the API alone)."""
    remover = service.remover

    async def remove(request):
        if service.admitted >= service.queue:
            await drain(request)
            return json_error(
                503,
                f"server busy: {service.admitted} requests already queued or running (limit {service.queue}, "
                "--queue); retry shortly",
                {"Retry-After": "1"},
            )
        service.admitted += 1
        try:
            # The body first, even when an option is bad: a client still uploading would otherwise see the
            # connection close under it instead of reading our error.
            data, filename, fields = await service.read_image(request)
            # Options come as query parameters or, as rembg's clients send them, as form fields: one list, so
            # an option given both ways is "given more than once" and an unknown field is refused like a query's.
            query = QueryParams([*query_items(request), *fields])
            opts = parse_options(query, remover)
            ignored = [key for key in MATTING if key in query]
            if ignored and not service.matting_logged:
                service.matting_logged = True
                log.warning("%s (rembg's alpha-matting settings) ignored: `a` here refines the mask with a guided "
                            "filter (said once; each answer names them in %s)", "/".join(ignored), IGNORED_HEADER)
            # A client that leaves while its request waits for a worker (the page aborts its request at every
            # option change) is skipped: its cut-out held up the ones still waited for (a 24 Mpx photo: seconds each).
            gone = threading.Event()
            watcher = asyncio.create_task(watch_disconnect(request, gone))
            try:
                png, seconds = await asyncio.get_running_loop().run_in_executor(
                    service.pool, service.cutout, data, opts, gone)
            finally:
                watcher.cancel()
        except ApiError as err:
            return json_error(err.status, err.message)
        except ClientDisconnect:  # the client hung up mid-upload: nobody to answer, nothing to log as an error
            log.info("client disconnected during the upload")
            return Response(status_code=400)
        except ClientGone:
            log.info("client left before its cut-out started: skipped")
            return Response(status_code=400)
        except BgRemoverError as err:  # a model fault (e.g. wrong output shape): the server's problem
            log.error("cut-out failed: %s", err)
            return json_error(500, f"internal error: {err}")
        except Exception as err:  # unforeseen (onnxruntime's own errors, memory): answered here, inside the CORS
            # middleware, so a page on an allowed origin can read it (Starlette's last-resort handler sits outside)
            log.error("cut-out failed: %s", one_line(err), exc_info=err)
            return json_error(500, f"internal error: {type(err).__name__}")
        except asyncio.CancelledError:  # a stop that cannot wait (a second Ctrl-C, the grace period's end; nothing
            # else cancels a request here): a JSON 503 to retry on, not uvicorn's plain 500 and a logged traceback
            service.cancelled += 1
            return json_error(503, "the server was stopped before this cut-out finished; retry", {"Retry-After": "1"})
        finally:
            service.admitted -= 1
        service.served += 1
        return Response(
            png,
            media_type="image/png",
            headers={
                "Content-Disposition": content_disposition(filename, opts),
                "Server-Timing": f"cutout;dur={seconds * 1000:.1f}",
                "Cache-Control": "no-store",
                **({IGNORED_HEADER: ", ".join(ignored)} if ignored else {}),
            },
        )

    async def model(request):
        body = dict(remover.meta)
        body["model_file"] = service.model_file
        if "quantization" in body:  # an int8 copy carries the float model's test_mIoU: say the served file's own
            body["test_mIoU_float"], body["test_mIoU"] = body.get("test_mIoU"), remover.test_miou
            # and the frames behind it: an int8 scored on `quantize --eval-limit 12` said "on 233 frames" (the float's)
            body["test_frames_float"], body["test_frames_of_float"] = body.get("test_frames"), body.get("test_frames_of")
            body["test_frames"], body["test_frames_of"] = remover.test_frames
        body["limits"] = {
            "max_bytes": service.max_bytes,
            "max_pixels": service.max_pixels,
            "max_side": remover.max_side,
            "queue": service.queue,
            "workers": service.workers,
        }
        return JSONResponse(body)

    async def health(request):
        return JSONResponse(
            {"status": "ok", "model": service.model_file, "busy": service.admitted, "served": service.served}
        )

    async def page_file(request):
        name, media = PAGES[request.url.path]
        try:
            content = (STATIC / name).read_bytes()  # a few KiB from the page cache; re-read so edits show
        except OSError:
            return json_error(404, f"page file {name} is missing from the installation")
        return Response(
            content, media_type=media, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"}
        )

    async def docs(request):  # a rembg user looks for the API's docs at /api (FastAPI's /docs before): a JSON 404
        return RedirectResponse("/#api", status_code=307)

    async def http_error(request, exc: HTTPException):
        routes = "POST /remove (or /api/remove), GET /model, GET /health" + ("; its usage is on the page at /" if page
                                                                             else "")
        messages = {404: f"not found: {request.url.path}; the API is {routes}", 405: f"method {request.method} not "
                    "allowed here" + (f" ({URL_UNSUPPORTED})" if "url" in request.query_params else "")}
        return json_error(exc.status_code, messages.get(exc.status_code, str(exc.detail)), exc.headers)

    async def server_error(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return json_error(500, f"internal error: {type(exc).__name__}")

    routes = [
        Route("/remove", remove, methods=["POST"]),
        Route("/api/remove", remove, methods=["POST"]),  # rembg's path
        Route("/model", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    if page:
        routes += [Route(path, page_file, methods=["GET"]) for path in PAGES]
        routes += [Route(path, docs, methods=["GET"]) for path in ("/docs", "/api")]
    # Off unless --cors names origins: the page is same-origin and the service binds loopback by default. Exposed
    # headers: a page on another origin reads only those (the download name, the ignored rembg parameters).
    exposed = ["Content-Disposition", IGNORED_HEADER]
    middleware = [Middleware(CORSMiddleware, allow_origins=list(cors), allow_methods=["GET", "POST"],
                             allow_headers=["*"], expose_headers=exposed)] if cors else []
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


# ----------------------------------------------------------------------------------------------------------
# CLI


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def cors_origins(value: str) -> list[str]:
    """--cors's value: origins as a browser sends them (scheme://host[:port], no path) or *."""
    origins = [o.strip() for o in value.split(",") if o.strip()]
    bad = next((o for o in origins if o != "*" and not re.fullmatch(r"[A-Za-z][\w+.-]*://[^/\s]+", o)), None)
    if bad == "null":  # what a file:// page or a sandboxed frame sends: any page can claim it, so not by name
        raise argparse.ArgumentTypeError("'null' (the origin of file:// pages and sandboxed frames) cannot be "
                                         "allowed by name, any page can claim it; --cors '*' allows every origin")
    if bad is not None or not origins:  # "http://host/" never matches: a browser's Origin has no slash
        raise argparse.ArgumentTypeError(f"an origin is scheme://host[:port], no path, or *; got {bad or value!r}")
    return origins


class HelpOrHost(argparse.Action):
    """-h alone is the help, as in any argparse command; -h ADDRESS is the host, as in `rembg s -h 0.0.0.0` (click's
    -h/--host), which printed the help and exited 0 without serving (a container just stopped)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            parser.print_help()
            parser.exit()
        setattr(namespace, self.dest, values)


def _parser(prog: str = "bgremover-serve") -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=prog,
        description="Serve background removal over HTTP (POST /remove, GET /model, GET /health, page at /).",
        add_help=False,
    )
    p.add_argument("-h", nargs="?", dest="host", default=argparse.SUPPRESS, action=HelpOrHost, metavar="HOST",
                   help="alone: show this help and exit; with an address: --host, as in rembg s")
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("--model", "-m", help=f"ONNX model (default ${MODEL_ENV} or the shipped one)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind ({DEFAULT_HOST}; 0.0.0.0 = all)")
    p.add_argument("--port", "-p", type=int, default=DEFAULT_PORT, help=f"TCP port ({DEFAULT_PORT}; 0 = any free)")
    p.add_argument("--threads", "-t", type=int, help=f"inference worker threads (default: one per core, {cpu_count()})")
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES, help=f"image size limit in bytes ({MAX_BYTES:,})")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help=f"decoded image limit ({MAX_PIXELS:,})")
    p.add_argument("--queue", type=int, default=QUEUE, help=f"requests at once before 503 ({QUEUE})")
    p.add_argument("--no-ui", action="store_true", help="the API alone, no page at / (as rembg s --no-ui)")
    p.add_argument("--cors", type=cors_origins, metavar="ORIGINS",
                   help="let pages from these origins call the API from a browser (comma-separated, * = any; "
                        "default none: the page at / needs none; rembg's server allows any)")
    levels = ["critical", "error", "warning", "info", "debug", "trace"]
    p.add_argument("--log-level", "-l", "--log_level", default="info", choices=levels, metavar="LEVEL",
                   help=f"uvicorn's: {', '.join(levels)} (info); -l/--log_level as in rembg s")
    return p


# On SIGTERM (docker stop, systemd) or Ctrl-C the server stops accepting and gives the requests in flight this long
# to finish: at 5 s a large photo (48 MP: ~8 s on 2 cores) was cut off with a 500. Idle, it stops at once; a
# second Ctrl-C stops it at once too (uvicorn).
GRACEFUL_S = 30


def server_config(app, log_level: str = "info", **kwargs) -> uvicorn.Config:
    # lifespan off: the app has no startup or shutdown work, and on a forced stop uvicorn logged the lifespan
    # task's cancellation as an error traceback
    kwargs.setdefault("lifespan", "off")
    return uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_S, **kwargs)


def main(argv: Sequence[str] | None = None, prog: str = "bgremover-serve") -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    with one_line_warnings(parser.prog):
        return _serve(args, parser.prog)


def _log_to_stderr(prog: str, level: str) -> None:
    """The service's own lines (an upload cut short, rembg's ignored settings, a failed cut-out) on stderr as
    `bgremover-serve: ...` at --log-level, as uvicorn's are: without a handler, Python printed the warnings bare and
    dropped the info lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if level == "trace" else level.upper())
    log.propagate = False


def _serve(args: argparse.Namespace, prog: str) -> int:
    def usage(msg: str) -> int:
        return report(msg, prog, code=2)

    if not 0 <= args.port <= 65535:
        return usage(f"--port must be within 0..65535, got {args.port}")
    if problem := threads_problem(args.threads):
        return usage(f"--{problem}")
    for name in ("max_bytes", "max_pixels", "queue"):  # --queue 0 would refuse every request with 503
        value = getattr(args, name)
        if value is not None and value < 1:
            return usage(f"--{name.replace('_', '-')} must be positive, got {value}")
    cores = cpu_count()
    workers = args.threads or cores
    try:
        remover = BackgroundRemover(args.model, threads=max(1, cores // workers), max_pixels=args.max_pixels)
    except BgRemoverError as err:
        return report(err, prog)
    # Bind here, not in uvicorn: a taken port is then one clear line too, and --port 0 can report its choice.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as err:
        sock.close()
        return report(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}", prog)
    host, port = sock.getsockname()[:2]
    service = Service(remover, workers, args.max_bytes, args.queue)
    _log_to_stderr(prog, args.log_level)
    meta = remover.meta
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(
        f"{prog}: {service.model_file} ({meta.get('net', '?')}, {len(remover.classes)} classes) on "
        f"http://{shown}:{port}/ — {count(workers, 'worker thread')}, queue {args.queue}, "
        f"max {args.max_bytes:,} bytes / {args.max_pixels:,} pixels"
        + (f", CORS for {','.join(args.cors)}" if args.cors else ""),
        file=sys.stderr,
        flush=True,
    )
    config = server_config(create_app(service, args.cors or (), page=not args.no_ui), args.log_level)
    # uvicorn handles SIGTERM while it serves, then raises it again once stopped. With SIGTERM's default action that
    # ended the process there, before the cut-outs the grace period's end had cancelled were answered (their clients
    # saw the connection drop) or counted; raised as Terminated, it unwinds as Ctrl-C's KeyboardInterrupt does.
    stopped_by = None
    try:
        with sigterm_raises():
            uvicorn.Server(config).run(sockets=[sock])
    except (KeyboardInterrupt, Terminated) as stop:  # Ctrl-C is how a person stops the server: exit 0, no traceback
        stopped_by = stop
        if service.cancelled:  # a second Ctrl-C, or the grace period's end, cut them short
            print(f"{prog}: stopped with {count(service.cancelled, 'cut-out')} in progress, answered 503 (a second "
                  f"Ctrl-C, or past the {GRACEFUL_S:g} s grace period)", file=sys.stderr)
    finally:
        service.pool.shutdown(wait=False, cancel_futures=True)
        sock.close()
    if isinstance(stopped_by, Terminated):  # still ended by SIGTERM: a clean stop to systemd, 143 in a shell
        signal.raise_signal(signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
