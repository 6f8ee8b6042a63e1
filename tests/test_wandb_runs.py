"""What a run's W&B record says when the run does not end well, and the W&B run of an evaluation."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import pytorch_lightning as pl
from conftest import REPO, write_camvid
from test_runs import TINY_RUN, _run
from test_train import compose_cfg
from wandb_records import offline_run, records


def _exit_code(run_dir) -> int:
    (path,) = run_dir.rglob("offline-run-*/run-*.wandb")
    offline_run(run_dir)  # waits for the exit record
    return next(r.exit.exit_code for r in records(path) if r.WhichOneof("record_type") == "exit")


@pytest.mark.parametrize("stop, code", [("crash", 1), ("sigterm", 143)])
def test_a_failed_or_interrupted_run_is_not_marked_successful_in_wandb(small_camvid, tmp_path, monkeypatch, stop,
                                                                       code):
    """The W&B run of a crashed or interrupted training ended with exit code 0, which W&B shows as "finished" (a
    success) while the run's summary.json said "failed" / "interrupted"."""
    from bgremover import train as train_mod
    from bgremover.task import run_task

    def fit(cfg, trainer, model, datamodule):
        if stop == "crash":
            raise RuntimeError("boom")
        raise train_mod.RunInterrupted(signal.SIGTERM, None, 0, 0)

    monkeypatch.setattr(train_mod, "_fit", fit)
    cfg = compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1", "logger=wandb"])
    with pytest.raises((RuntimeError, train_mod.RunInterrupted)):
        run_task(train_mod.train, cfg)
    assert _exit_code(tmp_path) == code


def test_a_refused_run_does_not_say_to_upload_the_wandb_run_it_removed(tmp_path):
    """A run that trained no step (one train frame, a batch of 2) is refused and its folder removed, wandb/
    included; the log still said "W&B: offline run, upload it with `wandb sync <that folder>/wandb/offline-run-…`"."""
    root = write_camvid(tmp_path / "CamVid", counts={"train": 1, "val": 1, "test": 1}, size=(32, 64))
    proc = _run("bgremover.train", *TINY_RUN, f"data.root={root}", "logger=wandb", "trainer.max_epochs=1",
                f"paths.log_dir={tmp_path}")
    assert proc.returncode == 1 and "training took no step" in proc.stderr, proc.stderr[-2000:]
    assert not list((tmp_path / "train" / "runs").glob("*"))
    assert "wandb sync" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]


