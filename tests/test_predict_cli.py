"""bgremover-predict on good, bad and mixed inputs: exit codes, one-line messages, files written or not."""

from __future__ import annotations

import importlib.util
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bgremover.predict import BackgroundRemover, main

# The controllable 1x1-conv model lives in test_predict.py; load it by path so this works whatever the
# pytest import mode or package layout of tests/ is.
_spec = importlib.util.spec_from_file_location(
    "_bgr_test_predict", Path(__file__).with_name("test_predict.py")
)
_tp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tp)
build_model, halves = _tp.build_model, _tp.halves


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(build_model(tmp_path_factory.mktemp("m") / "ctl.onnx"))


def read_png(src) -> Image.Image:
    with Image.open(src) as img:
        img.load()
    return img


def save_png(path: Path, h: int = 12, w: int = 20) -> Path:
    Image.fromarray(halves(h, w)).save(path)
    return path


def make_bad_files(folder: Path) -> list[str]:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # incompressible
    good = io.BytesIO()
    Image.fromarray(noise).save(good, format="PNG")
    jpg = io.BytesIO()
    Image.fromarray(noise).save(jpg, format="JPEG")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("hello, I am a text file\n")
    (folder / "cut.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "cut.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    return ["empty.jpg", "notes.jpg", "cut.png", "cut.jpg"]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line]


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bgremover.predict", *args], input=stdin, capture_output=True, timeout=120
    )


def test_single_file_next_to_input(model, tmp_path, capsys):
    src = save_png(tmp_path / "photo.png")
    assert main([str(src), "--model", model]) == 0
    out = read_png(tmp_path / "photo.nobg.png")
    assert out.mode == "RGBA" and out.size == (20, 12)
    a = np.asarray(out)[:, :, 3]
    assert (a[:, :10] == 255).all() and (a[:, 10:] == 0).all()
    assert "photo.nobg.png" in capsys.readouterr().err


def test_out_file_and_out_folder(model, tmp_path):
    src = save_png(tmp_path / "a.png")
    assert main([str(src), "--model", model, "--out", str(tmp_path / "res.png"), "--mask-only", "-q"]) == 0
    assert read_png(tmp_path / "res.png").mode == "L"
    assert (
        main([str(src), "--model", model, "--out", str(tmp_path / "outdir"), "--bg-color", "1,2,3", "-q"])
        == 0
    )
    comp = read_png(tmp_path / "outdir" / "a.nobg.png")
    assert comp.mode == "RGB" and tuple(np.asarray(comp)[0, -1]) == (1, 2, 3)


