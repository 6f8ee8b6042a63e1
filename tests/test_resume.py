"""Resuming a run: the clocks, the best epoch, the history, the CSV and W&B logs and the run plan go on from the
checkpoint; a resume that cannot go on (another net, nothing left to train) is one line before anything is built."""

from __future__ import annotations

import csv
import json
import logging
import os
import shlex
import signal
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from test_runs import TINY_RUN
from test_train import compose_cfg

from bgremover.lit.callbacks import describe_estimate, describe_plan
from bgremover.train import train


def test_resumed_run_counts_its_training_time_from_the_start(small_camvid, tmp_path):
    """summary.json's wall_time_s (the report's "Train time") of a resumed run counted only the time since the
    resume: 3 epochs, then 1 more from last.ckpt, was reported as 1 epoch's time."""
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    train(compose_cfg(run1, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=3", "test=false"]))
    s1 = json.loads((run1 / "summary.json").read_text())
    spent = torch.load(s1["last_ckpt"], weights_only=True)["callbacks"]["RunSummary"]["fit_s"]
    assert 0 < spent <= s1["wall_time_s"]
    t0 = time.time()
    train(compose_cfg(run2, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=4", "test=false",
                             f"ckpt_path={s1['last_ckpt']}"]))
    own = time.time() - t0
    s2 = json.loads((run2 / "summary.json").read_text())
    assert s2["epochs"] == 4
    assert spent < s2["wall_time_s"] < spent + own
    from bgremover.lit.summary import RunSummary  # train=false ckpt_path=X: the time recorded in X

    tested = RunSummary()
    tested.from_checkpoint(torch.load(s1["last_ckpt"], weights_only=True), s1["last_ckpt"])
    assert tested.fit_seconds == spent
    # and its steps: a test-only run's summary said global_step 0 (its own trainer's, which never stepped)
    train(compose_cfg(tmp_path / "run3", [*TINY_RUN, f"data.root={small_camvid}", "train=false",
                                          f"ckpt_path={s1['last_ckpt']}"]))
    s3 = json.loads((tmp_path / "run3" / "summary.json").read_text())
    assert (s3["epochs"], s3["global_step"]) == (3, s1["global_step"]) and s1["global_step"] > 0
    assert not (tmp_path / "run3" / "checkpoints").exists()  # testing copies no earlier best into its folder



def _resumed_clock(clock, state, now, trainer, set_up, trained):
    """`clock` (a TimeToMIoU) resumed from `state` in a new process whose clock reads 5000: `set_up` seconds before
    its first step, then `trained` seconds of training."""
    clock.load_state_dict(state)
    now[0] = 5000.0
    clock.on_fit_start(trainer, None)
    now[0] += set_up
    clock.on_train_start(trainer, None)
    now[0] += trained
    return clock


def test_speedrun_budget_and_clock_go_on_across_a_resume(monkeypatch):
    """A time-budgeted speed-run resumed from a checkpoint restarted its budget (a full new one, the lr back up
    its schedule) and its time-to-mIoU clock at zero."""
    from bgremover.lit import speedrun

    now = [1000.0]
    monkeypatch.setattr(speedrun.time, "perf_counter", lambda: now[0])

    class Trainer:
        world_size, lr_scheduler_configs, should_stop, is_global_zero = 1, [], False, True

    first = speedrun.TimeToMIoU(budget_s=100)
    first.on_fit_start(None, None)
    now[0] += 5  # set-up before the first step
    first.on_train_start(None, None)
    now[0] += 60
    state = first.state_dict()
    assert state["fit_s"] == 65 and state["train_s"] == 60

    resumed = _resumed_clock(speedrun.TimeToMIoU(budget_s=100), state, now, None, set_up=2, trained=10)
    assert resumed.elapsed() == 77 and resumed.train_elapsed() == 70
    assert resumed._progress(Trainer()) == pytest.approx(0.7)  # 30 s of the budget left, not 100



def test_resumed_module_keeps_the_best_validation_score():
    from bgremover.lit import SegmentationModule
    from bgremover.nets import FCDenseNet

    def module():
        net = FCDenseNet(down_blocks=(1,), up_blocks=(1,), bottleneck_layers=1, growth_rate=4, first_conv_channels=8)
        return SegmentationModule(net=net, optimizer=None)

    first = module()
    first.val_miou_best.update(torch.tensor(0.7))
    first.history = [{"epoch": 0, "val/mIoU": 0.7}]
    ckpt: dict = {"state_dict": {}}
    first.on_save_checkpoint(ckpt)

    resumed = module()
    resumed.on_load_checkpoint(ckpt)
    resumed.on_train_start()  # used to reset the best, so after a resume it covered only the new epochs
    resumed.val_miou_best.update(torch.tensor(0.5))
    assert float(resumed.val_miou_best.compute()) == pytest.approx(0.7)
    assert resumed.history == [{"epoch": 0, "val/mIoU": 0.7}]



def test_resume_from_last_ckpt_continues_history_and_best(small_camvid, tmp_path):
    cfg = compose_cfg(tmp_path / "a", [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=2"])
    train(cfg)
    s1 = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert Path(s1["last_ckpt"]).name == "last.ckpt"
    assert torch.load(s1["last_ckpt"], weights_only=True)["epoch"] == 1

    cfg = compose_cfg(tmp_path / "b", [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=4",
                                       f"ckpt_path={s1['last_ckpt']}"])
    train(cfg)
    s2 = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s2["history"]["epoch"] == [0, 1, 2, 3]
    # a max_time stop inside an epoch validates it, and the resumed run validates it again: the step tells them apart
    assert s2["history"]["step"] == [2, 4, 6, 8]
    assert s2["history"]["val/mIoU"][:2] == s1["history"]["val/mIoU"]
    assert s2["metrics"]["val/mIoU_best"] == pytest.approx(max(s2["history"]["val/mIoU"]))
    assert s2["history"]["val/mIoU_best"] == [max(s2["history"]["val/mIoU"][: i + 1]) for i in range(4)]



def test_a_resume_into_a_new_folder_keeps_the_earlier_best_epoch(small_camvid, tmp_path):
    """Lightning reloads the best score only in the same checkpoint folder: resumed into a new run folder (the
    README's way), the first epoch after the resume became "best" however bad, and was tested and exported. The
    earlier best is now copied in and ranked: a later epoch must beat it; the earlier run's files stay."""
    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=2"]))
    s1 = json.loads((tmp_path / "a" / "summary.json").read_text())
    before = sorted(os.listdir(tmp_path / "a" / "checkpoints"))
    state = torch.load(s1["last_ckpt"], weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith(("BestCheckpoint", "ModelCheckpoint"))]
    for run, score in (("b", 2.0), ("c", -1.0)):  # an earlier best no epoch can beat, then one every epoch beats
        state["callbacks"][key]["best_model_score"] = torch.tensor(score)
        torch.save(state, tmp_path / f"from_{run}.ckpt")
        train(compose_cfg(tmp_path / run, [*base, "trainer.max_epochs=3", f"ckpt_path={tmp_path / f'from_{run}.ckpt'}"]))
        s2 = json.loads((tmp_path / run / "summary.json").read_text())
        best = Path(s2["best_ckpt"])
        assert best.parent == tmp_path / run / "checkpoints"
        if score > 1:  # the earlier run's best, copied into this run
            assert best.name == Path(s1["best_ckpt"]).name and best.read_bytes() == Path(s1["best_ckpt"]).read_bytes()
            # and its score kept in this run's state: a second resume into another folder ranks it again (a None
            # score there was "no best so far", and that resume's first epoch became best however bad)
            kept = torch.load(s2["last_ckpt"], weights_only=True)["callbacks"][key]
            assert float(kept["best_model_score"]) == 2.0 and Path(kept["best_model_path"]) == best
        else:  # the new epoch, and the copy it replaced is gone
            assert best.name == "epoch_002.ckpt" and not (best.parent / Path(s1["best_ckpt"]).name).exists()
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == before



def test_a_resume_from_a_moved_run_folder_keeps_its_best_epoch(small_camvid, tmp_path, caplog):
    """A run folder copied or moved (from the GPU machine, say), then resumed: its best file was looked for at the
    path recorded only, so the first epoch after the resume became "best" however bad, and was tested and exported.
    It is found beside the checkpoint resumed; a best file found nowhere is named in a warning."""
    import shutil

    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=2"]))
    s1 = json.loads((tmp_path / "a" / "summary.json").read_text())
    shutil.move(tmp_path / "a", tmp_path / "moved")
    checkpoints = tmp_path / "moved" / "checkpoints"
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith(("BestCheckpoint", "ModelCheckpoint"))]
    state["callbacks"][key]["best_model_score"] = torch.tensor(2.0)  # an earlier best no epoch can beat
    torch.save(state, checkpoints / "edited.ckpt")
    train(compose_cfg(tmp_path / "b", [*base, "trainer.max_epochs=3", f"ckpt_path={checkpoints / 'edited.ckpt'}"]))
    best = Path(json.loads((tmp_path / "b" / "summary.json").read_text())["best_ckpt"])
    old_best = checkpoints / Path(s1["best_ckpt"]).name
    assert best == tmp_path / "b" / "checkpoints" / old_best.name and best.read_bytes() == old_best.read_bytes()
    # found nowhere: said, and the epochs from the resume on are ranked among themselves
    shutil.copy(checkpoints / "edited.ckpt", tmp_path / "alone.ckpt")
    with caplog.at_level("WARNING", logger="bgremover.train"):
        train(compose_cfg(tmp_path / "c", [*base, "trainer.max_epochs=3", f"ckpt_path={tmp_path / 'alone.ckpt'}"]))
    assert "resumed into a new folder without the best checkpoint so far, " in caplog.text
    assert Path(json.loads((tmp_path / "c" / "summary.json").read_text())["best_ckpt"]).name == "epoch_002.ckpt"


def test_a_resume_keeps_the_early_stopping_patience_it_is_given(small_camvid, tmp_path):
    """Lightning restored the checkpoint's patience with its count: resumed with `callbacks.early_stopping.patience=5`,
    a run stopped with patience 1 went on with 1 and stopped after one more epoch without a new best (4 epochs of
    the 6 asked for), while summary.json recorded patience 5. The count goes on; the patience is the command's."""
    from pytorch_lightning.callbacks import EarlyStopping

    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=2", "callbacks.early_stopping.patience=1"]))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith("EarlyStopping")]
    state["callbacks"][key].update(wait_count=1, best_score=torch.tensor(2.0))  # no epoch can beat it
    torch.save(state, tmp_path / "waited.ckpt")
    _, objects = train(compose_cfg(tmp_path / "b", [*base, "trainer.max_epochs=6", "callbacks.early_stopping.patience=3",
                                                    f"ckpt_path={tmp_path / 'waited.ckpt'}"]))
    (stopping,) = [c for c in objects["trainer"].callbacks if isinstance(c, EarlyStopping)]
    assert stopping.patience == 3 and stopping.wait_count == 3  # the count went on from 1: stopped after 2 more epochs
    assert objects["trainer"].current_epoch == 4


def test_a_resume_with_another_net_is_one_line_before_the_build(small_camvid, tmp_path):
    """`ckpt_path=<a DeepLab run's last.ckpt> model=tiramisu56` failed after the build as "RuntimeError: Error(s) in
    loading state_dict for SegmentationModule" and left a failed run folder; now one line naming both nets."""
    from bgremover import checks
    from bgremover.errors import UserError

    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.max_epochs=1"]
    train(compose_cfg(tmp_path / "a", base))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    net = json.loads((tmp_path / "a" / "summary.json").read_text())["net"]
    checks.validate_train(compose_cfg(tmp_path / "b", [*base, f"ckpt_path={last}", "trainer.max_epochs=2"]))  # fine
    # the same net with nothing left to train: it ran nothing, wrote an "ok" run, and compare took it for a seed
    # (the steps' case with epochs left: with trainer.max_epochs=1 still in it, the epochs alone refused it)
    for limits in (["trainer.max_epochs=1"], ["trainer.max_epochs=5", "trainer.max_steps=2"]):
        with pytest.raises(UserError) as info:
            checks.validate_train(compose_cfg(tmp_path / "b", [*base, f"ckpt_path={last}", *limits]))
        assert str(info.value).startswith(f"ckpt_path {last} has trained 1 epoch (2 steps): with "
                                          f"trainer.max_epochs={limits[0][-1]} and trainer.max_steps=") and \
            "nothing is left to train; raise them to go on, or test it with train=false" in str(info.value)
    checks.validate_train(compose_cfg(tmp_path / "b", [*base, f"ckpt_path={last}", "trainer.max_epochs=5",
                                                       "trainer.max_steps=3"]))  # one step left: it goes on
    deeplab = ["~experiment", "model=deeplabv3plus", "model.net.encoder_weights=null", f"data.root={small_camvid}"]
    with pytest.raises(UserError) as info:
        checks.validate_train(compose_cfg(tmp_path / "c", [*deeplab, f"ckpt_path={last}"]))
    assert str(info.value).startswith(f"ckpt_path {last} holds a {net}, and this run builds a "
                                      "deeplabv3plus_mobilenet_v2: resume with the run's own settings")
    checks.validate_train(compose_cfg(tmp_path / "d", [*deeplab, f"ckpt_init={last}"]))  # weights to start from



def test_a_resume_whose_clock_is_spent_is_refused_up_front(small_camvid, tmp_path):
    """trainer.max_time and a callback's budget_s go on across a resume: with the clock already spent, the resumed
    run trained nothing, tested, and wrote an "ok" run. Refused up front now; a malformed max_time, which
    Lightning refused only while building the Trainer, is one line naming the setting."""
    from bgremover import checks
    from bgremover.errors import UserError

    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.max_epochs=1"]
    train(compose_cfg(tmp_path / "a", base))
    state = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    state["callbacks"]["Timer"] = {"time_elapsed": {"train": 90.0, "validate": 3.0}}
    state["callbacks"]["TimeToMIoU"] = {"reached": {}, "fit_s": 70.0, "train_s": 61.0}
    ckpt = tmp_path / "spent.ckpt"
    torch.save(state, ckpt)
    more = [*base, "trainer.max_epochs=3", f"ckpt_path={ckpt}"]
    budget = ["+callbacks.clock._target_=bgremover.lit.speedrun.TimeToMIoU"]
    checks.validate_train(compose_cfg(tmp_path / "b", [*more, "trainer.max_time=00:00:01:31"]))  # 1 s left
    checks.validate_train(compose_cfg(tmp_path / "b", [*more, *budget, "+callbacks.clock.budget_s=62"]))
    for extra, key, allowed in ((["trainer.max_time=00:00:01:30"], "trainer.max_time", 90),
                                (["trainer.max_time={minutes: 1}"], "trainer.max_time", 60),
                                ([*budget, "+callbacks.clock.budget_s=60"], "callbacks.clock.budget_s", 60)):
        with pytest.raises(UserError) as info:
            checks.validate_train(compose_cfg(tmp_path / "b", [*more, *extra]))
        assert str(info.value).startswith(f"ckpt_path {ckpt} has trained ") and \
            f", and {key} allows {allowed} s in all: nothing is left to train" in str(info.value)
    for bad in ("10min", "00:00:00:00"):
        with pytest.raises(UserError, match=r"^trainer\.max_time must be "):
            checks.validate_train(compose_cfg(tmp_path / "c", [*base, f"trainer.max_time={bad}"]))



def test_a_resume_records_the_optimizer_it_trains_with(small_camvid, tmp_path, caplog):
    """Lightning restores the optimizer and its schedule: `ckpt_path=... model.optimizer.lr=1e-3` trained on at the
    checkpoint's 1e-5 without a word, while summary.json, W&B and compare's labels said 1e-3."""
    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=1", "model.optimizer.lr=0.01"]))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with caplog.at_level("WARNING", logger="bgremover.train"):
        _, objects = train(compose_cfg(tmp_path / "b", [*base, "trainer.max_epochs=2", "model.optimizer.lr=0.5",
                                                        f"ckpt_path={last}"]))
    assert objects["trainer"].optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.01)  # what trained
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["config"]["model"]["optimizer"]["lr"] == pytest.approx(0.01)  # what is recorded
    (warned,) = [r.getMessage() for r in caplog.records if "a resume goes on with" in r.getMessage()]
    assert "model.optimizer.lr=0.01 (not this command's 0.5)" in warned and f"ckpt_init={last}" in warned


def test_the_resume_hint_is_not_followed_by_lightnings_mid_epoch_warning():
    """Following the printed resume hint (a mid-epoch last.ckpt) showed Lightning's raw "unreliable results"
    warning right after it; the rest of that epoch only draws a fresh shuffle, and the plan says where it resumes."""
    import warnings

    from bgremover.utils import quiet_libraries

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not "
                      "resumable. This can cause unreliable results if further training is done.", stacklevel=1)
        warnings.warn("another warning", stacklevel=1)
    assert [str(w.message) for w in seen] == ["another warning"]