def test_eval_logged_to_wandb_goes_offline_by_itself_as_an_eval_run_with_its_config(small_camvid, tmp_path):
    """`python -m bgremover.eval ... logger=wandb` without a W&B key stopped on "UsageError: No API key configured"
    (train goes offline by itself, as the README says of every run); and its run was of job type "train", with no
    config (not even the checkpoint it evaluated)."""
    run = tmp_path / "run"
    train_proc = _run("bgremover.train", *TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1",
                      f"hydra.run.dir={run}", "seed=3", "+experiment_name=mine")
    assert train_proc.returncode == 0, train_proc.stderr[-2000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([sys.executable, "-m", "bgremover.eval", f"ckpt_path={ckpt}", f"data.root={small_camvid}",
                           "logger=wandb", f"hydra.run.dir={tmp_path / 'eval'}", "attach_to_run=false",
                           "data.limit_eval_images=2"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, stdin=subprocess.DEVNULL,
                          env={**env, "HOME": str(tmp_path), "NETRC": str(tmp_path / "no-netrc")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wandb:" not in proc.stdout + proc.stderr  # W&B's own summary block: silenced, as in train
    logged = offline_run(tmp_path / "eval" / "wandb")
    (path,) = (tmp_path / "eval" / "wandb").glob("offline-run-*/run-*.wandb")
    job_type = next(r.run.job_type for r in records(path) if r.WhichOneof("record_type") == "run")
    assert job_type == "eval"
    # named and grouped as the run it evaluates: every eval was "eval-seed42" (eval's own seed) in a group "eval"
    assert (logged["name"], logged["group"]) == ("tiramisu56-seed3", "mine")
    assert logged["config"]["ckpt_path"] == str(ckpt) and logged["config"]["split"] == "test"
    assert logged["summary"]["test/mIoU"] is not None
    # a partial test set says so there too, as a training run's summary does (it said test/frames=2 alone)
    assert (logged["summary"]["test/frames"], logged["summary"].get("test/frames_of"),
            logged["summary"].get("test/partial")) == (2, 3, True)
    # the config it records (W&B's and eval.json's) is the one the run ran with: job type, group, offline (it was
    # taken before prepare_wandb set them: "train", null, false)
    recorded = json.loads((tmp_path / "eval" / "eval.json").read_text())["config"]["logger"]["wandb"]
    for wb in (logged["config"]["logger"]["wandb"], recorded):
        assert wb["job_type"] == "eval" and wb["offline"] is True and wb["group"] is not None, wb


def test_a_ddp_run_logged_to_wandb_ends_without_an_error_on_its_other_rank(small_camvid, tmp_path):
    """trainer.devices=2 with W&B (the default logger): after the test stage rank 1 stopped on "error:
    AttributeError: 'function' object has no attribute 'update'" (its W&B experiment is Lightning's dummy) — a line
    and a traceback in a finished run's log, and under torchrun the whole job failed with exit 1. Rank 1 also
    printed the whole config a second time, into the same train.log."""
    run = tmp_path / "run"
    proc = _run("bgremover.train", *TINY_RUN, f"data.root={small_camvid}", "logger=wandb", "trainer.max_epochs=1",
                "trainer.devices=2", "+trainer.strategy=ddp", "trainer.precision=32-true", f"hydra.run.dir={run}",
                "extras.print_config=true", timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    log = (run / "train.log").read_text()
    assert "error:" not in out and "Traceback" not in log, out[-2000:]
    assert log.count("- config:\n") == 1  # rank 1 printed the whole config again, into the same log
    assert json.loads((run / "summary.json").read_text())["status"] == "ok"
    logged = offline_run(run / "wandb")  # one W&B run (rank 0's), with the test split marked
    assert logged["summary"]["test/frames_of"] == 3 and logged["summary"]["test/partial"] is False


def test_a_partial_val_split_is_flagged_in_the_wandb_summary(small_camvid, tmp_path):
    """trainer.limit_val_batches: the W&B summary said val/frames=1 and nothing of the split's 2 frames (summary.json
    flags it in val_split, the test split is flagged in W&B too), so the dashboard's val/mIoU looked whole."""
    from bgremover.task import finish_wandb
    from bgremover.train import train

    train(compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1", "logger=wandb",
                                 "trainer.limit_val_batches=1"]))
    finish_wandb()
    summary = offline_run(tmp_path / "wandb")["summary"]
    assert (summary["val/frames"], summary.get("val/frames_of"), summary.get("val/partial")) == (1, 2, True)
    assert (summary["test/frames"], summary["test/frames_of"], summary["test/partial"]) == (3, 3, False)
    # and the run's size and training time, summary.json's, beside them on the dashboard
    run = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["params"], summary["wall_time_s"]) == (run["params"], run["wall_time_s"]) and run["wall_time_s"] > 0


def test_logger_wandb_offline_true_keeps_a_run_offline_with_a_key_at_hand(tmp_path, monkeypatch):
    """`logger.wandb.offline=true` (WandbLogger's switch) with WANDB_API_KEY set: the run went online anyway, and on
    a machine without a network stopped after 100 s on "CommError: Failed to get resume status"."""
    from bgremover.task import prepare_wandb

    monkeypatch.setenv("WANDB_MODE", "")  # restored after the test: prepare_wandb sets it for the run
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    cfg = compose_cfg(tmp_path, ["logger=wandb", "logger.wandb.offline=true"])
    assert prepare_wandb(cfg) == "offline" and os.environ["WANDB_MODE"] == "offline" and cfg.logger.wandb.offline
    monkeypatch.setenv("WANDB_MODE", "")
    assert prepare_wandb(compose_cfg(tmp_path, ["logger=wandb"])) == "online"  # the key's default stays online


def test_a_key_saved_by_wandb_login_takes_runs_online_and_none_keeps_them_offline(tmp_path, monkeypatch):
    """`wandb login` saves the key in ~/.netrc, not in WANDB_API_KEY: read there too, or a logged-in user's runs
    stayed offline without a word (README: runs go online when a key is at hand)."""
    from bgremover.task import wandb_mode

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    netrc.chmod(0o600)  # as wandb login writes it (Python refuses a password in a file others can read)
    assert wandb_mode() == "online"


def test_wandb_project_from_the_environment_is_the_runs_and_the_comparisons(small_camvid, tmp_path, monkeypatch):
    """WANDB_PROJECT=mine: training runs still went to project "bgremover" (the config named it), while
    `compare --wandb` logged into "mine", so the comparison was not beside the runs it compares."""
    from bgremover.compare.runs import find_runs
    from bgremover.compare.wandb_log import _wandb_project
    from bgremover.task import finish_wandb
    from bgremover.train import train

    monkeypatch.setenv("WANDB_PROJECT", "mine")
    train(compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1", "logger=wandb",
                                 "test=false"]))
    finish_wandb()
    assert offline_run(tmp_path / "wandb")["project"] == "mine"
    monkeypatch.delenv("WANDB_PROJECT")  # compare run later, from another shell: the runs' config says it
    assert _wandb_project(find_runs([tmp_path])) == "mine"


