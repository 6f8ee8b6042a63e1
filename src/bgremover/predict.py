"""`bgremover-predict` (or `python -m bgremover.predict`): cut the background out of images, rembg-style.

    bgremover-predict IMG [IMG ...] | DIR [--out DIR|FILE] [--model PATH] [--classes A,B] [--threshold T]
                      [--refine] [--mask-only] [--bg-color R,G,B[,A]] [--bg-image P] [--threads N]
                      [--max-side N] [--max-pixels N] [--overwrite] [--quiet]
    bgremover-predict i [options] INPUT [OUTPUT] | p [options] INPUT_DIR OUTPUT_DIR | s [serve options]
    The second line is rembg's form (`rembg i/p/s`), with its -om (--only-mask), -bgc R G B A (--bgcolor) and
    -a (--alpha-matting: here the guided-filter --refine); `s` runs bgremover-serve.
    Writes <stem>.nobg.png (a mask: <stem>.mask.png) next to each input (or into --out; a name ending in / is a
    folder). `-` as input reads stdin; with no --out (or `--out -`) the PNG goes to stdout, never to a terminal.
    A folder is read with its sub-folders (mirrored in --out); images whose output exists are skipped
    (--overwrite replaces them); files named one by one are always written.
    Exit codes: 0 all written (or skipped as existing); 1 some input failed (each reported on stderr, the
    good ones are still written), the model cannot be loaded, or the output folder cannot be made or written
    (checked before any image is processed; where only some of the mirrored sub-folders cannot, their images
    fail and the rest are written); 2 usage error (bad option value, unknown class name, conflicting
    options); 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).

The library (BackgroundRemover, image decoding) is `bgremover.remover`, re-exported here. Like it, this module
never imports torch: a test enforces it. Over 400 lines on purpose: the plain and the rembg command forms
share every option and output rule, and splitting them would put one command line in two files.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bgremover.errors import OneLineParser, UserError, check_writable, one_line, one_line_warnings, report
from bgremover.files import Terminated, sigterm_raises
from bgremover.images import (
    IMAGE_EXTENSIONS,
    JPEG_SUFFIXES,
    MASK_SUFFIX,
    MAX_PIXELS,
    OUTPUT_SUFFIX,
    OUTPUT_SUFFIXES,
    PREDICTED_SUFFIXES,
    encode_image,
    load_background,
    output_suffix,
    parse_color,
)
from bgremover.remover import (  # noqa: F401  (re-exported: the library's names, importable from here as before)
    DEFAULT_MODEL,
    INT8_SUFFIX,
    MAX_SIDE,
    MODEL_ENV,
    BackgroundRemover,
    BgRemoverError,
    ImageError,
    ModelError,
    UsageError,
    default_model_path,
    guided_filter,
    is_stream,
    threads_problem,
    write_atomic,
)

# ----------------------------------------------------------------------------------------------------------
# CLI


def output_name(src: Path, mask_only: bool = False) -> str:
    return src.stem + output_suffix(mask_only)


def _is_image_file(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.endswith(PREDICTED_SUFFIXES)
    )


def _folder_images(folder: Path) -> list[Path]:
    """The images in a folder and its sub-folders, as rembg's `p` reads them (only the top level was read, and a
    folder of dated sub-folders had "no images"); hidden files and folders skipped (macOS's ._photo.jpg is no
    image), links to folders not followed (no loops)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(p for name in files if not name.startswith(".") and _is_image_file(p := Path(root) / name))
    return sorted(found)


def _is_folder_name(out: str) -> bool:
    """`OUTPUT/` names a folder, made if missing: Path() drops the slash, and `i a.jpg new/` wrote a file `new`."""
    return out.endswith(("/", os.sep))


