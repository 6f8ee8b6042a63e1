"""Runs a user can trust: last.ckpt is the newest epoch, partial test sets say so, an interrupted run exits
non-zero, a long run says up front what it will do, panels appear however often validation runs. Resuming:
test_resume.py; bad settings: test_run_errors.py; callbacks=ema: test_ema.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import REPO, write_camvid
from pytorch_lightning.callbacks import Callback
from test_train import TINY_TIRAMISU, compose_cfg

from bgremover.lit.callbacks import RunPlan, describe_estimate, describe_plan
from bgremover.lit.checkpoints import LastCheckpoint
from bgremover.train import train

TINY_RUN = [
    "~experiment",  # the base config, not the default quick recipe
    *TINY_TIRAMISU,
    "data.num_workers=0",
    "data.batch_size=2",
    "data.eval_batch_size=1",
    "data.crop_size=[32,32]",
    "extras.print_config=false",
    "measure_inference=false",
    "logger=csv",
    "trainer.check_val_every_n_epoch=1",
    "trainer.max_time=null",
]


# --- last.ckpt -------------------------------------------------------------------------------------------------
class _Scored(pl.LightningModule):
    """Logs a made-up validation score per epoch, so the test decides which epoch is best."""

    def __init__(self, scores: list[float]):
        super().__init__()
        self.scores = scores
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, _):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, _):  # nothing to compute: the epoch's score comes from `scores`
        return None

    def on_validation_epoch_end(self):
        self.log("score", self.scores[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 2)), batch_size=2)


def _fit_scored(tmp_path: Path, scores: list[float]) -> Path:
    ckpt_dir = tmp_path / "checkpoints"
    callbacks = [
        pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="epoch_{epoch:03d}", monitor="score", mode="max",
                                     save_top_k=1, auto_insert_metric_name=False),
        LastCheckpoint(dirpath=str(ckpt_dir)),
    ]
    trainer = pl.Trainer(max_epochs=len(scores), callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(_Scored(scores))
    return ckpt_dir


def test_last_ckpt_is_the_newest_epoch_after_the_best_one(tmp_path):
    ckpt_dir = _fit_scored(tmp_path, [0.9, 0.5, 0.4])  # best at the first epoch, then worse
    last = ckpt_dir / "last.ckpt"
    assert not last.is_symlink()
    assert torch.load(last, weights_only=True)["epoch"] == 2  # Lightning 2.6's save_last kept epoch 0 here
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]


def test_a_run_resumed_in_place_keeps_a_loadable_last_ckpt_while_it_trains(tmp_path):
    """A speed-run (last.ckpt written only at the end) resumed in place from last.ckpt → epoch_001.ckpt: the first
    new best deleted epoch_001.ckpt, and a hard kill before the end left last.ckpt dangling, nothing to resume."""
    ckpt_dir = tmp_path / "checkpoints"

    class Killed(Callback):  # a hard kill: the run ends without LastCheckpoint writing anything
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 3:  # after epoch 2 and its validation
                raise RuntimeError("killed")

    def fit(scores, epochs, ckpt_path=None, *extra):
        callbacks = [
            pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="epoch_{epoch:03d}", monitor="score", mode="max",
                                         save_top_k=1, auto_insert_metric_name=False),
            LastCheckpoint(dirpath=str(ckpt_dir), every_epoch=False), *extra,
        ]
        trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
        trainer.fit(_Scored(scores), ckpt_path=ckpt_path)

    fit([0.1, 0.2, 0.3, 0.4], 2)
    last = ckpt_dir / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "epoch_001.ckpt"
    with pytest.raises(RuntimeError, match="killed"):
        fit([0.1, 0.2, 0.3, 0.4], 4, str(last), Killed())
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch_002.ckpt", "last.ckpt"]  # epoch 2: the new best
    assert torch.load(last, weights_only=True)["epoch"] == 1  # still the state the resume began from


def test_last_ckpt_links_to_the_best_file_when_they_are_the_same_state(tmp_path):
    ckpt_dir = _fit_scored(tmp_path, [0.1, 0.2, 0.3])  # every epoch a new best
    last = ckpt_dir / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "epoch_002.ckpt"  # no duplicate copy on disk
    assert torch.load(last, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch_002.ckpt", "last.ckpt"]


def test_last_ckpt_with_several_best_files_kept_is_the_newest_epoch(tmp_path):
    """callbacks.model_checkpoint.save_top_k=2: ModelCheckpoint writes epoch 1 (second best) at the step, while its
    best file is still epoch 0's; last.ckpt is the newest state (epoch 1), never a link to the older best."""
    ckpt_dir = tmp_path / "checkpoints"
    callbacks = [
        pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="epoch_{epoch:03d}", monitor="score", mode="max",
                                     save_top_k=2, auto_insert_metric_name=False),
        LastCheckpoint(dirpath=str(ckpt_dir)),
    ]
    trainer = pl.Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(_Scored([0.9, 0.5]))
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch_000.ckpt", "epoch_001.ckpt", "last.ckpt"]
    assert Path(callbacks[0].best_model_path).name == "epoch_000.ckpt"
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["epoch"] == 1


def test_last_ckpt_at_the_end_only_is_written_without_validation(tmp_path):
    """every_epoch=False (the speed-runs): no write per epoch, one at the end, and with validation off
    (limit_val_batches=0) that is the run's only checkpoint; before, such a run wrote none at all."""
    ckpt_dir = tmp_path / "checkpoints"
    seen = []

    class Watch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(sorted(p.name for p in ckpt_dir.glob("*.ckpt")))

    callbacks = [
        Watch(),
        pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="epoch_{epoch:03d}", monitor="score", mode="max",
                                     save_top_k=1, auto_insert_metric_name=False),
        LastCheckpoint(dirpath=str(ckpt_dir), every_epoch=False),
    ]
    trainer = pl.Trainer(max_epochs=3, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(_Scored([0.1, 0.2, 0.3]))
    assert seen == [[], [], []]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]
    state = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (2, 6)  # at the last epoch's end, as every_epoch saves it
    from bgremover.lit.summary import RunSummary  # train=false ckpt_path=X reads the epochs X was trained for

    tested = RunSummary()
    tested.from_checkpoint(state, str(ckpt_dir / "last.ckpt"))
    assert tested.epochs == 3
    # one written at on_train_end (a stop inside an epoch) has "epoch" counting the finished one: the loop says 3
    tested.from_checkpoint({**state, "epoch": 3}, "x.ckpt")
    assert tested.epochs == 3


