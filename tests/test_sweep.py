"""Hydra multirun sweeps end to end: every job its own summary and offline W&B run; a failing job is reported
and does not lose the others' results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from wandb_records import offline_run

TINY = [
    "data.num_workers=0", "data.batch_size=2", "data.eval_batch_size=1", "data.crop_size=[64,64]",
    "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
    "trainer.max_epochs=1", "extras.print_config=false", "measure_inference=false", "callbacks.progress_bar.refresh_rate=0",
]


def run_sweep(tmp_path: Path, camvid_root: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    proc = subprocess.run(
        [sys.executable, "-m", "bgremover.train", "-m", "~experiment", f"paths.log_dir={tmp_path}", f"data.root={camvid_root}",
         *TINY, *overrides],
        capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"},
    )
    root = tmp_path / "train" / "multiruns"
    sweeps = list(root.iterdir()) if root.is_dir() else []
    assert len(sweeps) == 1, proc.stderr[-2000:]
    return proc, sweeps[0]


@pytest.mark.slow
def test_two_nets_two_seeds_give_four_summaries_and_four_wandb_runs(camvid_root, tmp_path):
    proc, sweep = run_sweep(tmp_path, camvid_root, "model=tiramisu56,deeplabv3plus", "seed=1,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 4
    assert sorted((s["net"], s["seed"]) for s in summaries) == [
        ("deeplabv3plus_mobilenet_v2", 1), ("deeplabv3plus_mobilenet_v2", 2), ("tiramisu56", 1), ("tiramisu56", 2)]
    assert all(s["status"] == "ok" and 0 <= s["metrics"]["test/mIoU"] <= 1 for s in summaries)
    job_dirs = {Path(s["run_dir"]) for s in summaries}
    assert len(job_dirs) == 4  # no two jobs share a folder
    runs = [offline_run(d / "wandb") for d in sorted(job_dirs)]
    groups = {r["group"] for r in runs}
    assert len(groups) == 1 and sweep.name in groups.pop()  # one W&B group per sweep
    # each job its own name (jobs differing in an lr alone, or Optuna's trials, shared one): the job's number
    assert sorted(r["name"].rsplit("-", 1)[1] for r in runs) == [f"job{Path(d).name}" for d in sorted(job_dirs)]
    assert sorted(r["tags"][0] for r in runs) == sorted(s["net"] for s in summaries)
    report = json.loads((sweep / "sweep_summary.json").read_text())
    assert [j["status"] for j in report["jobs"]] == ["ok"] * 4
    from bgremover import compare  # make compare: one row per net, its two seeds averaged

    assert {s.net: len(s.runs) for s in compare.aggregate(compare.find_runs([sweep]))} == {
        "deeplabv3plus_mobilenet_v2": 2, "tiramisu56": 2}
    assert "4 of 4 jobs ok" in proc.stderr
    # readable output: one line per job (no progress bars, model summaries or config dumps), no tips
    job_lines = [line for line in proc.stderr.splitlines() if line.startswith("[job ")]
    assert len(job_lines) == 4 and all(": ok test/mIoU=" in line for line in job_lines)
    # 1 test frame (limit_test_batches=1): flagged as eval flags it; the line said "(1 frames)"; and the val frame
    # that picked the tested epoch (limit_val_batches=1), said in the line instead of two warnings beside it
    partial = "(1 of 233 frames, PARTIAL), best epoch by val (1 of 101 frames, PARTIAL)"
    assert all(line.split(" in ")[0].endswith(partial) for line in job_lines), job_lines
    assert "PARTIAL (trainer.limit_val_batches" not in proc.stderr and "not the test split's" not in proc.stderr
    # and so are the sweep's closing lines and its sweep_summary.json (they said `test/mIoU=0.0186`, nothing more)
    closing = [line for line in proc.stderr.splitlines() if line.startswith("  [ok] job ")]
    assert len(closing) == 4 and all(line.endswith(partial) for line in closing), closing
    assert all(j["test_split"] == {"frames": 1, "of": 233, "complete": False} for j in report["jobs"])
    assert all(j["val_split"]["complete"] is False and j["val_split"]["frames"] == 1 for j in report["jobs"])
    logged = (Path(summaries[0]["run_dir"]) / "train.log").read_text()  # the job's log file keeps the warnings
    assert "PARTIAL, not the test split's score" in logged and "PARTIAL (trainer.limit_val_batches" in logged
    printed = (proc.stdout + proc.stderr).splitlines()
    assert len(printed) < 40, "\n".join(printed[:80])
    assert not any("Tip" in line or "Epoch" in line for line in printed)
    # wandb's "The anonymous setting has no effect" (Lightning passes anonymous=None) was one more line per job
    assert not any("anonymous" in line for line in printed), printed
    # each job line names what sets the job apart, not every override the command line gave all four
    assert sorted(line.split(":")[0] for line in job_lines) == [
        "[job 0] model=tiramisu56 seed=1", "[job 1] model=tiramisu56 seed=2",
        "[job 2] model=deeplabv3plus seed=1", "[job 3] model=deeplabv3plus seed=2"], job_lines
    # no duplicate checkpoints: one epoch, so last.ckpt is a link to the best file
    for job in job_dirs:
        assert (job / "checkpoints" / "last.ckpt").is_symlink()


@pytest.mark.slow
def test_failing_job_is_reported_and_others_are_kept(camvid_root, tmp_path):
    proc, sweep = run_sweep(tmp_path, camvid_root, "model=deeplabv3plus",
                            "model.net.encoder_name=mobilenet_v2,no_such_encoder")
    assert proc.returncode == 1
    by_job = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert len(by_job) == 2
    ok = [s for s in by_job.values() if s["status"] == "ok"]
    failed = [s for s in by_job.values() if s["status"] == "failed"]
    assert len(ok) == 1 and ok[0]["net"] == "deeplabv3plus_mobilenet_v2"
    assert len(failed) == 1 and "no_such_encoder" in failed[0]["error"]
    assert "1 of 2 jobs ok" in proc.stderr and "1 sweep job failed (see above)" in proc.stderr
    failed_job = next(name for name, s in by_job.items() if s["status"] == "failed")
    assert f"[failed] job {failed_job} (model.net.encoder_name=no_such_encoder)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_sweep_refused_before_its_first_job_leaves_no_folder(camvid_root, tmp_path):
    """`model=tiramisu65,tiramisu56`: one error line, but the sweep's folder stayed with only multirun.yaml, and
    `make compare` (the newest sweep) then refused it: "the sweep there stopped before any job ran"."""
    proc = subprocess.run(
        [sys.executable, "-m", "bgremover.train", "-m", "experiment=compare_models", "model=tiramisu65,tiramisu56",
         f"data.root={camvid_root}", f"paths.log_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: In 'train': Could not find 'model/tiramisu65'; options: deeplabv3, deeplabv3plus, tiramisu103, "
        "tiramisu56, tiramisu67"), proc.stderr[-2000:]
    assert list((tmp_path / "train" / "multiruns").iterdir()) == []
    mine = tmp_path / "mine"  # a folder the user made: it stays, emptied, and the corrected retry may use it
    mine.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "bgremover.train", "-m", "experiment=compare_models", "model=tiramisu65,tiramisu56",
         f"data.root={camvid_root}", f"hydra.sweep.dir={mine}"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 2 and "Could not find 'model/tiramisu65'" in proc.stderr and list(mine.iterdir()) == []


def run_cpu_quick_optuna(camvid_root: Path, sweep: Path, *overrides: str) -> subprocess.CompletedProcess:
    """An Optuna sweep of the cpu_quick recipe into `sweep` (its overrides make it fail fast)."""
    return subprocess.run(
        [sys.executable, "-m", "bgremover.train", "-m", "experiment=cpu_quick", "hparams_search=optuna", *overrides,
         f"data.root={camvid_root}", "logger=csv", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"},
    )


def test_failing_optuna_trials_do_not_end_the_sweep_with_a_traceback(camvid_root, tmp_path):
    """A failed job returned nan, which the Optuna sweeper cannot record: the first failure ended the whole
    sweep with two chained tracebacks. Now each failure is a failed trial and the sweep goes on; when every
    trial failed, one error line says so."""
    proc = run_cpu_quick_optuna(camvid_root, tmp_path / "sweep", "hydra.sweeper.n_trials=2", "data.batch_size=0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len([line for line in proc.stderr.splitlines() if line.startswith("[job ")]) == 2  # both trials ran
    # nor the sweeper's two lines per failed trial, which read as the sweep stopping ("with max_failure_rate=0.0")
    assert "max_failure_rate" not in proc.stdout + proc.stderr and "float-castable" not in proc.stdout + proc.stderr
    assert proc.stderr.rstrip().endswith(
        "error: no Optuna trial finished: every job failed (the [job] lines above say why)")


def test_an_optuna_trial_that_would_never_validate_is_refused_before_training(camvid_root, tmp_path):
    """With validation off every trial trained and tested in full, its job line said "ok", and the study then
    ended with "no Optuna trial finished: every job failed"."""
    sweep = tmp_path / "sweep"
    proc = run_cpu_quick_optuna(camvid_root, sweep, "hydra.sweeper.n_trials=1", "trainer.limit_val_batches=0")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (job,) = [line for line in proc.stderr.splitlines() if line.startswith("[job ")]
    assert ": failed in " in job and "optimized_metric=val/mIoU_best (the Optuna objective) comes from validation, " \
        "and this run never validates (trainer.limit_val_batches=0)" in job, job
    assert not list(sweep.rglob("*.ckpt"))  # nothing trained


@pytest.mark.slow
def test_an_optuna_sweeps_report_names_the_picked_trial(camvid_root, tmp_path):
    """A real two-trial Optuna search (one step each) and `python -m bgremover.compare` on it: the report's
    "Search" paragraph names the trial the study wrote to optimization_results.yaml, found among the runs."""
    import yaml

    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "bgremover.train", "-m", "experiment=cpu_quick", "hparams_search=optuna",
         "hydra.sweeper.n_trials=2", f"data.root={camvid_root}", "logger=csv", f"hydra.sweep.dir={sweep}",
         *TINY, "trainer.check_val_every_n_epoch=1"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # quiet: Optuna's "A new study created in memory" line is gone, the sampled numbers are cut to 4 digits
    assert "A new study" not in proc.stderr, proc.stderr[-3000:]
    job_lines = [line for line in proc.stderr.splitlines() if line.startswith("[job ")]
    assert len(job_lines) == 2 and all(line.split(":")[0].count("=") == 2 for line in job_lines), job_lines
    lrs = [w.split("=")[1] for line in job_lines for w in line.split(":")[0].split() if w.startswith("model.optimizer.lr=")]
    assert len(lrs) == 2 and all(len(lr.replace("e-0", "").lstrip("0.")) <= 4 for lr in lrs), job_lines
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_params"]
    picked = [job for job in ("0", "1") if all(
        any(o.startswith(f"{k}=") and yaml.safe_load(o.split("=", 1)[1]) == yaml.safe_load(str(v))
            for o in json.loads((sweep / job / "summary.json").read_text())["overrides"]) for k, v in best.items())]
    assert len(picked) == 1
    report = subprocess.run([sys.executable, "-m", "bgremover.compare", str(sweep), "--grid-images", "0"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert report.returncode == 0, report.stderr[-2000:]
    md = (sweep / "report" / "report.md").read_text()
    assert "## Search" in md and f"): run {picked[0]} (deeplabv3plus" in md, md[md.find("## Search"):][:600]


@pytest.mark.slow
def test_the_speedrun_sweep_runs_and_its_job_lines_show_what_differs(camvid_root, tmp_path):
    """`make speedruns` sweeps the speed-run experiments: every job failed at once with "AttributeError: 'NoneType'
    object has no attribute 'refresh_rate'" (a quiet sweep job turned off a progress bar the speed-runs set to null),
    and each job line repeated `trainer.max_time=00\\:00\\:01\\:00`, typed once for all, as Hydra escapes it."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "bgremover.train", "-m", "experiment=speedrun_deeplabv3plus,speedrun_remover",
         "trainer=cpu", f"hydra.sweep.dir={sweep}", f"data.root={camvid_root}", "++speedrun_budget_s=2",
         "trainer.max_time=00:00:01:00", "data.batch_size=2", "data.crop_size=[64,64]", "data.limit_eval_images=1",
         "logger=csv", "measure_inference=false"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_lines = [line for line in proc.stderr.splitlines() if line.startswith("[job ")]
    assert [line.split(":")[0] for line in job_lines] == [
        "[job 0] experiment=speedrun_deeplabv3plus", "[job 1] experiment=speedrun_remover"], job_lines
    nets = sorted(json.loads(p.read_text())["net"] for p in sweep.glob("*/summary.json"))
    assert nets == ["deeplabv3plus_mobilenet_v2", "deeplabv3plus_resnet18"]


