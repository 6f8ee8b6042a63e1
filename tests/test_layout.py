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


def test_every_command_names_itself_as_it_is_run():
    """Usage lines and messages said `ship: error:`, `quantize:`, `cutout-eval:` (make's target is eval-cutout)
    beside `python -m bgremover.export:` (an audit): each command's prog is how it is run, an installed script
    (bgremover-predict, with its rembg command) or `python -m` and its module."""
    import tomllib

    scripts = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
    wrong = []
    for path in SOURCES:
        text = path.read_text()
        constant = re.search(r'^PROG = "([^"]+)"', text, re.M)
        for found in re.finditer(r'OneLineParser\(\s*prog=(?:"([^"]+)"|(PROG)\b|(prog)\b)', text):
            literal, named, passed = found.groups()
            if passed:  # a parser built for the caller's prog (serve's, shared with `bgremover-predict s`)
                continue
            prog = literal or (constant.group(1) if named and constant else "?")
            module = ".".join(path.relative_to(REPO / "src").with_suffix("").parts).removesuffix(".__main__")
            package = module.rpartition(".")[0] if (path.parent / "__main__.py").is_file() else module
            if prog.split()[0] not in scripts and prog not in (f"python -m {module}", f"python -m {package}"):
                wrong.append(f"{path.relative_to(REPO)}: {prog}")
    assert not wrong, wrong


def test_an_error_line_is_the_messages_first_line_squeezed_and_cut(capsys):
    """What errors.report promises every command's `error:` line: one line, whatever the error holds (a library's
    message over several lines, runs of blanks, a 400-character path), with the exit status the caller asked for;
    a warning under one_line_warnings alike."""
    import warnings

    from bgremover.errors import one_line_warnings, report

    assert report(OSError("cannot read x.png\n  at byte 12 of its header"), "bgremover-predict") == 1
    assert report(ValueError("  runs \t of   blanks  "), code=2) == 2
    assert report(KeyError()) == 1  # no message: its type
    report(RuntimeError("z" * 300))
    report(RuntimeError("y" * 400))
    with one_line_warnings("bgremover-predict"), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("m.int8.onnx was not made from the current model\n  re-run make quantize", stacklevel=1)
    assert capsys.readouterr().err.splitlines() == [
        "bgremover-predict: error: cannot read x.png", "error: runs of blanks", "error: KeyError",
        "error: " + "z" * 300, "error: " + "y" * 299 + "…",
        "bgremover-predict: warning: m.int8.onnx was not made from the current model",
    ]
