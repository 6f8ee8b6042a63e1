"""`python -m bgremover.data [verify|stats]`: check (or fetch) CamVid, and print its train statistics.

verify (default): if the dataset folder exists, check it read-only and print split counts and the class table;
if it does not, download it (unless --no-download). stats: print train mean/std and median-frequency class
weights as YAML lines for conf/data/camvid.yaml. Every failure is one `error: ...` line on stderr, exit 1 (a bad
option: exit 2, Ctrl-C: 130, SIGTERM: 143, as every command here).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bgremover.data import download
from bgremover.data.camvid import DEFAULT_ROOT, ROOT_ENV, resolve_root
from bgremover.errors import OneLineParser, UserError, one_line, report
from bgremover.files import Terminated, sigterm_raises, stop_of

PROG = "python -m bgremover.data"  # the command as run (make data): its usage line and every error line


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Verify CamVid (downloading it when absent) or print its train-split statistics.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="verify",
        choices=("verify", "stats"),
        help="verify (default): check the dataset, downloading it if absent; stats: print train mean/std/weights",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help=f"dataset folder (default: ${ROOT_ENV}, else {DEFAULT_ROOT})",
    )
    parser.add_argument(
        "--deep", action="store_true", help="open every file and check sizes and label values"
    )
    parser.add_argument(
        "--no-download", action="store_true", help="fail instead of downloading a missing dataset"
    )
    parser.add_argument(
        "--url",
        default=None,
        help=f"archive to download (default: ${download.URL_ENV}, else {download.DEFAULT_URL})",
    )
    parser.add_argument("--sha256", default=None, help="expected sha256 of the archive (optional check)")
    parser.add_argument(
        "--retries", type=int, default=download.RETRIES, help="extra attempts after a failure"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def class_table() -> str:
    from bgremover.data.classes import CLASSES, PALETTE, VOID

    rows = [f"{'index':>5}  {'class':<11} colour (RGB)"]
    for index, name in enumerate(CLASSES):
        rows.append(f"{index:>5}  {name:<11} {PALETTE[index]}")
    rows.append(f"{VOID:>5}  {'void':<11} {PALETTE[VOID]}  (ignored by loss and metrics)")
    return "\n".join(rows)


def format_counts(root: Path, counts: dict[str, int]) -> str:
    lines = [f"CamVid at {root}: OK", f"{'split':<6} {'images':>6}"]
    lines += [f"{split:<6} {n:>6}" for split, n in counts.items()]
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace, root: Path) -> None:
    if root.exists():
        # An existing folder is only ever read: it may be a shared read-only copy.
        from bgremover.data.camvid import verify_root

        counts = verify_root(root, deep=args.deep)
    elif args.no_download:
        raise download.DownloadError(
            f"no CamVid dataset at {root}; run `make data DATA_DIR={root}` to download it, "
            f"or point --root / ${ROOT_ENV} at an existing copy"
        )
    else:
        print(f"CamVid not found at {root}; downloading it", file=sys.stderr)
        counts = download.download_camvid(
            root, args.url, sha256=args.sha256, retries=args.retries, deep=args.deep, progress=not args.quiet
        )
    print(format_counts(root, counts))
    print(class_table())


def cmd_stats(args: argparse.Namespace, root: Path) -> None:
    from bgremover.data.camvid import compute_mean_std, median_frequency_weights, verify_root

    if not root.exists():
        raise download.DownloadError(f"no CamVid dataset at {root}; run `make data DATA_DIR={root}` first")
    verify_root(root, splits=("train",), deep=args.deep)
    mean, std = compute_mean_std(root)
    weights = median_frequency_weights(root)
    print(f"# CamVid train-split statistics of {root} (0..1 scale), for conf/data/camvid.yaml")
    print(f"mean: [{', '.join(f'{v:.4f}' for v in mean)}]")
    print(f"std: [{', '.join(f'{v:.4f}' for v in std)}]")
    # data.class_weights takes a mode, which computes (and caches) these very weights: a list there was refused
    print(f"class_weights: median_freq  # median-frequency weights: [{', '.join(f'{v:.4f}' for v in weights)}]")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = resolve_root(args.root)
    try:
        # `kill`/`timeout` ended the process outright and left a hidden .CamVid.extract-* folder beside the dataset
        with sigterm_raises():
            (cmd_stats if args.command == "stats" else cmd_verify)(args, root)
    except UserError as e:  # whole: download errors end with what to do (delete the archive, point --root ...)
        return report(one_line(e, limit=None), PROG)
    except BrokenPipeError:
        # stdout went to a closed pipe (`| head`): nothing left to say; silence the flush at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (KeyboardInterrupt, Terminated) as e:
        # 130 / 143, as every command here (make_folder, export, compare...) and the shell report them; Ctrl-C was 1
        how, code = stop_of(e)
        return report(f"{how} (a partial download is kept and resumes next run)", PROG, code)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return report(f"{where}{one_line(e.strerror or e)}", PROG)
    return 0


if __name__ == "__main__":
    sys.exit(main())