# rembg's commands: `i INPUT [OUTPUT]` one file, `p INPUT_DIR OUTPUT_DIR` a folder, `s` the HTTP server
REMBG_COMMANDS = {"i": "one image: INPUT [OUTPUT] (- = stdin/stdout)", "p": "a folder: INPUT_DIR OUTPUT_DIR",
                  "s": "the HTTP service and page (bgremover-serve's options)"}


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="bgremover-predict" + (f" {command}" if command else ""),
        description="Remove the background (everything but the chosen classes) from images.",
        epilog="rembg's commands work too: " + "; ".join(f"`{k}` {v}" for k, v in REMBG_COMMANDS.items())
        # --info is taken before this parser (it needs no image), so only this line names it in --help
        + (". `--info [-m MODEL]` prints what the model segments, its test score and where it came from"
           if command is None else "")
        + ". Exit codes: 0 ok, 1 some input failed or the model cannot be loaded, 2 usage error.",
    )
    if command == "i":
        p.add_argument("input", nargs="?", metavar="INPUT", help="an image file, or - for stdin (the default when "
                       "stdin is not a terminal)")
        p.add_argument("out", nargs="?", metavar="OUTPUT", help=f"the PNG (or, opaque, JPEG) to write, a folder "
                       f"(ending in /) to write <stem>{OUTPUT_SUFFIX} (a mask: <stem>{MASK_SUFFIX}) into, or - for stdout (default, as rembg: stdout "
                       f"when it is redirected or piped, else <stem>{OUTPUT_SUFFIX} beside the input)")
    elif command == "p":
        p.add_argument("input", metavar="INPUT_DIR", help="a folder of images (its sub-folders too)")
        p.add_argument("out", metavar="OUTPUT_DIR", help=f"the folder to write <stem>{OUTPUT_SUFFIX} files into, "
                       f"sub-folders mirrored ({MASK_SUFFIX} with -om; made if missing)")
    else:
        p.add_argument(
            "inputs", nargs="+", metavar="IMG|DIR", help="image files, folders of images, or - for stdin"
        )
        p.add_argument("--out", "-o", help="output folder (sub-folders of an input folder mirrored; made if missing), "
                       "or output file for a single input (- = stdout)")
    p.add_argument("--model", "-m", help=f"ONNX model (default ${MODEL_ENV}, else {DEFAULT_MODEL} or, when made from "
                   f"it, its int8 copy {DEFAULT_MODEL.stem}{INT8_SUFFIX})")
    p.add_argument("--classes", "-c", help="comma-separated foreground classes (default: the model's)")
    p.add_argument("--threshold", "-t", type=float, help="hard mask: alpha = 255 where P(foreground) >= T")
    p.add_argument("--refine", "-a", "--alpha-matting", action="store_true",
                   help="snap the mask to image edges (guided filter; what rembg's -a is for)")
    for short, name in (("-ae", "erode-size"), ("-af", "foreground-threshold"), ("-ab", "background-threshold")):
        p.add_argument(short, f"--alpha-matting-{name}", type=int, metavar="N",
                       help="rembg's alpha-matting setting: accepted and ignored (our -a is a guided filter)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--mask-only", "-om", "--only-mask", action="store_true",
                       help="write the L-mode mask instead of a cut-out")
    group.add_argument("--bg-color", help="composite over this colour: R,G,B or R,G,B,A (0..255; A = its "
                       "opacity) or #rrggbb[aa]")
    group.add_argument("-bgc", "--bgcolor", nargs=4, type=int, metavar=("R", "G", "B", "A"),
                       help="rembg's form of --bg-color: -bgc 255 255 255 255 = opaque white, A=0 = none")
    group.add_argument("--bg-image", help="composite over this image (scaled to cover)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument(
        "--max-side", type=int,
        help=f"infer at most at this long side (default: the long side the model was trained at, which smaller "
             f"images are scaled up to as well; else at most {MAX_SIDE})"
    )
    p.add_argument(
        "--max-pixels", type=int, default=MAX_PIXELS, help=f"refuse larger images ({MAX_PIXELS:,})"
    )
    p.add_argument("--overwrite", action="store_true",
                   help="in folder runs, replace existing outputs (default: skip them); named files are always written")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or per-file messages")
    return p