def test_last_ckpt_holds_the_step_max_steps_stopped_at(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    trainer = pl.Trainer(max_epochs=5, max_steps=3, callbacks=[LastCheckpoint(dirpath=str(ckpt_dir))], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(_Scored([0.1] * 5))
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 3  # mid-epoch (2 steps each)


# --- test numbers of a run -------------------------------------------------------------------------------------


def test_train_without_a_test_split_and_test_false_finishes(tmp_path):
    """A train+val-only copy (what a GPU machine is given) with test=false: the run ends with its summary and
    says no test numbers, instead of failing on the missing test folder after training (seen on the H100)."""
    root = write_camvid(tmp_path / "CamVid", {"train": 4, "val": 2})
    cfg = compose_cfg(tmp_path / "a", [*TINY_RUN, f"data.root={root}", "trainer.max_epochs=1", "test=false"])
    metrics, _ = train(cfg)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["status"] == "ok" and "val/mIoU" in metrics
    assert summary["test_split"] == {"frames": None, "of": None, "complete": None}


def test_eval_attaches_test_numbers_to_a_run_trained_without_them(small_camvid, tmp_path, caplog):
    """`make eval` of a test=false run's checkpoint writes the test metrics into that run's summary.json (what
    `make compare` and the exporter read). Numbers over a partial test set are replaced by numbers over more frames
    (before, a first partial eval stuck for good and a later full one was dropped without a word); fewer or
    as many frames never replace, and say so."""
    from bgremover.eval import evaluate
    from bgremover.export import _read_test_result

    cfg = compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1", "test=false",
                                         "measure_inference=false"])  # fmt: skip
    train(cfg)
    summary_path = tmp_path / "run" / "summary.json"
    before = json.loads(summary_path.read_text())
    assert "test/mIoU" not in before["metrics"] and _read_test_result(Path(before["best_ckpt"])) == {}
    assert before["infer_ms_480x360"] is None  # a GPU run's setting: its CPU inference is timed by the eval

    def evaluate_in(name: str, *extra: str) -> dict:
        return evaluate(compose_cfg(tmp_path / name, [f"data.root={small_camvid}", "data.num_workers=0", *extra,
                                                      f"ckpt_path={before['best_ckpt']}"], config_name="eval"))[0]

    evaluate_in("eval1", "data.limit_eval_images=2")  # a partial look first
    partial = json.loads(summary_path.read_text())
    assert partial["test_split"] == {"frames": 2, "of": 3, "complete": False}

    metrics = evaluate_in("eval2")
    after = json.loads(summary_path.read_text())
    assert after["metrics"]["test/mIoU"] == pytest.approx(metrics["test/mIoU"])
    assert after["metrics"]["val/mIoU_best"] == before["metrics"]["val/mIoU_best"]  # the rest is kept
    assert 0 < after["infer_ms_480x360"] < 60_000
    assert after["test_split"] == {"frames": 3, "of": 3, "complete": True}
    assert Path(after["test_from"]["eval"]).is_file() and after["test_from"]["ckpt"] == before["best_ckpt"]
    assert _read_test_result(Path(before["best_ckpt"]))["test_mIoU"] == pytest.approx(metrics["test/mIoU"])

    # another checkpoint of the run (not the best, whose numbers the run reports) is never attached: its numbers
    # would have been credited to the best checkpoint in the summary, `make compare` and the exported ONNX
    other = Path(before["best_ckpt"]).with_name("other.ckpt")
    state = torch.load(before["best_ckpt"], weights_only=True)
    torch.save({**state, "global_step": state["global_step"] + 1}, other)  # a later state (a copy of the best is it)
    caplog.clear()
    evaluate(compose_cfg(tmp_path / "eval_other", [f"data.root={small_camvid}", "data.num_workers=0",
                                                   f"ckpt_path={other}"], config_name="eval"))
    assert json.loads(summary_path.read_text()) == after
    assert any("is not the run's best checkpoint" in r.getMessage() for r in caplog.records), caplog.text

    # a later evaluation of 2 frames, or of all 3 again, leaves the attached numbers alone, with a line saying so
    for name, extra in (("eval3", ["data.limit_eval_images=2"]), ("eval4", [])):
        caplog.clear()
        evaluate_in(name, *extra)
        assert json.loads(summary_path.read_text()) == after
        assert any("test numbers not attached" in r.getMessage() and "already has them over 3 of 3" in r.getMessage()
                   for r in caplog.records), caplog.text


def test_a_paper_nets_checkpoint_describes_its_net_in_numbers_that_rebuild_it(small_camvid, tmp_path):
    """The model configs read the Tiramisu's blocks from TIRAMISU_CONFIGS through a resolver (`${tiramisu:...}`):
    the checkpoint's net_config must hold the resolved numbers, which eval, export and ckpt_init rebuild the net
    from without Hydra (as strings of interpolations the rebuild fails)."""
    from bgremover import checkpoint
    from bgremover.nets.tiramisu import TIRAMISU_CONFIGS

    run = ["~experiment", "model=tiramisu56", f"data.root={small_camvid}", "data.num_workers=0", "data.batch_size=2",
           "data.eval_batch_size=1", "data.crop_size=[32,32]", "extras.print_config=false", "logger=csv",
           "measure_inference=false", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.max_time=null",
           "test=false"]
    train(compose_cfg(tmp_path, run))
    net, info, _ = checkpoint.load_net(json.loads((tmp_path / "summary.json").read_text())["best_ckpt"])
    paper = TIRAMISU_CONFIGS["fcdensenet56"]
    assert info["net_config"]["down_blocks"] == list(paper["down_blocks"]) and info["net_config"]["growth_rate"] == 12
    assert [len(b.layers) for b in net.down_blocks] == list(paper["down_blocks"])


