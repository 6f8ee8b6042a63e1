"""Runs a user can trust: last.ckpt is the newest epoch, resume keeps the best, partial test sets say so, an
interrupted run exits non-zero, bad configs fail at once, panels appear however often validation runs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import REPO, write_camvid
from omegaconf import open_dict
from test_train import TINY_TIRAMISU, compose_cfg

from bgremover.lit.callbacks import LastCheckpoint, RunPlan, describe_estimate, describe_plan
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


@pytest.fixture
def small_camvid(tmp_path: Path) -> Path:
    return write_camvid(tmp_path / "CamVid", {"train": 4, "val": 2, "test": 3}, size=(32, 64))


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


def test_last_ckpt_links_to_the_best_file_when_they_are_the_same_state(tmp_path):
    ckpt_dir = _fit_scored(tmp_path, [0.1, 0.2, 0.3])  # every epoch a new best
    last = ckpt_dir / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "epoch_002.ckpt"  # no duplicate copy on disk
    assert torch.load(last, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch_002.ckpt", "last.ckpt"]


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


# --- resume ------------------------------------------------------------------------------------------------------
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

    resumed = speedrun.TimeToMIoU(budget_s=100)
    resumed.load_state_dict(state)
    now[0] = 5000.0
    resumed.on_fit_start(None, None)
    now[0] += 2
    resumed.on_train_start(None, None)
    now[0] += 10
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
        else:  # the new epoch, and the copy it replaced is gone
            assert best.name == "epoch_002.ckpt" and not (best.parent / Path(s1["best_ckpt"]).name).exists()
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == before


def test_a_resume_with_another_net_is_one_line_before_the_build(small_camvid, tmp_path):
    """`ckpt_path=<a DeepLab run's last.ckpt> model=tiramisu56` failed after the build as "RuntimeError: Error(s) in
    loading state_dict for SegmentationModule" and left a failed run folder; now one line naming both nets."""
    from bgremover import config
    from bgremover.errors import UserError

    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.max_epochs=1"]
    train(compose_cfg(tmp_path / "a", base))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    net = json.loads((tmp_path / "a" / "summary.json").read_text())["net"]
    config.validate_train(compose_cfg(tmp_path / "b", [*base, f"ckpt_path={last}", "trainer.max_epochs=2"]))  # fine
    # the same net with nothing left to train: it ran nothing, wrote an "ok" run, and compare took it for a seed
    for limit in ("trainer.max_epochs=1", "trainer.max_steps=2"):
        with pytest.raises(UserError) as info:
            config.validate_train(compose_cfg(tmp_path / "b", [*base, f"ckpt_path={last}", limit]))
        assert str(info.value).startswith(f"ckpt_path {last} has trained 1 epochs (") and \
            "nothing is left to train; raise them to go on, or test it with train=false" in str(info.value)
    deeplab = ["~experiment", "model=deeplabv3plus", "model.net.encoder_weights=null", f"data.root={small_camvid}"]
    with pytest.raises(UserError) as info:
        config.validate_train(compose_cfg(tmp_path / "c", [*deeplab, f"ckpt_path={last}"]))
    assert str(info.value).startswith(f"ckpt_path {last} holds a {net}, and this run builds a "
                                      "deeplabv3plus_mobilenet_v2: resume with the run's own settings")
    config.validate_train(compose_cfg(tmp_path / "d", [*deeplab, f"ckpt_init={last}"]))  # weights to start from


def test_a_resume_whose_clock_is_spent_is_refused_up_front(small_camvid, tmp_path):
    """trainer.max_time and a callback's budget_s go on across a resume: with the clock already spent, the resumed
    run trained nothing, tested, and wrote an "ok" run. Refused up front now; a malformed max_time, which
    Lightning refused only while building the Trainer, is one line naming the setting."""
    from bgremover import config
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
    config.validate_train(compose_cfg(tmp_path / "b", [*more, "trainer.max_time=00:00:01:31"]))  # 1 s left
    config.validate_train(compose_cfg(tmp_path / "b", [*more, *budget, "+callbacks.clock.budget_s=62"]))
    for extra, key, allowed in ((["trainer.max_time=00:00:01:30"], "trainer.max_time", 90),
                                (["trainer.max_time={minutes: 1}"], "trainer.max_time", 60),
                                ([*budget, "+callbacks.clock.budget_s=60"], "callbacks.clock.budget_s", 60)):
        with pytest.raises(UserError) as info:
            config.validate_train(compose_cfg(tmp_path / "b", [*more, *extra]))
        assert str(info.value).startswith(f"ckpt_path {ckpt} has trained ") and \
            f", and {key} allows {allowed} s in all: nothing is left to train" in str(info.value)
    for bad in ("10min", "00:00:00:00"):
        with pytest.raises(UserError, match=r"^trainer\.max_time must be "):
            config.validate_train(compose_cfg(tmp_path / "c", [*base, f"trainer.max_time={bad}"]))