def _collect(inputs: Sequence[str], failures: list[str], from_folders: dict[Path, Path] | None = None
             ) -> list[Path | None]:
    """Expand folders; None stands for stdin. Missing paths and image-less folders go to `failures`; files found
    by expanding a folder are added to `from_folders` with their sub-folder in it (only those may be skipped when
    their output exists; an --out folder mirrors the sub-folders)."""
    items: list[Path | None] = []
    origin: dict[Path, Path] = {}  # a file found in a folder -> its sub-folder there (the first folder that has it)
    for raw in inputs:
        if raw == "-":
            items.append(None)
            continue
        path = Path(raw)
        if path.is_dir():
            found = _folder_images(path)
            if not found:
                failures.append(
                    f"{path}: directory contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))}), "
                    "its sub-folders neither (hidden ones and links to folders are not read)"
                )
            items.extend(found)
            for p in found:
                origin.setdefault(p, p.parent.relative_to(path))
        elif path.exists():
            items.append(path)
        else:
            failures.append(f"{path}: no such file or directory")
    seen: dict[Path, int] = {}
    unique: list[Path | None] = []
    for item in items:  # the same file named twice (or via its folder, or a link to it) is processed once
        key = item.resolve() if item is not None else None
        if key is None or key not in seen:
            if key is not None:
                seen[key] = len(unique)
            unique.append(item)
        elif unique[seen[key]].is_symlink() and not item.is_symlink():  # the file's own name, not a link's
            unique[seen[key]] = item
    if from_folders is not None:  # the copy kept says where it sits (a link's sub-folder is not the file's)
        from_folders.update((i.resolve(), origin[i]) for i in unique if i is not None and i in origin)
    return unique


def _plan_outputs(items: list[Path | None], out: str | None, several: bool, mask_only: bool = False,
                  sub: dict[Path, Path] | None = None, option: str = "--out") -> list[Path | None]:
    """Destination per item (None = stdout): <stem>.nobg.png, or <stem>.mask.png for masks, beside the input or in
    the `out` folder (in the input's sub-folder there: `sub`, from _collect). UsageError on impossible combinations;
    `option` is how the command line named the output (--out, or the rembg form's OUTPUT_DIR)."""
    suffix = output_suffix(mask_only)
    if out == "-" or (out is None and any(i is None for i in items)):
        if several or len(items) != 1:
            raise UsageError("stdout (-) can take exactly one image")
        if sys.stdout is None:  # closed (`>&-`): was "unexpected AttributeError"
            raise UsageError("stdout is closed: name the output file")
        if sys.stdout.isatty():  # rembg's `cat a.jpg | rembg i` dumped 256 KB of PNG bytes onto the terminal
            raise UsageError("stdout is a terminal: redirect it (> out.png) or name the output file")
        return [None]
    if out == "":  # Path("") is the current folder: an empty OUTPUT wrote there
        raise UsageError("the output is empty: name a file or folder (- for stdout)")
    sub = sub or {}
    if out is None:
        # Beside each input; an input in a read-only folder (a shared dataset, a mounted card) writes to the
        # current directory instead (in its sub-folder there), so the default command never fails for want of
        # write access.
        return _disambiguate(items, [_beside(i, suffix, sub.get(i.resolve(), Path()), option)  # type: ignore[union-attr]
                                     for i in items], suffix)
    target, folder = Path(out), _is_folder_name(out)
    # a named file, or a device or pipe (`--out /dev/stdout`, as the rembg form takes it)
    as_file = not several and not folder and not target.is_dir() and (
        target.suffix.lower() in OUTPUT_SUFFIXES or is_stream(target))
    if as_file:
        return [target]
    if target.exists() and not target.is_dir():
        raise UsageError(f"{option} {target} exists and is not a folder")
    if several and not folder and not target.exists() and target.suffix.lower() in IMAGE_EXTENSIONS:
        raise UsageError(f"{option} {target} names one image, but several are written: name a folder")
    if not several and not folder and target.suffix and not target.is_dir():
        raise UsageError(f"{option} {target}: an output file must end in .png (or .jpg, for an opaque one); a "
                         f"folder, in /")
    dests = [target / sub.get(i.resolve(), Path()) / output_name(i, mask_only) if i is not None
             else target / ("stdin" + suffix) for i in items]
    return _disambiguate(items, dests, suffix)


