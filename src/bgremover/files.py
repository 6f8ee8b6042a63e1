"""Writing a file so that no reader ever sees half of it: the one way every output is written (models,
checkpoints, summaries, reports, cut-outs), and the signal holders that keep a write, or a training step being
saved, whole. Standard library only: the predictor imports it without torch."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """The one folder for what bgremover caches (class weights, decoded CamVid arrays, the CPU kernels' build):
    $BGREMOVER_CACHE, else $XDG_CACHE_HOME/bgremover, else ~/.cache/bgremover. Read at each call, not at import,
    so a variable set later (by a test, a notebook) is honoured."""
    if os.environ.get("BGREMOVER_CACHE"):
        return Path(os.environ["BGREMOVER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bgremover"


def is_stream(path: str | os.PathLike) -> bool:
    """An existing device, pipe or socket (/dev/null, /dev/stdout, a FIFO): written to as it is, never replaced."""
    try:
        mode = os.stat(path).st_mode  # through links
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether writing `a` would overwrite `b`: the same path once links are followed, or a hard link to it."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temp file beside `path` for the block to write (by name: torch.save, onnx.save), renamed over `path`
    when the block ends, removed if it raises (Ctrl-C included). Through a link the link's target is replaced
    and the link stays (five writers did this five ways: some replaced the link with a file); an existing file
    keeps its permissions, a new one gets the umask's (mkstemp's 0600 would survive the rename)."""
    named, path = path, Path(os.path.realpath(path))
    if not path.parent.is_dir():  # say so, not "no such file" naming our temp file
        raise FileNotFoundError(f"{named} links to {path}, whose folder does not exist" if Path(named) != path
                                else f"{named}: its folder does not exist")
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(data: bytes, path: str | os.PathLike) -> None:
    """`data` into `path` through `replacing`; a device or pipe (/dev/stdout, a FIFO) is written to as it is (the
    rename replaced /dev/null with a PNG, as root)."""
    if is_stream(path):  # opened as named: /dev/stdout resolves to a "pipe:[…]" that no folder holds
        with open(path, "wb") as fh:  # a stream: nothing to rename over
            fh.write(data)
        return
    with replacing(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def signals_held() -> Iterator[list[int]]:
    """Hold Ctrl-C and SIGTERM while a few renames that belong together run: the list yielded collects those that
    came, for the caller to check between renames (and stop where its bookkeeping is whole); on leaving, the usual
    handlers are back and each held signal is delivered to them. Python raises KeyboardInterrupt between any two
    statements, and SIGTERM's default ends the process outright, so without this a rename could land unrecorded."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield []
        return
    came: list[int] = []
    # an ignored signal (SIG_IGN: a background job's SIGINT) stays ignored: holding it would make it stop the caller
    kinds = [s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) is not signal.SIG_IGN]
    before = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in kinds}
    try:
        yield came
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        # SIGTERM first: Ctrl-C's handler raises KeyboardInterrupt, which would end this loop and drop the SIGTERM
        for s in sorted(set(came), key=kinds.index):
            signal.raise_signal(s)


class Terminated(BaseException):
    """SIGTERM as an exception (`kill`, `timeout`, a job scheduler), raised where the command is, so it unwinds as
    on Ctrl-C: `replacing` removes its temp file, an export the folders it made. SIGTERM's default ends the
    process outright, and `kill` during an export left a 16 MiB hidden .model.onnx.*.tmp beside --out. A
    BaseException like KeyboardInterrupt, so no `except Exception` reports it as the command's own failure."""


def stop_of(exc: BaseException) -> tuple[str, int]:
    """How a Ctrl-C or a SIGTERM (Terminated) stopped a command, and its exit status as the shell reports it:
    ("interrupted", 130) or ("interrupted by SIGTERM", 143); every command says it the same way."""
    return ("interrupted by SIGTERM", 143) if isinstance(exc, Terminated) else ("interrupted", 130)


def raise_terminated(*_) -> None:
    """A SIGTERM handler: raise Terminated."""
    raise Terminated


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises Terminated (main thread only: only it may set handlers); the handler
    before is back after it, so a command's main() called from a program leaves the program's as they were. The
    command reports it as one line and exits 143 (128 + SIGTERM). An ignored SIGTERM (SIG_IGN, inherited from
    the parent) stays ignored, as in signals_held."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    before = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


class CtrlC:
    """SIGINT held while a fit trains: the first Ctrl-C is noted (`came`) and `message` said, for the fit to stop
    where its step ends; a second raises KeyboardInterrupt at once. Only Python's own handler is replaced (a
    program's is its business), and only in the main thread (only it may set handlers)."""

    def __init__(self) -> None:
        self.came, self._before = False, None

    def hold(self, message: str | None) -> None:
        from bgremover import ctrl_c_while_starting  # Python's own, once the command's main runs

        if threading.current_thread() is not threading.main_thread() \
                or signal.getsignal(signal.SIGINT) not in (signal.default_int_handler, ctrl_c_while_starting):
            return

        def came(signum, frame) -> None:
            if self.came:  # the second: at once
                self.let_go()
                raise KeyboardInterrupt
            self.came = True
            if message:
                print(message, file=sys.stderr, flush=True)

        self._before, self.came = signal.signal(signal.SIGINT, came), False

    def let_go(self) -> None:
        if self._before is not None:
            signal.signal(signal.SIGINT, self._before)
            self._before = None
