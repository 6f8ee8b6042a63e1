"""Bounded load test of bgremover-serve on loopback: throughput, p50/p95 latency and errors.

    python benchmarks/serve_load.py [--clients 8] [--requests 25] [--threads 1,2] [--image examples/x.jpg]
                                    [--query "classes=Car"] [--model M] [--queue 16]

For each --threads value it starts `bgremover-serve --port 0 --threads T` itself on 127.0.0.1, waits for
/health, warms up, then runs --clients concurrent clients, each sending --requests POST /remove (raw body,
keep-alive) one after another; it stops the server and prints one row per setting, side by side. Nothing
leaves the machine and the run ends by itself (--requests per client, a timeout per request).
Latency is per request as the client sees it (upload + queue wait + decode + inference + PNG encode +
download). An error is any non-200 answer or a failed connection.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

from bgremover.errors import OneLineParser
from bgremover.utils import cpu_kind

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "0001TP_008910.jpg"  # a real CamVid test frame, 480x360 JPEG



def start_server(args, threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "bgremover.serve", "--port", "0", "--threads", str(threads),
           "--queue", str(args.queue), "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    line = proc.stderr.readline()  # "bgremover-serve: <model> ... on http://127.0.0.1:PORT/ ..."
    found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not found:
        proc.kill()
        raise SystemExit(f"error: the server did not start: {line.strip() or proc.stderr.read().strip()}")
    # keep draining stderr so a chatty server can never block on a full pipe
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    port = int(found.group(1))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                conn.close()
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("error: the server did not answer /health within 60 s")


def client(port: int, body: bytes, path: str, n: int, timeout: float, out: list) -> None:
    """n sequential requests on one keep-alive connection (reconnecting after a failure)."""
    conn = None
    for _ in range(n):
        start = time.perf_counter()
        try:
            if conn is None:
                conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
            conn.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
            resp = conn.getresponse()
            data = resp.read()
            ok = resp.status == 200 and data[:8] == b"\x89PNG\r\n\x1a\n"
            status = resp.status
        except OSError as err:
            ok, status = False, type(err).__name__
            if conn is not None:
                conn.close()
            conn = None
        out.append((time.perf_counter() - start, ok, status))
    if conn is not None:
        conn.close()


def run_load(args, threads: int, body: bytes) -> dict:
    proc, port = start_server(args, threads)
    path = "/remove" + (f"?{args.query}" if args.query else "")
    try:
        warm: list = []
        client(port, body, path, 3, args.timeout, warm)  # first runs pay for onnxruntime's lazy setup
        results: list = []
        workers = [threading.Thread(target=client, args=(port, body, path, args.requests, args.timeout, results))
                   for _ in range(args.clients)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - start
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = sorted(r[0] for r in results)
    errors = [r[2] for r in results if not r[1]]
    # q[9] = p50, q[18] = p95; quantiles needs two points (--clients 1 --requests 1 has one)
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) > 1 else lat * 19
    return {"threads": threads, "n": len(results), "wall": wall, "rps": len(results) / wall,
            "p50": q[9] * 1000, "p95": q[18] * 1000, "errors": len(errors),
            "kinds": sorted({str(e) for e in errors})}


def main() -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    p.add_argument("--requests", type=int, default=25, help="requests per client (25)")
    p.add_argument("--threads", default="1,2", help="server --threads values to compare, comma list (1,2)")
    p.add_argument("--queue", type=int, default=16, help="server --queue (16; above --clients: no 503s)")
    p.add_argument("--image", default=str(EXAMPLE), help="image to send (a CamVid frame)")
    p.add_argument("--query", default="", help="query string for /remove, e.g. 'classes=Car&refine=1'")
    p.add_argument("--model", help="ONNX model (default: the shipped one)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request before it counts as an error")
    args = p.parse_args()
    if args.clients < 1 or args.requests < 1:
        p.error("--clients and --requests must be positive")
    try:
        settings = [int(t) for t in args.threads.split(",")]
    except ValueError:
        p.error(f"--threads wants a comma list of integers, e.g. 2,1 (got {args.threads!r})")
    if not Path(args.image).is_file():
        p.error(f"--image not found: {args.image}")
    body = Path(args.image).read_bytes()
    load0 = os.getloadavg()
    print(f"CPU: {cpu_kind()}; load average before: {' '.join(f'{x:.2f}' for x in load0)}")
    print(f"{args.clients} clients x {args.requests} requests, POST /remove{'?' + args.query if args.query else ''}"
          f" with {Path(args.image).name} ({len(body):,} bytes), queue {args.queue}, loopback")
    rows = [run_load(args, t, body) for t in settings]
    print(f"{'server --threads':>16} {'requests':>9} {'wall s':>7} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'errors':>6}")
    for r in rows:
        print(f"{r['threads']:>16} {r['n']:>9} {r['wall']:>7.1f} {r['rps']:>7.2f} {r['p50']:>7.0f} {r['p95']:>7.0f} "
              f"{r['errors']:>6}" + (f"  ({', '.join(r['kinds'])})" if r["kinds"] else ""))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