def _read_only(folder: Path) -> bool:
    # By its mode bits too: root passes os.access anyway, and wrote cut-outs into a 555 dataset folder (CI and
    # this project's machines run as root beside ../shared/CamVid).
    return not os.access(folder, os.W_OK) or not folder.stat().st_mode & 0o222


def _beside(item: Path, suffix: str, sub: Path, option: str = "--out") -> Path:
    if not _read_only(item.parent):
        return item.parent / (item.stem + suffix)
    if _read_only(Path.cwd()):  # run from inside the dataset (`cd CamVid/test; bgremover-predict x.png`): the
        # fallback was that very folder, and root wrote there after saying it would not
        raise UsageError(f"{item}: its folder and the current folder {Path.cwd()} are read-only: name an output "
                         f"folder ({option} DIR/)")
    return Path.cwd() / sub / (item.stem + suffix)


def _disambiguate(items: list[Path | None], dests: list[Path], suffix: str) -> list[Path | None]:
    """photo.jpg and photo.png would both become photo.nobg.png: give such clashes photo_jpg.nobg.png etc."""
    def renamed(item: Path, dest: Path, lower: bool) -> Path:
        ext = item.suffix.lstrip(".")
        return dest.with_name(f"{item.stem}_{ext.lower() if lower else ext}{suffix}")

    count = Counter(dests)
    out: list[Path | None] = [renamed(i, d, True) if count[d] > 1 and i is not None else d
                              for i, d in zip(items, dests, strict=True)]
    lowered = Counter(out)  # photo.jpg + photo.JPG still clash in lower case: those keep theirs
    out = [renamed(i, d, False) if i is not None and count[d] > 1 and lowered[o] > 1 else o
           for i, d, o in zip(items, dests, out, strict=True)]
    by_dest: dict[Path, Path | None] = {}
    for item, dest in zip(items, out, strict=True):  # e.g. a/x.png and b/x.png into one --out folder
        if dest is not None and dest in by_dest:
            raise UsageError(f"{by_dest[dest]} and {item} would both write {dest}: use separate --out folders")
        if dest is not None:
            by_dest[dest] = item
    return out


PROG = "bgremover-predict"


def _write_stdout(data: bytes) -> None:
    """All of `data` to stdout. Under PYTHONUNBUFFERED=1 (the Makefile's, and many container images') stdout's
    buffer is the raw file, whose write() may take only part (a full disk took 36 KiB of a 276 KiB PNG) and says
    so only in its count: the PNG was cut short and the exit status 0. Written until all is taken; the next write
    after a short one raises the disk's error (ENOSPC), reported as this input's failure."""
    out, view = sys.stdout.buffer, memoryview(data)
    while view:
        view = view[out.write(view) or 0:]  # None: a non-blocking stdout took nothing yet
    out.flush()


