"""`pip install .` (not editable) into a fresh environment: the predictor finds the shipped model and the
training entry points find their configs, from any working directory."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

EXAMPLE = REPO / "examples" / "0001TP_009180.jpg"


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> Path:
    """A new venv with the wheel of this checkout installed (no editable link). Its dependencies come from the
    project's venv through a .pth line (so no download); bgremover itself only from the wheel."""
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, timeout=300)
    env = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, capture_output=True, timeout=300)
    py = env / "bin" / "python"
    (wheel,) = wheels.glob("bgremover-*.whl")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return env


def _run(env: Path, *args: str, cwd: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PROJECT_ROOT", "BGREMOVER_MODEL", "PYTHONPATH")}
    return subprocess.run([str(env / "bin" / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**clean, **(extra_env or {})})


@pytest.mark.slow
def test_installed_predict_finds_the_shipped_model(fresh_env, tmp_path):
    where = _run(fresh_env, "python", "-c", "import bgremover.remover as r; print(r.__file__, r.DEFAULT_MODEL)",
                 cwd=tmp_path).stdout.split()
    assert str(REPO) not in where[0] and where[1].startswith(str(fresh_env))  # the wheel, not the checkout
    proc = _run(fresh_env, "bgremover-predict", str(EXAMPLE), "--out", str(tmp_path / "cut.png"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cut.png").stat().st_size > 10_000


@pytest.mark.slow
def test_installed_predict_without_a_model_says_where_to_put_one(fresh_env, tmp_path):
    models = fresh_env / "share" / "bgremover" / "models"
    hidden = models.with_name("models.hidden")
    models.rename(hidden)
    try:
        proc = _run(fresh_env, "bgremover-predict", str(EXAMPLE), "--out", str(tmp_path / "x.png"), cwd=tmp_path)
    finally:
        hidden.rename(models)
    errors = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(errors) == 1
    assert str(models / "bgremover-camvid.onnx") in errors[0] and "--model" in errors[0]


@pytest.mark.slow
def test_installed_train_finds_its_configs_from_any_directory(fresh_env, tmp_path):
    proc = _run(fresh_env, "bgremover-train", "--cfg", "job", "experiment=tiramisu103_camvid", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "experiment_name: tiramisu103_camvid" in proc.stdout and "FCDenseNet" in proc.stdout
    installed = sorted(p.relative_to(fresh_env / "share" / "bgremover" / "conf")
                       for p in (fresh_env / "share" / "bgremover" / "conf").rglob("*.yaml"))
    in_checkout = sorted([p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml")
                          if "experiment" not in p.parts]
                         + [Path("experiment") / p.name for p in (REPO / "experiments").glob("*.yaml")])
    assert installed == in_checkout  # pyproject's data-files list every config folder
    # the remover recipe's fine-tuning start point resolves to the installed copy of the shipped weights
    proc = _run(fresh_env, "bgremover-train", "--cfg", "job", "--resolve", "experiment=remover", "data.root=x",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"ckpt_init: {fresh_env / 'share' / 'bgremover' / 'models' / 'bgremover-camvid.pt'}" in proc.stdout


@pytest.mark.skipif(not __import__("shutil").which("cc"), reason="no C compiler: the kernels cannot be built")
def test_installed_package_builds_its_cpu_kernels(fresh_env, tmp_path):
    """The wheel carries cpu_kernels.c (package data): the installed dense block builds and loads it."""
    code = ("import warnings; warnings.simplefilter('error'); from bgremover.nets import cpu_kernels as k; "
            "print(k.SOURCE.is_file(), k.library() is not None)")
    proc = _run(fresh_env, "python", "-c", code, cwd=tmp_path, extra_env={"BGREMOVER_CACHE": str(tmp_path / "bgremover")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]
    assert list((tmp_path / "bgremover").glob("cpu_kernels-*.so"))


def test_make_reinstalls_only_when_pyproject_changes(tmp_path):
    """The install stamp is keyed on pyproject.toml's contents: a fresh clone's (or a touched) pyproject.toml is
    newer than the stamp without changing, and the old mtime rule reinstalled then (`make predict` needing a
    package index, and a shared .venv's editable install repointed at the clone). `make -n` shows the plan."""
    import shutil

    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(sys.executable)

    def plan() -> str:
        return subprocess.run(["make", "-n", "install"], cwd=tmp_path, capture_output=True, text=True,
                              check=True).stdout

    assert "pip install" in plan()  # no stamp yet: a fresh .venv gets the package
    cksum = subprocess.run(["cksum", "pyproject.toml"], cwd=tmp_path, capture_output=True, text=True,
                           check=True).stdout.split()[0]
    stamp = tmp_path / ".venv" / f".installed-{cksum}"
    stamp.touch()
    later = stamp.stat().st_mtime + 10
    os.utime(tmp_path / "pyproject.toml", (later, later))  # newer than the stamp, same contents
    assert "pip install" not in plan()
    with (tmp_path / "pyproject.toml").open("a") as f:
        f.write("\n# a changed dependency list\n")
    assert "pip install" in plan()  # changed contents: reinstall


def test_every_make_target_the_docs_name_exists():
    """The README's units paragraph named `make quantize`, which the Makefile did not have ("No rule to make target
    'quantize'"); each `make X` the READMEs show is a target, and `make -n quantize` runs the quantizer."""
    import re

    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-zA-Z_-]+):", makefile, re.M))
    for doc in (REPO / "README.md", REPO / "models" / "README.md"):
        text = doc.read_text()
        named = set(re.findall(r"`make\s+([a-z][a-z-]*)", text)) | set(re.findall(r"^make ([a-z][a-z-]*)", text, re.M))
        assert named and named <= targets, (doc.name, sorted(named - targets))
    plan = subprocess.run(["make", "-n", "quantize", "MODEL=m.onnx"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    assert "-m bgremover.quantize --model \"m.onnx\"" in plan


def test_make_predict_to_stdout_writes_only_the_png(tmp_path):
    """`make predict IMG=a.jpg OUT=- > cut.png` put make's echo of the command (".venv/bin/bgremover-predict
    "a.jpg" --out "-"") in front of the PNG: a broken file, exit 0. Any other OUT still shows the command."""
    import shutil

    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    cksum = subprocess.run(["cksum", "pyproject.toml"], cwd=tmp_path, capture_output=True, text=True,
                           check=True).stdout.split()[0]
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / f".installed-{cksum}").touch()  # installed: make runs the predictor straight away
    predictor = tmp_path / ".venv" / "bin" / "bgremover-predict"
    predictor.write_text("#!/bin/sh\nprintf '\\211PNG-bytes'\n")  # stands in for the cut-out it writes
    predictor.chmod(0o755)

    # as a person types it: under `make test` the inherited MAKELEVEL made this make print its own
    # "make[1]: Entering directory" lines to stdout (the Makefile's comment says what to do there)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}

    def make(*args: str) -> bytes:
        return subprocess.run(["make", "predict", "IMG=a.jpg", *args], cwd=tmp_path, capture_output=True,
                              check=True, env=env).stdout

    assert make("OUT=-") == b"\x89PNG-bytes"
    assert make("OUT=cut.png").startswith(b'.venv/bin/bgremover-predict "a.jpg"  --out "cut.png"')


def test_a_checkout_with_edited_recipes_is_recorded_dirty(tmp_path):
    """source_commit said `-dirty` only when src/bgremover differed from its commit: a run of an edited
    experiments/remover.yaml (or conf/) was recorded, in summary.json and its exported model, as that commit's clean
    recipe. The checkout's configs count now, as the code does."""
    import shutil

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    shutil.copytree(REPO / "src" / "bgremover", tmp_path / "src" / "bgremover",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("conf/train.yaml", "experiments/remover.yaml"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "a checkout"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()

    def commit() -> str:
        said = subprocess.run([sys.executable, "-c", "from bgremover import utils; print(utils.source_commit())"],
                              env={**os.environ, "PYTHONPATH": str(tmp_path / "src")}, capture_output=True,
                              text=True, timeout=60)
        assert said.returncode == 0, said.stderr
        return said.stdout.strip()

    assert commit() == head
    for name in ("experiments/remover.yaml", "conf/train.yaml", "src/bgremover/train.py"):
        original = (tmp_path / name).read_text()
        (tmp_path / name).write_text(original + "# edited\n")
        assert commit() == f"{head}-dirty", name
        (tmp_path / name).write_text(original)
    assert commit() == head


def test_an_installed_package_inside_a_users_checkout_records_no_commit(tmp_path):
    """bgremover installed (not editable) into a project's git-ignored .venv sits inside that project's checkout: a
    run recorded the project's HEAD as the code that trained it, and its exported model said so. Only this package's
    own checkout names a commit; the project's checkout names none."""
    import shutil

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / ".gitignore").write_text(".venv/\n")
    subprocess.run([*git, "add", ".gitignore"], check=True)
    subprocess.run([*git, "commit", "-qm", "the user's project"], check=True)
    site_dir = tmp_path / ".venv" / "lib" / "site-packages"
    shutil.copytree(REPO / "src" / "bgremover", site_dir / "bgremover", ignore=shutil.ignore_patterns("__pycache__"))
    said = subprocess.run([sys.executable, "-c", "from bgremover import utils; print(utils.source_commit())"],
                          env={**os.environ, "PYTHONPATH": str(site_dir)}, capture_output=True, text=True, timeout=60)
    assert said.returncode == 0, said.stderr
    assert said.stdout.strip() == "None"
    own = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if own.returncode == 0:  # this checkout's own code still names its commit
        from bgremover import utils

        assert utils.source_commit().split("-")[0] == own.stdout.strip()