def test_eval_json_names_the_checkpoints_net_and_a_partial_split(small_camvid, tmp_path, capsys):
    """eval.json said `"net": "net"` for a weights-only .pt (models/bgremover-camvid.pt) and kept eval.yaml's
    default FC-DenseNet103 under config.model for every checkpoint; a partial test set was not marked at all."""
    from bgremover import checkpoint
    from bgremover.errors import UserError
    from bgremover.eval import evaluate

    run = compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1",
                                         "test=false", "measure_inference=false"])
    train(run)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    best = summary["best_ckpt"]
    weights = checkpoint.save_weights(best, tmp_path / "weights.pt")
    evaluate(compose_cfg(tmp_path / "ev", [f"data.root={small_camvid}", "data.num_workers=0",
                                           "data.limit_eval_images=2", f"ckpt_path={weights}"], config_name="eval"))
    record = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert record["net"] == summary["net"] == record["config"]["model"]["net_name"] != "net"
    assert record["config"]["model"]["net"] == summary["config"]["model"]["net"]  # the checkpoint's, not eval.yaml's
    assert record["frames"] == {"frames": 2, "of": 3, "complete": False}
    # no frame at all: it exited 0, printed nothing and wrote an eval.json of empty metrics
    with pytest.raises(UserError, match=r"^no test frames were evaluated \(trainer.limit_test_batches=0"):
        evaluate(compose_cfg(tmp_path / "none", [f"data.root={small_camvid}", "data.num_workers=0", f"ckpt_path={weights}",
                                                 "trainer.limit_test_batches=0"], config_name="eval"))
    assert not (tmp_path / "none" / "eval.json").exists()

    proc = _run("bgremover.eval", f"ckpt_path={weights}", f"data.root={small_camvid}", "data.num_workers=0",
                "data.limit_eval_images=2", f"paths.log_dir={tmp_path / 'logs'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test/frames: 2 of 3 (PARTIAL: these numbers are not the split's)" in proc.stdout


def test_eval_prints_small_numbers_readably():
    """eval printed a class IoU of 1.7e-05 as 0.0000, which reads as exactly zero."""
    from bgremover.eval import number

    assert [number(v) for v in (0.5583, 0.0, 1.7e-05, -3e-4, 1.0)] == ["0.5583", "0.0000", "1.7e-05", "-0.0003", "1.0000"]


def test_limit_images_trims_only_training_and_frames_are_reported(small_camvid, tmp_path):
    cfg = compose_cfg(tmp_path / "a", [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1",
                                       "data.limit_images=2"])
    metrics, objects = train(cfg)
    assert len(objects["datamodule"].datasets["train"]) == 2
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["test_split"] == {"frames": 3, "of": 3, "complete": True}
    assert metrics["test/frames"] == 3

    cfg = compose_cfg(tmp_path / "b", [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1",
                                       "data.limit_eval_images=2"])
    train(cfg)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["test_split"] == {"frames": 2, "of": 3, "complete": False}

    from bgremover import compare

    report = compare.build_report([tmp_path / "a", tmp_path / "b"], out=tmp_path / "report", grid_images=0)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "2 of 3 (partial)" in report.main_md and "PARTIAL TEST SET" in markdown
    assert (tmp_path / "report").stat().st_mode & 0o055 == 0o055  # readable by others, not 0700


# --- interrupted runs --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_writes_last_ckpt_marks_summary_and_exits_non_zero(small_camvid, tmp_path):
    """SIGTERM as `timeout`, Slurm's scancel or `kill -- -PGID` send it: to the whole process group, DataLoader
    workers included. The workers died of it first and the run ended in "error: RuntimeError: DataLoader worker
    (pid ...) exited unexpectedly", status failed, no resume line; now they leave the stop to the main process."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bgremover.train", *TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1000",
         f"hydra.run.dir={run_dir}", "callbacks.progress_bar.refresh_rate=0", "data.num_workers=1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "WANDB_MODE": "offline"}, start_new_session=True,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert last.exists(), proc.communicate()[1][-2000:]
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "SIGTERM" in errors[0] and f"ckpt_path={last}" in errors[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["last_ckpt"] == str(last)
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == summary["global_step"] > 0
    # its wall_time_s is the training time the resume goes on from (it was the process time: setup included)
    assert 0 <= summary["wall_time_s"] - saved["callbacks"]["RunSummary"]["fit_s"] < 1.0


def test_ctrl_c_inside_the_first_imports_is_an_interrupt_not_a_failure(small_camvid, tmp_path, monkeypatch):
    """Ctrl-C in a run's first seconds lands inside `import torch` (reached from the settings check): the handler
    then imported Lightning, which re-imported the half-loaded torch and raised an unrelated error ("partially
    initialized module 'torch'", "Trying to override a python impl") that the run recorded as its failure, exit 1,
    and its folder stayed. Here the interrupted import is a module that can no longer be imported."""
    import sys

    from bgremover import checks
    from bgremover.train import RunInterrupted

    def interrupted_import(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(checks, "validate_train", interrupted_import)
    monkeypatch.setitem(sys.modules, "pytorch_lightning.trainer.states", None)  # importing it raises
    run = tmp_path / "a"
    with pytest.raises(RunInterrupted, match=r"^interrupted by SIGINT before training started: nothing was trained$"):
        train(compose_cfg(run, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1"]))


_EVAL_CTRL_C = """
import sys
from bgremover import checkpoint, eval as ev
from bgremover.lit.module import SegmentationModule
def ctrl_c(*a, **k):
    raise KeyboardInterrupt
if sys.argv[1] == "start":
    checkpoint.load_module = ctrl_c
else:
    SegmentationModule.test_step = ctrl_c
sys.argv[1:] = sys.argv[2:]
ev.main()
"""


def test_ctrl_c_in_make_eval_is_one_line_and_130(small_camvid, tmp_path):
    """`make eval` stopped by Ctrl-C while it started: a KeyboardInterrupt traceback; in its test loop: Lightning's
    "attempting graceful shutdown" and exit 1, nothing else said. Both are one line and 130 now, no eval.json."""
    train(compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1", "test=false"]))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for when in ("start", "test"):
        proc = subprocess.run([sys.executable, "-c", _EVAL_CTRL_C, when, f"ckpt_path={ckpt}",
                               f"data.root={small_camvid}", f"paths.log_dir={tmp_path / 'logs'}", "logger=csv"],
                              capture_output=True, text=True, timeout=300, cwd=REPO,
                              env={**os.environ, "WANDB_MODE": "offline"})
        assert proc.returncode == 130, (when, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == "error: interrupted: nothing was evaluated", proc.stderr
        assert not list((tmp_path / "logs").rglob("eval.json"))


def test_ctrl_c_while_starting_or_testing_says_what_was_kept(small_camvid, tmp_path, monkeypatch):
    """Ctrl-C while a run started was a bare KeyboardInterrupt traceback (its half-made run folder stayed); in the
    test stage, Lightning's exit 1 with no word of the finished training. Now one RunInterrupted each: nothing was
    trained, or which checkpoint to test and how (make remover's own finishing command where it set one)."""
    from bgremover import train as train_mod
    from bgremover.config import FINISH_ENV
    from bgremover.lit.module import SegmentationModule
    from bgremover.train import RunInterrupted

    base = [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1"]
    real_build = train_mod.build
    monkeypatch.setattr(train_mod, "build", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(RunInterrupted, match=r"^interrupted by SIGINT before training started: nothing was trained$"):
        train(compose_cfg(tmp_path / "a", base))
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"")
    real_train = train_mod._train
    monkeypatch.setattr(train_mod, "_train", lambda cfg, objects: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(RunInterrupted) as info:  # a resume stopped as it starts: its checkpoint still resumes it
        train(compose_cfg(tmp_path / "b", [*base, f"ckpt_path={ckpt}"]))
    monkeypatch.setattr(train_mod, "_train", real_train)
    assert str(info.value).startswith("interrupted by SIGINT before training started; resume with: make train ARGS=")
    assert str(info.value).endswith(f" ckpt_path={ckpt}\"")
    monkeypatch.setattr(train_mod, "build", real_build)

    monkeypatch.setattr(SegmentationModule, "test_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    for finish in (None, "finish {best_ckpt} here"):
        if finish:
            monkeypatch.setenv(FINISH_ENV, finish)
        run = tmp_path / f"c{bool(finish)}"
        with pytest.raises(RunInterrupted) as info:
            train(compose_cfg(run, base))
        best = info.value.best_ckpt
        assert Path(best).parent == run / "checkpoints" and Path(best).is_file()
        then = f"finish {best} here" if finish else f"make eval CKPT={best}"
        assert str(info.value) == (f"interrupted by SIGINT in the test stage, after training finished; its best "
                                   f"checkpoint is {best}: finish with: {then}")


def test_a_run_stopped_in_its_test_stage_is_finished_by_the_eval_it_names(small_camvid, tmp_path, monkeypatch):
    """The interrupt said "finish with: make eval CKPT=<best>", but that eval left summary.json "interrupted" (a stub
    without history, epochs or val numbers, last_ckpt null though last.ckpt existed), and `make compare` never
    counted the run. Now the run keeps its whole record and the eval that attaches its test numbers finishes it."""
    from bgremover import compare
    from bgremover.eval import evaluate
    from bgremover.lit.module import SegmentationModule
    from bgremover.task import run_task
    from bgremover.train import RunInterrupted
    from bgremover.train import train as task

    real_test_step = SegmentationModule.test_step
    monkeypatch.setattr(SegmentationModule, "test_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted) as info:
        run_task(task, compose_cfg(run, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=2"]))
    monkeypatch.setattr(SegmentationModule, "test_step", real_test_step)
    s = json.loads((run / "summary.json").read_text())
    assert (s["status"], s["stage"], s["epochs"], s["history"]["epoch"]) == ("interrupted", "test", 2, [0, 1])
    assert s["best_ckpt"] == info.value.best_ckpt and Path(s["last_ckpt"]).is_file()
    assert s["metrics"]["val/mIoU_best"] > 0 and "test/mIoU" not in s["metrics"] and s["config"]["seed"] == s["seed"]
    assert not compare.aggregate(compare.find_runs([run]))  # not counted yet

    evaluate(compose_cfg(tmp_path / "ev", [f"data.root={small_camvid}", "data.num_workers=0",
                                           f"ckpt_path={info.value.best_ckpt}"], config_name="eval"))
    done = json.loads((run / "summary.json").read_text())
    assert done["status"] == "ok" and not {"error", "stage"} & done.keys()
    assert done["test_split"]["complete"] and done["metrics"]["test/mIoU"] >= 0 and done["history"] == s["history"]
    (stats,) = compare.aggregate(compare.find_runs([run]))
    assert stats.miou.mean == done["metrics"]["test/mIoU"]
    # a stub without the training record (had the record failed to build) is not passed off as a finished run
    stub = {k: s[k] for k in ("status", "error", "stage", "best_ckpt", "run_dir", "net", "seed")}
    (run / "summary.json").write_text(json.dumps(stub))
    evaluate(compose_cfg(tmp_path / "ev2", [f"data.root={small_camvid}", "data.num_workers=0",
                                            f"ckpt_path={info.value.best_ckpt}"], config_name="eval"))
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"


def test_max_time_ends_the_first_epoch_too(tmp_path, monkeypatch):
    """The base trainer's min_epochs=1 made Lightning run the whole first epoch whatever trainer.max_time said:
    the plan said "stops after 25 s at most" and the run took 235 s (a FC-DenseNet103 epoch on a CPU: 36 min)."""
    from bgremover.lit.module import SegmentationModule

    data = write_camvid(tmp_path / "CamVid", {"train": 10, "val": 2, "test": 2}, size=(32, 64))
    step = SegmentationModule.training_step
    monkeypatch.setattr(SegmentationModule, "training_step", lambda *a, **k: time.sleep(0.6) or step(*a, **k))
    _, objects = train(compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={data}", "test=false",
                                                       "trainer.max_time=00:00:00:01"]))
    trainer = objects["trainer"]
    assert trainer.num_training_batches == 5 and 1 <= trainer.global_step < 5


def test_eval_on_val_reports_only_what_it_measured(small_camvid, tmp_path):
    """`make eval ARGS="split=val"` printed val/mIoU_best = the training's best (carried in the checkpoint) beside
    this evaluation's val/mIoU, and wrote it to eval.json."""
    from bgremover.eval import evaluate

    train(compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1", "test=false"]))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    state["val_miou_best"] = 0.99
    torch.save(state, tmp_path / "x.ckpt")
    metrics, _ = evaluate(compose_cfg(tmp_path / "eval", [f"data.root={small_camvid}", "data.num_workers=0",
                                                          f"ckpt_path={tmp_path / 'x.ckpt'}", "split=val"],
                                      config_name="eval"))
    assert metrics.get("val/mIoU_best", metrics["val/mIoU"]) == metrics["val/mIoU"] < 0.99


def test_a_class_absent_from_the_test_frames_has_no_iou_not_zero(small_camvid, tmp_path):
    """On a partial test set a class can be absent from labels and predictions alike: its IoU printed 0.0000 and
    the per-class row averaged below the mIoU, which (rightly) leaves such a class out."""
    from bgremover.train import build

    model = build(compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}"]))["model"]
    metric, k = model.test_class_iou, model.num_classes
    metric.update(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 1, 2, 2]]))  # classes 3.. never seen
    iou = metric.compute()
    assert iou[:3].tolist() == pytest.approx([1.0, 0.5, 0.5]) and torch.isnan(iou[3:]).all() and len(iou) == k
    miou = model.miou["test_"]
    miou.update(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 1, 2, 2]]))
    assert float(iou[~torch.isnan(iou)].mean()) == pytest.approx(float(miou.compute()))  # mIoU: the present ones


def test_test_loss_does_not_depend_on_the_eval_batch_size(tmp_path):
    """test/loss was a frame-weighted mean of per-batch pixel means: the same checkpoint on the same 12 frames gave
    0.7428 at batch 4 and 0.7405 at batch 2. It is the mean over labelled pixels now, however frames are batched."""
    from bgremover.eval import evaluate

    data = write_camvid(tmp_path / "CamVid", {"train": 4, "val": 2, "test": 5}, size=(32, 64))
    train(compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={data}", "trainer.max_epochs=1", "test=false"]))
    losses = []
    for batch in (1, 2, 5):
        metrics, _ = evaluate(compose_cfg(tmp_path / f"e{batch}", [
            f"data.root={data}", "data.num_workers=0", f"data.eval_batch_size={batch}",
            f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "attach_to_run=false"], config_name="eval"))
        losses.append(metrics["test/loss"])
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-5), losses


@pytest.mark.parametrize("stage", ["val", "test"])
def test_class_weighted_loss_does_not_depend_on_the_eval_batch_size(stage):
    """With data.class_weights=median_freq a batch's loss is the class-weighted mean (its denominator the summed
    weights of the labelled pixels), but batches were pooled by their labelled-pixel counts: these 4 frames gave
    test/loss 2.7120 at batch 4, 2.7132 at 2 and 2.1288 at 1 (a frame of a weight-0 class alone scored 0/0, counted as
    0 over all its pixels). Now the loss of the split as one batch, however it is batched."""
    from torch import nn

    from bgremover.lit.module import SegmentationModule

    torch.manual_seed(0)
    weights = [0.2, 1.0, 0.3, 5.0, 1.0, 0.0, 0.7, 3.0, 1.5, 4.0, 8.0]  # 0: a class median_freq never saw
    net = nn.Conv2d(3, 11, 1)
    model = SegmentationModule(net=net, optimizer=None, class_weights=weights, channels_last=False,
                               num_log_images=0)
    x, y = torch.randn(4, 3, 6, 7), torch.randint(0, 12, (4, 6, 7))
    y[0, :3] = 3  # frames of unlike class mixes: a heavy class in one, mostly light and void ones in another
    y[2] = torch.randint(9, 12, (6, 7))
    y[3] = 11  # a frame of void and the weightless class adds nothing (alone, its loss is 0/0)
    y[3, 2:] = 5
    with torch.no_grad():
        whole = float(nn.CrossEntropyLoss(weight=torch.tensor(weights), ignore_index=11)(net(x), y))
        for batch in (4, 2, 1):
            for i in range(0, 4, batch):
                model._step((x[i : i + batch], y[i : i + batch]), stage, i // batch)
            metric = model.loss_mean[f"{stage}_"]
            assert float(metric.compute()) == pytest.approx(whole, rel=1e-6), batch
            metric.reset()


def test_dice_weighted_loss_does_not_depend_on_the_eval_batch_size():
    """model.dice_weight adds a soft Dice pooled over the batch, a ratio of sums: val/loss averaged batch Dice
    values, so these 4 frames (one without foreground) scored 3.3947 at batch 4, 3.3998 at 2 and 3.4185 at 1. Now
    the loss of the split as one batch (its cross-entropy plus the Dice of its summed overlap), however batched."""
    from torch import nn

    from bgremover.lit.module import SegmentationModule, soft_dice_loss

    torch.manual_seed(0)
    net = nn.Conv2d(3, 11, 1)
    model = SegmentationModule(net=net, optimizer=None, dice_weight=1.0, channels_last=False, num_log_images=0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 12, (4, 16, 16))
    y[1] = 0  # a frame without foreground
    with torch.no_grad():
        logits = net(x)
        whole = float(nn.CrossEntropyLoss(ignore_index=11)(logits, y) + soft_dice_loss(logits, y, model.fg_index, 11))
        for batch in (4, 2, 1):
            for i in range(0, 4, batch):
                model._step((x[i : i + batch], y[i : i + batch]), "val", i // batch)
            model.log_dict = lambda values, **kw: None  # no trainer here: the epoch's numbers are what we read
            assert model._log_epoch("val")["val/loss"] == pytest.approx(whole, rel=1e-6), batch


def test_a_split_without_labelled_pixels_has_no_accuracy_as_it_has_no_miou():
    """All void: mIoU was NaN (nothing counted) and acc 0.0 (torchmetrics' micro accuracy over nothing), a number
    that reads as every pixel wrong. Both NaN now; a split with labels keeps its accuracy."""
    import math

    from torch import nn

    from bgremover.lit.module import SegmentationModule

    torch.manual_seed(0)
    model = SegmentationModule(net=nn.Conv2d(3, 11, 1), optimizer=None, channels_last=False, num_log_images=0)
    model.log_dict = lambda values, **kw: None  # no trainer here: the epoch's numbers are what we read
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model._step((x, torch.full((2, 8, 8), 11)), "val", 0)
        out = model._log_epoch("val")
        assert math.isnan(out["val/mIoU"]) and math.isnan(out["val/acc"]), out
        y = torch.randint(0, 11, (2, 8, 8))
        model._step((x, y), "test", 0)
        out = model._log_epoch("test")
        right = float((model.net(x).argmax(1) == y).float().mean())
    assert out["test/acc"] == pytest.approx(right) and not math.isnan(out["test/mIoU"])


def test_a_test_only_run_records_the_config_that_trained_its_checkpoint(small_camvid, tmp_path):
    """`train=false ckpt_path=X` recorded only its own command's config (the default lr, max_epochs, no ckpt_init),
    which compare then grouped and labelled it by. X's run's config is recorded too, and compare reads that."""
    from bgremover.compare.runs import Run, recipe

    base = [*TINY_RUN, f"data.root={small_camvid}"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=1", "model.optimizer.lr=0.0123", "test=false"]))
    train(compose_cfg(tmp_path / "b", [*base, "train=false", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"]))
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert b["config"]["model"]["optimizer"]["lr"] != 0.0123  # this command's
    assert b["trained_config"]["model"]["optimizer"]["lr"] == 0.0123 and b["trained_config"]["trainer"]["max_epochs"] == 1
    assert recipe(Run(tmp_path / "b", b))["model.optimizer.lr"] == "0.0123"


def test_a_test_only_run_tests_and_records_the_checkpoint_it_is_given(small_camvid, tmp_path):
    """`train=false ckpt_path=X` (what a resume with nothing left to train says to run) tests X's weights, not the
    net it builds, and its summary.json names X and carries X's history: its numbers are `make eval`'s of X."""
    from bgremover.eval import evaluate

    base = [*TINY_RUN, f"data.root={small_camvid}"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=2", "test=false"]))
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    evaluated, _ = evaluate(compose_cfg(tmp_path / "e", [f"data.root={small_camvid}", "data.num_workers=0",
                                                         f"ckpt_path={last}", "attach_to_run=false"],
                                        config_name="eval"))
    # with the run's own settings, which it has trained to the end: testing it trains nothing, so it is no refusal
    tested, _ = train(compose_cfg(tmp_path / "b", [*base, "trainer.max_epochs=2", "train=false", f"ckpt_path={last}"]))
    assert tested["test/mIoU"] == pytest.approx(evaluated["test/mIoU"], abs=1e-6)
    assert tested["test/loss"] == pytest.approx(evaluated["test/loss"], rel=1e-5)
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert b["best_ckpt"] == str(last.resolve()) and b["epochs"] == 2
    assert b["history"] == a["history"] and len(b["history"]["epoch"]) == 2


def test_the_summary_names_last_ckpt_itself_and_the_median_inference_time(tmp_path, monkeypatch):
    """summary.json's last_ckpt is checkpoints/last.ckpt, also when it is a link to the best epoch's file (a later
    epoch moves it; its target may be deleted); infer_ms_480x360 is the median of the timed passes, not the worst."""
    from types import SimpleNamespace

    from bgremover.lit import summary

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    (ckpt_dir / "epoch_002.ckpt").write_bytes(b"x")
    (ckpt_dir / "last.ckpt").symlink_to("epoch_002.ckpt")
    trainer = SimpleNamespace(callbacks=[LastCheckpoint(dirpath=str(ckpt_dir))])
    assert summary.last_checkpoint(trainer) == str(ckpt_dir / "last.ckpt")

    clock = iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.003])  # passes of 5, 1 and 3 ms (the warm-up is not timed)
    monkeypatch.setattr(summary.time, "perf_counter", lambda: next(clock))
    assert summary.measure_inference_ms(torch.nn.Conv2d(3, 2, 1)) == pytest.approx(3.0)


def test_a_partial_val_split_is_flagged_like_a_partial_test_set(small_camvid, tmp_path, caplog):
    """trainer.limit_val_batches: the best val mIoU (and the epoch it picks) came from part of the val split, and
    neither the run nor compare said so ("Best val mIoU %" over 4 of 101 frames in the audit)."""
    from bgremover import compare

    base = [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1", "test=false"]
    with caplog.at_level("WARNING", logger="bgremover.train"):
        train(compose_cfg(tmp_path / "a", [*base, "trainer.limit_val_batches=1"]))
    train(compose_cfg(tmp_path / "b", base))
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in "ab")
    assert a["val_split"] == {"frames": 1, "of": 2, "complete": False} and b["val_split"]["complete"] is True
    assert "val numbers (and the best epoch they pick) over 1 of 2 frames: PARTIAL" in caplog.text
    report = compare.build_report([tmp_path / "a"], out=tmp_path / "report", grid_images=0)
    assert "(partial val split)" in report.main_md


def test_a_run_shorter_than_its_validation_interval_still_validates_and_says_when(small_camvid, tmp_path, caplog):
    """Validation every 2 epochs, 1 epoch trained: there was no best checkpoint and the test stage scored the last
    weights (then a warning said so). Now the run validates where it ends, and its plan says it will."""
    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.max_epochs=1"]
    with caplog.at_level("INFO", logger="bgremover"):
        _, objects = train(compose_cfg(tmp_path / "a", [*base, "trainer.check_val_every_n_epoch=2"]))
    assert [h["epoch"] for h in objects["model"].history] == [0]
    assert objects["summary"].best_ckpt and Path(objects["summary"].best_ckpt).is_file()
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: "))
    assert "validation every 2 epochs and at the end" in plan, plan


# --- helpers and training on train+val ---------------------------------------------------------------------------
def _run(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "WANDB_MODE": "offline", **(env or {})})


def test_a_fast_dev_run_names_itself_as_what_cut_the_splits_short(small_camvid, tmp_path, caplog):
    """`debug=fdr` tests one batch: its PARTIAL warnings blamed data.limit_eval_images or
    trainer.limit_test_batches, which nobody had set."""
    cfg = compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "debug=fdr"])
    with caplog.at_level("WARNING", logger="bgremover.train"):
        train(cfg)
    fdr = "trainer.fast_dev_run (debug=fdr) runs 1 batch of each split"
    assert f"test numbers over 1 of 3 frames: PARTIAL, not the test split's score ({fdr})" in caplog.text
    assert f"val numbers (and the best epoch they pick) over 1 of 2 frames: PARTIAL ({fdr})" in caplog.text
    assert "limit_eval_images" not in caplog.text
    from omegaconf import OmegaConf

    from bgremover.train import _cut_by

    limits = "data.limit_eval_images or trainer.limit_test_batches"  # what cuts a split when fast_dev_run is off
    assert _cut_by(OmegaConf.create({"trainer": {"fast_dev_run": False}}), limits) == limits
    assert _cut_by(OmegaConf.create({"trainer": {"fast_dev_run": 3}}), limits).endswith("runs 3 batches of each split")


def test_a_ddp_rank_other_than_zero_keeps_the_partial_warnings_to_itself(small_camvid, tmp_path, caplog, monkeypatch):
    """Under DDP every rank computes the run's record: 'test numbers over 2 of 3 frames: PARTIAL' and its val twin
    came once per rank, in the terminal and in train.log. Rank zero says them (the test above); the others not."""
    from pytorch_lightning.utilities import rank_zero_only

    cfg = compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "debug=fdr"])
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with caplog.at_level("WARNING", logger="bgremover.train"):
        metrics, _ = train(cfg)
    assert metrics["test/frames"] == 1  # partial indeed
    assert "PARTIAL" not in caplog.text


def test_train_plus_val_run_learns_from_both_and_says_so(small_camvid, tmp_path):
    cfg = compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1",
                                 "data.train_split=train+val"])
    _, objects = train(cfg)
    trainer = objects["trainer"]
    train_frames = len(trainer.datamodule.datasets["train"])
    assert train_frames == len(list((small_camvid / "train").iterdir())) + len(list((small_camvid / "val").iterdir()))
    assert trainer.global_step == train_frames // 2  # batch 2, drop_last
    summary = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert summary["config"]["data"]["train_split"] == "train+val"