def _positionals(argv: list[str]) -> list[str]:
    """The plain form's positional arguments: option values skipped (`--out i` names a folder, not a command)."""
    takes = {o: (1 if a.nargs is None else a.nargs) for a in _parser()._actions for o in a.option_strings
             if a.nargs != 0}
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg in takes:
            skip = takes[arg] if isinstance(takes[arg], int) else 1
        elif arg == "-" or not arg.startswith("-"):
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in REMBG_COMMANDS else None  # a file named i, p or s: give it as ./i
    misplaced = None if command else next((a for a in _positionals(argv) if a in REMBG_COMMANDS
                                           and not Path(a).exists()), None)
    if misplaced:  # `-q i in.jpg out.png` read i and out.png as inputs and wrote in.nobg.png
        return report(f"{misplaced} is rembg's command: put it first ({PROG} {misplaced} [options] ...)", PROG, code=2)
    if command is None and "--info" in argv:
        # a stale int8 copy's warning printed Python's file:line header and the source line beneath it
        with one_line_warnings(PROG):
            return _info(argv)
    if command == "s":
        from bgremover.serve import main as serve

        return serve(argv[1:], prog=f"{PROG} s")
    # Intermixed: options may come between the positionals (`i IN -om OUT`), as rembg (click) allows; plain
    # parse_args stops filling positionals at the first option and rejects OUT. Bad syntax: one error line, exit 2.
    args = _parser(command).parse_intermixed_args(argv[1:] if command else argv)
    err = sys.stderr

    def fail_usage(msg: str) -> int:
        return report(msg, PROG, code=2)

    try:
        if command is not None:
            args = _from_rembg_form(command, args)
        with one_line_warnings(PROG), sigterm_raises():
            return _run(args, fail_usage)
    except KeyboardInterrupt:
        print("bgremover-predict: interrupted", file=err)
        return 130
    except Terminated:  # `kill`, `timeout`: as on Ctrl-C, no temp file of the image being written is left behind
        print("bgremover-predict: interrupted by SIGTERM", file=err)
        return 143
    except UsageError as e:
        return fail_usage(str(e))
    except BgRemoverError as e:
        return report(e, PROG)
    except Exception as e:  # a bug, not bad input: still one line, never a traceback
        return report(f"unexpected {type(e).__name__}: {one_line(e, 200)}", PROG)


