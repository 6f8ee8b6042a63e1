"""bgremover: CamVid segmentation experiments (Lightning + Hydra) and an ONNX background remover."""

__version__ = "0.1.0"


def ctrl_c_while_starting(signum, frame) -> None:
    """SIGINT while a command starts (`python -m bgremover.X`, `bgremover-predict`...): its first half second
    imports Hydra, Pillow or torch, and a Ctrl-C there was a KeyboardInterrupt traceback from inside an import.
    Before the command's `main` runs it is one line and exit 130; from then on Python's own KeyboardInterrupt,
    which each command handles (and LastCheckpoint holds, as it holds Python's own handler)."""
    import os

    while frame is not None:
        if frame.f_code.co_name == "main":
            raise KeyboardInterrupt
        frame = frame.f_back
    from bgremover.errors import STARTING, report

    report(STARTING)
    os._exit(130)


def _held_while_starting() -> None:
    # a command only: runpy imports this package with argv[0] "-m" while it finds `python -m bgremover.X`, and a
    # console script is named bgremover-*; `import bgremover` in a program or a test leaves its handlers alone
    import os
    import signal
    import sys
    import threading

    run_as = sys.argv[0] if sys.argv else ""
    if (run_as == "-m" or os.path.basename(run_as).startswith("bgremover-")) \
            and threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        import bgremover.errors  # noqa: F401  (stdlib only) here, not half-imported when the signal lands

        signal.signal(signal.SIGINT, ctrl_c_while_starting)


_held_while_starting()