# --- what a long run says up front -------------------------------------------------------------------------------
def test_run_plan_and_estimate_describe_the_run(small_camvid, tmp_path, caplog):
    cfg = compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=7",
                                 "trainer.max_time=00:02:00:00"])
    with caplog.at_level("INFO", logger="bgremover.train"):
        _, objects = train(cfg)
    trainer = objects["trainer"]
    # the plan as logged when training started (afterwards, testing the best checkpoint restores the Timer's
    # clock from it, and "2 h 00 min" became "1 h 59 min" whenever the fit took over 30 s on a loaded CPU)
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: "))
    assert "7 epochs × 2 steps = 14 steps" in plan and "batch 2 of 32×32 crops" in plan
    assert "stops after 2 h 00 min of training (trainer.max_time)" in plan
    for cb in trainer.callbacks:  # the estimate from a fresh run's clocks
        if type(cb).__name__ == "Timer":
            cb._offset = 0.0
    estimate = describe_estimate(trainer, 600.0)  # 10 min a step: 140 min > the 2 h cap
    assert "about 2 h 20 min" in estimate and "trainer.max_time stops it after 2 h 00 min" in estimate
    assert "after about 6 of the 7 epochs" in estimate  # a count (epoch numbers start at 0)
    assert any(isinstance(cb, RunPlan) for cb in trainer.callbacks)