def _info(argv: list[str]) -> int:
    """`--info [-m MODEL]`: the description of the model a cut-out would use (the int8 copy, when that is it)."""
    from bgremover import model_format

    p = OneLineParser(prog=f"{PROG} --info", description="Print what a model segments, its test score and where "
                      "it came from.")
    p.add_argument("--info", action="store_true", required=True)
    p.add_argument("--model", "-m", help=f"ONNX model (default: the one {PROG} uses)")
    args = p.parse_args(argv)
    try:
        remover = BackgroundRemover(args.model, threads=1)
    except BgRemoverError as e:
        return report(e, PROG)
    path = remover.model_path
    print(f"model: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    for line in model_format.describe(remover.meta, (remover.test_miou, *remover.test_frames)):
        print(line)
    return 0


def _from_rembg_form(command: str, args: argparse.Namespace) -> argparse.Namespace:
    """`i`/`p`'s positional INPUT and OUTPUT as the plain form's inputs and --out (checked there)."""
    if command == "i":
        if args.input is None:
            if sys.stdin is None or sys.stdin.isatty():  # None: closed (`<&-`)
                raise UsageError("i needs an INPUT image (or - with an image on stdin)")
            args.input = "-"
        if args.input != "-" and Path(args.input).is_dir():
            raise UsageError(f"i takes one image, {args.input} is a folder: use `p INPUT_DIR OUTPUT_DIR`")
        if args.out is None and sys.stdout is not None and not sys.stdout.isatty():  # rembg's `i a.jpg > b.png`:
            # b.png was left empty; a closed stdout (`>&-`, None) is no redirection: beside the input
            args.out = "-"
        elif args.out not in (None, "-") and not Path(args.out).is_dir() and not _is_folder_name(args.out):
            # OUTPUT is the file to write, as in rembg: `i a.jpg new` made a folder `new` with a.nobg.png inside
            out = Path(args.out)
            if out.suffix and out.suffix.lower() not in OUTPUT_SUFFIXES:
                raise UsageError(f"OUTPUT {args.out}: a cut-out is a PNG (its transparency needs one): end the "
                                 "name in .png (or .jpg, for an opaque one)")
            args.out_file = out
    elif not Path(args.input).exists():
        raise UsageError(f"p INPUT_DIR {args.input}: no such folder")
    elif not Path(args.input).is_dir():  # the rest (an OUTPUT that is a file, stdin to stdout) as the plain form
        raise UsageError(f"p takes a folder, {args.input} is not one: use `i INPUT OUTPUT` for one image")
    args.inputs = [args.input]
    args.out_option = "OUTPUT_DIR" if command == "p" else "OUTPUT"
    return args


def _run(args: argparse.Namespace, fail_usage) -> int:
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        return fail_usage(f"--threshold must be within 0..1, got {args.threshold}")
    if problem := threads_problem(args.threads):
        return fail_usage(f"--{problem}")
    for name in ("max_side", "max_pixels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return fail_usage(f"--{name.replace('_', '-')} must be positive, got {value}")
    matting = [f for f, v in (("-ae", args.alpha_matting_erode_size), ("-af", args.alpha_matting_foreground_threshold),
                              ("-ab", args.alpha_matting_background_threshold)) if v is not None]
    if matting:  # rembg commands carry them along with -a: they run here, with one line saying what they mean
        warnings.warn(f"{'/'.join(matting)} (rembg's alpha-matting settings) ignored: -a here refines the mask with "
                      "a guided filter", stacklevel=2)
    given = args.bg_color if args.bg_color is not None else args.bgcolor  # --bg-color R,G,B[,A] or -bgc R G B A
    bg_color = parse_color(given) if given is not None else None
    if args.bg_image is not None and not (Path(args.bg_image).is_file() or is_stream(args.bg_image)):
        # a pipe too (`--bg-image <(curl -s URL)`: it was "no such file"), read as the inputs are
        what = "is a folder" if Path(args.bg_image).is_dir() else "no such file"
        return fail_usage(f"--bg-image {args.bg_image}: {what}")

    failures: list[str] = []
    several = len(args.inputs) > 1 or any(Path(i).is_dir() for i in args.inputs if i != "-")
    if "-" in args.inputs and several:
        return fail_usage("stdin (-) cannot be combined with other inputs")
    from_folders: dict[Path, Path] = {}
    items = _collect(args.inputs, failures, from_folders)
    if not items:  # nothing usable: report without paying for (or failing on) the model
        for line in failures:
            report(line, PROG)
        return 1
    out_file = getattr(args, "out_file", None)  # `i INPUT OUTPUT`: that very name
    outputs = [out_file] if out_file is not None and len(items) == 1 else _plan_outputs(
        items, args.out, several, args.mask_only, from_folders, getattr(args, "out_option", "--out"))
    moved = sorted({str(i.parent) for i, o in zip(items, outputs, strict=True)
                    if args.out is None and i is not None and o is not None and o.parent != i.parent})
    if moved and not args.quiet:  # the read-only fallback of _beside: say where the files went
        print(f"{', '.join(moved)}: read-only, so the outputs go to the current folder {Path.cwd()}",
              file=sys.stderr)
    bg_image = None
    if args.bg_image is not None:  # read once for every input; its transparency kept (the composite keeps it)
        try:
            bg_image = load_background(args.bg_image, args.max_pixels)
        except ImageError as e:
            return fail_usage(f"--bg-image {e}")
    opaque = args.mask_only or (bg_image is not None and bg_image.mode == "RGB") or (
        bg_color is not None and bg_color[3:] in ((), (255,)))
    jpeg = next((o for o in outputs if o is not None and o.suffix.lower() in JPEG_SUFFIXES), None)
    if jpeg is not None and bg_image is not None and not opaque:
        return fail_usage(f"{jpeg}: the --bg-image has transparent areas, which the composite keeps: it is a PNG "
                          "(give a .png name, or an opaque --bg-image)")
    if jpeg is not None and not opaque:  # a JPEG has no transparency: the cut-out's would be lost (rembg wrote a
        # PNG under the .jpg name)
        return fail_usage(f"{jpeg}: a cut-out with transparency is a PNG; a JPEG needs an opaque background "
                          "(-bgc R G B 255, --bg-image) or --mask-only")
    # the --bg-image is read as well: `i a.jpg bg.png --bg-image bg.png` replaced the background photo
    sources = {Path(i).resolve() for i in (*items, args.bg_image) if i is not None}
    for dst in outputs:  # a cut-out written over its own photo (`a.png -o a.png`, or through a link) destroys it
        if dst is not None and dst.resolve() in sources:
            return fail_usage(f"{dst} is an input image: its cut-out would replace it; choose another output")

    remover = BackgroundRemover(
        args.model,
        classes=args.classes.split(",") if args.classes is not None else None,
        threads=args.threads,
        max_side=args.max_side,
        max_pixels=args.max_pixels,
    )
    unwritable: dict[Path, str] = {}  # output folder -> why nothing can be written in it
    if outputs and outputs[0] is not None:
        # Made and checked before any inference: a folder we cannot write would otherwise fail every image
        # after its inference, each blamed on the input and naming a hidden temp file.
        folders = sorted({o.parent for o in outputs if o is not None and not is_stream(o)})
        for dest in folders:
            try:
                dest.mkdir(parents=True, exist_ok=True)
                # tried with a probe file, not os.access: root passes that check, and /proc refuses files anyway
                check_writable(dest, "output folder", folder=True)
            except OSError as e:
                unwritable[dest] = f"cannot create the output folder {dest}: {e.strerror or one_line(e, 200)}"
            except UserError as e:
                unwritable[dest] = str(e)
        if unwritable and len(unwritable) == len(folders):  # nothing can be written at all: one line, up front
            return report(unwritable[folders[0]], PROG)
        # Only some (one mirrored sub-folder clashes with a file, or is read-only): a folder run stopped there and
        # wrote none of the other folders' images; as rembg's `p`, those images fail, named, and the rest are written.

    opts = dict(
        threshold=args.threshold,
        refine=args.refine,
        mask_only=args.mask_only,
        bg_color=bg_color,
        bg_image=bg_image,
    )
    pairs = list(zip(items, outputs, strict=True))
    bar = None
    if several and not args.quiet:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(pairs), unit="img", file=sys.stderr, dynamic_ncols=True)
        except ImportError:  # tqdm is a nicety, not a requirement of the predictor
            bar = None
    written = skipped = 0
    for src, dst in pairs:
        # Folder runs skip what an earlier run already wrote (resumable batch jobs); a file named on the command
        # line is always written: its old cut-out may come from another model or other options.
        if dst is not None and dst.is_dir():  # not an earlier cut-out to skip, nor one to replace: a failure
            failures.append(f"{dst} is a folder: the cut-out of {src} cannot be written there")
        elif dst is not None and dst.exists() and not args.overwrite and src is not None and src.resolve() in from_folders:
            skipped += 1
        elif dst is not None and dst.parent in unwritable:
            failures.append(f"{src}: not cut out: {unwritable[dst.parent]}")
        else:
            try:
                source = src
                if src is None:
                    source = io.BytesIO(sys.stdin.buffer.read() if sys.stdin is not None else b"")  # None: closed
                    if not source.getbuffer().nbytes:  # was "not a recognised image file" (`i` from a script)
                        raise ImageError("<stdin>: no data (give an INPUT image, or pipe one in)")
                data = encode_image(remover.remove(source, **opts), dst.suffix if dst is not None else ".png")
            except ImageError as e:
                failures.append(str(e))
            except (OSError, MemoryError) as e:
                failures.append(f"{src if src is not None else '<stdin>'}: {one_line(e, 200)}")
            else:
                try:
                    if dst is None:
                        _write_stdout(data)
                    else:
                        write_atomic(data, dst)
                        if not args.quiet and not several:
                            print(f"wrote {dst}", file=sys.stderr)
                    written += 1
                except OSError as e:  # the output's disk or pipe: a full disk was reported as the input's fault
                    failures.append(f"{src if src is not None else '<stdin>'}: cannot write "
                                    f"{dst if dst is not None else '<stdout>'}: {e.strerror or one_line(e, 200)}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    for line in failures:
        report(line, PROG)
    if not args.quiet and (several or skipped):
        print(
            f"{written} written, {skipped} skipped (exist; --overwrite to replace), {len(failures)} failed",
            file=sys.stderr,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
