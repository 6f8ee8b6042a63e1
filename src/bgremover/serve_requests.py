"""What one request to bgremover-serve is: its options, its body within the limits, and the Service all requests share.

The routes (serve.py) read a request through here: the image from a multipart field `file` or the raw body, counted
against --max-bytes as it arrives (408 for a body that stalls), the options from the query or form fields (rembg's
names too), each refusal an ApiError with its HTTP status. The cut-out itself runs on the Service's worker pool.
"""

from __future__ import annotations

import asyncio
import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.datastructures import QueryParams, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from bgremover.images import encode_png, output_suffix, parse_color
from bgremover.remover import BackgroundRemover, ImageError, PixelLimitError, UsageError

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
    # an empty colour is none, as rembg's server takes `?bgc=` (a text it reads `if bgc`) and as an empty form field
    # is here: it was a 422 (`?om=` stays one, as there: pydantic's bool refuses "")
    query = QueryParams([(REMBG_NAMES.get(k, k), v) for k, v in query.multi_items()
                         if not (REMBG_NAMES.get(k, k) == "bg_color" and v == "")])
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