def test_the_estimate_times_training_steps_without_the_validations_between_them(monkeypatch, caplog):
    """The estimate's seconds per step are training's alone: it says "(validation extra)", and a run whose short
    epochs validate among its first steps counted those validations as step time (here 1 s steps and a 5 s
    validation after step 6 read 1.50 s a step, and a run of 10 000 steps 4 h 10 min instead of 2 h 46 min)."""
    from types import SimpleNamespace

    from bgremover.lit import callbacks

    clock = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    trainer = SimpleNamespace(max_epochs=1000, num_training_batches=10, accumulate_grad_batches=1, max_steps=-1,
                              callbacks=[], fast_dev_run=False, is_global_zero=True, sanity_checking=False)
    plan = callbacks.RunPlan(estimate_after_steps=10)
    with caplog.at_level("INFO", logger="bgremover.train"):
        for step in range(1, 12):  # the first step is the warm-up, then 10 timed ones of 1 s each
            clock[0] += 1.0
            plan.on_train_batch_end(trainer)
            if step == 6:
                plan.on_validation_start(trainer)
                clock[0] += 5.0
                plan.on_validation_end(trainer)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("estimate: ")]
    assert line.startswith("estimate: 1.00 s per training step → about 2 h 46 min of training for 1000 epochs"), line


def test_run_plan_and_frame_counts_say_one_as_one(small_camvid, tmp_path, caplog):
    """A one-epoch, one-step run's plan said "1 epochs × 1 steps = 1 steps"; a one-frame split "(1 frames)"."""
    from bgremover.utils import frames_note

    with caplog.at_level("INFO", logger="bgremover.train"):
        train(compose_cfg(tmp_path / "a", [*TINY_RUN, f"data.root={small_camvid}", "test=false",
                                           "trainer.max_epochs=1", "trainer.limit_train_batches=1"]))
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: "))
    assert "1 epoch × 1 step = 1 step," in plan, plan
    assert "validation every 1 epoch," in plan, plan  # was "every 1 epoch(s)"
    assert frames_note({"frames": 1, "of": 1, "complete": True}) == " (1 frame)"