def test_a_quiet_sweep_jobs_terminal_keeps_warnings_and_its_log_file_keeps_everything(tmp_path):
    """quiet_libraries(verbose=False), a sweep job's: on the terminal no info line from Lightning or bgremover,
    nor a warning its job line already says (IN_JOB_LINE), but every other warning; the run's log file keeps
    all of them; Lightning's tips are dropped on both."""
    import io

    from bgremover.utils import IN_JOB_LINE, quiet_libraries

    root, term_text = logging.getLogger(), io.StringIO()
    term, log_file = logging.StreamHandler(term_text), logging.FileHandler(tmp_path / "job.log")
    lightning, ours = logging.getLogger("pytorch_lightning.trainer"), logging.getLogger("bgremover.train")
    kept, root.handlers = root.handlers, [term, log_file]
    levels = [lightning.level, ours.level]
    try:
        quiet_libraries(verbose=False)
        for logger in (lightning, ours):
            logger.setLevel(logging.INFO)
        lightning.info("GPU available: False")
        ours.info("plan: 1 epoch")
        ours.warning("test numbers over 1 of 3 frames: PARTIAL", extra=IN_JOB_LINE)
        lightning.warning("val dataloader has few workers")
        lightning.info("💡 Tip: try litmodels")
    finally:
        root.handlers = kept
        lightning.setLevel(levels[0])
        ours.setLevel(levels[1])
        log_file.close()
    assert term_text.getvalue().splitlines() == ["val dataloader has few workers"]
    assert (tmp_path / "job.log").read_text().splitlines() == [
        "GPU available: False", "plan: 1 epoch", "test numbers over 1 of 3 frames: PARTIAL",
        "val dataloader has few workers"]