def test_an_eval_sweep_reports_its_jobs_as_evaluated_not_failed(small_camvid, tmp_path):
    """`python -m bgremover.eval -m ckpt_path=X split=val,test`: every job wrote its eval.json, and the sweep said
    "0 of 2 jobs ok … no summary.json (the job crashed before writing one)" and exited 1."""
    from test_runs import TINY_RUN, _run

    run = tmp_path / "run"
    trained = _run("bgremover.train", *TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1",
                   f"hydra.run.dir={run}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    sweep = tmp_path / "evals"
    proc = _run("bgremover.eval", "-m", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"data.root={small_camvid}",
                "attach_to_run=false", "split=val,test", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    evals = [json.loads((sweep / j["job"] / "eval.json").read_text()) for j in jobs]
    assert [(j["status"], j["split"], j["net"]) for j in jobs] == [("ok", "val", "tiramisu56"),
                                                                   ("ok", "test", "tiramisu56")]
    assert jobs[0]["val/mIoU"] == evals[0]["metrics"]["val/mIoU"] and jobs[0]["test/mIoU"] is None
    assert jobs[1]["test/mIoU"] == evals[1]["metrics"]["test/mIoU"]
    assert "2 of 2 jobs ok" in proc.stderr
    assert f"val/mIoU={evals[0]['metrics']['val/mIoU']:.4f} (2 frames)" in proc.stderr
    assert f"test/mIoU={evals[1]['metrics']['test/mIoU']:.4f} (3 frames)" in proc.stderr


def test_the_sweep_report_counts_each_jobs_status_and_exits_1_when_one_failed(tmp_path, capsys):
    """The sweep's end, without training: the sweep tests above need minutes of real jobs each. A failed job, one
    that crashed before its summary.json, an interrupted one and ok ones: each listed as what it was, in job order (10 after 2), and
    the sweep exits 1; a sweep whose jobs all passed exits normally."""
    import yaml
    from omegaconf import OmegaConf

    from bgremover.sweep import SweepReport

    def job(name: str, seed: int, summary: dict | None) -> None:
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=tiramisu56", f"seed={seed}"]))
        if summary is not None:
            (tmp_path / name / "summary.json").write_text(json.dumps(summary))

    ok = {"status": "ok", "net": "tiramisu56", "metrics": {"test/mIoU": 0.41234, "val/mIoU_best": 0.5}}
    job("0", 1, {**ok, "seed": 1})
    job("1", 2, {"status": "failed", "net": "tiramisu56", "seed": 2, "error": "CUDA out of memory"})
    job("2", 3, None)  # killed before it wrote anything
    job("3", 5, {"status": "interrupted", "net": "tiramisu56", "seed": 5, "error": "interrupted by SIGTERM"})
    job("10", 4, {**ok, "seed": 4, "metrics": {"test/mIoU": 0.25}})
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit) as info:
        SweepReport().on_multirun_end(config)
    assert info.value.code == 1
    jobs = json.loads((tmp_path / "sweep_summary.json").read_text())["jobs"]
    assert [(j["job"], j["status"], j["seed"], j["test/mIoU"]) for j in jobs] == [
        ("0", "ok", 1, 0.41234), ("1", "failed", 2, None), ("2", "failed", None, None), ("3", "interrupted", 5, None),
        ("10", "ok", 4, 0.25)]
    err = capsys.readouterr().err.splitlines()
    assert err[1:] == [
        f"sweep {tmp_path}: 2 of 5 jobs ok",
        "  [ok] job 0 (seed=1) test/mIoU=0.4123",
        "  [failed] job 1 (seed=2): CUDA out of memory",
        "  [failed] job 2 (seed=3): no summary.json (the job crashed before writing one)",
        "  [interrupted] job 3 (seed=5): interrupted by SIGTERM",
        "  [ok] job 10 (seed=4) test/mIoU=0.2500",
        "error: 3 sweep jobs failed (see above); the others' results are kept"]

    for name in ("1", "2", "3"):  # all rerun and passed: the sweep passes
        (tmp_path / name / "summary.json").write_text(json.dumps({**ok, "seed": int(name) + 1}))
    SweepReport().on_multirun_end(config)
    assert "5 of 5 jobs ok" in capsys.readouterr().err


def test_a_sweep_jobs_line_says_its_status_score_and_time(tmp_path, capsys, monkeypatch):
    """The one line each job prints when it ends, without a sweep to run: also for a job that wrote no
    summary.json (it crashed first), which must read as failed."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from bgremover.sweep import print_job_line

    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # an earlier test's run in this process set it
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    print_job_line(cfg)
    assert capsys.readouterr().err == "[job 0] defaults: failed — no summary.json\n"
    (tmp_path / "summary.json").write_text(json.dumps(
        {"status": "ok", "metrics": {"test/mIoU": 0.56789}, "wall_time_s": 61.6}))
    print_job_line(cfg)
    assert capsys.readouterr().err == "[job 0] defaults: ok test/mIoU=0.5679 in 62 s\n"