def test_a_resume_in_place_keeps_the_csv_logs_earlier_rows(small_camvid, tmp_path):
    """Lightning's CSV writer deleted csv/metrics.csv when it started: resumed in its own folder, a run's CSV
    history began at the resume (11 rows became 5 in the audit). The earlier rows stay; new ones are appended."""
    import csv

    base = [*TINY_RUN, f"data.root={small_camvid}", "logger=csv"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=2", "test=false"]))
    path = tmp_path / "a" / "csv" / "metrics.csv"
    before = list(csv.DictReader(path.open()))
    assert sorted({r["epoch"] for r in before if r.get("val/mIoU")}) == ["0", "1"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=3", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"]))
    after = list(csv.DictReader(path.open()))
    assert sorted({r["epoch"] for r in after if r.get("val/mIoU")}) == ["0", "1", "2"]
    assert [{k: v for k, v in r.items() if k in before[0]} for r in after[: len(before)]] == before  # kept as written
    assert any(r.get("test/mIoU") for r in after)  # the test stage's new column, header widened
    assert sum(line.startswith("epoch,") for line in path.read_text().splitlines()) == 1  # one header
    # rows past the checkpoint's step (an older checkpoint resumed, a hard kill after the last save) are trained
    # again: they are dropped, not kept twice
    from bgremover.lit.csv_log import _rows_before

    path.write_text("epoch,step,train/loss\n0,1,0.9\n0,3,0.8\n1,5,0.7\n1,7,0.6\n")
    torch.save({"global_step": 5}, tmp_path / "at5.ckpt")
    assert _rows_before(str(path), str(tmp_path / "at5.ckpt")) == (
        ["epoch", "step", "train/loss"], [{"epoch": "0", "step": "1", "train/loss": "0.9"},
                                          {"epoch": "0", "step": "3", "train/loss": "0.8"},
                                          {"epoch": "1", "step": "5", "train/loss": "0.7"}])


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


# --- honest test numbers ------------------------------------------------------------------------------------------
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


def test_a_run_resumed_mid_epoch_shows_its_epoch_on_the_bar(small_camvid, tmp_path):
    """Resumed inside an epoch, Lightning skips on_train_epoch_start: the bar read `Training: 26/?`."""
    from bgremover.lit.callbacks import EpochProgressBar

    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.max_epochs=3"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_steps=3"]))  # 2 steps an epoch: stops inside epoch 2
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    _, objects = train(compose_cfg(tmp_path / "b", [*base, "trainer.max_steps=4", f"ckpt_path={last}"]))
    assert objects["trainer"].global_step == 4
    (bar,) = [c for c in objects["trainer"].callbacks if isinstance(c, EpochProgressBar)]
    assert bar.train_progress_bar.desc.startswith("Epoch 2/2"), bar.train_progress_bar.desc  # max_steps: 2 epochs


def test_a_setting_of_another_data_choice_is_named_in_one_line(small_camvid, tmp_path):
    """`EXP=speedrun_remover ARGS="trainer=cpu data=camvid"`: the recipe's resident-data settings reached
    CamVidDataModule as `TypeError: ... unexpected keyword argument 'scale_range'` (with a traceback in the log)."""
    proc = _run("bgremover.train", "experiment=speedrun_remover", "trainer=cpu", "data=camvid",
                f"data.root={small_camvid}", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: scale_range is not a setting of bgremover.data.datamodule.CamVidDataModule: "
                                   "the recipe or an override sets it for another choice of that config group")
    assert not (tmp_path / "train").exists() or not any((tmp_path / "train" / "runs").iterdir())