def test_folder_skip_and_overwrite(model, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("a.png", "b.jpg", "c.PNG"):
        save_png(src / name)
    (src / "readme.txt").write_text("not an image, and not an image extension: ignored")
    assert main([str(src), "--model", model, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.nobg.png", "b.nobg.png", "c.nobg.png"]
    assert "3 written, 0 skipped" in capsys.readouterr().err

    (out / "a.nobg.png").write_bytes(b"sentinel")  # an existing output is kept without --overwrite
    assert main([str(src), "--model", model, "--out", str(out)]) == 0
    assert (out / "a.nobg.png").read_bytes() == b"sentinel"
    assert "0 written, 3 skipped" in capsys.readouterr().err
    assert main([str(src), "--model", model, "--out", str(out), "--overwrite", "-q"]) == 0
    assert read_png(out / "a.nobg.png").size == (20, 12)


def test_named_file_is_always_rewritten(model, tmp_path, capsys):
    """`make predict IMG=x.jpg MODEL=other.onnx` used to keep the old cut-out ("0 written, 1 skipped", exit 0)."""
    save_png(tmp_path / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.nobg.png").write_bytes(b"stale cut-out of another model")
    assert main([str(tmp_path / "x.png"), "--model", model, "--out", str(out)]) == 0
    assert read_png(out / "x.nobg.png").size == (20, 12)
    err = capsys.readouterr().err
    assert "skipped" not in err and "wrote" in err


def test_folder_in_place_does_not_eat_its_own_outputs(model, tmp_path, capsys):
    save_png(tmp_path / "x.png")
    assert main([str(tmp_path), "--model", model]) == 0
    assert main([str(tmp_path), "--model", model]) == 0  # second run: x.nobg.png is not an input
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nobg.png", "x.png"]
    assert "0 written, 1 skipped" in capsys.readouterr().err


def test_mixed_folder_writes_good_reports_bad(model, tmp_path, capsys):
    src, out = tmp_path / "mixed", tmp_path / "out"
    src.mkdir()
    save_png(src / "good1.png")
    save_png(src / "good2.png")
    bad = make_bad_files(src)
    assert main([str(src), "--model", model, "--out", str(out), "-q"]) == 1
    # Only the good outputs: no partial or temp files for the bad ones.
    assert sorted(p.name for p in out.iterdir()) == ["good1.nobg.png", "good2.nobg.png"]
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == len(bad)
    for name in bad:
        assert sum(name in line for line in lines) == 1


def test_same_stem_different_extensions_do_not_clash(model, tmp_path):
    save_png(tmp_path / "photo.png")
    Image.fromarray(halves(12, 20)).save(tmp_path / "photo.jpg")
    save_png(tmp_path / "other.png")
    assert main([str(tmp_path), "--model", model, "-q"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".nobg.png"))
    assert names == ["other.nobg.png", "photo_jpg.nobg.png", "photo_png.nobg.png"]


def test_missing_inputs_and_empty_folder(model, tmp_path, capsys):
    assert main([str(tmp_path / "nope.png"), "--model", model]) == 1
    assert "nope.png: no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--model", model]) == 1
    assert "contains no images" in capsys.readouterr().err
    good = save_png(tmp_path / "ok.png")  # one good + one missing: good written, exit 1
    assert main([str(good), str(tmp_path / "gone.jpg"), "--model", model, "-q"]) == 1
    assert (tmp_path / "ok.nobg.png").is_file()


def test_usage_errors_exit_2(model, tmp_path, capsys):
    src = save_png(tmp_path / "a.png")
    assert main([str(src), "--model", model, "--classes", "Car,Unicorn"]) == 2
    err = capsys.readouterr().err
    assert "Unicorn" in err and "Pedestrian" in err and len(err.strip().splitlines()) == 1
    for bad in ("300,0,0", "red", "1,2"):
        assert main([str(src), "--model", model, "--bg-color", bad]) == 2
        assert "bad colour" in capsys.readouterr().err
    assert main([str(src), "--model", model, "--threshold", "2"]) == 2
    with pytest.raises(SystemExit) as exc:
        main([])  # argparse: no inputs
    assert exc.value.code == 2
    assert not (tmp_path / "a.nobg.png").exists()


def test_model_errors_exit_1(tmp_path, capsys):
    src = save_png(tmp_path / "a.png")
    assert main([str(src), "--model", str(tmp_path / "missing.onnx")]) == 1
    assert "model file not found" in capsys.readouterr().err
    plain = build_model(tmp_path / "plain.onnx", metadata=False)
    assert main([str(src), "--model", str(plain)]) == 1
    assert "not a bgremover model" in capsys.readouterr().err
    assert not (tmp_path / "a.nobg.png").exists()


def test_pixel_limit(model, tmp_path, capsys):
    src = save_png(tmp_path / "big.png", 50, 50)
    assert main([str(src), "--model", model, "--max-pixels", "1000"]) == 1
    assert "exceeds the limit" in capsys.readouterr().err
    assert not (tmp_path / "big.nobg.png").exists()


def test_stdin_to_stdout(model, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(halves(12, 20)).save(buf, format="PNG")
    res = run_cli("-", "--model", model, stdin=buf.getvalue())
    assert res.returncode == 0, res.stderr
    out = read_png(io.BytesIO(res.stdout))
    a = np.asarray(out)[:, :, 3]
    assert out.size == (20, 12) and (a[:, :10] == 255).all() and (a[:, 10:] == 0).all()
    res = run_cli("-", "--model", model, "--out", str(tmp_path / "s.png"), stdin=buf.getvalue())
    assert res.returncode == 0 and read_png(tmp_path / "s.png").mode == "RGBA" and res.stdout == b""


def test_damaged_exif_is_one_warning_line_and_the_cutout_is_written(model, tmp_path):
    """A JPEG whose EXIF block is cut short printed PIL's warning twice, each as Python's file:line header plus
    the source line `warnings.warn(str(msg))`. Now one line naming the file; the pixels are cut out as usual."""
    exif = Image.Exif()
    exif[0x0112] = 6  # an orientation, then a long description: cut short, the block no longer parses
    exif[0x010E] = "x" * 40
    src = tmp_path / "photo.jpg"
    Image.fromarray(halves(12, 20)).save(src, quality=95, exif=exif.tobytes()[:-30])
    res = run_cli(str(src), "-m", model)
    assert res.returncode == 0, res.stderr
    assert res.stderr.decode().splitlines() == [
        f"bgremover-predict: warning: {src}: damaged metadata (Truncated File Read): the pixels decoded fine, "
        "an EXIF rotation may be missing",
        f"wrote {tmp_path / 'photo.nobg.png'}",
    ]
    assert read_png(tmp_path / "photo.nobg.png").size == (20, 12)


def test_a_folder_where_the_cutout_goes_is_a_failure_not_a_skip(model, tmp_path, capsys):
    """A folder named like the output (photo.nobg.png/) failed after inference blaming the input and naming a
    hidden temp file; in a folder run it was counted "skipped (exist)" with exit 0."""
    src = save_png(tmp_path / "photo.png")
    save_png(tmp_path / "other.png")
    (tmp_path / "photo.nobg.png").mkdir()
    in_the_way = f"bgremover-predict: error: {tmp_path / 'photo.nobg.png'} is a folder: the cut-out of"
    assert main([str(src), "-m", model]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"{in_the_way} {src} cannot be written there"]
    assert main([str(tmp_path), "-m", model, "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(in_the_way), err
    assert (tmp_path / "other.nobg.png").is_file() and not list((tmp_path / "photo.nobg.png").iterdir())


def test_a_folder_with_case_twins_and_macos_junk_is_cut_out_whole(model, tmp_path, capsys):
    """photo.jpg + photo.JPG both became photo_jpg.nobg.png: the whole folder was refused ("several inputs would
    write the same output file; use separate --out folders", naming none, advice that cannot help); macOS's
    ._photo.jpg (AppleDouble metadata) failed as "not a recognised image file"."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("photo.jpg", "photo.JPG", "other.png"):
        save_png(folder / name)
    (folder / "._photo.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (folder / "alias.png").symlink_to(folder / "other.png")  # cut out once, under the file's own name
    assert main(["p", str(folder), str(tmp_path / "out"), "-m", model, "-q"]) == 0, capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == ["other.nobg.png", "photo_JPG.nobg.png", "photo_jpg.nobg.png"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = save_png(tmp_path / "a" / "x.png"), save_png(tmp_path / "b" / "x.png")
    assert main([str(a), str(b), "--out", str(tmp_path / "both"), "-m", model]) == 2
    assert capsys.readouterr().err.strip() == (f"bgremover-predict: error: {a} and {b} would both write "
                                               f"{tmp_path / 'both' / 'x_png.nobg.png'}: use separate --out folders")


def test_rembg_matting_settings_are_accepted_and_empty_stdin_is_named(model, tmp_path):
    """`rembg i -a -ae 15 in out` failed with "argument --refine/-a/--alpha-matting: ignored explicit argument 'e'";
    an empty stdin was "<stdin>: not a recognised image file", and `i` with nothing piped never said what it wants."""
    src = save_png(tmp_path / "a.png")
    res = run_cli("i", "-a", "-ae", "15", "-af", "240", "-ab", "10", str(src), str(tmp_path / "out.png"), "-m", model)
    assert res.returncode == 0, res.stderr
    assert res.stderr.decode().splitlines()[0] == ("bgremover-predict: warning: -ae/-af/-ab (rembg's alpha-matting "
                                                   "settings) ignored: -a here refines the mask with a guided filter")
    out = np.asarray(read_png(tmp_path / "out.png"))
    remover = BackgroundRemover(model)  # -a is the guided-filter refinement (the output said RGBA, nothing more)
    assert np.array_equal(out, np.asarray(remover.remove(halves(12, 20), refine=True)))
    assert not np.array_equal(out, np.asarray(remover.remove(halves(12, 20))))
    for argv in (["-"], ["i"], ["i", "-", "-"]):
        res = run_cli(*argv, "-m", model, stdin=b"")
        assert res.returncode == 1 and res.stderr.decode().strip() == (
            "bgremover-predict: error: <stdin>: no data (give an INPUT image, or pipe one in)"), (argv, res.stderr)


def test_main_called_from_a_program_leaves_its_warnings_as_they_were(model, tmp_path, capsys):
    """main() switched the whole process's warnings.showwarning to its one-line form for good (review)."""
    import warnings

    before = warnings.showwarning
    src = save_png(tmp_path / "a.png")
    assert main([str(src), "-m", model, "-q"]) == 0
    assert warnings.showwarning is before


def test_subprocess_errors_are_one_line_no_traceback(model, tmp_path):
    text = tmp_path / "fake.jpg"
    text.write_text("not a jpeg")
    cases = [
        ((str(text), "--model", model), 1),
        ((str(tmp_path / "missing.png"), "--model", model), 1),
        ((str(text), "--model", str(tmp_path / "none.onnx")), 1),
        (("-", "--model", model), 1),  # empty stdin
        ((str(text), "--model", model, "--bg-color", "x"), 2),
    ]
    for args, code in cases:
        res = run_cli(*args, stdin=b"")
        err = res.stderr.decode()
        assert res.returncode == code, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
    assert sorted(os.listdir(tmp_path)) == ["fake.jpg"]  # nothing written, no temp leftovers


def test_input_in_read_only_folder_writes_to_cwd(tmp_path, monkeypatch):
    """`make predict IMG=../shared/CamVid/test/x.png`: the dataset folder is read-only (mode 555). As root (CI, this
    project's machines) os.access passes any folder, and the cut-out was written into the dataset."""
    ro = tmp_path / "ro"
    ro.mkdir()
    src = ro / "frame.png"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(src)
    ro.chmod(0o555)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    from bgremover.predict import _plan_outputs

    assert _plan_outputs([src], None, several=False) == [work / "frame.nobg.png"]


def test_the_read_only_fallback_says_where_the_files_went(model, tmp_path, monkeypatch, capsys):
    """A folder run from a read-only folder reported "0 written, 1 skipped" against an unrelated file of the
    same name in the current folder, never saying that it wrote (or looked) there."""
    ro, work = tmp_path / "ro", tmp_path / "work"
    ro.mkdir()
    work.mkdir()
    save_png(ro / "frame.png")
    ro.chmod(0o555)
    monkeypatch.chdir(work)
    assert main([str(ro), "-m", model]) == 0
    err = capsys.readouterr().err
    assert f"{ro}: read-only, so the outputs go to the current folder {work}" in err
    assert os.listdir(work) == ["frame.nobg.png"] and os.listdir(ro) == ["frame.png"]


def test_run_inside_a_read_only_folder_writes_nothing_there(model, tmp_path, monkeypatch, capsys):
    """`cd CamVid/test; bgremover-predict x.png` as root: the input's folder is read-only (mode 555), so the
    output went to "the current folder" instead, which is that same folder, and root wrote the cut-out into the
    dataset after saying it would not. Now: one line asking for an output folder, exit 2, nothing written."""
    ro = tmp_path / "ro"
    ro.mkdir()
    save_png(ro / "frame.png")
    ro.chmod(0o555)
    monkeypatch.chdir(ro)
    try:
        for argv, option in ((["frame.png"], "--out"), (["i", "frame.png"], "OUTPUT"), ([str(ro)], "--out")):
            monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # `i` without OUTPUT: not to stdout
            assert main([*argv, "-m", model]) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [f"bgremover-predict: error: {'frame.png' if argv[-1] == 'frame.png' else ro / 'frame.png'}: "
                           f"its folder and the current folder {ro} are read-only: name an output folder ({option} "
                           "DIR/)"], argv
            assert os.listdir(ro) == ["frame.png"], argv
        assert main(["frame.png", "-m", model, "-q", "-o", str(tmp_path / "out") + "/"]) == 0
        assert os.listdir(tmp_path / "out") == ["frame.nobg.png"]
    finally:
        ro.chmod(0o755)


def test_rembg_commands_i_and_p(model, tmp_path, capsys, monkeypatch):
    """rembg's habits: `i INPUT OUTPUT`, `p IN_DIR OUT_DIR`, -om, -bgc R G B A and -a give what the plain form
    gives (before, `bgremover-predict i a.png b.png` failed on a file named "i")."""
    src = save_png(tmp_path / "a.png")
    assert main([str(src), "--model", model, "--out", str(tmp_path / "plain.png"), "-q"]) == 0
    assert main(["i", "--model", model, str(src), str(tmp_path / "i.png"), "-q"]) == 0
    assert (tmp_path / "i.png").read_bytes() == (tmp_path / "plain.png").read_bytes()
    assert main(["i", "-m", model, "-om", str(src), str(tmp_path / "mask.png")]) == 0
    assert read_png(tmp_path / "mask.png").mode == "L"
    assert main(["i", "-m", model, "-bgc", "0", "0", "255", "255", "-a", str(src), str(tmp_path / "blue.png")]) == 0
    blue = read_png(tmp_path / "blue.png")
    assert blue.mode == "RGB" and tuple(np.asarray(blue)[0, -1]) == (0, 0, 255)
    assert main([str(src), "-m", model, "-bgc", "0", "0", "255", "64", "-o", str(tmp_path / "t.png")]) == 0
    assert tuple(np.asarray(read_png(tmp_path / "t.png"))[0, -1]) == (0, 0, 255, 64)
    res = run_cli("i", "-m", model, str(src))  # no OUTPUT, stdout redirected: the PNG goes there, as rembg's
    assert res.returncode == 0 and read_png(io.BytesIO(res.stdout)).mode == "RGBA", res.stderr
    assert not (tmp_path / "a.nobg.png").exists()  # `i a.png > b.png` left b.png empty and wrote a.nobg.png
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["i", "-m", model, str(src)]) == 0  # no OUTPUT, on a terminal: beside the input, as the plain form
    monkeypatch.undo()
    assert read_png(tmp_path / "a.nobg.png").mode == "RGBA"
    assert main([str(src), "-m", model, "-om"]) == 0  # the plain form too (-om was read as `--out m`)
    # a mask is <stem>.mask.png, as the service names it: the cut-out beside it stays
    assert read_png(tmp_path / "a.mask.png").mode == "L" and not (tmp_path / "m").exists()
    assert read_png(tmp_path / "a.nobg.png").mode == "RGBA"

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("x.png", "y.png"):
        save_png(folder / name)
    assert main(["p", "-m", model, "-q", str(folder), str(tmp_path / "out" / "new")]) == 0
    assert sorted(os.listdir(tmp_path / "out" / "new")) == ["x.nobg.png", "y.nobg.png"]
    assert sorted(os.listdir(folder)) == ["x.png", "y.png"]
    capsys.readouterr()

    # each form refuses the other's input in one line, exit 2, writing nothing
    before = sorted(os.listdir(tmp_path))
    assert main(["i", "-m", model, str(folder), str(tmp_path / "z.png")]) == 2
    assert "use `p INPUT_DIR OUTPUT_DIR`" in capsys.readouterr().err
    assert main(["p", "-m", model, str(src), str(tmp_path / "zdir")]) == 2
    assert "use `i INPUT OUTPUT`" in capsys.readouterr().err
    assert main(["p", "-m", model, str(folder), str(src)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before


def test_rembg_output_names_and_misplaced_commands(model, tmp_path, capsys, monkeypatch):
    """Found by a rembg user's audit: `-q i in.jpg out.png` read i and out.png as inputs and wrote in.nobg.png;
    `i a.png new` made a folder `new`; `i a.png b.jpg` blamed a `--out` never typed; `i a.png ""` wrote into the
    current folder; a bad -bgc printed argparse's 7-line usage before its error."""
    monkeypatch.chdir(tmp_path)
    src = save_png(tmp_path / "a.png")
    before = sorted(os.listdir(tmp_path))
    for argv in (["-q", "i", "-m", model, str(src), "out.png"], ["--threads", "1", "s", "--port", "8768"],
                 ["-m", model, "-om", "p", str(tmp_path), str(tmp_path / "pp")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        cmd = next(a for a in argv if a in ("i", "p", "s"))
        assert err == f"bgremover-predict: error: {cmd} is rembg's command: put it first (bgremover-predict {cmd} " \
                      "[options] ...)"
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    assert main([str(src), "-m", model, "-q", "--out", "p"]) == 0  # an option's value named p is no command
    assert os.listdir(tmp_path / "p") == ["a.nobg.png"]

    assert main(["i", "-m", model, "-q", str(src), "new"]) == 0  # rembg writes that very name
    assert (tmp_path / "new").is_file() and read_png(tmp_path / "new").mode == "RGBA"
    assert main(["i", "-m", model, str(src), "b.jpg"]) == 2
    assert "b.jpg: a cut-out with transparency is a PNG; a JPEG needs an opaque background" in \
        capsys.readouterr().err and not (tmp_path / "b.jpg").exists()
    assert main(["i", "-m", model, str(src), ""]) == 2 and not (tmp_path / "a.nobg.png").exists()
    assert "the output is empty" in capsys.readouterr().err
    res = run_cli("i", "-m", model, str(src), "c.png", "-bgc", "1", "2", "3")
    err = res.stderr.decode()
    assert res.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("bgremover-predict i: error:") and "(see --help)" in err
    assert main(["i", "-m", model, "--threads", "-1", str(src), "d.png"]) == 2
    assert "--threads must be >= 0 (0 = the default), got -1" in capsys.readouterr().err
    assert main(["i", "-m", str(tmp_path), str(src), "d.png"]) == 1  # said "model file not found" of a folder
    assert f"model {tmp_path} is a folder, not an ONNX file" in capsys.readouterr().err
    # said "model file not found" of a path that is there, and onnxruntime's "No graph was found in the protobuf"
    # of an empty file (a copy or download cut short)
    (tmp_path / "empty.onnx").write_bytes(b"")
    for there, said in (("/dev/null", "model /dev/null is not a regular file, not an ONNX file"),
                        (str(tmp_path / "empty.onnx"), f"model {tmp_path / 'empty.onnx'} is empty (0 bytes), not an "
                                                        "ONNX model: copy or export it again")):
        assert main(["i", "-m", there, str(src), "d.png"]) == 1 and not (tmp_path / "d.png").exists()
        assert error_lines(capsys.readouterr().err) == [f"bgremover-predict: error: {said}"]


def test_rembg_i_reads_stdin_and_s_is_the_server(model, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(halves(12, 20)).save(buf, format="PNG")
    res = run_cli("i", "-m", model, stdin=buf.getvalue())  # no INPUT, stdin not a terminal: stdin to stdout
    assert res.returncode == 0, res.stderr
    assert read_png(io.BytesIO(res.stdout)).size == (20, 12)
    res = run_cli("s", "--help")
    assert res.returncode == 0 and b"usage: bgremover-predict s" in res.stdout and b"--max-bytes" in res.stdout
    res = run_cli("s", "-m", model, "--port", "70000")
    assert res.returncode == 2 and res.stderr.decode().strip() == "bgremover-predict s: error: --port must be " \
        "within 0..65535, got 70000"


def test_output_over_an_input_is_refused(model, tmp_path, capsys):
    """`bgremover-predict same.png -o same.png` replaced the photo by its cut-out (exit 0), through a link too."""
    src = save_png(tmp_path / "same.png")
    original = src.read_bytes()
    (tmp_path / "link.png").symlink_to(src)
    for argv in ([str(src), "-o", str(src)], [str(tmp_path / "link.png"), "-o", str(src)],
                 [str(src), "-o", str(tmp_path / "link.png")], ["i", str(src), str(src)]):
        assert main([*argv, "-m", model]) == 2, argv
        err = capsys.readouterr().err
        assert "is an input image: its cut-out would replace it" in err and len(err.strip().splitlines()) == 1
    assert src.read_bytes() == original and sorted(os.listdir(tmp_path)) == ["link.png", "same.png"]


def test_an_image_name_as_out_for_several_inputs_is_refused(model, tmp_path, capsys):
    """`a.jpg b.png -o two.png` made a folder named two.png holding both cut-outs."""
    a, b = save_png(tmp_path / "a.png"), save_png(tmp_path / "b.png")
    assert main([str(a), str(b), "-m", model, "-o", str(tmp_path / "two.png")]) == 2
    assert "names one image, but several are written: name a folder" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]
    assert main([str(a), str(b), "-m", model, "-o", str(tmp_path / "two"), "-q"]) == 0  # a folder name is fine
    assert sorted(os.listdir(tmp_path / "two")) == ["a.nobg.png", "b.nobg.png"]


def test_options_between_the_positionals(model, tmp_path, capsys):
    """`i IMG -om OUT.png` failed with "unrecognized arguments: OUT.png" (exit 2) although rembg takes options
    anywhere, and only `i IMG OUT.png -om` worked; `p` and the plain form had the same limit."""
    src = save_png(tmp_path / "a.png")
    assert main(["i", str(src), "-om", str(tmp_path / "mask.png"), "-m", model]) == 0
    assert read_png(tmp_path / "mask.png").mode == "L"
    folder = tmp_path / "in"
    folder.mkdir()
    save_png(folder / "x.png")
    assert main(["p", str(folder), "-q", "-m", model, str(tmp_path / "out")]) == 0
    assert os.listdir(tmp_path / "out") == ["x.nobg.png"]
    b = save_png(tmp_path / "b.png")
    assert main([str(src), "-q", str(b), "-m", model, "-o", str(tmp_path / "two")]) == 0
    assert sorted(os.listdir(tmp_path / "two")) == ["a.nobg.png", "b.nobg.png"]
    buf = io.BytesIO()
    Image.fromarray(halves(12, 20)).save(buf, format="PNG")
    res = run_cli("i", "-", "-om", "-", "-m", model, stdin=buf.getvalue())  # stdin to stdout, option between
    assert res.returncode == 0, res.stderr
    assert read_png(io.BytesIO(res.stdout)).mode == "L"


def test_an_output_folder_that_cannot_be_made_or_written_is_one_line_up_front(model, tmp_path, monkeypatch, capsys):
    """--out into a read-only folder ran inference on every image, then failed each one blaming the input and
    naming a hidden temp file ("0 written, 0 skipped, 21 failed"); a missing folder below a read-only one gave
    "unexpected PermissionError". Now: one line naming the folder, exit 1, before the model runs."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("x.png", "y.png"):
        save_png(folder / name)
    src = save_png(tmp_path / "a.png")
    infer = []
    monkeypatch.setattr("bgremover.predict.BackgroundRemover.remove", lambda *a, **k: infer.append(a))
    (tmp_path / "file").write_text("a regular file, so no folder can be made below it\n")
    below = tmp_path / "file" / "sub"
    for argv in ([str(folder), "--out", str(below)], ["p", str(folder), str(below)], [str(src), "-o", str(below) + "/"],
                 ["i", str(src), str(below / "a.png")]):
        assert main([*argv, "-m", model]) == 1, argv
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [f"bgremover-predict: error: cannot create the output folder {below}: "
                                            "Not a directory"], argv
    # A folder that exists but takes no file: /proc refuses new files for everyone, root included (root passes
    # any os.access check, so the check must try a file; before, the failure came after inference, blamed on the
    # input and naming a hidden temp file).
    for argv in ([str(folder), "--out", "/proc"], ["i", str(src), "/proc/a.png"], [str(src), "-o", "/proc/a.png"]):
        assert main([*argv, "-m", model]) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("bgremover-predict: error: output folder /proc: cannot write in "
                                                   "/proc ("), (argv, err)
    assert infer == [] and sorted(os.listdir(folder)) == ["x.png", "y.png"]


def test_cutouts_keep_the_inputs_colour_profile(model, tmp_path):
    """A JPEG with an embedded ICC profile gave a cut-out PNG without one: its unchanged RGB values were then read
    as sRGB. Colour outputs keep the profile; a mask (L) needs none."""
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = tmp_path / "photo.jpg"
    Image.fromarray(halves(12, 20)).save(src, quality=95, icc_profile=icc)
    assert main([str(src), "-m", model, "-q"]) == 0
    assert read_png(tmp_path / "photo.nobg.png").info.get("icc_profile") == icc
    assert main(["i", str(src), str(tmp_path / "white.png"), "-bgc", "255", "255", "255", "255", "-m", model]) == 0
    assert read_png(tmp_path / "white.png").info.get("icc_profile") == icc
    assert main(["i", str(src), str(tmp_path / "mask.png"), "-om", "-m", model]) == 0
    assert "icc_profile" not in read_png(tmp_path / "mask.png").info


def test_an_opaque_output_may_be_a_jpeg(model, tmp_path, capsys):
    """`i photo.jpg out.jpg -bgc 255 255 255 255` (a product photo on white) was refused ("end the name in .png"),
    though such a cut-out has no transparency to lose; rembg writes PNG bytes under the .jpg name."""
    src = save_png(tmp_path / "a.png", 24, 32)
    assert main(["i", "-q", "-m", model, str(src), str(tmp_path / "w.jpg"), "-bgc", "255", "255", "255", "255"]) == 0
    white = Image.open(tmp_path / "w.jpg")
    assert white.format == "JPEG" and white.mode == "RGB" and white.size == (32, 24)
    on_png = Image.open(io.BytesIO(run_cli("i", "-m", model, str(src), "-", "-bgc", "255", "255", "255", "255").stdout))
    diff = np.abs(np.asarray(white, np.int16) - np.asarray(on_png.convert("RGB"), np.int16))
    assert diff.mean() < 4, diff.mean()  # the same composite, JPEG-compressed
    assert main([str(src), "-q", "-m", model, "--out", str(tmp_path / "m.jpeg"), "-om"]) == 0
    assert Image.open(tmp_path / "m.jpeg").format == "JPEG" and Image.open(tmp_path / "m.jpeg").mode == "L"
    assert main([str(src), "-q", "-m", model, "--out", str(tmp_path / "k.jpg"), "--bg-color", "#000000"]) == 0
    assert Image.open(tmp_path / "k.jpg").format == "JPEG"
    capsys.readouterr()
    # a half-transparent background, or a plain cut-out, keeps its transparency: a PNG, nothing written
    for argv in (["i", "-m", model, str(src), str(tmp_path / "h.jpg"), "-bgc", "255", "255", "255", "128"],
                 [str(src), "-m", model, "--out", str(tmp_path / "h.jpg")]):
        assert main(argv) == 2
        assert "h.jpg: a cut-out with transparency is a PNG" in capsys.readouterr().err
    assert main(["i", "-m", model, str(src), str(tmp_path / "h.webp"), "-bgc", "255", "255", "255", "255"]) == 2
    assert not list(tmp_path.glob("h.*"))


def test_a_mask_run_over_a_folder_of_cut_outs_writes_masks(model, tmp_path, capsys):
    """A user audit: `p in out` then `p in out -om` printed "0 written, 2 skipped" and left the cut-outs: masks and
    cut-outs had one name. Now <stem>.mask.png beside <stem>.nobg.png, and neither is read back as an input."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("x.png", "y.png"):
        save_png(folder / name)
    assert main(["p", "-m", model, "-q", str(folder), str(out)]) == 0
    assert main(["p", "-m", model, str(folder), str(out), "-om"]) == 0
    assert "2 written, 0 skipped" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["x.mask.png", "x.nobg.png", "y.mask.png", "y.nobg.png"]
    assert {read_png(out / n).mode for n in ("x.mask.png", "y.mask.png")} == {"L"}
    assert main(["p", "-m", model, "-q", str(out), str(tmp_path / "again")]) == 1  # outputs are not inputs
    assert "contains no images" in capsys.readouterr().err


def test_folders_are_read_with_their_sub_folders_mirrored(model, tmp_path, capsys):
    """rembg's `p` reads sub-folders; here `p photos out` said "contains no images" for photos/2024/a.jpg and
    skipped a sub-folder beside loose files without a word. Now they are read, and --out mirrors them (two
    a.png in two sub-folders do not clash); hidden folders stay out."""
    photos = tmp_path / "photos"
    for sub in ("2024", "2025/summer", ".thumbs"):
        (photos / sub).mkdir(parents=True)
    save_png(photos / "top.png")
    save_png(photos / "2024" / "a.png")
    save_png(photos / "2025" / "summer" / "a.png")
    save_png(photos / ".thumbs" / "t.png")
    out = tmp_path / "out"
    assert main(["p", "-m", model, "-q", str(photos), str(out)]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == ["2024/a.nobg.png", "2025/summer/a.nobg.png", "top.nobg.png"]
    only_sub = tmp_path / "only_sub"
    (only_sub / "day1").mkdir(parents=True)
    save_png(only_sub / "day1" / "b.png")
    assert main(["-m", model, "-q", str(only_sub)]) == 0  # beside each input, as the plain form writes
    assert (only_sub / "day1" / "b.nobg.png").is_file()


def test_one_sub_folder_that_cannot_be_made_fails_only_its_images(model, tmp_path, capsys):
    """`p photos out` where out/2024 is a file (or any one mirrored sub-folder cannot be made): the whole run
    stopped up front and wrote none of the other folders' photos. As in rembg's `p`, those photos fail, named,
    exit 1, and the rest are written; a rerun once the clash is gone does only the missing ones."""
    photos = tmp_path / "photos"
    for sub in ("2024", "2025"):
        (photos / sub).mkdir(parents=True)
        save_png(photos / sub / "a.png")
    save_png(photos / "top.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "2024").write_text("a file where the sub-folder would go\n")
    assert main(["p", "-m", model, "-q", str(photos), str(out)]) == 1
    assert error_lines(capsys.readouterr().err) == [
        f"bgremover-predict: error: {photos / '2024' / 'a.png'}: not cut out: cannot create the output folder "
        f"{out / '2024'}: File exists"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["2025/a.nobg.png", "top.nobg.png"]
    (out / "2024").unlink()
    assert main(["p", "-m", model, str(photos), str(out)]) == 0
    assert "1 written, 2 skipped" in capsys.readouterr().err
    assert (out / "2024" / "a.nobg.png").is_file()


def test_a_rembg_model_name_is_said_to_be_no_model_here(tmp_path, monkeypatch, capsys):
    """`bgremover-predict i -m u2net in.jpg out.png`, a rembg command line as typed from habit, said only "model
    file not found: u2net"; a rembg user read that as a download that failed. The line now says what -m takes."""
    src = save_png(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    for name in ("u2net", "isnet-general-use"):
        assert main(["i", "-m", name, str(src), "o.png"]) == 1
        assert error_lines(capsys.readouterr().err) == [
            f"bgremover-predict: error: model file not found: {name} (rembg's model names are no models here: give "
            "an exported .onnx file, or leave -m out for the shipped model)"]
    assert main(["i", "-m", "models/mine.onnx", str(src), "o.png"]) == 1  # a path: only "not found"
    assert error_lines(capsys.readouterr().err) == ["bgremover-predict: error: model file not found: models/mine.onnx"]
    assert not (tmp_path / "o.png").exists()


def test_an_output_ending_in_a_slash_is_a_folder(model, tmp_path, capsys):
    """`i a.png new/` wrote a PNG file named `new`; `-o results.v2/` was refused as a file without .png."""
    src = save_png(tmp_path / "a.png")
    assert main(["i", "-m", model, "-q", str(src), str(tmp_path / "new") + "/"]) == 0
    assert (tmp_path / "new").is_dir() and os.listdir(tmp_path / "new") == ["a.nobg.png"]
    assert main([str(src), "-m", model, "-q", "-o", str(tmp_path / "results.v2") + "/"]) == 0
    assert os.listdir(tmp_path / "results.v2") == ["a.nobg.png"]


def test_stdin_to_a_terminal_is_refused(model, tmp_path, capsys, monkeypatch):
    """`cat a.jpg | bgremover-predict i` with stdout on a terminal dumped the PNG's bytes onto it, exit 0."""
    src = save_png(tmp_path / "a.png")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(src.read_bytes())))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["i", "-m", model]) == 2
    assert "stdout is a terminal: redirect it (> out.png) or name the output file" in capsys.readouterr().err
    assert main(["-", "-m", model]) == 2


def test_a_missing_p_folder_says_so(model, tmp_path, capsys):
    """`p /nonexist out` said "p takes a folder, /nonexist is not one: use `i INPUT OUTPUT`"; `p dir new.png`
    blamed an --out never typed."""
    assert main(["p", "-m", model, str(tmp_path / "nonexist"), str(tmp_path / "out")]) == 2
    assert f"p INPUT_DIR {tmp_path / 'nonexist'}: no such folder" in capsys.readouterr().err
    folder = tmp_path / "in"
    folder.mkdir()
    save_png(folder / "x.png")
    save_png(folder / "y.png")
    assert main(["p", "-m", model, str(folder), str(tmp_path / "new.png")]) == 2
    assert "OUTPUT_DIR " in capsys.readouterr().err


def test_writing_through_links_devices_and_keeping_permissions(model, tmp_path, capsys):
    """A user audit: `i a.jpg /dev/null` replaced the device with a regular PNG file (as root), an output that is a
    link became a file (its target untouched), and a replaced 0600 output came back 0644."""
    src = save_png(tmp_path / "a.png")
    target = tmp_path / "real.png"
    target.write_bytes(b"old")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    assert main(["i", "-m", model, "-q", str(src), str(link)]) == 0
    assert link.is_symlink() and read_png(target).mode == "RGBA"
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    import threading

    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)  # never hangs the run
    reader.start()
    assert main(["i", "-m", model, "-q", str(src), str(fifo)]) == 0
    reader.join(10)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and read_png(io.BytesIO(got[0])).mode == "RGBA"
    private = tmp_path / "private.png"
    private.write_bytes(b"old")
    private.chmod(0o600)
    assert main(["i", "-m", model, "-q", str(src), str(private)]) == 0
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and read_png(private).mode == "RGBA"


def test_devices_and_pipes_as_outputs_in_both_forms(model, tmp_path, capsys):
    """A review: `i a.jpg /dev/stdout | wc -c` wrote nothing (the link resolved to "pipe:[…]", then a temp file
    there), `/dev/fd/1` was refused as "cannot write in /dev/fd" (the folder probe), and the plain form refused
    `--out <a FIFO>` as "exists and is not a folder" where the rembg form took it."""
    import threading

    src = save_png(tmp_path / "a.png")
    for argv in (lambda out: ["i", "-m", model, "-q", str(src), out], lambda out: [str(src), "-m", model, "-q", "-o", out]):
        r, w = os.pipe()  # a small PNG fits the pipe's buffer: read once the writer is closed
        assert main(argv(f"/dev/fd/{w}")) == 0, capsys.readouterr().err
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            assert read_png(io.BytesIO(pipe.read())).mode == "RGBA"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert main([str(src), "-m", model, "-q", "--out", str(fifo)]) == 0, capsys.readouterr().err
    reader.join(10)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and read_png(io.BytesIO(got[0])).mode == "RGBA"
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "nowhere" / "x.png")
    assert main(["i", "-m", model, "-q", str(src), str(dangling)]) == 1
    err = capsys.readouterr().err
    assert f"{dangling} links to " in err and ".tmp" not in err  # (the line is cut at 300 characters)


def test_sub_folders_are_mirrored_from_the_copy_kept(model, tmp_path, capsys, monkeypatch):
    """A review: a link in a sub-folder to a top-level photo put its cut-out in out/sub/; `in in/sub` put
    in/sub/b.png's in out/; and a read-only tree without --out flattened into the current folder, two p.jpg in
    two sub-folders refused as a clash of names nobody chose."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    save_png(src / "a.png")
    save_png(src / "sub" / "b.png")
    (src / "sub" / "link.png").symlink_to(src / "a.png")
    assert main([str(src), "-m", model, "-q", "-o", str(tmp_path / "out")]) == 0
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png")) == [
        "a.nobg.png", "sub/b.nobg.png"]
    assert main([str(src), str(src / "sub"), "-m", model, "-q", "-o", str(tmp_path / "out2")]) == 0
    assert sorted(str(p.relative_to(tmp_path / "out2")) for p in (tmp_path / "out2").rglob("*.png")) == [
        "a.nobg.png", "sub/b.nobg.png"]
    ro, work = tmp_path / "ro", tmp_path / "work"
    for sub in ("x", "y"):
        (ro / sub).mkdir(parents=True)
        save_png(ro / sub / "p.png")
        (ro / sub).chmod(0o555)
    ro.chmod(0o555)
    work.mkdir()
    monkeypatch.chdir(work)
    try:
        assert main([str(ro), "-m", model, "-q"]) == 0, capsys.readouterr().err
    finally:
        for d in (ro, ro / "x", ro / "y"):
            d.chmod(0o755)
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*.png")) == ["x/p.nobg.png", "y/p.nobg.png"]


def test_a_camera_jpeg_with_a_second_picture_is_no_animation(tmp_path):
    """Pillow opens a JPEG carrying MPF data (a gain map, a depth map) as a 2-frame MPO: it was warned about as
    "2 frames, only the first is cut out" (a review)."""
    import warnings

    from bgremover.remover import open_image

    a, b = (Image.fromarray(halves(12, 20)) for _ in range(2))
    a.save(tmp_path / "mpo.jpg", format="MPO", save_all=True, append_images=[b])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_image(tmp_path / "mpo.jpg").size == (20, 12)


class _ShortWrites(io.RawIOBase):
    """stdout as a raw file (PYTHONUNBUFFERED=1) on a disk with `room` bytes left: each write takes at most
    `chunk` bytes and returns the count, as FileIO does; once full, writing raises ENOSPC, as the disk does."""

    def __init__(self, room: int, chunk: int) -> None:
        self.room, self.chunk, self.got = room, chunk, bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if not self.room:
            raise OSError(28, "No space left on device")
        n = min(len(b), self.room, self.chunk)
        self.got += bytes(b[:n])
        self.room -= n
        return n


def test_a_short_write_to_stdout_is_finished_or_a_failure(model, tmp_path, capsys, monkeypatch):
    """`i a.jpg > cut.png` under PYTHONUNBUFFERED=1 with a full disk: stdout's raw write took 36 KiB of the PNG and
    returned that count, the rest was dropped, and the exit status was 0 beside a truncated cut-out."""
    src = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(src)
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(_ShortWrites(10**9, 1000)))  # room, 1000 bytes a write
    assert main(["i", "-m", model, str(src), "-"]) == 0
    whole = bytes(sys.stdout.buffer.got)
    assert read_png(io.BytesIO(whole)).size == (64, 48) and len(whole) > 3000
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(_ShortWrites(3000, 10**9)))  # 3000 bytes left on the disk
    assert main(["i", "-m", model, str(src), "-"]) == 1
    assert bytes(sys.stdout.buffer.got) == whole[:3000]
    assert error_lines(capsys.readouterr().err) == [f"bgremover-predict: error: {src}: cannot write <stdout>: No space "
                                                    "left on device"]


def test_a_full_disk_names_the_output_it_could_not_write(model, tmp_path, capsys, monkeypatch):
    """A folder run onto a full disk said "in/x.png: [Errno 28] No space left on device" for each photo, naming the
    input (on another, roomy disk) and not the file or folder that could not be written. Each failure now names the
    output; nothing half-written stays behind."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("x.png", "y.png"):
        save_png(folder / name)
    out = tmp_path / "out"

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    assert main([str(folder), "-o", str(out), "-m", model, "-q"]) == 1
    assert error_lines(capsys.readouterr().err) == [
        f"bgremover-predict: error: {folder / n}.png: cannot write {out / n}.nobg.png: No space left on device"
        for n in ("x", "y")]
    assert list(out.iterdir()) == []


def test_sigterm_while_a_cutout_is_written_leaves_no_temp_file(model, tmp_path):
    """`kill` of a folder run (a job scheduler's timeout) ended it outright: the cut-out being written stayed as a
    hidden .x.nobg.png.*.tmp in the output folder. It now unwinds as Ctrl-C does, exit 143."""
    import signal

    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        save_png(tmp_path / "in" / name)
    out = tmp_path / "out"
    code = ("import os, signal, sys, time\n"
            "from bgremover import files, predict\n"
            "def write(data, path):  # half of the PNG is in the temp file when the SIGTERM comes\n"
            "    with files.replacing(path) as tmp:\n"
            "        tmp.write_bytes(data[: len(data) // 2])\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(30)\n"
            "predict.write_atomic = write\n"
            f"sys.exit(predict.main(['p', '-m', {model!r}, '-q', {str(tmp_path / 'in')!r}, {str(out)!r}]))\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and proc.stderr == "bgremover-predict: interrupted by SIGTERM\n", proc.stderr
    assert list(out.iterdir()) == []


def test_an_output_over_the_bg_image_is_refused(model, tmp_path, capsys):
    """`i a.png bg.png --bg-image bg.png` (or a folder run's -o onto it) replaced the background photo by the
    composite, exit 0: the --bg-image is an input too."""
    src, bg = save_png(tmp_path / "a.png"), save_png(tmp_path / "bg.png", 30, 40)
    original = bg.read_bytes()
    for argv in (["i", str(src), str(bg)], [str(src), "-o", str(bg)]):
        assert main([*argv, "--bg-image", str(bg), "-m", model]) == 2, argv
        assert capsys.readouterr().err == (f"bgremover-predict: error: {bg} is an input image: its cut-out would "
                                           "replace it; choose another output\n")
    assert bg.read_bytes() == original and sorted(os.listdir(tmp_path)) == ["a.png", "bg.png"]


def test_jfif_and_avif_photos_in_a_folder_are_cut_out(model, tmp_path, capsys):
    """A folder of browser downloads (.jfif) and phone photos (.avif) was "2 written" of 4 photos: those two kinds,
    which Pillow reads, were passed over without a word."""
    from PIL import features

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.jpg", "c.JFIF", *((["d.avif"]) if features.check("avif") else [])):
        Image.fromarray(halves(12, 20)).save(folder / name, format="AVIF" if name.endswith("avif") else None)
    assert main(["p", "-m", model, "-q", str(folder), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(Path(n).stem + ".nobg.png" for n in os.listdir(folder))
    assert "c.nobg.png" in written


def test_a_closed_stdin_or_stdout_is_named_not_a_crash(model, tmp_path):
    """From a cron job or a daemon with stdout closed (`>&-`), `i a.png` said "unexpected AttributeError: 'NoneType'
    object has no attribute 'isatty'" and wrote nothing; so did `i` with stdin closed."""
    src = save_png(tmp_path / "a.png")

    def run(*args: str, close: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bgremover.predict", *args], stdin=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path,
                              preexec_fn=lambda: os.close(close))  # fmt: skip

    res = run("i", "-m", model, str(src), close=1)  # no redirection to write to: beside the input, as on a terminal
    assert res.returncode == 0 and read_png(tmp_path / "a.nobg.png").mode == "RGBA", res.stderr
    res = run("i", "-m", model, str(src), "-", close=1)
    assert (res.returncode, res.stderr) == (2, "bgremover-predict: error: stdout is closed: name the output file\n")
    res = run("i", "-m", model, close=0)
    assert (res.returncode, res.stderr) == (2, "bgremover-predict: error: i needs an INPUT image (or - with an image "
                                               "on stdin)\n")


def test_an_image_from_a_pipe_by_name_is_read(model, tmp_path, capsys):
    """`i <(curl -s URL) out.png` (bash hands over /dev/fd/63, a pipe) and a named FIFO said "empty file": a pipe
    has no size. It is read once, whole; a pipe that brings nothing says so."""
    import threading

    src = save_png(tmp_path / "a.png")
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    def feed(data: bytes) -> None:  # opening blocks until the reader opens the other end
        with fifo.open("wb") as fh:
            fh.write(data)

    for data, code in ((src.read_bytes(), 0), (b"", 1)):
        writer = threading.Thread(target=feed, args=(data,), daemon=True)  # daemon: a reader that never opens
        writer.start()
        assert main(["i", "-m", model, str(fifo), str(tmp_path / "cut.png")]) == code
        writer.join(10)
        err = capsys.readouterr().err
        if code == 0:
            assert read_png(tmp_path / "cut.png").size == (20, 12), err
        else:
            assert error_lines(err) == [f"bgremover-predict: error: {fifo}: no data"]


def test_a_bg_image_with_transparency_gives_an_rgba_composite(model, tmp_path, capsys):
    """`--bg-image bg.png` whose top half is red at alpha 0 wrote an RGB file, red there: the composite keeps the
    background's transparency (RGBA PNG); a .jpg output, which cannot hold it, is refused in one line."""
    src, bg = save_png(tmp_path / "a.png"), tmp_path / "bg.png"  # 12x20: red left half (kept), blue right
    back = Image.new("RGBA", (100, 100), (0, 255, 0, 255))
    back.paste((255, 0, 0, 0), (0, 0, 100, 50))
    back.save(bg)  # scaled to cover 20x12: rows 0-5 lie in its hidden half, rows 7-11 in its green one
    assert main(["i", "-m", model, str(src), str(tmp_path / "cut.png"), "--bg-image", str(bg)]) == 0
    assert main(["i", "-m", model, str(src), str(tmp_path / "plain.png")]) == 0
    cut, plain = read_png(tmp_path / "cut.png"), np.asarray(read_png(tmp_path / "plain.png"))
    arr = np.asarray(cut)
    assert cut.mode == "RGBA" and plain[:, 12:, 3].max() == 0  # the right side: background alone
    assert (arr[:5, 12:] == 0).all()  # the hidden red stays hidden
    assert (arr[8:, 12:] == (0, 255, 0, 255)).all() and (arr[:, :8] == plain[:, :8]).all()
    capsys.readouterr()
    assert main(["i", "-m", model, str(src), str(tmp_path / "cut.jpg"), "--bg-image", str(bg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "transparent areas" in err and not (tmp_path / "cut.jpg").exists()


def test_a_bg_image_from_a_pipe_is_read(model, tmp_path, capsys):
    """`--bg-image <(curl -s URL)` said "no such file" of the pipe bash hands over; a folder was "no such file" too."""
    import threading

    src, bg = save_png(tmp_path / "a.png"), tmp_path / "bg.png"
    Image.new("RGB", (40, 24), (0, 0, 255)).save(bg)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with fifo.open("wb") as fh:
            fh.write(bg.read_bytes())

    threading.Thread(target=feed, daemon=True).start()
    assert main(["i", "-m", model, str(src), str(tmp_path / "cut.png"), "--bg-image", str(fifo)]) == 0
    by_file = main(["i", "-m", model, str(src), str(tmp_path / "ref.png"), "--bg-image", str(bg)])
    assert by_file == 0 and np.array_equal(np.asarray(read_png(tmp_path / "cut.png")), np.asarray(read_png(tmp_path / "ref.png")))
    capsys.readouterr()
    assert main(["i", "-m", model, str(src), str(tmp_path / "x.png"), "--bg-image", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"bgremover-predict: error: --bg-image {tmp_path}: is a folder\n"


def test_help_names_info_and_it_works_as_named(model, capsys):
    """README and `make model-info` name `bgremover-predict --info`, but `bgremover-predict --help` never did: a user
    could not find how to read a model's description from the command itself."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    helped = " ".join(capsys.readouterr().out.split())
    assert "`--info [-m MODEL]` prints what the model segments, its test score and where it came from" in helped
    assert main(["--info", "-m", model]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"model: {model} (") and any(line.startswith("classes (") for line in out)
    with pytest.raises(SystemExit):
        main(["i", "--help"])  # rembg's forms take no --info: their help does not offer it
    assert "--info" not in capsys.readouterr().out


def test_a_pytorch_checkpoint_as_model_says_export_it_first(tmp_path, capsys):
    """models/ holds the shipped weights (bgremover-camvid.pt) beside the .onnx: `-m models/bgremover-camvid.pt` (or
    a run's .ckpt) to --info or a cut-out said "INVALID_PROTOBUF : ... Protobuf parsing failed", not what to do."""
    import torch

    weights = tmp_path / "weights.pt"
    torch.save({"state_dict": {"net.w": torch.zeros(2)}}, weights)
    photo = save_png(tmp_path / "photo.png")
    for argv in (["--info", "-m", str(weights)], [str(photo), "-m", str(weights)]):
        assert main(argv) == 1
        assert capsys.readouterr().err.strip() == (f"bgremover-predict: error: model {weights} is a PyTorch "
                                                   f"checkpoint, not an ONNX model: export it first (make export "
                                                   f"CKPT={weights})")
    assert not (tmp_path / "photo.nobg.png").exists()
    (tmp_path / "notes.onnx").write_text("not a model")  # any other file: onnxruntime's own reason, one line
    assert main(["--info", "-m", str(tmp_path / "notes.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"bgremover-predict: error: cannot load ONNX model {tmp_path / 'notes.onnx'}: ")
    assert err.count("\n") == 1


def test_an_image_given_as_the_model_is_named_as_one(tmp_path, capsys):
    """`bgremover-predict -m photo.jpg` (the image where the model goes, or `make model-info MODEL=photo.jpg`) said
    onnxruntime's "INVALID_PROTOBUF : ... Protobuf parsing failed", which says nothing of the mix-up."""
    photo = save_png(tmp_path / "photo.png")
    for argv in (["--info", "-m", str(photo)], [str(photo), "-m", str(photo)]):
        assert main(argv) == 1
        assert capsys.readouterr().err.strip() == (f"bgremover-predict: error: model {photo} is an image (PNG), not "
                                                   "an ONNX model: -m/--model names the model; give the image as an "
                                                   "input")
    assert not (tmp_path / "photo.nobg.png").exists()


def test_every_option_of_the_predictor_and_the_service_is_in_the_readme():
    """The README's option table of bgremover-predict left out `--quiet` (-q), which `--help` lists: each option of
    the two commands is named in its README section (by any of its spellings, rembg's included), and each option
    the predictor's table names is one the command takes."""
    import re

    from bgremover import predict, serve

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sections = {title: body for title, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", readme, re.M | re.S)}
    flags = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")
    for parser, section in ((predict._parser(), "Export and the background remover"),
                            (serve._parser(), "Cut-outs as a service")):
        named = set(flags.findall(sections[section]))
        unnamed = [a.option_strings for a in parser._actions
                   if a.option_strings and "--help" not in a.option_strings and not named & set(a.option_strings)]
        assert unnamed == [], (section, unnamed)
    table = re.search(r"^\| option \| meaning \|\n(?:^\|.*\n)+", sections["Export and the background remover"], re.M)
    column = "\n".join(row.split(" | ")[0] for row in table.group(0).splitlines()[2:])
    takes = {s for a in predict._parser()._actions for s in a.option_strings}
    assert set(flags.findall(column)) - takes == set()