def test_run_plan_counts_the_steps_max_steps_allows(small_camvid, tmp_path):
    # 7 epochs × 2 steps, but max_steps=11 ends the run in its 6th epoch: 11 steps, not 12 or 14
    cfg = compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=7",
                                 "trainer.max_steps=11"])
    _, objects = train(cfg)
    trainer, model = objects["trainer"], objects["model"]
    assert trainer.global_step == 11
    assert "6 epochs × 2 steps = 11 steps (trainer.max_steps=11)" in describe_plan(trainer, model)  # 6 × 2 ≠ 11
    assert "about 1 h 50 min of training for 6 epochs" in describe_estimate(trainer, 600.0)


def test_progress_bar_counts_to_the_epoch_a_time_budget_reaches():
    from bgremover.lit.callbacks import epoch_label

    # Lightning's numbering, from 0 (checkpoint names, history, W&B), over the last epoch's number
    assert epoch_label(2, 100) == "Epoch 2/99"
    assert epoch_label(0, 1000, 1200.0, 0.0) == "Epoch 0/999 (stops after 20 min 00 s)"
    # 3 epochs in 150 s: 1050 s left hold 21 more, so epoch 23 is running when the time runs out
    assert epoch_label(3, 1000, 1200.0, 150.0) == "Epoch 3/~23 (17 min 30 s of 20 min 00 s left)"
    assert epoch_label(3, 5, 1200.0, 150.0) == "Epoch 3/4 (17 min 30 s of 20 min 00 s left)"  # epochs end it first
    # resumed at epoch 10: the pace is this process's (2 epochs in 100 s), not 12 epochs in 100 s
    assert epoch_label(12, 1000, 1200.0, 100.0, first=10) == "Epoch 12/~33 (18 min 20 s of 20 min 00 s left)"
    # resumed from an epoch-end last.ckpt: Lightning first shows the finished epoch 1 (no batches left) while the
    # run starts at 2; its bar read "Epoch 1/~1 (4 min 54 s of 4 min 54 s left)", a pace over -1 epochs
    assert epoch_label(1, 4, 294.0, 0.03, first=2) == "Epoch 1/3 (stops after 4 min 54 s)"


def test_the_bars_time_left_counts_down_inside_an_epoch(monkeypatch):
    """`Epoch 1/~2 (2 min 08 s of 4 min 00 s left)` was set as an epoch started and stood still for the whole epoch
    (minutes on a CPU): the time left now moves at each refresh, the pace (the `~2`) stays the finished epochs'."""
    import io
    import types

    from tqdm import tqdm

    from bgremover.lit import callbacks
    from bgremover.lit.callbacks import EpochProgressBar, epoch_label

    clock = [1000.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    budget = types.SimpleNamespace(budget_s=240.0, spent_before_s=0.0)  # TimeToMIoU's 4 minutes
    trainer = types.SimpleNamespace(callbacks=[budget], max_epochs=1000, max_steps=-1, num_training_batches=4,
                                    accumulate_grad_batches=1, current_epoch=0, progress_bar_metrics={}, loggers=[])
    bar = EpochProgressBar()
    bar._trainer, bar._train_progress_bar = trainer, tqdm(file=io.StringIO())
    bar._t0, bar._first_epoch = clock[0], 0  # on_train_start's

    def desc() -> str:
        return bar.train_progress_bar.desc.removesuffix(": ")  # tqdm's separator

    bar.on_train_epoch_start(trainer)
    assert desc() == "Epoch 0/999 (stops after 4 min 00 s)"
    clock[0] += 30.0
    bar.on_train_batch_end(trainer, None, None, None, 0)
    assert desc() == "Epoch 0/999 (3 min 30 s of 4 min 00 s left)"
    clock[0] += 82.0  # epoch 0 took 112 s: 128 s left hold 2 more, epoch 2 runs when the time runs out
    trainer.current_epoch = 1
    bar.on_train_epoch_start(trainer)
    assert desc() == "Epoch 1/~2 (2 min 08 s of 4 min 00 s left)"
    for i, (step, left) in enumerate(((40.0, "1 min 28 s"), (30.0, "58 s"), (90.0, "0 s"))):
        clock[0] += step
        bar.on_train_batch_end(trainer, None, None, None, i)
        assert desc() == f"Epoch 1/~2 ({left} of 4 min 00 s left)"
        assert bar.train_progress_bar.n == i + 1  # Lightning's own update still runs
    assert epoch_label(3, 1000, 1200.0, 150.0, now_s=200.0) == "Epoch 3/~23 (16 min 40 s of 20 min 00 s left)"


# --- image panels -------------------------------------------------------------------------------------------------
def test_panels_appear_when_validation_runs_every_few_epochs(small_camvid, tmp_path, monkeypatch):
    from bgremover.lit import SegmentationModule

    epochs: list[int] = []
    monkeypatch.setattr(SegmentationModule, "_log_panel", lambda self: epochs.append(self.current_epoch))
    cfg = compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=6",
                                 "trainer.check_val_every_n_epoch=2", "model.log_images_every_n_epochs=4"])
    train(cfg)
    assert epochs == [1, 5]  # validations at epochs 1, 3, 5; `epoch % 4 == 0` never held there


def test_panels_draw_void_black_and_every_class_in_a_colour_for_a_folders_own_classes():
    """The W&B panel of a data=folder run (make remover: classes background/foreground, void 2) drew the void
    labels (unknown mask values, the val padding) in CamVid's Pole colour, as a third class; with a classes.txt of
    13 classes, classes 11 and 12 were drawn black, as void."""
    from torch import nn

    from bgremover.data.classes import PALETTE
    from bgremover.lit import SegmentationModule

    def panel(classes: list[str], labels: list[int]) -> list[tuple[int, ...]]:
        module = SegmentationModule(nn.Conv2d(3, len(classes), 1), optimizer=torch.optim.SGD, class_names=classes,
                                    ignore_index=len(classes), default_foreground=classes[1:])
        y = torch.tensor([[labels]])
        module._panel = (torch.zeros(1, 3, 1, len(labels)), y, y)  # input | ground truth | prediction
        (row,) = module.panel_images()
        truth, pred = row[0, len(labels):2 * len(labels)], row[0, 2 * len(labels):]
        assert (truth == pred).all()
        return [tuple(int(c) for c in px) for px in truth]

    black = (0, 0, 0)
    assert panel(["background", "foreground"], [0, 1, 2]) == [PALETTE[0], PALETTE[1], black]
    many = panel([f"c{i}" for i in range(13)], [10, 11, 12, 13])
    assert many[0] == PALETTE[10] and black not in many[:3] and many[1] != many[2] and many[3] == black
    assert panel(["Sky", "Building"] + ["x"] * 9, [0, 11]) == [PALETTE[0], black]  # CamVid's: as before


# --- weight averaging (callbacks=ema) ------------------------------------------------------------------------------


def test_speedrun_times_say_when_val_is_trained_on(small_camvid):
    from types import SimpleNamespace

    from bgremover.data import CamVidDataModule, ResidentCamVidDataModule
    from bgremover.lit.speedrun import TimeToMIoU

    cb = TimeToMIoU(thresholds=[0.5])
    for dm_type in (CamVidDataModule, ResidentCamVidDataModule):
        trainer = SimpleNamespace(datamodule=dm_type(root=small_camvid, train_split="train+val"), limit_val_batches=1.0)
        cb.on_fit_start(trainer, None)
        assert cb.describe() == "val/mIoU >= 0.500: not reached (val is in the training data: not a held-out score)"
        cb.on_fit_start(SimpleNamespace(datamodule=dm_type(root=small_camvid), limit_val_batches=1.0), None)
        assert cb.describe() == "val/mIoU >= 0.500: not reached"


def test_a_run_without_a_logger(small_camvid, tmp_path):
    """`logger=null` (or `~logger`) ended every run with "Cannot use LearningRateMonitor callback with Trainer that
    has no logger" after the build (a user audit); summary.json still records the run."""
    _, objects = train(compose_cfg(tmp_path, [*(o for o in TINY_RUN if o != "logger=csv"), f"data.root={small_camvid}", "~logger",
                                              "trainer.max_epochs=1", "test=false"]))
    assert objects["trainer"].global_step == 2 and not objects["logger"]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "ok"