def test_a_run_that_never_validates_says_so(small_camvid, tmp_path, caplog):
    """Validation every 2 epochs, 1 epoch trained: no best checkpoint, the test stage scored the last weights, and
    nothing said so."""
    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.max_epochs=1"]
    with caplog.at_level("INFO", logger="bgremover"):
        train(compose_cfg(tmp_path / "a", [*base, "trainer.check_val_every_n_epoch=2"]))
        train(compose_cfg(tmp_path / "b", base))
    warned = [r for r in caplog.records if "it never validates" in r.getMessage()]
    assert len(warned) == 1 and "every 2 epochs and this run trains 1" in warned[0].getMessage()


def test_resume_hint_keeps_the_data_location(monkeypatch):
    """`DATA_DIR=../shared/CamVid make train`, interrupted: the printed resume command left DATA_DIR out and
    failed as printed (dataset folder not found: data/CamVid)."""
    from bgremover import utils
    from bgremover.train import RunInterrupted

    monkeypatch.setattr(utils, "overrides", lambda: ["model=tiramisu56", "hydra.run.dir=x"])
    monkeypatch.setenv("DATA_DIR", "/data/Cam Vid")
    assert str(RunInterrupted(signal.SIGTERM, "/r/last.ckpt", 3, 40)).endswith(
        "resume with: DATA_DIR='/data/Cam Vid' make train ARGS=\"model=tiramisu56 ckpt_path=/r/last.ckpt\"")
    monkeypatch.setattr(utils, "overrides", lambda: ["data.root=/d"])  # typed: it is in the overrides already
    assert str(RunInterrupted(signal.SIGTERM, "/r/last.ckpt", 3, 40)).endswith(
        "resume with: make train ARGS=\"data.root=/d ckpt_path=/r/last.ckpt\"")


# --- errors arrive early ------------------------------------------------------------------------------------------
def _run(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "WANDB_MODE": "offline", **(env or {})})


def test_bad_batch_size_fails_at_once_in_one_line_and_leaves_no_run_folder(small_camvid, tmp_path):
    start = time.time()
    proc = _run("bgremover.train", f"data.root={small_camvid}", "data.batch_size=-1", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: data.batch_size must be a positive integer, got -1"
    assert proc.stdout.count("\n") < 5  # no config dump, no model summary
    assert time.time() - start < 30
    assert not list((tmp_path / "train" / "runs").glob("*"))


def test_a_group_set_to_null_is_switched_off_not_a_traceback(small_camvid, tmp_path):
    """`logger=null` (the lightning-hydra-template way to switch a group off) crashed in Hydra with a bare
    ValueError traceback ("Config group override must be a string or a list"); it now means `~logger`. A key that
    is not a config group keeps null as its value, and eval without a checkpoint says so in one line (it said
    "TypeError: expected str ... not NoneType" and left a run folder)."""
    from bgremover.config import _drop_group

    assert [_drop_group(a) for a in ("logger=null", "callbacks=None", "tta=null", "ckpt_path=null", "logger=csv",
                                     "nosuchgroup=null", "data.root=null")] == [
        "~logger", "~callbacks", "~tta", "ckpt_path=null", "logger=csv", "nosuchgroup=null", "data.root=null"]
    # one process for both: train and eval share the command-line path (config.hydra_command_line)
    proc = _run("bgremover.eval", "tta=null", "logger=null", "ckpt_path=null", f"data.root={small_camvid}",
                f"paths.log_dir={tmp_path}")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: no checkpoint given: make eval CKPT="), proc.stderr
    assert not list(tmp_path.glob("*/runs/*"))


def test_a_run_folder_that_holds_a_run_is_never_trained_or_evaluated_into(small_camvid, tmp_path):
    """`hydra.run.dir=<an earlier run>` overwrote its config, log, summary and last.ckpt (`make reproduce-default`
    used one fixed folder, so a second run clobbered the first). Refused in one line before Hydra writes anything;
    resuming that run in place (ckpt_path inside it) and a new folder are fine."""
    from bgremover.config import _taken_run_dir

    old = tmp_path / "old_run"
    (old / ".hydra").mkdir(parents=True)
    (old / "checkpoints").mkdir()
    files = {old / "summary.json": '{"status": "ok"}', old / ".hydra" / "config.yaml": "seed: 1\n",
             old / "checkpoints" / "last.ckpt": "weights"}
    for path, text in files.items():
        path.write_text(text)
    proc = _run("bgremover.train", f"hydra.run.dir={old}", f"data.root={small_camvid}", f"ckpt_path={tmp_path / 'x.ckpt'}")
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: hydra.run.dir={old} already holds a run"), \
        proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1
    assert {p: p.read_text() for p in files} == files and sorted(p.name for p in old.iterdir()) == [
        ".hydra", "checkpoints", "summary.json"]
    assert _taken_run_dir([f"hydra.run.dir={old}", f"ckpt_path={old}/checkpoints/last.ckpt"]) is None  # resume
    assert _taken_run_dir([f"hydra.run.dir={tmp_path / 'new'}"]) is None
    assert _taken_run_dir(["-m", f"hydra.run.dir={old}"]) is None  # a sweep's folders are hydra.sweep.dir's
    # an evaluation into the training's folder replaced its .hydra config with eval's (ckpt_path inside: exempt)
    assert _taken_run_dir([f"hydra.run.dir={old}", f"ckpt_path={old}/checkpoints/last.ckpt"], resumes=False).startswith(
        f"hydra.run.dir={old} already holds a run")
    proc = _run("bgremover.eval", f"hydra.run.dir={old}", f"ckpt_path={old}/checkpoints/last.ckpt",
                f"data.root={small_camvid}")
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: hydra.run.dir={old} already holds a run"), \
        proc.stderr[-2000:]
    assert {p: p.read_text() for p in files} == files
    # a sweep into an earlier sweep's folder: job 0 overwrote the earlier job 0, the earlier jobs joined the report
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "summary.json").write_text('{"status": "ok"}')
    assert _taken_run_dir(["-m", f"hydra.sweep.dir={sweep}", "seed=1,2"]) == (
        f"hydra.sweep.dir={sweep} already holds a sweep: its jobs' results would be overwritten and counted into "
        "this one; choose a new folder")
    assert _taken_run_dir(["-m", f"hydra.sweep.dir={tmp_path / 'fresh'}", "seed=1,2"]) is None


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


