"""`make ship CKPT=...`: a trained checkpoint becomes the shipped background remover, if it beats the shipped one.

    python -m bgremover.ship --ckpt RUN/checkpoints/epoch_N.ckpt [--models-dir models] [--data-root DIR] [--force]

Builds the three files of the shipped set in a scratch folder inside the models folder: the float ONNX model
(`bgremover.export`: the reference), its int8 copy (`bgremover.quantize`, with its accuracy gate: the
predictor's default) and the weights-only float16 checkpoint that `ckpt_init=` and `make remover` fine-tune
from. Then it scores the shipped float model (its int8 copy, against the candidate's, when that is there alone) on
the same CamVid test frames (`cutout_eval`, the code of
`make eval-cutout`) and moves the new files over `bgremover-camvid{.onnx,.int8.onnx,.pt}` only if the candidate
is better on test mIoU and cut-out IoU and no worse on boundary F and alpha MAE (`--force` skips that comparison,
not the int8 gate). A checkpoint of another net than the shipped one needs `--force` too: `make remover`
fine-tunes the shipped net from the .pt, and its recipe names that net. So does one with another default foreground:
each model's cut-out IoU is over its own foreground classes, and `make predict` would cut out other things.
A shipped model of other classes than CamVid's cannot be scored on CamVid test: it too is replaced only with --force
(a candidate of other classes never: the int8 gate scores it on CamVid test). Both are checked before any build.
Otherwise nothing in the models folder changes.
The example cut-outs (`examples/*.nobg.png` for the default models folder, or `--examples DIR`) are redone with
the new default (int8) model, so they show what `make predict` now makes, and installed with the models as one
set: an error or Ctrl-C before the last rename puts every old file back. It prints the rows models/README.md needs.

Exit codes: 0 shipped, 1 not better or failed (nothing changed), 2 bad option value, 130 interrupted (Ctrl-C), 143
terminated (SIGTERM): nothing changed either.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bgremover import errors, files
from bgremover.data.camvid import DEFAULT_ROOT, ROOT_ENV, resolve_root
from bgremover.data.classes import same_classes
from bgremover.errors import OneLineParser, UserError

PROG = "python -m bgremover.ship"  # the command as run, in its usage line and messages (also make ship)
STEM = "bgremover-camvid"  # the shipped set: <stem>.onnx (float reference), <stem>.int8.onnx, <stem>.pt


class ShipError(UserError):
    """The candidate is not shipped (worse than the shipped model, or a step failed): nothing was changed."""


def _score(model: Path, pairs, threads: int | None, progress: bool) -> dict[str, Any]:
    from bgremover import cutout_eval
    from bgremover.quantize import _scores

    return _scores(cutout_eval.evaluate(cutout_eval.load_remover(model, threads=threads), pairs, progress=progress))


# what "beats" means, in the scores' keys: higher mIoU and cut-out IoU, and no worse boundary F or alpha MAE. The
# last two were added after a train+val run won the first two by 0.02 mIoU points while its edges got worse
# (boundary F 51.25 vs 53.25): a tie on the class map is not a better remover. IoU and F in points, as the
# README's tables (they copy these rows; cut-out IoU and boundary F were fractions beside mIoU in points), MAE as is.
MUST_GAIN = (("mIoU", "mIoU", 100, ".2f"), ("fg_iou", "cut-out IoU", 100, ".2f"))
MUST_HOLD = (("boundary_f", "boundary F", 100, ".2f", 1), ("mae", "alpha MAE", 1, ".4f", -1))


def losses(candidate: dict[str, Any], shipped: dict[str, Any]) -> list[str]:
    """Why `candidate` does not beat `shipped`, one "name new vs old" per failed measure (empty: it beats it)."""
    out = [f"{name} {scale * candidate[k]:{fmt}} vs {scale * shipped[k]:{fmt}}"
           for k, name, scale, fmt in MUST_GAIN if not candidate[k] > shipped[k]]
    out += [f"{name} {scale * candidate[k]:{fmt}} vs {scale * shipped[k]:{fmt}}"
            for k, name, scale, fmt, sign in MUST_HOLD if sign * candidate[k] < sign * shipped[k]]
    return out


def _row(name: str, s: dict[str, Any]) -> str:
    return (f"| {name} | {100 * s['mIoU']:.2f} | {100 * s['fg_iou']:.2f} | {100 * s['boundary_f']:.2f} | {s['mae']:.4f} | "
            f"{s['ms_per_image']:.0f} |")


def ship(ckpt: Path, models_dir: Path, data_root: Path, *, force: bool = False, eval_limit: int | None = None,
         threads: int | None = None, progress: bool = False, examples: Path | None = None,
         log=print) -> dict[str, Any]:
    """Build, compare, and (if better, or forced) install the shipped set; returns the scores. ShipError when
    the candidate is not installed."""
    from bgremover import checkpoint, cutout_eval, export, quantize
    from bgremover.data.camvid import select
    from bgremover.remover import int8_path

    float_model = models_dir / f"{STEM}.onnx"
    names = {"float": float_model, "int8": int8_path(float_model), "weights": models_dir / f"{STEM}.pt"}
    # checkpoint, then data, are checked before anything is written; the checkpoint first, as `make ship CKPT=`
    # names it and the data folder is a default the user may not have thought about yet
    net, meta = export.load_checkpoint_net(ckpt)
    every = cutout_eval.find_pairs(data_root, "test")
    pairs = select(every, eval_limit)
    # --eval-limit is for trials: a score over part of the test split ships nothing unless forced (it did, and
    # models/README's rows said "CamVid test, 4 frames" beside a full-split history)
    partial = len(pairs) < len(every)
    span, flag = (f"{len(pairs)} of {len(every)}", " (PARTIAL)") if partial else (str(len(pairs)), "")
    # the model to beat: the float reference, else the int8 copy alone (what the predictor loads when the float file
    # was deleted: with only it there, the candidate was installed without any comparison)
    reference = next((names[kind] for kind in ("float", "int8") if names[kind].is_file()), None)
    versus = "shipped int8" if reference == names["int8"] else "shipped"  # its row; scored against the like
    shipped = export.read_metadata(reference) if reference is not None else {}
    # both models are scored on CamVid test: classes of another dataset were refused by that scoring, in words that
    # did not say which model ("model classes ... are not CamVid's"), and only after the export and quantization
    if not same_classes(meta["classes"]):
        raise ShipError(f"{ckpt} is not a CamVid model: make ship scores and installs CamVid models only (a folder "
                        f"remover is used with --model); its classes: {', '.join(meta['classes'])}")
    unscorable = bool(shipped) and not same_classes(shipped.get("classes") or [])
    if unscorable and not force:
        raise ShipError(f"the shipped model {reference} is not a CamVid model, so it cannot be scored against the "
                        f"candidate (--force replaces it unscored); its classes: {', '.join(shipped['classes'])}")
    shipped_net = shipped.get("net")
    if shipped_net not in (None, meta["net"]) and not force:
        # the .pt is what `make remover` fine-tunes: its recipe names the shipped net, and a checkpoint of
        # another net would only fit it in a few tensors, silently
        raise ShipError(
            f"{ckpt} is a {meta['net']}, the shipped model a {shipped_net}: experiments/remover.yaml fine-tunes "
            f"{shipped_net} from {names['weights'].name}, so change its model.net too, then ship with --force"
        )
    fg, shipped_fg = ({c.lower() for c in m.get("default_foreground") or []} for m in (meta, shipped))
    if shipped_fg and fg != shipped_fg and not force:
        # the cut-out IoU of the gate is each model's own foreground: a Car-only candidate beat the shipped model's
        # Car+Pedestrian+Bicyclist score and was installed, and `make predict` silently stopped cutting out people
        raise ShipError(
            f"{ckpt} cuts out {', '.join(meta['default_foreground'])} by default, the shipped model "
            f"{', '.join(shipped['default_foreground'])}: their cut-out IoUs are not comparable and make predict would "
            "cut out other things: ship with --force to change the default foreground"
        )
    models_dir.mkdir(parents=True, exist_ok=True)
    # same filesystem: the final moves are renames. A fresh name each time: .ship-<pid> of a run the OOM killer
    # ended stayed behind, and a container's next `make ship`, under the same pid, failed on "File exists"
    scratch = Path(tempfile.mkdtemp(prefix=".ship-", dir=models_dir))
    cutouts: list[tuple[Path, Path]] = []  # the example cut-outs made, with their places
    try:
        new = {kind: scratch / path.name for kind, path in names.items()}
        export.export_onnx(net, meta, new["float"])
        log(f"exported {meta.get('net') or meta.get('net_name')} to ONNX; quantizing and scoring it "
            f"on {span} test frames{flag}")
        record = quantize.quantize(new["float"], new["int8"], data_root, eval_limit=eval_limit, threads=threads,
                                   progress=progress, log=log)  # fmt: skip
        scores = {"candidate": record["eval"]["float"], "candidate int8": record["eval"]["int8"]}
        if unscorable:
            log(f"the shipped model {reference} is not a CamVid model: nothing to compare with")
        elif reference is not None:
            scores[versus] = _score(reference, pairs, threads, progress)
        else:
            log(f"no shipped model in {models_dir}: nothing to compare with")
        log(f"| CamVid test, {span} frames{flag} | mIoU % | cut-out IoU % | boundary F % (2 px) | alpha MAE | ms / image |")
        log("|---|---|---|---|---|---|")
        for name, s in scores.items():
            log(_row(name, s))
        old = scores.get(versus)
        lost = [] if old is None else losses(scores[versus.replace("shipped", "candidate")], old)
        if lost and not force:
            raise ShipError(f"{ckpt} does not beat the shipped model on {span} test frames{flag} ("
                            f"{', '.join(lost)}): nothing changed (--force ships it anyway)")
        if partial and not force:
            raise ShipError(f"scored on {span} test frames{flag} (--eval-limit {eval_limit}): nothing changed; a "
                            "model ships on the whole test split (drop --eval-limit; --force ships it anyway)")
        checkpoint.save_weights(ckpt, new["weights"])
        # before anything is installed (it was after: a Ctrl-C there left new models and old cut-outs, and the
        # line "interrupted: nothing changed")
        if examples is not None:
            _example_cutouts(examples, new["int8"], threads, cutouts)
        _install([*((new[kind], names[kind]) for kind in ("weights", "int8", "float")), *cutouts])
        for kind in ("weights", "int8", "float"):
            log(f"wrote {names[kind]} ({names[kind].stat().st_size / 1e6:.1f} MB)")
        if examples is not None:
            log(f"redid {errors.count(len(cutouts), 'example cut-out')} in {examples}")
        return scores
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for made, _ in cutouts:  # what an error or interrupt left of the new cut-outs (none once installed)
            made.unlink(missing_ok=True)


def _example_cutouts(folder: Path, model: Path, threads: int | None, made: list[tuple[Path, Path]]) -> None:
    """Into `made`, (new file, its place): <stem>.nobg.png for each example photo, made by `model` (the int8 copy: what
    `make predict` loads by default; tests/test_shipped.py checks that the shipped cut-outs are its output),
    written beside it under a hidden name until _install renames it (the same folder: a rename, never a copy)."""
    from bgremover.images import OUTPUT_SUFFIX, encode_png
    from bgremover.remover import BackgroundRemover, write_atomic

    photos = sorted(p for p in folder.glob("*.jpg") if p.is_file())
    remover = BackgroundRemover(model, threads=threads)
    for photo in photos:
        final = photo.with_name(photo.stem + OUTPUT_SUFFIX)
        new = final.with_name(f".{final.name}.ship-{os.getpid()}")
        try:
            png = encode_png(remover.remove(photo))
        except (UserError, OSError) as e:  # a photo that cannot be read keeps whatever it had
            print(f"{PROG}: warning: example {photo.name} not redone: {errors.one_line(e)}", file=sys.stderr)
            continue
        made.append((new, final))
        write_atomic(png, new)


def _install(moves: list[tuple[Path, Path]]) -> None:
    """Rename each new file over its place; if anything stops it half-way (an error, Ctrl-C, SIGTERM), every old
    file is put back and the new ones removed, so the models and example folders always hold one consistent set. An
    old file waits beside its place under a hidden name (the same folder: renames only) until all are in. Signals
    are held and checked between renames: a Ctrl-C landing between a rename and its record lost the old file."""
    placed, backups = [], []
    with files.signals_held() as came:
        try:
            for new, final in moves:
                if came:
                    raise KeyboardInterrupt
                if final.exists():
                    backup = final.with_name(f".{final.name}.old-{os.getpid()}")
                    os.replace(final, backup)
                    backups.append((backup, final))
                os.replace(new, final)
                placed.append(final)
            if came:  # even after the last rename: "interrupted: nothing changed" stays true
                raise KeyboardInterrupt
        except BaseException:
            for new, final in moves:
                (final if final in placed else new).unlink(missing_ok=True)
            for backup, final in backups:
                os.replace(backup, final)
            raise
    for backup, _ in backups:
        backup.unlink(missing_ok=True)


def _parser() -> argparse.ArgumentParser:
    from bgremover.remover import _shipped_models

    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0],
                                epilog="Exit codes: 0 shipped, 1 not better or failed (nothing changed), 2 bad option value.")
    p.add_argument("--ckpt", required=True, help="the trained checkpoint (a run's best epoch)")
    p.add_argument("--models-dir", default=str(_shipped_models()), help="where the shipped set lies (default: models/)")
    p.add_argument("--data-root", help=f"CamVid folder (default ${ROOT_ENV}, else {DEFAULT_ROOT})")
    p.add_argument("--examples", help="folder whose *.jpg get new <stem>.nobg.png cut-outs once shipped "
                   "(default: examples/ of the checkout when --models-dir is the default)")
    p.add_argument("--force", action="store_true", help="ship even if it does not beat the shipped model")
    p.add_argument("--eval-limit", type=int,
                   help="score N evenly spaced test frames instead of all: a trial, which installs nothing without --force")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads for the evaluation (default: all cores)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (code := errors.below_minimum(args, {"eval_limit": 1, "threads": 0}, PROG)) is not None:
        return code
    from bgremover.remover import _shipped_models

    data_root = resolve_root(args.data_root)
    models_dir = Path(args.models_dir)
    examples = Path(args.examples) if args.examples else None
    if examples is None and models_dir.resolve() == _shipped_models().resolve():
        examples = models_dir.parent / "examples" if (models_dir.parent / "examples").is_dir() else None
    elif examples is not None and not examples.is_dir():
        return errors.report(f"--examples {examples}: no such folder", PROG, 2)
    try:
        errors.check_writable(models_dir, "--models-dir", folder=True)  # before the export and the scoring
        with files.sigterm_raises():  # `kill`, `timeout`: as Ctrl-C (it left models/.ship-*/ with the new files)
            ship(Path(args.ckpt), models_dir, data_root, force=args.force, eval_limit=args.eval_limit,
                 threads=args.threads, progress=not args.quiet, examples=examples)  # fmt: skip
    except (KeyboardInterrupt, files.Terminated) as e:
        how, code = files.stop_of(e)
        print(f"{PROG}: {how}: nothing changed", file=sys.stderr)
        return code
    except UserError as e:
        return errors.report(e, PROG, 1)
    except Exception as e:  # a bug or an onnxruntime failure: still one line, and the models are untouched
        return errors.report(f"unexpected {type(e).__name__}: {errors.one_line(e)} (nothing changed)", PROG, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