def test_a_test_only_run_online_is_an_eval_run_beside_the_training_run_not_its_continuation(tmp_path):
    """`train=false ckpt_path=<last.ckpt>` online, from a run logged online, took the training run's W&B id with
    resume="allow": the test-only config overwrote the training run's and its test row went in at step 0."""
    import torch

    from bgremover import train as train_mod

    ckpt = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 40, "wandb_run_id": "abc123", "wandb_run_offline": False,
                "wandb_run_name": "tiny-seed7", "wandb_run_group": "quick"}, ckpt)
    cfg = compose_cfg(tmp_path / "test_only", ["logger=wandb", "train=false", f"ckpt_path={ckpt}"])
    assert train_mod._resume_wandb(cfg, "online") == "abc123"  # the config still names the run it tested
    assert cfg.logger.wandb.get("id") is None and cfg.logger.wandb.get("resume") is None
    assert (cfg.logger.wandb.job_type, cfg.logger.wandb.name, cfg.logger.wandb.group) == ("eval", "tiny-seed7",
                                                                                          "quick")
    resumed = compose_cfg(tmp_path / "resume", ["logger=wandb", f"ckpt_path={ckpt}"])  # a resume still goes on
    train_mod._resume_wandb(resumed, "online")
    assert (resumed.logger.wandb.id, resumed.logger.wandb.resume, resumed.logger.wandb.job_type) == (
        "abc123", "allow", "train")


class CrashAtStep(pl.Callback):
    """A bug inside training (not a user's mistake): raised after training step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *_) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"boom at step {self.step}")


def test_a_crashed_run_logs_its_traceback_and_says_how_to_upload_its_wandb_run(small_camvid, tmp_path):
    """What the README says of a run that ends: a bug's one `error:` line in the terminal and its whole traceback in
    the run's train.log, and an offline W&B run's "wandb sync <folder>" line (WANDB_SILENT hides W&B's own), with
    the folder named there holding the run, in the terminal and the log, ended well or not; neither was tested
    on a real command, only through the logging call."""
    run = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = _run("bgremover.train", *TINY_RUN, f"data.root={small_camvid}", "logger=wandb", "trainer.max_epochs=2",
                "+callbacks.crash._target_=test_wandb_runs.CrashAtStep", "+callbacks.crash.step=1",
                f"hydra.run.dir={run}", env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    # the terminal: one line, naming the log (W&B's own output, tracebacks: none)
    assert proc.stderr.splitlines() == [f"error: RuntimeError: boom at step 1 (traceback in {run / 'train.log'})"]
    assert "Traceback" not in proc.stdout + proc.stderr
    log = (run / "train.log").read_text()
    traceback = log[log.index("Traceback (most recent call last):"):]
    # the whole of it: from the task wrapper through Lightning's loop to the line that raised, and the error
    assert 'in run_task' in traceback and "in on_train_batch_end" in traceback
    assert 'raise RuntimeError(f"boom at step {self.step}")\nRuntimeError: boom at step 1\n' in traceback
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    (offline,) = (run / "wandb").glob("offline-run-*")
    assert list(offline.glob("run-*.wandb")), list(offline.iterdir())
    upload = re.compile(r"W&B: offline run, upload it with `wandb sync (\S+)`")
    assert upload.findall(proc.stdout) == upload.findall(log) == [str(offline)], proc.stdout[-2000:]
    assert _exit_code(run) == 1
