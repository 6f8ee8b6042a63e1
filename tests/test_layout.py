"""House rules the code keeps (issue 15): one place prints a command-line error; a file past ~400 lines says
at its top why it is one piece."""

from __future__ import annotations

import re

from conftest import REPO

SOURCES = sorted((REPO / "src" / "bgremover").rglob("*.py"))
LONG = 430  # "about 400 lines"


def test_every_error_line_comes_from_errors_report():
    printers = []
    for path in SOURCES:
        if path.name == "errors.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"print\(f?[\"'][^\"']*error: ", line):
                printers.append(f"{path.relative_to(REPO)}:{n}")
    assert not printers, f"print through bgremover.errors.report instead: {printers}"


def test_long_files_say_why_at_their_top():
    unexplained = []
    for path in SOURCES:
        lines = path.read_text().splitlines()
        if len(lines) > LONG and not any("400" in line for line in lines[:20]):
            unexplained.append(f"{path.relative_to(REPO)} ({len(lines)} lines)")
    assert not unexplained, unexplained


def test_every_command_line_reports_a_bad_option_in_one_line():
    """A bad option printed argparse's usage block before its error in seven commands (export, ship, quantize,
    compare, cutout_eval, train_remover, make_folder): each builds its parser from errors.OneLineParser now."""
    plain = [p.name for p in SOURCES if re.search(r"\bargparse\.ArgumentParser\(", p.read_text())]
    assert plain == [], plain