def test_a_resume_in_place_keeps_the_csv_logs_earlier_rows(small_camvid, tmp_path):
    """Lightning's CSV writer deleted csv/metrics.csv when it started: resumed in its own folder, a run's CSV
    history began at the resume (11 rows became 5 in the audit). The earlier rows stay; new ones are appended."""
    import csv

    base = [*TINY_RUN, f"data.root={small_camvid}", "logger=csv"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=2", "test=false"]))
    path = tmp_path / "a" / "csv" / "metrics.csv"
    before = list(csv.DictReader(path.open()))
    step = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert sorted({r["epoch"] for r in before if r.get("val/mIoU")}) == ["0", "1"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=3", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"]))
    after = list(csv.DictReader(path.open()))
    assert sorted({r["epoch"] for r in after if r.get("val/mIoU")}) == ["0", "1", "2"]
    assert [{k: v for k, v in r.items() if k in before[0]} for r in after[: len(before)]] == before  # kept as written
    # and once: the resumed run's rows come from its own steps, from the checkpoint's on
    assert len([r for r in after if float(r["step"]) < step]) == len(before)
    assert any(r.get("test/mIoU") for r in after)  # the test stage's new column, header widened
    assert sum(line.startswith("epoch,") for line in path.read_text().splitlines()) == 1  # one header
    # rows past the checkpoint's step (an older checkpoint resumed, a hard kill after the last save) are trained
    # again: they are dropped, not kept twice
    from bgremover.lit.csv_log import _rows_before

    path.write_text("epoch,step,train/loss,test/mIoU\n0,1,0.9,\n0,3,0.8,\n1,5,0.7,\n1,5,,0.47\n1,7,0.6,\n")
    torch.save({"global_step": 5}, tmp_path / "at5.ckpt")
    # and the earlier test stage's row (at the checkpoint's step): it stayed beside the new one, stale
    assert _rows_before(str(path), str(tmp_path / "at5.ckpt")) == (
        ["epoch", "step", "train/loss", "test/mIoU"], [{"epoch": "0", "step": "1", "train/loss": "0.9", "test/mIoU": ""},
                                                       {"epoch": "0", "step": "3", "train/loss": "0.8", "test/mIoU": ""},
                                                       {"epoch": "1", "step": "5", "train/loss": "0.7", "test/mIoU": ""}])



def test_a_run_resumed_mid_epoch_shows_its_epoch_on_the_bar(small_camvid, tmp_path):
    """Resumed inside an epoch, Lightning skips on_train_epoch_start: the bar read `Training: 26/?`."""
    from bgremover.lit.callbacks import EpochProgressBar

    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.max_epochs=3"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_steps=3"]))  # 2 steps an epoch: stops inside epoch 2
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    _, objects = train(compose_cfg(tmp_path / "b", [*base, "trainer.max_steps=4", f"ckpt_path={last}"]))
    assert objects["trainer"].global_step == 4
    (bar,) = [c for c in objects["trainer"].callbacks if isinstance(c, EpochProgressBar)]
    assert bar.train_progress_bar.desc.startswith("Epoch 1/1"), bar.train_progress_bar.desc  # max_steps: 2 epochs



def test_resume_hint_keeps_the_data_location(monkeypatch):
    """`DATA_DIR=../shared/CamVid make train`, interrupted: the printed resume command left DATA_DIR out and
    failed as printed (dataset folder not found: data/CamVid)."""
    from bgremover import utils
    from bgremover.train import RunInterrupted

    monkeypatch.setattr(utils, "overrides", lambda: ["model=tiramisu56", "hydra.run.dir=x"])
    monkeypatch.setenv("DATA_DIR", "/data/Cam Vid")
    assert str(RunInterrupted(signal.SIGTERM, "/r/last.ckpt", 3, 40)).endswith(
        "resume with: DATA_DIR='/data/Cam Vid' make train ARGS=\"model=tiramisu56 ckpt_path=/r/last.ckpt\"")
    # the epoch as Lightning, the checkpoint names and summary.json's history number it (from 0)
    assert str(RunInterrupted(signal.SIGTERM, "/r/last.ckpt", 3, 40)).startswith("interrupted by SIGTERM at epoch 3, step 40;")
    monkeypatch.setattr(utils, "overrides", lambda: ["data.root=/d"])  # typed: it is in the overrides already
    assert str(RunInterrupted(signal.SIGTERM, "/r/last.ckpt", 3, 40)).endswith(
        "resume with: make train ARGS=\"data.root=/d ckpt_path=/r/last.ckpt\"")
    monkeypatch.setattr(utils, "overrides", lambda: [])  # nothing typed: it read ARGS=" ckpt_path=..."
    monkeypatch.delenv("DATA_DIR")
    assert str(RunInterrupted(signal.SIGINT, "/r/last.ckpt", 3, 40)).endswith(
        "resume with: make train ARGS=\"ckpt_path=/r/last.ckpt\"")



