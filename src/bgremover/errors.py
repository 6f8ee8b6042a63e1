"""The one user-error type. Torch-free, so the predictor (onnxruntime + numpy + Pillow) can use it too.

Anything a person can fix — a bad path, a wrong option, a broken file — raises `UserError` (or a subclass that
only narrows where it came from). Entry points print it as one `error: ...` line and exit non-zero; anything
else is a bug and keeps its traceback (in the run's log file).
"""

from __future__ import annotations

import argparse
import contextlib

# the flag beside any number computed over part of a split (limit_test_batches, data.limit_eval_images, --limit);
# here because this module is the one every entry point imports, the torch-free predictor side included
PARTIAL = "PARTIAL: these numbers are not the split's"


class UserError(Exception):
    """What the user gave us cannot be used; the message is one line that names the file or option at fault."""


# the predictor's (torch-free) narrowings: which part of a cut-out failed, for the service's status codes
class BgRemoverError(UserError):
    """Base of the predictor's errors (bgremover.remover, bgremover.images), each reported as one line."""


class ModelError(BgRemoverError):
    """The model file is missing, unreadable or not a bgremover model."""


class ImageError(BgRemoverError):
    """An input image cannot be used (unreadable, truncated, too large, ...)."""


class PixelLimitError(ImageError):
    """An image over the pixel limit (max_pixels, --max-pixels): the service answers it 413, not 400."""


class UsageError(BgRemoverError):
    """A bad option value (unknown class, bad colour, ...)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a run (train.RunInterrupted says where and how to go on): not a failure, and not
    the user's error; the run exits 128 + `signum`."""

    signum: int


class RankFailed(RuntimeError):
    """Another DDP rank's crash (not a user error), as rank zero reports it (lit/ddp.py)."""


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`1 epoch`, `3 epochs` (`plural` where an s is wrong): every message says a number of things this way."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def one_line(error: BaseException | str, limit: int | None = 300) -> str:
    """The first line of an error's message (or of a text), whitespace squeezed and cut at ``limit`` (None: whole):
    the one shortening every one-line report uses (``report``; ``bgremover.utils.error_summary`` for runs)."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ("" if isinstance(error, str) else type(error).__name__)
    first = " ".join(first.split())
    return first if limit is None or len(first) <= limit else first[: limit - 1] + "…"


def checkpoint_problem(path) -> str | None:
    """What is wrong with a checkpoint path before it is read, in one phrase; None when it names a file."""
    from pathlib import Path

    if Path(path).is_dir():  # was "checkpoint not found" of a run folder that is there
        return f"{path} is a folder, not a checkpoint: name a .ckpt or .pt file in it (e.g. its checkpoints/last.ckpt)"
    if not Path(path).is_file():
        return f"checkpoint not found: {path}"
    from bgremover.model_format import is_torchscript

    if is_torchscript(path):  # export's --torchscript copy (X.pt beside X.onnx): it read "truncated or damaged"
        return (f"{path} is a TorchScript model (export's --torchscript copy), not a training checkpoint: give the "
                "run's .ckpt or the .pt weights of make ship")
    return None


def report(error: BaseException | str, prog: str | None = None, code: int = 1) -> int:
    """The one place a command line prints an error: one `[prog: ]error: ...` line on stderr; returns `code`
    (the exit status to give back), so callers write `return report(err)`."""
    import sys

    message = error if isinstance(error, str) else one_line(error)
    print(f"{prog}: error: {message}" if prog else f"error: {message}", file=sys.stderr, flush=True)
    return code


STARTING = "interrupted by SIGINT while starting: nothing was done"


@contextlib.contextmanager
def starting():
    """Around a Hydra command (train, eval): a Ctrl-C while Hydra composes its config, before the run handles
    interrupts, was a KeyboardInterrupt traceback from inside Hydra; one line and exit 130 (the imports before it:
    bgremover.ctrl_c_while_starting)."""
    try:
        yield
    except KeyboardInterrupt:
        raise SystemExit(report(STARTING, code=130)) from None


class OneLineParser(argparse.ArgumentParser):
    """argparse with a bad option (`--port abc`) as one `prog: error: ...` line and exit 2, not its usage block
    before it: what bgremover-predict and bgremover-serve (also as `bgremover-predict s`) both print."""

    def error(self, message: str):
        import sys

        sys.exit(report(f"{message} (see --help)", self.prog, code=2))


@contextlib.contextmanager
def one_line_warnings(prog: str | None = None):
    """While a command runs: Python warnings as one `[prog: ]warning: ...` line each, not Python's file:line
    header plus the warning's source line — what a command-line user reads is the message (a stale int8 model, a
    damaged EXIF block). Which warnings show, and how often, stays Python's filters' decision. Restored after, so
    calling a command's main() from a program leaves its warnings as they were."""
    import sys
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        text = one_line(message, None)
        print(f"{prog}: warning: {text}" if prog else f"warning: {text}", file=file or sys.stderr, flush=True)

    previous, warnings.showwarning = warnings.showwarning, show
    try:
        yield
    finally:
        warnings.showwarning = previous


def below_minimum(args, minimums: dict[str, int], prog: str | None = None) -> int | None:
    """Lower bounds of numeric command-line options (`args` from argparse; None = not given): the first one
    below its minimum is reported as one line and its exit status (2, a usage error) returned; None when all fit."""
    for name, low in minimums.items():
        value = getattr(args, name)
        if value is not None and value < low:
            return report(f"--{name.replace('_', '-')} must be >= {low}, got {value}", prog, 2)
    return None


def check_writable(path, option: str, folder: bool = False) -> None:
    """Before any work (an export, a calibration, a 233-frame evaluation): `path` — a file to write, or with
    ``folder=True`` a folder to create or fill — can be written. Not a folder where a file is wanted (or the
    reverse), below no file, and its nearest existing folder takes a new file (tried, not guessed: root passes any
    permission check, and /proc refuses files anyway). Give `path` as typed: a file name ending in "/" names a
    folder. Raises UserError naming `option`."""
    import os
    import tempfile
    from pathlib import Path

    p = Path(path)
    if not folder and str(path) == "-":  # `make export OUT=-` wrote a file named "-": for predict, `-` is stdout
        raise UserError(f"{option} - would write a file named '-' (only bgremover-predict writes to stdout): give a "
                        "file name (./- if you mean that one)")
    if not folder and str(path).endswith(("/", os.sep)):  # Path() drops the slash: `--out new/` wrote a file "new"
        raise UserError(f"{option} {path} names a folder: give a file name in it")
    if folder and p.exists() and not p.is_dir():
        raise UserError(f"{option} {p} is a file, not a folder")
    if not folder and p.is_dir():
        raise UserError(f"{option} {p} is a folder: give a file name in it")
    existing = p if folder else p.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {p}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".bgremover-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{option} {p}: cannot write in {existing} ({e.strerror or type(e).__name__})") from None