def test_run_plan_counts_steps_with_gradient_accumulation(small_camvid, tmp_path, caplog):
    """4 batches an epoch accumulated by 3 are 2 optimizer steps (the last one partial), and the plan said 1: "2
    epochs × 1 step = 2 steps" for a run of 4 (a user audit)."""
    with caplog.at_level("INFO", logger="bgremover.train"):
        _, objects = train(compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "data.batch_size=1",
                                                  "+trainer.accumulate_grad_batches=3", "trainer.max_epochs=2",
                                                  "test=false"]))
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: "))
    assert objects["trainer"].global_step == 4
    assert "2 epochs × 2 steps = 4 steps" in plan, plan


def test_the_precision_recorded_is_the_one_that_trains(small_camvid, tmp_path):
    """`trainer.precision=16-mixed` on a CPU trains bf16-mixed (Lightning converts it), while summary.json and W&B
    recorded "16-mixed" (a user audit)."""
    _, objects = train(compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.precision=16-mixed",
                                              "trainer.max_epochs=1", "trainer.limit_train_batches=1", "test=false"]))
    assert str(objects["trainer"].precision) == "bf16-mixed"
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["trainer"]["precision"] == "bf16-mixed"


def test_a_double_precision_run(small_camvid, tmp_path):
    """`trainer.precision=64-true` failed at its first step: "expected scalar type Float but found Double" (the
    logits cast to fp32 against the fp64 class weights; a user audit)."""
    _, objects = train(compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.precision=64-true",
                                              "data.class_weights=median_freq", "trainer.max_epochs=1",
                                              "trainer.limit_train_batches=1", "test=false"]))
    assert objects["trainer"].global_step == 1


def _fp32_test_numbers(ckpt: str, root: Path) -> tuple[float, float]:
    """(test loss, test mIoU) of a checkpoint's net in fp32 over a small_camvid's test frames, from the files,
    without the module: 32×64 frames (multiples of 32: nothing padded), no class weights."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image
    from torchmetrics.functional.classification import multiclass_jaccard_index

    from bgremover import checkpoint

    net, info, _ = checkpoint.load_net(ckpt)
    mean, std = torch.tensor(info["mean"]).view(3, 1, 1), torch.tensor(info["std"]).view(3, 1, 1)
    frames = sorted((root / "test").iterdir())
    x = torch.stack([(torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) / 255 - mean) / std
                     for f in frames])
    y = torch.stack([torch.from_numpy(np.array(Image.open(root / "testannot" / f.name))).long() for f in frames])
    with torch.no_grad():
        logits = net(x)
    loss = F.cross_entropy(logits, y, ignore_index=11)  # the mean over the split's labelled pixels
    return float(loss), float(multiclass_jaccard_index(logits.argmax(1), y, num_classes=11, ignore_index=11))


def test_a_mixed_precision_runs_test_numbers_are_its_best_nets_in_fp32(small_camvid, tmp_path):
    """bf16-mixed (trainer=default's, the speed-runs') trains under Lightning's autocast; the test stage leaves it:
    the published test/loss and test/mIoU are those of the best checkpoint's fp32 net, as the exported model and
    the shipped remover run it, not bf16 numbers."""
    metrics, _ = train(compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.precision=bf16-mixed",
                                              "trainer.max_epochs=1", "data.class_weights=null"]))
    loss, miou = _fp32_test_numbers(json.loads((tmp_path / "summary.json").read_text())["best_ckpt"], small_camvid)
    assert metrics["test/frames"] == 3 and metrics["test/loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["test/mIoU"] == pytest.approx(miou, abs=1e-6)


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_a_true_precision_run_is_tested_in_fp32_as_eval_tests_it(precision, small_camvid, tmp_path):
    """`trainer.precision=bf16-true` (16-true, 64-true) trained, then failed in its test stage: the fp32 test input
    met the weights Lightning had cast ("Input type (torch.FloatTensor) and weight type (CPUBFloat16Type)"). The
    test stage runs the net in fp32, so a 64-true run's test numbers are `make eval`'s of its best checkpoint."""
    from bgremover.eval import evaluate

    metrics, objects = train(compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={small_camvid}",
                                                            f"trainer.precision={precision}", "trainer.max_epochs=1"]))
    assert metrics["test/frames"] == 3 and 0 <= metrics["test/mIoU"] <= 1
    assert {p.dtype for p in objects["model"].net.parameters()} == {torch.float32}
    if precision == "64-true":  # fp64 input and weights round to fp32 exactly as the checkpoint loads in eval
        best = json.loads((tmp_path / "run" / "summary.json").read_text())["best_ckpt"]
        evaluated = evaluate(compose_cfg(tmp_path / "ev", [f"data.root={small_camvid}", "data.num_workers=0",
                                                           "trainer.precision=32-true", f"ckpt_path={best}"],
                                         config_name="eval"))[0]
        assert metrics["test/mIoU"] == pytest.approx(evaluated["test/mIoU"], abs=1e-6)
        assert metrics["test/loss"] == pytest.approx(evaluated["test/loss"], rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_a_half_precision_run_weighs_its_loss_by_the_class_weights_as_given(precision, small_camvid, tmp_path):
    """`trainer.precision=bf16-true data.class_weights=median_freq` stopped at its first step: Lightning had cast the
    class-weight buffer to bf16 with the module, against the loss's fp32 logits ("expected scalar type Float but
    found BFloat16"). The loss weighs by the weights as computed, in fp32."""
    metrics, objects = train(compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1",
                                                    f"trainer.precision={precision}", "data.class_weights=median_freq"]))
    model = objects["model"]
    assert objects["trainer"].global_step == 2 and metrics["test/frames"] == 3
    assert torch.equal(model.criterion.weight, torch.tensor(model.hparams.class_weights, dtype=torch.float32))
    assert len(set(model.hparams.class_weights)) > 1  # weighted: the classes' weights differ


def test_the_paper_recipes_learning_rate_decays_per_epoch_not_per_step(small_camvid, tmp_path):
    """The Tiramisu recipe multiplies the lr by 0.995 per epoch (Jégou et al.): stepped per batch instead, an epoch
    of 184 batches would cut it to 40 % (0.995**184), and it would be gone long before the recipe's last epoch."""
    cfg = compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=3", "test=false"])
    assert cfg.model.scheduler_interval == "epoch" and cfg.model.scheduler.gamma == 0.995
    _, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.global_step == 6  # 4 frames in batches of 2: 2 steps an epoch
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(cfg.model.optimizer.lr * 0.995**3, rel=1e-9)  # not 0.995**6


@pytest.mark.parametrize("mode, monitor", [("min", "val/loss"), ("max", "val/mIoU")])
def test_reduce_on_plateau_steps_on_each_validation(mode, monitor, small_camvid, tmp_path):
    """ReduceLROnPlateau, the lightning-hydra-template's scheduler, failed after the build: "The lr scheduler dict
    must include a monitor". It steps on the val metric its mode fits, once per validation (every 2nd epoch)."""
    plateau = f"+model.scheduler={{_target_:torch.optim.lr_scheduler.ReduceLROnPlateau,_partial_:true,mode:{mode}," \
              "patience:0,factor:0.5}"
    cfg = compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "~model.scheduler", plateau,
                                 "trainer.max_epochs=4", "trainer.check_val_every_n_epoch=2", "test=false"])
    lr = cfg.model.optimizer.lr
    _, objects = train(cfg)
    config = objects["trainer"].lr_scheduler_configs[0]
    assert config.monitor == monitor and config.interval == "epoch" and config.frequency == 2
    assert config.scheduler.last_epoch == 2  # epochs 1 and 3 validated: two steps
    first, second = json.loads((tmp_path / "summary.json").read_text())["history"][monitor]
    better = second < first if mode == "min" else second > first
    assert config.scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(lr if better else lr / 2)


def test_without_the_projects_callbacks_no_checkpoint_passes_for_the_best(small_camvid, tmp_path):
    """`callbacks=none`: Lightning's own ModelCheckpoint keeps the newest epoch, and summary.json recorded it as
    `best_ckpt`, which test, compare and export then treat as the best (a user audit). It is the last one."""
    train(compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "callbacks=none", "trainer.max_epochs=2",
                                 "test=false"]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_ckpt"] is None and summary["last_ckpt"] and Path(summary["last_ckpt"]).is_file()