def test_cpu_ddp_with_sync_batchnorm_is_refused_before_building(small_camvid, tmp_path):
    from bgremover import config
    from bgremover.errors import UserError

    cfg = compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer=ddp", "trainer.accelerator=cpu",
                                 "trainer.devices=2"])
    with pytest.raises(UserError, match="sync_batchnorm=false"):
        config.validate_train(cfg)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    proc = _run("bgremover.train", f"paths.log_dir={tmp_path}", env={"DATA_DIR": str(tmp_path / "empty")})
    assert proc.returncode == 1 and "make data" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_eval_reads_only_the_split_it_evaluates_and_never_suggests_unsafe_loading(small_camvid, tmp_path):
    proc = _run("bgremover.eval", "ckpt_path=README.md", f"data.root={small_camvid}", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 1 and proc.stderr.startswith("error: not a PyTorch checkpoint: README.md")
    assert "weights_only" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    shutil.rmtree(small_camvid / "train")  # eval never needs the train split
    shutil.rmtree(small_camvid / "trainannot")
    proc = _run("bgremover.eval", "ckpt_path=README.md", f"data.root={small_camvid}", f"paths.log_dir={tmp_path}")
    assert "train" not in proc.stderr


def test_train_split_with_test_fails_in_one_line_before_any_run_folder(small_camvid, tmp_path):
    proc = _run("bgremover.train", f"data.root={small_camvid}", "data.train_split=train+test", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: data.train_split=train+test would train on the test split: "
                                   "its numbers would mean nothing")
    assert not list((tmp_path / "train" / "runs").glob("*"))


def test_output_dir_override_is_refused_in_one_line_and_nothing_is_deleted(small_camvid, tmp_path):
    """paths.output_dir=X split a run (checkpoints in X, its log and config in Hydra's folder), and a user error
    then removed X as an "empty run folder" when it held only .log files: a user's own folder."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.log").write_text("keep me")
    for module in ("bgremover.train", "bgremover.eval"):
        proc = _run(module, f"data.root={small_camvid}", f"paths.output_dir={mine}", "data.batch_size=-1",
                    "ckpt_path=README.md", f"paths.log_dir={tmp_path / 'logs'}")
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert proc.stderr.strip() == ("error: paths.output_dir follows Hydra's run folder: set hydra.run.dir=<folder> "
                                       "instead (a sweep: hydra.sweep.dir=<folder>)")
        assert (mine / "notes.log").read_text() == "keep me"
    assert not [p for p in (tmp_path / "logs").rglob("*") if p.is_file()]  # Hydra's own run folders are removed


def test_a_user_error_never_removes_a_folder_hydra_did_not_make(tmp_path):
    from bgremover import utils
    from bgremover.errors import UserError

    cfg = compose_cfg(tmp_path / "hydra_run", [*TINY_RUN])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.log").write_text("keep me")
    with open_dict(cfg):
        cfg.paths.output_dir = str(mine)

    def fails(_):
        raise UserError("bad input")

    with pytest.raises(UserError):
        utils.run_task(fails, cfg)
    assert (mine / "notes.log").read_text() == "keep me"


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


def test_unknown_model_lists_only_real_choices():
    proc = _run("bgremover.train", "model=tiramisu999")
    assert proc.returncode != 0 and "tiramisu103" in proc.stderr and "recipe" not in proc.stderr


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
    assert "stops after 2 h 00 min at most (trainer.max_time)" in plan
    for cb in trainer.callbacks:  # the estimate from a fresh run's clocks
        if type(cb).__name__ == "Timer":
            cb._offset = 0.0
    estimate = describe_estimate(trainer, 600.0)  # 10 min a step: 140 min > the 2 h cap
    assert "about 2 h 20 min" in estimate and "trainer.max_time stops it after 2 h 00 min" in estimate
    assert any(isinstance(cb, RunPlan) for cb in trainer.callbacks)


def test_run_plan_counts_the_steps_max_steps_allows(small_camvid, tmp_path):
    # 7 epochs × 2 steps, but max_steps=11 ends the run in its 6th epoch: 11 steps, not 12 or 14
    cfg = compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=7",
                                 "trainer.max_steps=11"])
    _, objects = train(cfg)
    trainer, model = objects["trainer"], objects["model"]
    assert trainer.global_step == 11
    assert "6 epochs × 2 steps = 11 steps" in describe_plan(trainer, model)
    assert "about 1 h 50 min of training for 6 epochs" in describe_estimate(trainer, 600.0)


def test_progress_bar_counts_to_the_epoch_a_time_budget_reaches():
    from bgremover.lit.callbacks import epoch_label

    assert epoch_label(2, 100) == "Epoch 3/100"
    assert epoch_label(0, 1000, 1200.0, 0.0) == "Epoch 1/1000 (stops after 20 min 00 s at most)"
    # 3 epochs in 150 s: 1050 s left hold 21 more, so the 24th epoch is running when the time runs out
    assert epoch_label(3, 1000, 1200.0, 150.0) == "Epoch 4/~24 (17 min 30 s of 20 min 00 s left)"
    assert epoch_label(3, 5, 1200.0, 150.0) == "Epoch 4/5 (17 min 30 s of 20 min 00 s left)"  # epochs end it first
    # resumed at epoch 10: the pace is this process's (2 epochs in 100 s), not 12 epochs in 100 s
    assert epoch_label(12, 1000, 1200.0, 100.0, first=10) == "Epoch 13/~34 (18 min 20 s of 20 min 00 s left)"


# --- image panels -------------------------------------------------------------------------------------------------
def test_panels_appear_when_validation_runs_every_few_epochs(small_camvid, tmp_path, monkeypatch):
    from bgremover.lit import SegmentationModule

    epochs: list[int] = []
    monkeypatch.setattr(SegmentationModule, "_log_panel", lambda self: epochs.append(self.current_epoch))
    cfg = compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=6",
                                 "trainer.check_val_every_n_epoch=2", "model.log_images_every_n_epochs=4"])
    train(cfg)
    assert epochs == [1, 5]  # validations at epochs 1, 3, 5; `epoch % 4 == 0` never held there


# --- weight averaging (callbacks=ema) ------------------------------------------------------------------------------
def test_ema_decay_too_slow_for_the_run_is_called_out(tmp_path, caplog):
    from bgremover.lit.callbacks import EMAWeights

    def fit(decay: float) -> list[str]:
        caplog.clear()
        trainer = pl.Trainer(max_epochs=3, callbacks=[EMAWeights(decay=decay)], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                             default_root_dir=tmp_path)
        with caplog.at_level("WARNING", logger="bgremover.train"):
            trainer.fit(_Scored([0.1, 0.2, 0.3]))
        return [r.getMessage() for r in caplog.records if "callbacks.ema.decay" in r.getMessage()]

    # 3 epochs × 2 steps = 6 steps, against an average over ~1000
    assert fit(0.999) == ["callbacks.ema.decay=0.999 averages over ~1000 steps, and this run plans 6: the average "
                          "keeps much of the early weights; for this length use callbacks.ema.decay=0.1667"]
    assert fit(0.5) == []  # ~2 steps: fine for 6


def _net_tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("net.") and v.is_floating_point()}


def test_callbacks_ema_checkpoints_the_average_and_resumes_from_the_raw_weights(small_camvid, tmp_path):
    """callbacks=ema: each checkpoint's state_dict (what test, eval, export and ship read) is the moving average
    and the raw weights travel in current_model_state; the fitted module holds the average; decay 0 makes the
    average the raw weights; a resumed run goes on and keeps averaging."""
    from bgremover import checkpoint

    ema = [*TINY_RUN, f"data.root={small_camvid}", "callbacks=ema"]
    _, objects = train(compose_cfg(tmp_path / "a", [*ema, "trainer.max_epochs=2", "callbacks.ema.decay=0.5"]))
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    ckpt = torch.load(s["last_ckpt"], weights_only=False)
    avg, raw = _net_tensors(ckpt["state_dict"]), _net_tensors(ckpt["current_model_state"])
    assert avg.keys() == raw.keys() and len(avg) > 10
    assert sum(not torch.equal(avg[k], raw[k]) for k in avg) > len(avg) // 2  # averaged, not copied
    best = torch.load(s["best_ckpt"], weights_only=False)
    best_avg = _net_tensors(best["state_dict"])
    assert any(not torch.equal(best_avg[k], v) for k, v in _net_tensors(best["current_model_state"]).items())
    fitted = {f"net.{k}": v for k, v in objects["model"].net.state_dict().items()}
    assert all(torch.equal(fitted[k], best_avg[k]) for k in best_avg)  # the test stage ran the best average
    net, _, _ = checkpoint.load_net(s["best_ckpt"])  # export / ship / ckpt_init read the average
    assert all(torch.equal(net.state_dict()[k[4:]], v) for k, v in best_avg.items())

    _, _ = train(compose_cfg(tmp_path / "b", [*ema, "trainer.max_epochs=3", "callbacks.ema.decay=0.5",
                                              f"ckpt_path={s['last_ckpt']}"]))  # fmt: skip
    s2 = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s2["history"]["epoch"] == [0, 1, 2] and s2["status"] == "ok"

    train(compose_cfg(tmp_path / "c", [*ema, "trainer.max_epochs=1", "callbacks.ema.decay=0.0"]))
    last = torch.load(json.loads((tmp_path / "c" / "summary.json").read_text())["last_ckpt"], weights_only=False)
    avg, raw = _net_tensors(last["state_dict"]), _net_tensors(last["current_model_state"])
    assert all(torch.equal(avg[k], raw[k]) for k in avg)  # decay 0: the average is the last step's weights


def test_speedrun_times_say_when_val_is_trained_on(small_camvid):
    from types import SimpleNamespace

    from bgremover.data import CamVidDataModule, ResidentCamVidDataModule
    from bgremover.lit.speedrun import TimeToMIoU

    cb = TimeToMIoU(thresholds=[0.5])
    for dm_type in (CamVidDataModule, ResidentCamVidDataModule):
        cb.on_fit_start(SimpleNamespace(datamodule=dm_type(root=small_camvid, train_split="train+val")), None)
        assert cb.describe() == "val/mIoU >= 0.500: not reached (val is in the training data: not a held-out score)"
        cb.on_fit_start(SimpleNamespace(datamodule=dm_type(root=small_camvid)), None)
        assert cb.describe() == "val/mIoU >= 0.500: not reached"


def test_resume_names_its_wandb_run_and_continues_it_online(small_camvid, tmp_path, monkeypatch):
    """A resumed run was a new, unrelated W&B run. Now the checkpoint records its W&B run; offline (here) the
    resumed run is a new one whose config names the old (wandb sync keeps only the last of two offline runs with
    one id), online the same run goes on (id + resume="allow")."""
    from wandb_records import offline_run

    from bgremover import train as train_mod
    from bgremover.utils import finish_wandb

    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    wandb_run = [*TINY_RUN[:-3], "logger=wandb", "trainer.check_val_every_n_epoch=1", "trainer.max_time=null"]
    train(compose_cfg(run1, [*wandb_run, f"data.root={small_camvid}", "trainer.max_epochs=1", "test=false"]))
    finish_wandb()
    first = offline_run(run1 / "wandb")
    last = run1 / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["wandb_run_id"] == first["id"]

    resume = [*wandb_run, f"data.root={small_camvid}", "trainer.max_epochs=2", "test=false", f"ckpt_path={last}"]
    train(compose_cfg(run2, resume))
    finish_wandb()
    second = offline_run(run2 / "wandb")
    assert second["id"] != first["id"] and second["config"]["resumed_from_wandb_run"] == first["id"]

    cfg = compose_cfg(tmp_path / "online", resume)
    assert train_mod._resume_wandb(cfg, "online") == first["id"]
    assert (cfg.logger.wandb.id, cfg.logger.wandb.resume) == (first["id"], "allow")


def test_last_ckpt_at_the_end_keeps_the_raw_weights_beside_the_ema_average(tmp_path):
    """every_epoch=False saved at on_train_end, after callbacks=ema had copied the average over the raw weights:
    the checkpoint's current_model_state (what a resume trains on) was the average too."""
    from bgremover.lit.callbacks import EMAWeights

    ckpt_dir = tmp_path / "checkpoints"
    trainer = pl.Trainer(max_epochs=3, callbacks=[EMAWeights(decay=0.5), LastCheckpoint(str(ckpt_dir), every_epoch=False)],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(_Scored([0.1, 0.2, 0.3]))
    state = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert state["global_step"] == 6
    raw, avg = state["current_model_state"]["layer.weight"], state["state_dict"]["layer.weight"]
    assert not torch.equal(raw, avg)


def test_run_plan_of_a_run_resumed_from_a_validation_end_checkpoint(small_camvid, tmp_path, caplog):
    """last.ckpt linked to the best file, which ModelCheckpoint writes at the end of the epoch's validation:
    Lightning still counts that epoch as running when training starts, and the plan said "resumes at epoch 1
    (step 2): 3 of 3 epochs × 2 steps = 4 steps left" (3 × 2 is not 4) where epoch 2 of 3 was next."""
    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.check_val_every_n_epoch=2"]
    train(compose_cfg(tmp_path / "a", [*base, "trainer.max_epochs=2"]))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert last.is_symlink()  # the only validation, in the last epoch: its best file is the last one
    with caplog.at_level("INFO", logger="bgremover.train"):
        _, objects = train(compose_cfg(tmp_path / "b", [*base, "trainer.max_epochs=4", f"ckpt_path={last}"]))
    plan = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: "))
    assert "resumes at epoch 3 (step 4): 2 of 4 epochs × 2 steps = 4 steps left" in plan
    assert objects["trainer"].global_step == 8 and objects["trainer"].current_epoch == 4


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
    assert "resumes at epoch 4 (step 6): 1 of 4 epochs × 2 steps = 2 steps left" in plan
    estimate = describe_estimate(objects["trainer"], 600.0, (3, 6))  # 2 steps left at 10 min each
    assert "about 20 min 00 s of training for the 1 epoch left" in estimate

    # the time limits: what a resumed run has left of them (both clocks go on across a resume)
    timer = Timer(duration="00:00:10:00")
    timer.load_state_dict({"time_elapsed": {"train": 125.0}})
    budget = TimeToMIoU(budget_s=300)
    budget.load_state_dict({"train_s": 290.0})
    assert _time_limit(SimpleNamespace(callbacks=[timer])) == (475.0, "trainer.max_time")
    assert _time_limit(SimpleNamespace(callbacks=[timer, budget])) == (10.0, "TimeToMIoU's time budget")
