"""Cut-outs over HTTP, like rembg's `rembg s`: a Starlette app on uvicorn over one shared BackgroundRemover.
Here: the routes and the page, and the command line that starts the server; what a request is (its options, body
and limits, the Service all share) is serve_requests.py.

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
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from bgremover.errors import OneLineParser, count, one_line, one_line_warnings, report
from bgremover.files import Terminated, sigterm_raises
from bgremover.remover import (
    MODEL_ENV,
    BackgroundRemover,
    BgRemoverError,
    threads_problem,
)
from bgremover.serve_requests import (  # (the request side; tests import ApiError, Service from here as before)
    IGNORED_HEADER,
    MATTING,
    MAX_BYTES,
    MAX_PIXELS,
    QUEUE,
    URL_UNSUPPORTED,
    ApiError,
    ClientGone,
    Service,
    content_disposition,
    drain,
    json_error,
    parse_options,
    query_items,
    watch_disconnect,
)

log = logging.getLogger("bgremover.serve")

DEFAULT_HOST = "127.0.0.1"  # loopback: exposing the service is an explicit choice (--host 0.0.0.0)
DEFAULT_PORT = 8000
STATIC = Path(__file__).with_name("static")
PAGES = {  # the only files served from static/ (no directory listing, no path traversal to worry about)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/page.css": ("page.css", "text/css; charset=utf-8"),
    "/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
}
# The page may load nothing from elsewhere: this makes "no external resources" a browser-enforced fact.
CSP = "default-src 'self'; img-src 'self' blob: data:; connect-src 'self' blob:; object-src 'none'; base-uri 'none'"
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
            if body["test_frames_of"] is None:  # a record too old to tell (BackgroundRemover.test_frames): left out, as
                del body["test_frames_of"]  # a null there read as "not tested"
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
    if service.cancelled:  # a cut-out cut short still runs on its worker, which Python's exit would join: the
        # terminal hung for its remaining seconds after "stops at once", and a third Ctrl-C there printed a traceback
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