@pytest.mark.parametrize("limits", [
    ["trainer.max_epochs=5", "trainer.max_steps=3", "trainer.check_val_every_n_epoch=1"],  # stops inside epoch 2
    ["trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2"],  # the last epoch is not a validating one
    # validation after every batch (val_check_interval): Lightning scores the last step itself, once
    ["trainer.max_epochs=5", "trainer.max_steps=3", "trainer.check_val_every_n_epoch=1", "+trainer.val_check_interval=0.5"],
    # an interval that does not divide the epoch (4 batches): Lightning validates after batch 3, not at the end
    ["trainer.max_epochs=1", "data.batch_size=1", "+trainer.val_check_interval=0.75"],
    ["trainer.max_epochs=1", "data.batch_size=1", "trainer.check_val_every_n_epoch=null", "+trainer.val_check_interval=3"],
    # the same interval counted over the run (4-batch epochs): validations after batches 3, 6, 9 and 12, where it
    # ends; stopped at batch 7 (the 3rd of epoch 2, not a validation of the run's count) the end is scored
    ["trainer.max_epochs=3", "data.batch_size=1", "trainer.check_val_every_n_epoch=null", "+trainer.val_check_interval=3"],
    ["trainer.max_epochs=5", "trainer.max_steps=7", "data.batch_size=1", "trainer.check_val_every_n_epoch=null",
     "+trainer.val_check_interval=3"],
    # a time interval (an hour): whether Lightning validates there is not known ahead; the end is scored
    ["trainer.max_epochs=1", "trainer.check_val_every_n_epoch=null", "+trainer.val_check_interval=00:01:00:00"],
])
def test_the_weights_a_run_ends_with_are_validated(small_camvid, tmp_path, limits):
    """A user audit: a run that max_steps stopped inside an epoch, or whose last epoch was not a validating one,
    never scored its last weights: the best checkpoint (what test, compare and export use) was picked among older
    ones, whatever the last steps had learned. Now the run validates once more where it ends."""
    _, objects = train(compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "test=false", *limits]))
    trainer, history = objects["trainer"], objects["model"].history
    assert history and history[-1]["step"] == trainer.global_step, (history, trainer.global_step)
    assert [h["step"] for h in history] == sorted({h["step"] for h in history})  # no validation twice


def test_a_loader_without_a_length_is_validated_at_its_end_only():
    """val_check_batch is inf for a train loader without a length: Lightning validates at its end, so the end is
    not forced (a second validation) and a step inside it is no validation."""
    from types import SimpleNamespace

    from bgremover.lit.checkpoints import _validates_here

    for every in (1, None):
        trainer = SimpleNamespace(check_val_every_n_epoch=every, current_epoch=0, should_stop=False,
                                  val_check_batch=float("inf"))
        assert [_validates_here(trainer, i, last) for i, last in ((4, False), (5, True))] == [False, True]


def test_a_max_time_stop_inside_an_epoch_that_does_not_validate_scores_its_weights(tmp_path, monkeypatch):
    """trainer.max_time's stop inside an epoch validated only where that epoch validated anyway: with validation
    every 2 epochs, a run stopped in its first scored nothing, so it had no best checkpoint to test or export."""
    from bgremover.lit.module import SegmentationModule

    data = write_camvid(tmp_path / "CamVid", {"train": 10, "val": 2, "test": 2}, size=(32, 64))
    step = SegmentationModule.training_step
    monkeypatch.setattr(SegmentationModule, "training_step", lambda *a, **k: time.sleep(0.6) or step(*a, **k))
    _, objects = train(compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={data}", "test=false",
                                                       "trainer.check_val_every_n_epoch=2",
                                                       "trainer.max_time=00:00:00:01"]))
    trainer, history = objects["trainer"], objects["model"].history
    assert 1 <= trainer.global_step < 5 and [h["step"] for h in history] == [trainer.global_step], history
    assert objects["summary"].best_ckpt and Path(objects["summary"].best_ckpt).is_file()


class FirstEpochBestByForeground(pl.Callback):
    """val/fg_iou (the remover's checkpoint metric) best at epoch 0, whatever val/mIoU does."""

    def on_validation_end(self, trainer, pl_module):  # before ModelCheckpoint's (checkpoint callbacks run last)
        if not trainer.sanity_checking:
            trainer.callback_metrics["val/fg_iou"] = torch.tensor(1.0 if trainer.current_epoch == 0 else 0.0)


def test_val_miou_best_is_the_runs_when_the_best_epoch_is_picked_by_another_metric(small_camvid, tmp_path):
    """The remover picks its best epoch by val/fg_iou: testing that checkpoint loaded its val/mIoU_best so far, and
    summary.json, the sweep line, compare and Optuna's objective said epoch 0's val/mIoU as the run's best, below
    the history's own val/mIoU_best column."""
    deeplab = ["~experiment", "model=deeplabv3plus", "data.num_workers=0", "data.batch_size=2", "data.crop_size=[32,32]",
               "data.eval_batch_size=1", "extras.print_config=false", "measure_inference=false", "logger=csv",
               "trainer.max_time=null", "trainer.check_val_every_n_epoch=1", f"data.root={small_camvid}",
               "callbacks.model_checkpoint.monitor=val/fg_iou", "trainer.max_epochs=3",
               "+callbacks.fg._target_=test_runs.FirstEpochBestByForeground"]
    metrics, _ = train(compose_cfg(tmp_path / "run", deeplab))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    history = summary["history"]["val/mIoU"]
    assert Path(summary["best_ckpt"]).name == "epoch_000.ckpt" and max(history) > history[0], history  # the case
    assert summary["metrics"]["val/mIoU_best"] == metrics["val/mIoU_best"] == pytest.approx(max(history))
    assert summary["history"]["val/mIoU_best"][-1] == pytest.approx(max(history))


def test_a_runs_test_numbers_are_its_best_epochs_not_its_last(small_camvid, tmp_path):
    """The test stage after training scores the best checkpoint (what summary.json names, compare ranks and export
    ships), not the weights training ended with: here the best is epoch 0 of 3, and the run's test numbers are
    that file's, computed from it without the module, not last.ckpt's."""
    metrics, _ = train(compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=3",
                                              "data.class_weights=null", "callbacks.model_checkpoint.monitor=val/fg_iou",
                                              "+callbacks.fg._target_=test_runs.FirstEpochBestByForeground"]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert Path(summary["best_ckpt"]).name == "epoch_000.ckpt"
    best, last = (_fp32_test_numbers(summary[k], small_camvid) for k in ("best_ckpt", "last_ckpt"))
    assert abs(best[0] - last[0]) > 1e-3 * best[0]  # the case: the last epoch's net scores otherwise
    assert metrics["test/loss"] == pytest.approx(best[0], rel=1e-5)
    assert metrics["test/mIoU"] == pytest.approx(best[1], abs=1e-6)


def test_speedrun_times_over_part_of_the_val_split_say_so(small_camvid, tmp_path, caplog):
    """trainer.limit_val_batches: the time-to-mIoU lines (a speed-run's headline numbers) quoted a score over part
    of the val split as the split's, though summary.json's val_split says PARTIAL (an audit)."""
    with caplog.at_level("INFO", logger="bgremover.train"):
        train(compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1", "test=false",
                                     "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
                                     "+callbacks.time_to_miou._target_=bgremover.lit.speedrun.TimeToMIoU",
                                     "+callbacks.time_to_miou.thresholds=[0.0]"]))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("speedrun: ")]
    assert any(" (1 of 2 frames, PARTIAL) >= 0.000 after " in line for line in lines), lines
    took = next(line for line in lines if line.startswith("speedrun: training took"))
    assert took.endswith(" (epoch 0) (val/mIoU (1 of 2 frames, PARTIAL))"), took
    assert json.loads((tmp_path / "summary.json").read_text())["val_split"]["complete"] is False


def test_summary_json_holds_numbers_given_as_numpy_or_torch_scalars(tmp_path):
    """Metrics reach summary.json as torch or numpy scalars (a logged tensor, a numpy mean): they are written as
    JSON numbers, not as the strings "tensor(0.5000)" or "0.25" a reader of the file would compare as text."""
    import numpy as np

    from bgremover.utils import write_json_atomic

    path = tmp_path / "run" / "summary.json"
    write_json_atomic(path, {"test/mIoU": torch.tensor(0.5), "val/mIoU": np.float32(0.25), "epochs": np.int64(3),
                             "run_dir": tmp_path / "run"})
    assert json.loads(path.read_text()) == {"test/mIoU": 0.5, "val/mIoU": 0.25, "epochs": 3,
                                            "run_dir": str(tmp_path / "run")}