def test_the_printed_resume_command_works_for_any_run_folder(monkeypatch):
    """A run under "/runs/my run,é": the printed `make train ARGS="... ckpt_path=..."` split the path at its space
    in make's recipe, and Hydra refused the é and the comma. Run through both shells as make runs it, the command
    gives Hydra the checkpoint's path."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from bgremover import utils
    from bgremover.config import path_override
    from bgremover.train import RunInterrupted

    monkeypatch.setattr(utils, "overrides", lambda: ["model=tiramisu56"])
    last = "/runs/my run,é/checkpoints/last.ckpt"
    command = str(RunInterrupted(signal.SIGTERM, last, 3, 40)).split("resume with: ")[1]
    (args,) = [w.removeprefix("ARGS=") for w in shlex.split(command) if w.startswith("ARGS=")]  # the user's shell
    argv = [path_override(a) for a in shlex.split(args)]  # make's recipe shell, then bgremover.train's command line
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(argv)}
    assert parsed == {"model": "tiramisu56", "ckpt_path": last}



def test_resuming_with_more_epochs_stretches_a_run_length_schedule(small_camvid, tmp_path):
    """A run resumed with a larger trainer.max_epochs got the first run's PolynomialLR back (total_iters = its
    steps), so every added step trained at lr 0 and nothing changed. The schedule now spans the new run: the
    resumed steps train (lr > 0 and the weights move) and the lr reaches 0 at the new end."""
    import torch

    from bgremover import checkpoint

    deeplab = ["~experiment", "model=deeplabv3plus", "data.num_workers=0", "data.batch_size=2", "data.crop_size=[32,32]",
               "data.eval_batch_size=1", "extras.print_config=false", "measure_inference=false", "logger=csv",
               "trainer.max_time=null", "test=false", f"data.root={small_camvid}"]
    train(compose_cfg(tmp_path / "run1", [*deeplab, "trainer.max_epochs=2"]))
    last = tmp_path / "run1" / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=False)
    assert first["lr_schedulers"][0]["total_iters"] == 4 and first["lr_schedulers"][0]["_last_lr"][0] == 0.0
    _, objects = train(compose_cfg(tmp_path / "run2", [*deeplab, "trainer.max_epochs=4", f"ckpt_path={last}"]))
    rows = list(csv.DictReader(next((tmp_path / "run2").rglob("metrics.csv")).open()))
    lrs = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    assert lrs and all(lr > 0 for lr in lrs), lrs  # was [0.0, 0.0]
    scheduler = objects["trainer"].lr_scheduler_configs[0].scheduler
    assert scheduler.total_iters == 8 and scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    moved = checkpoint.net_state(checkpoint.read(tmp_path / "run2" / "checkpoints" / "last.ckpt"))
    before = checkpoint.net_state(first)
    assert any(not torch.equal(moved[k], before[k]) for k in before if before[k].is_floating_point())



def test_resuming_a_warmup_cosine_run_with_more_epochs_stretches_it_too(small_camvid, tmp_path, monkeypatch):
    """The speed-runs' WarmupCosineLR is stretched to a resumed run's new length like PolynomialLR: torch gives it no
    `_get_closed_form_lr`, its own get_lr is one. Left at the first run's length, every added step trained at the
    schedule's floor (lr 0). Each resumed step's lr is the cosine of the new length, computed here."""
    import math

    from bgremover.lit.module import SegmentationModule

    cosine = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "~model.scheduler.gamma",
              "model.scheduler._target_=bgremover.lit.speedrun.WarmupCosineLR", "+model.scheduler.total_iters=null",
              "+model.scheduler.warmup=0.25", "model.scheduler_interval=step"]
    train(compose_cfg(tmp_path / "a", [*cosine, "trainer.max_epochs=2"]))  # 4 frames, batch 2: 4 steps
    lrs: list[float] = []
    real = SegmentationModule.training_step

    def recording(self, batch, batch_idx):
        lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return real(self, batch, batch_idx)

    monkeypatch.setattr(SegmentationModule, "training_step", recording)
    cfg = compose_cfg(tmp_path / "b", [*cosine, "trainer.max_epochs=4",
                                       f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"])
    _, objects = train(cfg)
    base = cfg.model.optimizer.lr
    expected = [base * 0.5 * (1 + math.cos(math.pi * (step / 8 - 0.25) / 0.75)) for step in range(4, 8)]
    assert lrs == pytest.approx(expected, rel=1e-9) and min(lrs) > 0
    assert objects["trainer"].lr_scheduler_configs[0].scheduler.total_iters == 8


def _record_batches(monkeypatch) -> list[tuple[int, float]]:
    """(epoch, sum of the batch's pixels) of every training batch the runs after this call train on."""
    from bgremover.lit.module import SegmentationModule

    seen: list[tuple[int, float]] = []
    real = SegmentationModule.training_step

    def recording(self, batch, batch_idx):
        seen.append((self.current_epoch, round(float(batch[0].double().sum()), 3)))
        return real(self, batch, batch_idx)

    monkeypatch.setattr(SegmentationModule, "training_step", recording)
    return seen


@pytest.mark.parametrize("data", ["data.num_workers=0", "data.num_workers=1", "data=camvid_resident"])
def test_a_resumed_run_draws_new_batches_not_its_first_epochs_again(small_camvid, tmp_path, monkeypatch, data):
    """The train loader's generator and the augmentations were seeded with `seed` whenever a loader was made, so a
    resumed run (a CPU run split in two, a `make remover` resume) trained its first epochs' batches again, crop for
    crop. A loader made at epoch k > 0 now draws from a seed of its own; a fresh run is as it was. The resident data
    (the GPU speed-runs') followed the epoch already: checked here so it stays so."""

    seen = _record_batches(monkeypatch)
    deeplab = ["~experiment", "model=deeplabv3plus", data, "data.batch_size=2",
               "data.crop_size=[32,32]", "data.eval_batch_size=1", "extras.print_config=false", "measure_inference=false",
               "logger=csv", "trainer.max_time=null", "test=false", f"data.root={small_camvid}"]
    train(compose_cfg(tmp_path / "run1", [*deeplab, "trainer.max_epochs=2"]))
    last = tmp_path / "run1" / "checkpoints" / "last.ckpt"
    train(compose_cfg(tmp_path / "run2", [*deeplab, "trainer.max_epochs=4", f"ckpt_path={last}"]))
    by_epoch = {e: [x for ep, x in seen if ep == e] for e in range(4)}
    assert all(len(batches) == 2 for batches in by_epoch.values()), seen  # 4 frames, batch 2
    assert by_epoch[2] != by_epoch[0] and by_epoch[3] != by_epoch[1], seen  # were equal, batch for batch
    assert len({x for _, x in seen}) == len(seen)  # no batch drawn twice


def test_a_resident_run_resumed_inside_an_epoch_trains_the_batches_it_had_left(small_camvid, tmp_path, monkeypatch):
    """Ctrl-C one batch into epoch 1 (of 2 batches), then the resume: the resident loader (the GPU speed-runs')
    started that epoch over, so the resumed run trained its first batch again, crop for crop, and never its second.
    It goes on with the batches left, with their augmentation draws: the run ends with an uninterrupted run's
    weights (no dropout: no other randomness)."""
    from bgremover import checkpoint
    from bgremover.train import RunInterrupted

    seen = _record_batches(monkeypatch)
    base = [*TINY_RUN, f"data.root={small_camvid}", "data=camvid_resident", "model.net.dropout=0.0", "test=false",
            "trainer.max_epochs=3"]
    train(compose_cfg(tmp_path / "whole", base))
    whole = list(seen)
    seen.clear()
    with pytest.raises(RunInterrupted):
        train(compose_cfg(tmp_path / "a", [*base, "+callbacks.stop._target_=test_resume.CtrlCAtStep",
                                           "+callbacks.stop.step=3"]))
    train(compose_cfg(tmp_path / "b", [*base, f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"]))
    assert len(whole) == 6 and seen == whole, (whole, seen)  # epoch 1's first batch came twice, its second never
    ends = [checkpoint.net_state(checkpoint.read(tmp_path / run / "checkpoints" / "last.ckpt")) for run in ("whole", "b")]
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


@pytest.mark.parametrize("step", [1, 3])
def test_a_run_resumed_inside_an_epoch_trains_the_frames_it_had_left(small_camvid, tmp_path, monkeypatch, step):
    """Ctrl-C one batch into epoch 0 (or 1), then the resume: Lightning ran the rest of the epoch from a loader that
    started over, so the epoch's first frames were trained again (at epoch 0 crop for crop) and its last ones never.
    The checkpoint keeps the shuffle as the epoch began it: the resumed run trains the frames an uninterrupted run
    trains, in its order (the val/test frames are read in file order; these are the train split's)."""
    from bgremover.data.camvid import CamVidDataset
    from bgremover.train import RunInterrupted

    frames: list[int] = []
    real = CamVidDataset.__getitem__

    def recording(self, index):
        if self.split == "train":
            frames.append(index)
        return real(self, index)

    monkeypatch.setattr(CamVidDataset, "__getitem__", recording)
    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.max_epochs=3"]  # 2 batches of 2 an epoch
    train(compose_cfg(tmp_path / "whole", base))
    whole = list(frames)
    frames.clear()
    with pytest.raises(RunInterrupted):
        train(compose_cfg(tmp_path / "a", [*base, "+callbacks.stop._target_=test_resume.CtrlCAtStep",
                                           f"+callbacks.stop.step={step}"]))
    assert len(frames) == 2 * step
    train(compose_cfg(tmp_path / "b", [*base, f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"]))
    assert len(whole) == 12 and frames == whole, (whole, frames)


def test_the_stretched_schedule_is_said_in_words(small_camvid, tmp_path, caplog):
    """The line said "planned for 1 steps" (a "%ss" plural); it counts as every other message does."""
    deeplab = ["~experiment", "model=deeplabv3plus", "data.num_workers=0", "data.batch_size=4", "data.crop_size=[32,32]",
               "data.eval_batch_size=1", "extras.print_config=false", "measure_inference=false", "logger=csv",
               "trainer.max_time=null", "test=false", f"data.root={small_camvid}"]
    train(compose_cfg(tmp_path / "run1", [*deeplab, "trainer.max_epochs=1"]))  # 4 frames, batch 4: one step
    last = tmp_path / "run1" / "checkpoints" / "last.ckpt"
    with caplog.at_level(logging.INFO):
        train(compose_cfg(tmp_path / "run2", [*deeplab, "trainer.max_epochs=2", f"ckpt_path={last}"]))
    assert "the learning-rate schedule planned for 1 step now spans 2 " in caplog.text, caplog.text[-2000:]


def test_resume_names_its_wandb_run_and_continues_it_online(small_camvid, tmp_path, monkeypatch, caplog):
    """A resumed run was a new, unrelated W&B run. Now the checkpoint records its W&B run; offline (here) the
    resumed run is a new one whose config names the old (wandb sync keeps only the last of two offline runs with
    one id), online the same run goes on (id + resume="allow") if it was logged online. Both keep the run's name:
    a sweep job's "-job3" was dropped by a resume from outside the sweep (the name came from the config again)."""
    from wandb_records import offline_run

    from bgremover import train as train_mod
    from bgremover.task import finish_wandb

    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    wandb_run = [*TINY_RUN[:-3], "logger=wandb", "trainer.check_val_every_n_epoch=1", "trainer.max_time=null"]
    train(compose_cfg(run1, [*wandb_run, f"data.root={small_camvid}", "trainer.max_epochs=1", "test=false",
                             "logger.wandb.name=tiny-seed7-job3",  # as a sweep's job 3 names itself
                             "logger.wandb.group=quick-2026-11-28_10-00-00"]))  # and its sweep's group
    finish_wandb()
    first = offline_run(run1 / "wandb")
    last = run1 / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["wandb_run_id"] == first["id"]
    assert first["name"] == "tiny-seed7-job3"

    resume = [*wandb_run, f"data.root={small_camvid}", "trainer.max_epochs=2", "test=false", f"ckpt_path={last}"]
    train(compose_cfg(run2, resume))
    with caplog.at_level("INFO", logger="bgremover.train"):
        finish_wandb()
    # how to upload it, as W&B's own line would say were it not silenced (a user audit)
    (offline_dir,) = (run2 / "wandb").glob("offline-run-*")
    assert f"W&B: offline run, upload it with `wandb sync {offline_dir}`" in caplog.text
    second = offline_run(run2 / "wandb")
    assert second["id"] != first["id"] and second["config"]["resumed_from_wandb_run"] == first["id"]
    assert second["name"] == "tiny-seed7-job3"  # was the config's "<net>-seed<S>"
    # in the sweep's group (it went to "train", out of the sweep's group on the dashboard), as summary.json says
    assert second["group"] == first["group"] == "quick-2026-11-28_10-00-00"
    assert json.loads((run2 / "summary.json").read_text())["group"] == second["group"]

    # logged offline, resumed online: a new run too (reusing the id, a later `wandb sync` of the offline first part
    # erased the online continuation logged under it: wandb/wandb#5865)
    cfg = compose_cfg(tmp_path / "online_after_offline", resume)
    assert train_mod._resume_wandb(cfg, "online") == first["id"] and cfg.logger.wandb.get("id") is None
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["wandb_run_offline"] is True
    assert (cfg.logger.wandb.name, cfg.logger.wandb.group) == ("tiny-seed7-job3", "quick-2026-11-28_10-00-00")
    online_ckpt = tmp_path / "online.ckpt"  # the checkpoint of a run logged online goes on in that run
    torch.save({**ckpt, "wandb_run_offline": False}, online_ckpt)
    cfg = compose_cfg(tmp_path / "online", [*resume[:-1], f"ckpt_path={online_ckpt}"])
    assert train_mod._resume_wandb(cfg, "online") == first["id"]
    assert (cfg.logger.wandb.id, cfg.logger.wandb.resume, cfg.logger.wandb.name) == (first["id"], "allow",
                                                                                     "tiny-seed7-job3")
    assert cfg.logger.wandb.group == "quick-2026-11-28_10-00-00"
    named = compose_cfg(tmp_path / "named", [*resume, "logger.wandb.name=second-try"])
    train_mod._resume_wandb(named, "online")
    assert named.logger.wandb.name == "second-try"  # a name the command line gives is kept
    regrouped = compose_cfg(tmp_path / "regrouped", [*resume, "logger.wandb.group=mine"])
    train_mod._resume_wandb(regrouped, "online")
    assert regrouped.logger.wandb.group == "mine"
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    job = compose_cfg(tmp_path / "job", resume)  # a sweep's job resuming it: keeps its own name (a review)
    OmegaConf.set_readonly(job.hydra, False)
    with open_dict(job):
        job.hydra.mode = RunMode.MULTIRUN
        job.logger.wandb.name = "tiny-seed7-job5"
    HydraConfig().set_config(job)
    train_mod._resume_wandb(job, "online")
    assert job.logger.wandb.name == "tiny-seed7-job5"



def test_run_plan_of_a_run_resumed_from_a_validation_end_checkpoint(small_camvid, tmp_path, caplog):
    """last.ckpt linked to the best file, which ModelCheckpoint writes at the end of the epoch's validation:
    Lightning still counts that epoch as running when training starts, and the plan said "resumes at epoch 1
    (step 2): 3 of 3 epochs × 2 steps = 4 steps left" (3 × 2 is not 4) where epoch 2 was next (epochs
    numbered from 0, as Lightning numbers them)."""
    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.check_val_every_n_epoch=2"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=2"]))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert last.is_symlink()  # the only validation, in the last epoch: its best file is the last one
    with caplog.at_level("INFO", logger="bgremover.train"):
        _, objects = train(compose_cfg(tmp_path / "b", [*base, "trainer.max_epochs=4", f"ckpt_path={last}"]))
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: "))
    assert "resumes at epoch 2 (step 4): 2 of 4 epochs × 2 steps = 4 steps left" in plan
    assert objects["trainer"].global_step == 8 and objects["trainer"].current_epoch == 4



class StopAtStep(pl.Callback):
    """Stops training after `step` optimizer steps, as trainer.max_time does (inside an epoch)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *_):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_run_plan_of_a_run_stopped_inside_an_epoch_counts_the_steps_left(small_camvid, tmp_path, caplog):
    """Stopped one step into epoch 1 (2 steps an epoch), as trainer.max_time stops it: the plan said "2 of 4 epochs
    × 2 steps = 5 steps left" (the planned 8 minus step 3), and the run took 4 (Lightning counted epoch 1 as done).
    The resume goes on inside epoch 1 now, and its plan counts the step that epoch had left."""
    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=4", "+callbacks.stop._target_=test_resume.StopAtStep",
                                       "+callbacks.stop.step=3"]))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with caplog.at_level("INFO", logger="bgremover.train"):
        _, objects = train(compose_cfg(tmp_path / "b", [*base, "trainer.max_epochs=4", f"ckpt_path={last}"]))
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: "))
    assert "3 of 4 epochs × 2 steps − 1 done = 5 steps left" in plan, plan
    assert objects["trainer"].global_step == 3 + 5


class CtrlCAtStep(pl.Callback):
    """Ctrl-C after `step` optimizer steps: Lightning's handler stops the fit inside the epoch, as a terminal's would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *_):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_run_plan_of_a_run_interrupted_inside_an_epoch_counts_the_steps_left(small_camvid, tmp_path, caplog):
    """Ctrl-C one step into epoch 1 (2 steps an epoch): its last.ckpt resumes inside that epoch (as a
    max_time stop's does), with one step of it left; the plan said "3 of 4 epochs × 2 steps = 6 steps left" and the run
    took 5 (make remover: 106 said, 105 trained)."""
    from bgremover.train import RunInterrupted

    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.max_epochs=4"]
    with pytest.raises(RunInterrupted):
        train(compose_cfg(tmp_path / "a", [*base, "+callbacks.stop._target_=test_resume.CtrlCAtStep",
                                           "+callbacks.stop.step=3"]))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with caplog.at_level("INFO", logger="bgremover.train"):
        _, objects = train(compose_cfg(tmp_path / "b", [*base, f"ckpt_path={last}"]))
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: "))
    left = objects["trainer"].global_step - 3
    assert left == 5 and "3 of 4 epochs × 2 steps − 1 done = 5 steps left" in plan, plan  # the sum adds up


def test_run_plan_of_a_resumed_run_counts_what_is_left(small_camvid, tmp_path, caplog):
    """A resumed run's plan announced the whole run again (all epochs, all steps, the whole time limit)."""
    from types import SimpleNamespace

    from pytorch_lightning.callbacks import Timer

    from bgremover.lit.callbacks import _time_limit
    from bgremover.lit.speedrun import TimeToMIoU

    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=3"]))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with caplog.at_level("INFO", logger="bgremover.train"):
        _, objects = train(compose_cfg(tmp_path / "b", [*base, "trainer.max_epochs=4", f"ckpt_path={last}"]))
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: "))
    assert "resumes at epoch 3 (step 6): 1 of 4 epochs × 2 steps = 2 steps left" in plan
    estimate = describe_estimate(objects["trainer"], 600.0, (3, 6, 0))  # 2 steps left at 10 min each
    assert "about 20 min 00 s of training for the 1 epoch left" in estimate
    # trainer.max_steps ending it first: "2 of 4 epochs × 2 steps = 1 steps left" did not add up (a user audit)
    trainer = objects["trainer"]
    trainer.fit_loop.epoch_loop.max_steps = 7
    plan = describe_plan(trainer, objects["model"], (2, 6, 0))
    assert "resumes at epoch 2 (step 6): 2 of 4 epochs × 2 steps = 1 step left (trainer.max_steps=7)" in plan, plan

    # the time limits: what a resumed run has left of them (both clocks go on across a resume)
    timer = Timer(duration="00:00:10:00")
    timer.load_state_dict({"time_elapsed": {"train": 125.0}})
    budget = TimeToMIoU(budget_s=300)
    budget.load_state_dict({"train_s": 290.0})
    assert _time_limit(SimpleNamespace(callbacks=[timer])) == (475.0, "trainer.max_time")
    assert _time_limit(SimpleNamespace(callbacks=[timer, budget])) == (10.0, "TimeToMIoU's time budget")


def test_a_resume_with_max_steps_from_an_epoch_end_checkpoint(small_camvid, tmp_path):
    """A user audit: `trainer.max_steps=4`, then resumed with `trainer.max_steps=8`, ended with "Early stopping
    conditioned on metric val/mIoU which is not available" (Lightning replays the train-epoch-end hooks of a
    max_steps resume, and early stopping checked there with validation every epoch), and with validation less
    often it logged an epoch of NaN train numbers. Now it trains on, and its history holds no NaN."""
    import math

    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.check_val_every_n_epoch=1",
            "trainer.max_epochs=null"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_steps=4"]))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    _, objects = train(compose_cfg(tmp_path / "b", [*base, "trainer.max_steps=8", f"ckpt_path={last}"]))
    assert objects["trainer"].global_step == 8
    rows = list(csv.DictReader(next((tmp_path / "b").rglob("metrics.csv")).open()))
    train_rows = [r for r in rows if r.get("train/mIoU")]
    assert train_rows and not any(math.isnan(float(r["train/mIoU"])) for r in train_rows), train_rows


def test_a_validation_cut_short_by_an_interrupt_is_named(caplog):
    """Ctrl-C in a validation, then the resume: Lightning finishes that validation over the frames it had left, and
    the run picked its best epoch from an 8-of-10-frame score without a word (a user audit)."""
    from bgremover.train import _cut_validations

    whole = {"frames": 10, "of": 10, "complete": True}
    history = [{"epoch": 0, "val/mIoU": 0.5, "val/frames": 8}, {"epoch": 1, "val/mIoU": 0.4, "val/frames": 10},
               {"epoch": 2, "val/mIoU": 0.45, "val/frames": 10}]
    with caplog.at_level("WARNING", logger="bgremover.train"):
        got = _cut_validations(history, whole)
    assert got == {"frames": 10, "of": 10, "complete": False, "cut_epochs": [0]}
    assert "val of epoch 0 covered 8 of 10 frames (a validation interrupted and resumed): the best epoch is one of " \
           "them, so it was picked by a PARTIAL score" in caplog.text
    history[0]["val/mIoU"] = 0.3  # not the best: named, the run's val numbers stand
    assert _cut_validations(history, whole) == {**whole, "cut_epochs": [0]}
    assert _cut_validations([{"epoch": 0, "val/mIoU": 0.5, "val/frames": 10}], whole) == whole
    # a sweep job's one line says it, in place of the warning (quiet sweeps printed it beside every job line)
    from bgremover.utils import val_note

    assert val_note({"frames": 10, "of": 10, "complete": False, "cut_epochs": [0]}) == \
        ", best epoch by val (a validation cut short, PARTIAL)"
    assert val_note({"frames": 4, "of": 10, "complete": False}) == ", best epoch by val (4 of 10 frames, PARTIAL)"
    assert val_note(whole) == val_note(None) == ""


def test_the_removers_resume_hint_quotes_a_checkpoint_path_with_a_space(monkeypatch):
    """`make remover ... --run-dir "runs/a b"`, interrupted: the printed command put `ckpt_path=runs/a b/...`
    unquoted into ARGS, so the shell split it and the resume was refused (an audit)."""
    import shlex

    from bgremover import config
    from bgremover.train import RunInterrupted

    monkeypatch.setenv(config.RESUME_ENV, "make remover DATA=/d EXP=remover ARGS=\"--run-dir '/r/a b' "
                                          "ckpt_path={ckpt_path}\"")
    hint = str(RunInterrupted(signal.SIGINT, "/r/a b/checkpoints/last.ckpt", 1, 4)).split("resume with: ")[1]
    args = shlex.split(shlex.split(hint)[-1].removeprefix("ARGS="))  # as make hands ARGS to the shell
    assert args == ["--run-dir", "/r/a b", "ckpt_path=/r/a b/checkpoints/last.ckpt"], hint


class _ClockTrainer:
    """What TimeToMIoU reads of a trainer, validation off (trainer.limit_val_batches=0)."""
    world_size, lr_scheduler_configs, should_stop, is_global_zero, global_step, current_epoch = 1, [], False, True, 1, 0
    limit_val_batches, datamodule, loggers = 0, None, []

    def __init__(self):
        self.callback_metrics = {}


def _first_step(clock, now, seconds):
    from types import SimpleNamespace

    import torch

    trainer = _ClockTrainer()
    clock.on_fit_start(trainer, None)
    clock.on_train_start(trainer, None)
    now[0] += seconds
    clock.on_train_batch_end(trainer, SimpleNamespace(device=torch.device("cpu")))
    return trainer


def test_a_speedrun_without_validation_records_its_training_and_warm_up_time(monkeypatch):
    """time/fit_s and time/first_step_s reached the loggers and summary.json only from a validation: a speed-run
    with validation off (the README's train+val row) recorded neither, only "training took" in its log."""
    from bgremover.lit import speedrun

    now = [1000.0]
    monkeypatch.setattr(speedrun.time, "perf_counter", lambda: now[0])
    clock = speedrun.TimeToMIoU(budget_s=100)
    trainer = _first_step(clock, now, 7.0)
    now[0] += 50
    clock.on_train_end(trainer, None)
    assert {k: float(v) for k, v in trainer.callback_metrics.items()} == {"time/fit_s": 57.0, "time/first_step_s": 7.0}


def test_a_resumed_speedrun_counts_every_starts_warm_up(monkeypatch):
    """Each start of a split run (call A, then call B resuming last.ckpt) pays the first step's warm-up inside the
    budget (the H100 split run: 35.6 s, then 17.8 s); the resumed run's time/first_step_s, which summary.json
    keeps for the whole run, held only the last start's."""
    from bgremover.lit import speedrun

    now = [1000.0]
    monkeypatch.setattr(speedrun.time, "perf_counter", lambda: now[0])
    first = speedrun.TimeToMIoU(budget_s=100)
    _first_step(first, now, 35.0)
    now[0] += 20
    resumed = speedrun.TimeToMIoU(budget_s=100)
    resumed.load_state_dict(first.state_dict())
    trainer = _first_step(resumed, now, 18.0)
    resumed.on_train_end(trainer, None)
    assert float(trainer.callback_metrics["time/first_step_s"]) == 53.0
    assert float(trainer.callback_metrics["time/fit_s"]) == 73.0


def _validated(clock, trainer, miou, sanity=False):
    trainer.sanity_checking, trainer.callback_metrics["val/mIoU"] = sanity, torch.tensor(miou)
    clock.on_validation_end(trainer, None)
    trainer.sanity_checking = False
    return {k: round(r["seconds"], 6) for k, r in clock.reached.items()}


def test_time_to_miou_is_the_first_time_on_the_fit_clock_across_a_resume(monkeypatch):
    """A speed-run's headline numbers: the seconds since fit started (set-up and sanity check included) at which
    val mIoU first reached each threshold. The sanity check's score (an untrained net's, on 2 batches) is none of
    them, a later validation above it does not move it, and a resume keeps both the times and the fit clock."""
    from bgremover.lit import speedrun

    now = [1000.0]
    monkeypatch.setattr(speedrun.time, "perf_counter", lambda: now[0])
    clock = speedrun.TimeToMIoU(thresholds=[0.5, 0.6], budget_s=100)
    trainer = _ClockTrainer()
    clock.on_fit_start(trainer, None)
    now[0] += 4.0  # the sanity check, before training starts
    assert _validated(clock, trainer, 0.9, sanity=True) == {}
    clock.on_train_start(trainer, None)
    now[0] += 10.0
    assert _validated(clock, trainer, 0.5) == {"time_to/0.500": 14.0}  # reached at exactly the threshold
    now[0] += 10.0
    assert _validated(clock, trainer, 0.55) == {"time_to/0.500": 14.0}  # the first time, not the latest
    state = clock.state_dict()
    assert (state["fit_s"], state["train_s"]) == (24.0, 20.0)

    resumed = _resumed_clock(speedrun.TimeToMIoU(thresholds=[0.5, 0.6], budget_s=100), state, now, trainer,
                             set_up=3.0, trained=5.0)
    assert _validated(resumed, trainer, 0.52) == {"time_to/0.500": 14.0}
    now[0] += 2.0
    assert _validated(resumed, trainer, 0.61) == {"time_to/0.500": 14.0, "time_to/0.600": 34.0}  # 24 + 3 + 5 + 2
    now[0] += 6.0
    resumed.on_train_end(trainer, None)
    got = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("time")}
    assert got == {"time/fit_s": 40.0, "time_to/0.500": 14.0, "time_to/0.600": 34.0}  # fit's clock, not training's


def test_a_resume_cut_short_before_its_first_step_keeps_the_earlier_warm_up(monkeypatch):
    """A resumed start stopped before its first step ended (a Ctrl-C inside it) wrote a checkpoint whose warm-up
    time must still hold the earlier starts': the next resume's time/first_step_s adds to it, not to zero."""
    from bgremover.lit import speedrun

    now = [1000.0]
    monkeypatch.setattr(speedrun.time, "perf_counter", lambda: now[0])
    first = speedrun.TimeToMIoU(budget_s=100)
    _first_step(first, now, 35.0)
    cut = speedrun.TimeToMIoU(budget_s=100)
    cut.load_state_dict(first.state_dict())
    cut.on_fit_start(_ClockTrainer(), None)
    cut.on_train_start(_ClockTrainer(), None)
    now[0] += 4.0  # inside its first step
    assert cut.state_dict()["first_steps_s"] == 35.0
    last = speedrun.TimeToMIoU(budget_s=100)
    last.load_state_dict(cut.state_dict())
    trainer = _first_step(last, now, 18.0)
    last.on_train_end(trainer, None)
    assert float(trainer.callback_metrics["time/first_step_s"]) == 53.0


def test_a_spent_budget_stops_the_run_with_a_validation_at_the_schedules_floor(monkeypatch):
    """The step the budget runs out at (budget_s=100: after 100 s of training) is the last, at the floor lr of a
    WarmupCosineLR, and is validated whatever trainer.check_val_every_n_epoch says."""
    from bgremover.lit import speedrun

    now = [1000.0]
    monkeypatch.setattr(speedrun.time, "perf_counter", lambda: now[0])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = speedrun.WarmupCosineLR(opt, total_iters=10**6, warmup=0.0, final_ratio=0.1)
    trainer = _ClockTrainer()
    trainer.lr_scheduler_configs = [type("Config", (), {"scheduler": sched})()]
    trainer.check_val_every_n_epoch = 1000
    clock = speedrun.TimeToMIoU(budget_s=100)
    clock.on_fit_start(trainer, None)
    clock.on_train_start(trainer, None)
    now[0] += 99.0
    clock.on_train_batch_start(trainer)
    assert not trainer.should_stop and sched.budget_progress == pytest.approx(0.99)
    now[0] += 1.0  # 100 s: the budget's end
    clock.on_train_batch_start(trainer)
    assert trainer.should_stop and trainer.check_val_every_n_epoch == 1
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)



def _interrupting(hook: str, when):
    """SegmentationModule's `hook`, sending this process a Ctrl-C (SIGINT) once it has run (its random draws made,
    the BatchNorm statistics moved) when `when(module, *args)`."""
    from bgremover.lit.module import SegmentationModule

    real = getattr(SegmentationModule, hook)

    def interrupted(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if when(self, *args):
            os.kill(os.getpid(), signal.SIGINT)
        return out

    return interrupted


SPLITS = {  # how the first part of a split run ends: its overrides, or the module hook that raises Ctrl-C
    "at_an_epoch_end": ["trainer.max_epochs=1"],
    "max_steps_inside_an_epoch": ["trainer.max_steps=3"],
    "stopped_inside_an_epoch": ["+callbacks.stop._target_=test_resume.StopAtStep", "+callbacks.stop.step=3"],
    "ctrl_c_after_a_step": ["+callbacks.stop._target_=test_resume.CtrlCAtStep", "+callbacks.stop.step=3"],
    "ctrl_c_inside_a_step": ("training_step", lambda m, batch, i: m.global_step == 3),  # epoch 1's last batch
    "ctrl_c_inside_a_validation": ("validation_step", lambda m, batch, i, *_: m.current_epoch == 1 and i == 1
                                   and not m.trainer.sanity_checking),
}


@pytest.mark.parametrize(("data", "split"), [
    *(("data.num_workers=0", split) for split in SPLITS),
    ("data=camvid_resident", "stopped_inside_an_epoch"),
    ("data.num_workers=2", "ctrl_c_after_a_step"),
    ("data=camvid_resident", "ctrl_c_inside_a_step"),
    ("data=camvid_resident", "at_an_epoch_end"),
])
def test_a_split_run_ends_with_the_weights_of_an_uninterrupted_one(small_camvid, tmp_path, monkeypatch, data, split):
    """A run stopped and resumed trained other numbers than the run left alone: seed_everything at the resume
    re-seeded torch, so the dropout masks (FC-DenseNet's 0.2) after it were the first steps' again, and the CPU
    path's augmentations drew other crops, flips and jitters (with workers, other ones again). The checkpoint keeps
    the random state between the steps it resumes between, and the data draw from seeds of their epoch and frame:
    the two runs end bit for bit alike (the same operations on the same numbers, on one CPU). A Ctrl-C inside a
    step had already moved its BatchNorm running statistics, which last.ckpt kept and the resume's run of the step
    moved again: the first Ctrl-C stops the fit where the step ends. A run that
    trainer.max_time or max_steps stopped inside an epoch resumed at the next one: the rest of that epoch's frames
    were never trained, and its per-epoch lr step never taken; it resumes inside that epoch now."""
    from bgremover import checkpoint
    from bgremover.lit.module import SegmentationModule
    from bgremover.train import RunInterrupted

    base = [*TINY_RUN, f"data.root={small_camvid}", data, "data.scale_jitter=0.2", "data.color_jitter=0.3",
            "test=false", "trainer.max_epochs=3"]  # the net's dropout: 0.2; 4 frames, batch 2: 2 steps an epoch
    train(compose_cfg(tmp_path / "whole", base))
    stop = SPLITS[split]
    if isinstance(stop, tuple):
        real = getattr(SegmentationModule, stop[0])
        monkeypatch.setattr(SegmentationModule, stop[0], _interrupting(*stop))
        with pytest.raises(RunInterrupted):
            train(compose_cfg(tmp_path / "a", base))
        monkeypatch.setattr(SegmentationModule, stop[0], real)
    elif "CtrlC" in " ".join(stop):
        with pytest.raises(RunInterrupted):
            train(compose_cfg(tmp_path / "a", [*base, *stop]))
    else:
        train(compose_cfg(tmp_path / "a", [*base, *stop]))
    train(compose_cfg(tmp_path / "b", [*base, f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"]))
    whole, split_run = (checkpoint.net_state(checkpoint.read(tmp_path / r / "checkpoints" / "last.ckpt"))
                        for r in ("whole", "b"))
    differ = [k for k in whole if not torch.equal(whole[k], split_run[k])]
    assert not differ, differ


def test_a_checkpoint_without_random_state_resumes_and_says_so(small_camvid, tmp_path, caplog):
    """A last.ckpt written before the random state was kept still resumes, with a line saying where its draws
    go on from."""
    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=1"]))
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"].pop("RandomState")["torch"].dtype == torch.uint8
    torch.save(ckpt, tmp_path / "old.ckpt")
    with caplog.at_level("WARNING", logger="bgremover.train"):
        _, objects = train(compose_cfg(tmp_path / "b", [*base, "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'old.ckpt'}"]))
    assert objects["trainer"].global_step == 4
    said = [r.getMessage() for r in caplog.records if "random state" in r.getMessage()]
    assert said == [f"{tmp_path / 'old.ckpt'} holds no random state (written by an older version): the dropout masks "
                    "and other random draws after the resume go on from seed=42, not from where its run left them"]


@pytest.mark.parametrize("presses", [1, 2])
def test_a_ctrl_c_stops_where_the_step_ends_and_a_second_at_once(small_camvid, tmp_path, monkeypatch, capsys, presses):
    """Ctrl-C inside a step raised there, and last.ckpt kept the BatchNorm statistics its forward had moved (or, on
    a CPU, the weights its optimizer had updated and not others): the first Ctrl-C now lets the step end, saves
    there and stops; a second stops at once, as Ctrl-C did."""
    from bgremover.lit.module import SegmentationModule
    from bgremover.train import RunInterrupted

    real = SegmentationModule.training_step

    def pressed(self, batch, batch_idx):
        out = real(self, batch, batch_idx)
        if self.global_step == 2:  # inside epoch 1's first step, its forward done
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(SegmentationModule, "training_step", pressed)
    with pytest.raises(RunInterrupted) as stop:
        train(compose_cfg(tmp_path / "a", [*TINY_RUN, f"data.root={small_camvid}", "test=false",
                                           "trainer.max_epochs=3"]))
    assert stop.value.signum == signal.SIGINT
    assert stop.value.step == (3 if presses == 1 else 2)  # the step done and saved, or cut short
    assert "Ctrl-C: stopping where this step ends" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own again


def test_a_resume_without_its_runs_seed_goes_on_with_it(small_camvid, tmp_path, caplog):
    """A run trained with seed=7, resumed by a hand-written `ckpt_path=` alone: the epochs left drew their order
    and crops from the default seed 42, which summary.json then recorded as the run's. The resume goes on with
    the run's seed, says so, and ends as the run left alone does."""
    from bgremover import checkpoint

    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false"]
    train(compose_cfg(tmp_path / "whole", [*base, "seed=7", "trainer.max_epochs=2"]))
    train(compose_cfg(tmp_path / "a", [*base, "seed=7", "trainer.max_epochs=1"]))
    with caplog.at_level("WARNING", logger="bgremover.train"):
        train(compose_cfg(tmp_path / "b", [*base, "trainer.max_epochs=2",
                                           f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"]))
    assert any("goes on with its run's seed=7 (not this command's 42)" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["seed"] == 7
    whole, split = (checkpoint.net_state(checkpoint.read(tmp_path / r / "checkpoints" / "last.ckpt")) for r in ("whole", "b"))
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_a_run_stopped_inside_an_epoch_counts_that_epoch_in_every_record(small_camvid, tmp_path):
    """`trainer.max_steps` (or a time budget) ending a run inside an epoch: its summary.json counted the unfinished
    epoch (2 epochs, 3 steps of 2 a epoch), while a test-only run of its checkpoint and the model exported from it
    said 1 epoch, and model-info read "1 epoch, 3 steps; its run 2 epochs" as if the run had trained on past it.
    Every record counts it now; a resume still goes on inside that epoch (finished epochs: 1)."""
    from bgremover import checkpoint

    run1 = tmp_path / "run1"
    train(compose_cfg(run1, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=5", "trainer.max_steps=3",
                             "test=false"]))
    s1 = json.loads((run1 / "summary.json").read_text())
    assert (s1["epochs"], s1["global_step"]) == (2, 3)
    ckpt = torch.load(s1["last_ckpt"], weights_only=True)
    assert checkpoint.provenance(s1["last_ckpt"], ckpt)["epochs"] == 2
    assert checkpoint.epochs_trained(ckpt) == 1  # what a resume goes on from: the rest of epoch 1
    train(compose_cfg(tmp_path / "run2", [*TINY_RUN, f"data.root={small_camvid}", "train=false",
                                          f"ckpt_path={s1['last_ckpt']}"]))
    s2 = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert (s2["epochs"], s2["global_step"]) == (2, 3)


def test_a_resume_reads_its_checkpoint_once_before_the_fit(small_camvid, tmp_path, monkeypatch):
    """A resume's set-up read its checkpoint five times over, each a full torch.load (its checks, the optimizer and
    the seed it adopts, its W&B run, its classes; FC-DenseNet103's with its optimizer state is 110 MB): once now,
    Lightning's own read for the fit aside. A file changed since is read again; outside a set-up nothing is kept."""
    from bgremover import checkpoint
    from bgremover.task import finish_wandb

    base = [*TINY_RUN[:-3], "logger=wandb", "trainer.check_val_every_n_epoch=1", "trainer.max_time=null",
            f"data.root={small_camvid}", "test=false"]
    train(compose_cfg(tmp_path / "run1", [*base, "trainer.max_epochs=1"]))
    finish_wandb()
    last = (tmp_path / "run1" / "checkpoints" / "last.ckpt").resolve()
    reads = []
    load = torch.load

    def counted(f, *args, **kwargs):  # the project's reads name the file; Lightning's pass an open one
        if isinstance(f, str | os.PathLike) and Path(f).resolve() == last:
            reads.append(kwargs.get("mmap"))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    train(compose_cfg(tmp_path / "run2", [*base, "trainer.max_epochs=2", f"ckpt_path={last}"]))
    finish_wandb()
    assert reads == [None], reads  # one full read (an mmap'ed look at a few keys would be cheap: none here)
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["epochs"] == 2
    assert checkpoint._KEPT is None
    other = tmp_path / "other.ckpt"
    torch.save({"global_step": 1}, other)
    with checkpoint.read_once():
        assert checkpoint.read(other) is checkpoint.read(other)
        torch.save({"global_step": 2, "epoch": 0}, other)
        assert checkpoint.read(other) == {"global_step": 2, "epoch": 0}
    assert checkpoint.read(other) is not checkpoint.read(other)
