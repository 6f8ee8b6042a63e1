"""Bad settings and misplaced runs fail at once, in one line, before a run folder is made; nothing a user made
is ever removed or overwritten."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_camvid
from omegaconf import open_dict
from test_runs import TINY_RUN, _run
from test_train import compose_cfg


def test_a_setting_of_another_data_choice_is_named_in_one_line(small_camvid, tmp_path):
    """`EXP=speedrun_remover ARGS="trainer=cpu data=camvid"`: the recipe's resident-data settings reached
    CamVidDataModule as `TypeError: ... unexpected keyword argument 'scale_range'` (with a traceback in the log)."""
    proc = _run("bgremover.train", "experiment=speedrun_remover", "trainer=cpu", "data=camvid",
                f"data.root={small_camvid}", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: scale_range is not a setting of bgremover.data.datamodule.CamVidDataModule: "
                                   "the recipe or an override sets it for another choice of that config group")
    assert not (tmp_path / "train").exists() or not any((tmp_path / "train" / "runs").iterdir())



@pytest.mark.parametrize("override, message", [
    ("model.net.encoder_name=nope", "error: model.net.encoder_name=nope is not an encoder segmentation_models_pytorch "
     "knows: choose one of its "),
    ("model.net.encoder_name=resnet19", "error: model.net.encoder_name=resnet19 is not an encoder "
     "segmentation_models_pytorch knows (closest: resnet18, "),
    ("model.net.encoder_name=tu-nope", "error: model.net.encoder_name=tu-nope: timm has no model 'nope'"),
    ("model.net.encoder_weights=imagenet21k", "error: model.net.encoder_weights=imagenet21k is not a weight set of "
     "encoder mobilenet_v2 (it has: imagenet; or null: random weights)"),
])
def test_an_unknown_deeplab_encoder_is_refused_before_a_run_folder_is_made(small_camvid, tmp_path, override, message):
    """smp's KeyError ("Wrong encoder name `nope`, supported encoders: [76 names]") came while the net was built:
    one line, but a failed run folder was left behind."""
    proc = _run("bgremover.train", "model=deeplabv3plus", override, "trainer=cpu", "logger=csv",
                f"data.root={small_camvid}", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 1 and proc.stderr.strip().startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "train").exists() or not any((tmp_path / "train" / "runs").iterdir())


def test_a_sweep_experiment_run_as_one_training_is_refused(small_camvid, tmp_path):
    """`make train EXP=compare_models` (the README's `make sweep` experiment) ran one job of the base config,
    FC-DenseNet103 for 100 epochs (hours on a CPU), its sweep of nets × seeds dropped without a word. A job of it
    (every swept key given, as a sweep job's resume command gives them) still trains."""
    proc = _run("bgremover.train", "experiment=compare_models", f"data.root={small_camvid}",
                f"paths.log_dir={tmp_path}")
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: experiment=compare_models is a sweep over model, seed (hydra.sweeper.params): one run would train "
        "only its defaults; run the sweep with make sweep EXP=compare_models (-m), or pick its job: model=... "
        "seed=..."), proc.stderr
    assert not (tmp_path / "train").exists() or not any((tmp_path / "train" / "runs").iterdir())
    proc = _run("bgremover.train", "experiment=compare_models", "model=tiramisu56", "seed=1", "trainer.max_epochs=0",
                f"data.root={small_camvid}", f"paths.log_dir={tmp_path}")  # past the sweep check, to the next one
    assert proc.returncode == 1 and "trainer.max_epochs" in proc.stderr and "sweep" not in proc.stderr, proc.stderr


def test_deeplab_with_a_batch_of_one_is_refused_before_a_run_folder_is_made(small_camvid, tmp_path):
    """"Expected more than 1 value per channel when training" came at the first step (ASPP's image pooling before
    a BatchNorm), after the datamodule, the net and the run folder were made."""
    proc = _run("bgremover.train", "model=deeplabv3plus", "data.batch_size=1", "trainer=cpu", "logger=csv",
                f"data.root={small_camvid}", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: data.batch_size=1 cannot train DeepLabV3Plus: its image-pooling branch normalises one value per "
        "channel, which BatchNorm refuses in training; use 2 or more"), proc.stderr
    assert not (tmp_path / "train").exists() or not any((tmp_path / "train" / "runs").iterdir())


@pytest.mark.parametrize("override, message", [
    ("data.crop_size=224", "data.crop_size must be [height, width] in pixels or null, got 224"),
    ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch must be a positive integer, got 0"),
    ("trainer.max_steps=0", "trainer.max_steps must be a positive integer, got 0"),
    ("ckpt_path=last", "ckpt_path=last: give the checkpoint's path (a run's last one: <run>/checkpoints/last.ckpt)"),
    ("trainer.max_steps=abc", "trainer.max_steps must be a positive integer, got 'abc'"),
    ("+trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be a positive integer, got 0"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val must be a non-negative number (0 or null: no "
                                     "clipping), got -1"),
    ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0 trains nothing: to test a checkpoint, use "
                                      "train=false ckpt_path=<checkpoint>"),
    # a user audit, as the README said it: "stack expects each tensor to be equal size" at the first batch
    ("data.crop_size=null data.scale_jitter=0.25", "data.crop_size=null (full frames) with data.scale_jitter=0.25 "
     "gives frames of different sizes, which a batch of 2 cannot stack: add data.scale_jitter=0, or keep a crop size"),
    # RandomScale drew a scale of 0 now and then: cv2.resize's "inv_scale_x > 0" stopped the run epochs in
    ("data.scale_jitter=1.0", "data.scale_jitter must be at least 0 and below 1 (frames are scaled by 1-j..1+j), "
     "got 1.0; data=camvid_resident takes data.scale_range=[lo,hi] for wider ranges"),
    ("data.scale_jitter=-0.25", "data.scale_jitter must be at least 0 and below 1 (frames are scaled by 1-j..1+j), "
     "got -0.25"),
    ("+model.optimizer.lrr=0.1", "+model.optimizer.lrr=0.1 adds a setting torch.optim.RMSprop does not take. Did you "
     "mean 'model.optimizer.lr'? (give it as model.optimizer.lr=0.1)"),
    # another optimizer over the paper recipe's RMSprop: its alpha was named, not where it came from
    ("model.optimizer._target_=torch.optim.AdamW", "model.optimizer.alpha is not a setting of torch.optim.AdamW (it "
     "takes: lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable, fused); the recipe "
     "sets it for the class it names: drop it with ~model.optimizer.alpha"),
    # trained, then stopped at the first epoch without improvement: "'>=' not supported between 'int' and 'str'"
    ("callbacks.early_stopping.patience=abc", "callbacks.early_stopping.patience must be a number, got 'abc'"),
    ("model.optimizer.weight_decay=1e-4x", "model.optimizer.weight_decay must be a number, got '1e-4x'"),
    # "'<=' not supported between instances of 'float' and 'list'" after the build; a null gamma at the first
    # epoch's end; centered=maybe trained centered, without a word
    ("model.optimizer.weight_decay=[1]", "model.optimizer.weight_decay must be a number, got [1]"),
    ("model.scheduler.gamma=null", "model.scheduler.gamma must be a number, got null"),
    ("+model.optimizer.centered=maybe", "model.optimizer.centered must be true or false, got 'maybe'"),
    # each passed the checks and failed after the build: the DataLoader's "num_workers option should be
    # non-negative", a crop of one side or of 0 pixels in albumentations, a crop the net's skips cannot concatenate
    ("data.num_workers=-1", "data.num_workers must be 0 or more, got -1"),
    ("data.crop_size=[32]", "data.crop_size must be [height, width] in pixels or null, got [32]"),
    ("data.crop_size=[0,32]", "data.crop_size must be [height, width] in pixels or null, got [0, 32]"),
    ("data.crop_size=[48,32]", "data.crop_size [48, 32] must be multiples of 32 (the net's size multiple)"),
    ("data.limit_images=0", "data.limit_images must be a positive integer, got 0"),
    ("data.limit_eval_images=0", "data.limit_eval_images must be a positive integer, got 0"),
    ("data.eval_batch_size=0", "data.eval_batch_size must be a positive integer, got 0"),
    ("trainer.max_epochs=0", "trainer.max_epochs must be a positive integer, got 0"),
    # taken without a word: a learning rate of 0 trains nothing, true clips as 1; `best` was "not found: best"
    ("model.optimizer.lr=0", "model.optimizer.lr must be a positive number, got 0"),
    ("trainer.gradient_clip_val=true", "trainer.gradient_clip_val must be a non-negative number (0 or null: no "
                                       "clipping), got True"),
    ("ckpt_init=best", "ckpt_init=best: give the checkpoint's path (a run's last one: <run>/checkpoints/last.ckpt)"),
    ("trainer.max_time=00:00:00:00", "trainer.max_time must be a positive duration, got '00:00:00:00'"),
    ("train=false", "train=false needs ckpt_path=<checkpoint> to test"),
    # trained no step: Lightning's "length of the train loader is zero" warnings came first, after the build
    ("data.limit_images=1", "training would take no step: data.limit_images=1 fills no batch of data.batch_size=2 "
                            "(a short last batch is dropped); lower data.batch_size"),
])
def test_settings_that_failed_after_the_build_are_refused_up_front(small_camvid, tmp_path, override, message):
    """Both failed after the datamodule, the net and the W&B run were built ("TypeError: 'int' object is not
    iterable", "ZeroDivisionError: integer modulo by zero"), leaving a failed run folder."""
    from bgremover import checks
    from bgremover.errors import UserError

    with pytest.raises(UserError) as info:
        checks.validate_train(compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={small_camvid}", *override.split()]))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_train_split_limited_to_one_batch_trains(small_camvid, tmp_path):
    """The no-step refusal above counts the batch: a limit that fills one still trains."""
    from bgremover import checks

    checks.validate_train(compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={small_camvid}",
                                                         "data.limit_images=2"]))


def test_a_misspelt_setting_added_with_a_plus_is_not_blamed_on_the_recipe(small_camvid, tmp_path):
    """`+model.optimizer.nesterov=true` is the user's own key (Hydra's `+` form of a key the config lacks; SGD's, and no
    typo of an RMSprop one, which is answered with the one meant): the line names what the class takes, without
    "the recipe sets it ...: drop it with ~model.optimizer.nesterov", which is for keys a
    recipe set for another class."""
    from bgremover import checks
    from bgremover.errors import UserError

    with pytest.raises(UserError) as info:
        checks.validate_train(compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={small_camvid}",
                                                             "+model.optimizer.nesterov=true"]))
    said = str(info.value)
    assert said.startswith("model.optimizer.nesterov is not a setting of torch.optim.RMSprop (it takes: lr, alpha, ")
    assert said.endswith(")") and "recipe" not in said, said


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("override, message", [
    # Lightning's endless training: "OverflowError: cannot convert float infinity to integer" after the build
    ("trainer.max_epochs=-1", "model.scheduler.total_iters=null spans the run's steps, and this run sets no number "
                              "of them (trainer.max_epochs=-1): give trainer.max_epochs or trainer.max_steps"),
    ("~trainer.max_epochs trainer.max_time=00:00:10:00", "model.scheduler.total_iters=null spans the run's steps, and "
     "this run sets no number of them (no trainer.max_epochs, which beside trainer.max_time Lightning takes as no limit)"),
    # per epoch: planned for 1 epoch, at its end (lr 0) from the second on, without a word
    ("trainer.max_epochs=-1 trainer.max_steps=40 model.scheduler_interval=epoch",
     "model.scheduler.total_iters=null spans the run's epochs, and this run sets no number of them "
     "(trainer.max_epochs=-1): give trainer.max_epochs, or model.scheduler.total_iters=N"),
    ("model.scheduler_interval=batch", "model.scheduler_interval must be step or epoch, got 'batch'"),
    # the failure came after the first epoch, in Lightning's words
    ("~model.scheduler +model.scheduler={_target_:torch.optim.lr_scheduler.ReduceLROnPlateau,_partial_:true} "
     "trainer.limit_val_batches=0", "model.scheduler ReduceLROnPlateau steps on a val metric, and this run never "
     "validates (trainer.limit_val_batches=0): drop one of the two"),
])
def test_a_schedule_over_the_run_needs_a_run_length(small_camvid, tmp_path, override, message):
    from bgremover import checks
    from bgremover.errors import UserError

    base = [*(o for o in TINY_RUN if not o.startswith("model")), f"data.root={small_camvid}", "model=deeplabv3plus"]
    with pytest.raises(UserError) as info:
        checks.validate_train(compose_cfg(tmp_path / "run", [*base, *override.split()]))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    # a step count is a length: the poly schedule spans those 3 steps (lr 0 at the last)
    from bgremover.train import train

    _, objects = train(compose_cfg(tmp_path / "ok", [*base, "trainer.max_epochs=-1", "trainer.max_steps=3"]))
    scheduler = objects["trainer"].lr_scheduler_configs[0].scheduler
    assert objects["trainer"].global_step == 3 and scheduler.total_iters == 3 and scheduler.get_last_lr()[0] == 0


def test_trainer_ddp_on_a_cpu_machine_names_what_asked_for_the_gpu(small_camvid, tmp_path):
    """`trainer=ddp` was blamed on the default recipe ("cpu_quick trains on a GPU"), and the fix offered dropped DDP."""
    proc = _run("bgremover.train", "trainer=ddp", f"data.root={small_camvid}", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: trainer=ddp trains on a GPU (trainer.accelerator=gpu) and this machine has none: for DDP over CPU "
        "processes add trainer.accelerator=cpu trainer.devices=2 trainer.sync_batchnorm=false")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_typed_gpu_accelerator_on_a_cpu_machine_is_named_with_a_fix_that_works(small_camvid, tmp_path):
    """`make train ARGS="trainer.accelerator=cuda"` was answered "cpu_quick trains on a GPU (...): add
    ARGS="trainer=cpu"": the CPU recipe blamed, and the fix offered still failed (the typed key wins over the group)."""
    proc = _run("bgremover.train", "trainer.accelerator=cuda", f"data.root={small_camvid}", f"paths.log_dir={tmp_path}",
                env={"MAKELEVEL": ""})  # typed to python -m bgremover.train, not make
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: trainer.accelerator=cuda asks for a GPU and this machine has none: put trainer=cpu in its place to "
        "run it here")
    fixed = _run("bgremover.train", "trainer=cpu", f"data.root={small_camvid}", f"paths.log_dir={tmp_path}",
                 "data.num_workers=0", "data.crop_size=[32,32]", "data.batch_size=2", "data.class_weights=null",
                 "trainer.max_epochs=1", "logger=csv", "measure_inference=false")
    assert fixed.returncode == 0, fixed.stderr


def test_a_test_only_run_on_a_gpu_trainer_without_a_gpu_is_refused_as_a_training_is(small_camvid, tmp_path,
                                                                                      monkeypatch):
    """`make train ARGS="train=false ckpt_path=<last.ckpt> trainer=gpu"` (what the README and the
    limit_train_batches=0 refusal say to test a checkpoint with) skipped the GPU check a training gets: it read the
    checkpoint, built the net, then failed in Lightning's words ("No supported gpu backend found!") and left a
    failed run folder."""
    from bgremover import checks
    from bgremover.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MAKELEVEL", raising=False)  # typed to python -m bgremover.train
    ckpt = tmp_path / "last.ckpt"
    torch.save({"pytorch-lightning_version": "2.5.0", "epoch": 0, "global_step": 2, "state_dict": {}}, ckpt)
    with pytest.raises(UserError) as info:
        checks.validate_train(compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={small_camvid}", "train=false",
                                                             f"ckpt_path={ckpt}", "trainer=gpu"]))
    assert str(info.value) == ("trainer=gpu trains on a GPU (trainer.accelerator=gpu) and this machine has none: add "
                               "trainer=cpu to run it here")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_eval_on_a_gpu_trainer_without_a_gpu_is_refused_as_train_refuses_it(small_camvid, tmp_path):
    """`make eval ARGS="trainer=gpu"` (eval --help lists it) loaded the checkpoint, then failed in Lightning's words
    ("No supported gpu backend found!") and left a failed run folder; train refused it up front in one line."""
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"refused before it is read")
    proc = _run("bgremover.eval", f"ckpt_path={ckpt}", "trainer=gpu", f"data.root={small_camvid}",
                f"paths.log_dir={tmp_path}", env={"MAKELEVEL": ""})
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: trainer=gpu trains on a GPU (trainer.accelerator=gpu) and this machine has none: add trainer=cpu to "
        "run it here")
    assert not (tmp_path / "eval").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_recipe_on_a_cpu_machine_offers_the_fix_as_the_command_was_typed(small_camvid, tmp_path):
    """`python -m bgremover.train experiment=speedrun_remover` was told to `add ARGS="trainer=cpu"`: make's syntax."""
    message = "error: speedrun_remover trains on a GPU (trainer.accelerator=gpu) and this machine has none: add {} to run it here"
    for makelevel, fix in (("", "trainer=cpu"), ("1", 'ARGS="trainer=cpu"')):
        proc = _run("bgremover.train", "experiment=speedrun_remover", f"data.root={small_camvid}",
                    f"paths.log_dir={tmp_path}", env={"MAKELEVEL": makelevel})
        assert proc.returncode == 1 and proc.stderr.strip() == message.format(fix)


def test_an_optimized_metric_no_run_logs_is_named(small_camvid, tmp_path):
    """A misspelt optimized_metric: every Optuna job said "ok", then the sweep ended in "Return value must be
    float-castable. Got 'None'" / "every job failed"; a single run said nothing at all."""
    proc = _run("bgremover.train", *TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1",
                "optimized_metric=val/miou", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("warning: optimized_metric")]
    assert line.startswith("warning: optimized_metric=val/miou is not among this run's metrics (") \
        and "val/mIoU, val/mIoU_best" in line and line.endswith("): a sweep gets no number from it")
    # validation off: val/mIoU_best is missing for that reason, and a single run feeds no sweep (audit: noise)
    proc = _run("bgremover.train", *TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1",
                "trainer.limit_val_batches=0", "test=false", "logger=csv", f"hydra.run.dir={tmp_path / 'noval'}")
    assert proc.returncode == 0 and "optimized_metric" not in proc.stderr, proc.stderr[-2000:]


def test_an_optuna_trial_that_would_never_validate_is_refused_in_seconds(small_camvid, tmp_path):
    """The check test_sweep runs on the real CamVid (a whole study), on the composed config of one trial."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    from bgremover import checks
    from bgremover.errors import UserError

    cfg = compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={small_camvid}", "hparams_search=optuna",
                                         "trainer.limit_val_batches=0"])
    with read_write(cfg.hydra), open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN  # a trial is a job of the study's multirun
    HydraConfig().set_config(cfg)
    with pytest.raises(UserError) as info:
        checks.validate_train(cfg)
    assert str(info.value).startswith("optimized_metric=val/mIoU_best (the Optuna objective) comes from validation, "
                                      "and this run never validates (trainer.limit_val_batches=0)")


def test_bad_batch_size_fails_at_once_in_one_line_and_leaves_no_run_folder(small_camvid, tmp_path):
    start = time.time()
    proc = _run("bgremover.train", f"data.root={small_camvid}", "data.batch_size=-1", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: data.batch_size must be a positive integer, got -1"
    assert proc.stdout.count("\n") < 5  # no config dump, no model summary
    assert time.time() - start < 30
    assert not list((tmp_path / "train" / "runs").glob("*"))



def test_a_run_that_trains_no_step_fails_instead_of_testing_an_untrained_net(tmp_path):
    """One train frame with data.batch_size=2 (data.limit_images=1 is refused up front now): Lightning's "No
    training batches" went by as an info line, and the run then tested its untrained net and ended "ok" with those
    numbers (global_step 0, no checkpoint)."""
    root = write_camvid(tmp_path / "CamVid", counts={"train": 1, "val": 1, "test": 1}, size=(32, 64))
    proc = _run("bgremover.train", *TINY_RUN, f"data.root={root}", "trainer.max_epochs=1",
                f"paths.log_dir={tmp_path}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and errors == [
        "error: training took no step: the train split fills no batch of data.batch_size=2 (a short last batch is "
        "dropped); lower data.batch_size"], proc.stderr[-2000:]
    assert "test/mIoU" not in proc.stdout and not list((tmp_path / "train" / "runs").glob("*"))


def test_paths_hydra_would_refuse_are_taken_as_typed(tmp_path):
    """`ckpt_path=<run>/checkpoints/epoch=3-step=10.ckpt` (Lightning's names), a run folder named runé or run,v2
    (a resume line printed by the project), `data.root=~/CamVid`: each was Hydra's grammar error
    (LexerNoViableAltException, "Ambiguous value ... add --multirun") instead of the run. A sweep over paths stays."""
    from bgremover.config import path_override

    both = tmp_path / "a,b"
    both.mkdir()
    assert [path_override(a) for a in ("ckpt_path=/r/runé/x.ckpt", "ckpt_path=/r/epoch=3-step=10.ckpt",
                                       "+ckpt_init=/r/a(1)/x.pt", "hydra.run.dir=/r/run,v2", "data.root=~/CamVid",
                                       "data.root=/plain", "ckpt_path=null", "data.root='/d/é'", "model=fcdensenet56",
                                       "hydra.run.dir=${paths.log_dir}/x")] == [
        "ckpt_path='/r/runé/x.ckpt'", "ckpt_path='/r/epoch=3-step=10.ckpt'", "+ckpt_init='/r/a(1)/x.pt'",
        "hydra.run.dir='/r/run,v2'", f"data.root='{Path.home() / 'CamVid'}'", "data.root=/plain", "ckpt_path=null",
        "data.root='/d/é'", "model=fcdensenet56", "hydra.run.dir=${paths.log_dir}/x"]
    assert path_override("ckpt_path=a.ckpt,b.ckpt", multirun=True) == "ckpt_path=a.ckpt,b.ckpt"  # a sweep
    # quoted values Hydra reads back as they were, and so does the run-folder check (a review: a trailing
    # backslash was Hydra's "token recognition error")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from bgremover.config import _unquoted, quoted

    for value in ("/d/x\\", "/d/it's", "/d/a\\'b", "/d/a\\b", "/d/\\\\", "/d/poolé,v2"):
        assert OverridesParser.create().parse_override(f"data.root={quoted(value)}").value() == value
        assert _unquoted(quoted(value)) == value
    assert path_override(f"data.root={both}", multirun=True) == f"data.root='{both}'"  # one folder that exists
    ckpt = tmp_path / "runé,v2" / "epoch=3-step=10.ckpt"
    proc = _run("bgremover.eval", f"ckpt_path={ckpt}")
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: ckpt_path: checkpoint not found: {ckpt}"
    proc = _run("bgremover.train", "data.root=~/nowhere", env={"HOME": str(tmp_path)})
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: dataset folder not found: {tmp_path / 'nowhere'} ")


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



def test_a_group_a_run_cannot_do_without_is_named_and_extras_may_be_switched_off(small_camvid, tmp_path):
    """`_drop_group` takes `X=null` for every group: `model=null` failed after the build ("Key 'net' is not in
    struct"), `paths=null` in Hydra's traceback, and `extras=null` (off in the lightning-hydra-template) as a
    three-line traceback before anything ran. Groups a run needs are named in one line; extras are off."""
    for module, override, options in (("bgremover.train", "model=null", "deeplabv3, deeplabv3plus, tiramisu103"),
                                       ("bgremover.train", "paths=null", "default"),
                                       ("bgremover.eval", "~trainer", "cpu, ddp, default, gpu")):
        proc = _run(module, override, f"data.root={small_camvid}", f"paths.log_dir={tmp_path}",
                    *(["ckpt_path=x.ckpt"] if module.endswith("eval") else []))
        group, task = override.lstrip("~").split("=")[0], module.split(".")[1]
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: {override}: {task} cannot run without a {group} config; choose one of: {options}"
            + ("" if group != "model" else ", tiramisu56, tiramisu67")], proc.stderr[-2000:]
    proc = _run("bgremover.train", "extras=null", f"data.root={small_camvid}", f"paths.log_dir={tmp_path}",
                *(o for o in TINY_RUN if o not in ("~experiment", "extras.print_config=false")), "trainer.max_epochs=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(next(tmp_path.glob("train/runs/*/summary.json")).read_text())["status"] == "ok"


def test_a_run_folder_that_holds_a_run_is_never_trained_or_evaluated_into(small_camvid, tmp_path):
    """`hydra.run.dir=<an earlier run>` overwrote its config, log, summary and last.ckpt (`make reproduce-default`
    used one fixed folder, so a second run clobbered the first). Refused in one line before Hydra writes anything;
    resuming that run in place (ckpt_path inside it) and a new folder are fine."""
    from bgremover.run_dirs import taken_run_dir

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
    assert taken_run_dir([f"hydra.run.dir={old}", f"ckpt_path={old}/checkpoints/last.ckpt"]) is None  # resume
    assert taken_run_dir([f"hydra.run.dir={tmp_path / 'new'}"]) is None
    # as make remover passes it (quoted for Hydra, config.quoted): the same run, refused and resumed alike
    from bgremover.config import quoted

    assert taken_run_dir([f"hydra.run.dir={quoted(old)}"]).startswith(f"hydra.run.dir={old} already holds a run")
    assert taken_run_dir([f"hydra.run.dir={quoted(old)}", f"ckpt_path={old}/checkpoints/last.ckpt"]) is None
    assert taken_run_dir(["-m", f"hydra.run.dir={old}"]) is None  # a sweep's folders are hydra.sweep.dir's
    # an evaluation into the training's folder replaced its .hydra config with eval's (ckpt_path inside: exempt)
    assert taken_run_dir([f"hydra.run.dir={old}", f"ckpt_path={old}/checkpoints/last.ckpt"], resumes=False) == (
        f"hydra.run.dir={old} already holds a run: its config, log and results would be overwritten; choose a new "
        "folder")  # without train's "(or resume it in place with ckpt_path=...)": an evaluation never resumes
    proc = _run("bgremover.eval", f"hydra.run.dir={old}", f"ckpt_path={old}/checkpoints/last.ckpt",
                f"data.root={small_camvid}")
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: hydra.run.dir={old} already holds a run"), \
        proc.stderr[-2000:]
    assert {p: p.read_text() for p in files} == files
    # a sweep into an earlier sweep's folder: job 0 overwrote the earlier job 0, the earlier jobs joined the report
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "summary.json").write_text('{"status": "ok"}')
    assert taken_run_dir(["-m", f"hydra.sweep.dir={sweep}", "seed=1,2"]) == (
        f"hydra.sweep.dir={sweep} already holds a sweep or run (0/summary.json): its results would be overwritten "
        "or counted into this one; choose a new folder")
    assert taken_run_dir(["-m", f"hydra.sweep.dir={tmp_path / 'fresh'}", "seed=1,2"]) is None
    # nested in a job of that sweep (it became a run "0/0" of it), or the folder above every sweep (all of them
    # went into one report): both were accepted
    assert taken_run_dir(["-m", f"hydra.sweep.dir={sweep / '0'}", "seed=1,2"]).startswith(
        f"hydra.sweep.dir={sweep / '0'} already holds a sweep or run (summary.json)")
    assert taken_run_dir(["-m", f"hydra.sweep.dir={sweep / '0' / 'x'}", "seed=1,2"]).startswith(
        f"hydra.sweep.dir={sweep / '0' / 'x'} lies inside the run or sweep {sweep / '0'}")
    (tmp_path / "multiruns" / "2026-01-01_10-00-00").mkdir(parents=True)
    (tmp_path / "multiruns" / "2026-01-01_10-00-00" / "multirun.yaml").write_text("{}\n")
    (tmp_path / "multiruns" / "2026-01-01_10-00-00" / "0").mkdir()  # a sweep that ran a job
    assert "already holds a sweep or run (2026-01-01_10-00-00/multirun.yaml)" in taken_run_dir(
        ["-m", f"hydra.sweep.dir={tmp_path / 'multiruns'}", "seed=1,2"])
    # a single run at a sweep's root: accepted, and the sweep's report then counted it among its jobs (a user audit)
    root = tmp_path / "multiruns" / "2026-01-01_10-00-00"
    assert taken_run_dir([f"hydra.run.dir={root}"]) == (
        f"hydra.run.dir={root} holds a sweep: a run there would be counted among its jobs; choose a new folder")
    # a lone multirun.yaml: a sweep refused at its start, nothing to overwrite (its retry was refused as taken)
    (tmp_path / "refused").mkdir()
    (tmp_path / "refused" / "multirun.yaml").write_text("{}\n")
    assert taken_run_dir(["-m", f"hydra.sweep.dir={tmp_path / 'refused'}", "seed=1,2"]) is None



def test_a_run_killed_before_its_summary_keeps_its_folder_and_last_ckpt(small_camvid, tmp_path, monkeypatch):
    """A run killed by SIGKILL or the out-of-memory killer (or one still running) has written no summary.json,
    only Hydra's record of its start and its checkpoints: a new run with the same `hydra.run.dir` was accepted,
    replaced its config and log and re-pointed last.ckpt, the killed run's one way to go on, at its own epoch
    (`epoch_000-v1.ckpt` beside the killed run's `epoch_000.ckpt`). Refused in one line; resuming it in place
    and the other ranks of a DDP run (started into rank zero's folder) are not."""
    from bgremover.run_dirs import taken_run_dir

    killed = tmp_path / "killed"
    (killed / ".hydra").mkdir(parents=True)
    (killed / "checkpoints").mkdir()
    files = {killed / ".hydra" / "hydra.yaml": "hydra:\n  job:\n    name: train\n",
             killed / ".hydra" / "config.yaml": "seed: 1\n", killed / "train.log": "epoch 0\n",
             killed / "checkpoints" / "epoch_000.ckpt": "weights of epoch 0"}
    for path, text in files.items():
        path.write_text(text)
    (killed / "checkpoints" / "last.ckpt").symlink_to("epoch_000.ckpt")
    proc = _run("bgremover.train", f"hydra.run.dir={killed}", f"data.root={small_camvid}", *TINY_RUN,
                "trainer.max_epochs=1", "logger=csv")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: hydra.run.dir={killed} holds a run that wrote no summary.json (killed, or still running): its "
        "config, log and last.ckpt would be overwritten; choose a new folder (or resume it in place with "
        "ckpt_path=<that run>/checkpoints/last.ckpt)"]
    assert {p: p.read_text() for p in files} == files
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    assert os.readlink(killed / "checkpoints" / "last.ckpt") == "epoch_000.ckpt"
    assert taken_run_dir([f"hydra.run.dir={killed}", f"ckpt_path={killed}/checkpoints/last.ckpt"]) is None
    # a run still in its first epoch (no checkpoint yet), and one whose Hydra record is gone: each mark suffices
    started = tmp_path / "started"
    (started / ".hydra").mkdir(parents=True)
    (started / ".hydra" / "hydra.yaml").write_text("{}\n")
    assert "(it holds no checkpoint to resume from)" in taken_run_dir([f"hydra.run.dir={started}"])
    shutil.rmtree(killed / ".hydra")
    assert taken_run_dir([f"hydra.run.dir={killed}"]).startswith(f"hydra.run.dir={killed} holds a run that wrote")
    # Lightning's DDP launcher runs the command line again for rank 1 into rank zero's folder, begun a moment ago
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert taken_run_dir([f"hydra.run.dir={started}"]) is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert taken_run_dir([f"hydra.run.dir={started}"]) is not None
    # an empty folder of the user's, or one a refused command emptied, is no run
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert taken_run_dir([f"hydra.run.dir={tmp_path / 'empty'}"]) is None


def test_a_slurm_sweep_without_slurm_is_one_line_and_leaves_no_sweep_folder(small_camvid, tmp_path, monkeypatch):
    """The README's SLURM command on a machine without SLURM: submitit's RuntimeError 'Could not detect "srun"' in a
    traceback, after Hydra had made the sweep folder; that folder, holding only multirun.yaml, was then the newest
    sweep, which plain `make compare` refused until it was deleted by hand."""
    bare = tmp_path / "bin"  # a PATH without srun, whatever the machine running the tests has
    bare.mkdir()
    proc = _run("bgremover.train", "-m", "hydra/launcher=slurm", "seed=1,2", f"data.root={small_camvid}",
                f"paths.log_dir={tmp_path / 'logs'}", env={"PATH": str(bare)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: hydra/launcher=slurm hands each job to SLURM, and this machine has no srun on its PATH: run the "
        "sweep on a SLURM cluster's login node, or without hydra/launcher=slurm to run its jobs here one after another"]
    assert not (tmp_path / "logs").exists()
    from bgremover.config import missing_launcher

    srun = bare / "srun"  # on a cluster's login node the sweep goes on to submitit
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", str(bare))
    assert missing_launcher(["-m", "hydra/launcher=slurm", "seed=1,2"]) is None
    monkeypatch.setenv("PATH", str(tmp_path))
    assert missing_launcher(["-m", "hydra/launcher=slurm", "seed=1,2"]) is not None
    assert missing_launcher(["-m", "seed=1,2"]) is None  # the basic launcher runs the jobs here


def test_an_optuna_search_without_dash_m_is_guarded_as_a_sweep(small_camvid, tmp_path):
    """`hparams_search=optuna` sweeps without -m (its config sets hydra.mode=MULTIRUN), and the command line's
    guards looked for -m alone: such a search into an earlier sweep's folder (hydra.sweep.dir=) was accepted,
    overwrote that sweep's job 0 and counted its other jobs into the new sweep's report."""
    from bgremover.run_dirs import taken_run_dir

    earlier = tmp_path / "search"
    (earlier / "0").mkdir(parents=True)
    (earlier / "1").mkdir()
    for job in ("0", "1"):
        (earlier / job / "summary.json").write_text('{"status": "ok"}')
    (earlier / "optimization_results.yaml").write_text("best_value: 0.5\n")
    before = {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()}
    proc = _run("bgremover.train", "hparams_search=optuna", "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={earlier}",
                f"data.root={small_camvid}", *TINY_RUN, "trainer.max_epochs=1", "logger=csv")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: hydra.sweep.dir={earlier} already holds a sweep or run (0/summary.json): its results would be "
        "overwritten or counted into this one; choose a new folder"]
    assert {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == before
    assert taken_run_dir(["hydra.mode=MULTIRUN", f"hydra.sweep.dir={earlier}"]) is not None
    assert taken_run_dir([f"hydra.sweep.dir={earlier}"]) is None  # one run: hydra.sweep.dir is not its folder


def test_a_folder_holding_an_evaluation_or_a_run_with_no_checkpoint_is_taken_and_never_offered_as_a_resume(tmp_path):
    """An evaluation's folder (eval.json) is a run's record too: a training into it overwrote eval's config and
    log. A run stopped before its first checkpoint is refused without the advice to resume it from a last.ckpt
    that is not there (followed, it said "checkpoint not found")."""
    from bgremover.run_dirs import taken_run_dir

    for folder, record in (("evaluated", "eval.json"), ("stopped", "summary.json")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / record).write_text("{}")
        assert taken_run_dir([f"hydra.run.dir={tmp_path / folder}"]) == (
            f"hydra.run.dir={tmp_path / folder} already holds a run: its config, log and results would be "
            "overwritten; choose a new folder (it holds no checkpoint to resume from)")


def test_cpu_ddp_with_sync_batchnorm_is_refused_before_building(small_camvid, tmp_path):
    from bgremover import checks
    from bgremover.errors import UserError

    cfg = compose_cfg(tmp_path, [*TINY_RUN, f"data.root={small_camvid}", "trainer=ddp", "trainer.accelerator=cpu",
                                 "trainer.devices=2"])
    with pytest.raises(UserError, match="sync_batchnorm=false"):
        checks.validate_train(cfg)



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
    from bgremover.errors import UserError
    from bgremover.task import run_task

    cfg = compose_cfg(tmp_path / "hydra_run", [*TINY_RUN])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.log").write_text("keep me")
    with open_dict(cfg):
        cfg.paths.output_dir = str(mine)

    def fails(_):
        raise UserError("bad input")

    with pytest.raises(UserError):
        run_task(fails, cfg)
    assert (mine / "notes.log").read_text() == "keep me"



def test_a_run_stopped_before_it_started_leaves_no_folder_and_a_crash_or_a_sweep_job_keeps_its_record(tmp_path):
    """Ctrl-C before training started (nothing trained, no checkpoint): its run folder, which holds only what
    Hydra wrote, goes as a refused run's does. A crash at the same point (a bug, not the user's) keeps its folder
    with a `failed` summary.json, and so does a sweep's job refused on a user error: the sweep's report lists it
    as failed, with its reason, instead of losing the job."""
    import signal

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    from bgremover.errors import UserError
    from bgremover.task import run_task
    from bgremover.train import RunInterrupted

    errors = {"ctrl-c": (RunInterrupted(signal.SIGINT, None, 0, 0, stage="start"), None),
              "crash": (RuntimeError("boom"), "RuntimeError: boom"), "sweep job": (UserError("bad input"), "bad input")}
    for stop, (error, said) in errors.items():
        run = tmp_path / stop
        cfg = compose_cfg(run, [*TINY_RUN])
        if stop == "sweep job":
            with read_write(cfg.hydra), open_dict(cfg):
                cfg.hydra.mode = RunMode.MULTIRUN
            HydraConfig().set_config(cfg)
        (run / ".hydra").mkdir(parents=True)  # what Hydra writes before the task runs
        (run / ".hydra" / "config.yaml").write_text("seed: 1\n")
        (run / "train.log").write_text("")

        def stops(_, error=error):
            raise error

        with pytest.raises(type(error)):
            run_task(stops, cfg)
        if stop == "ctrl-c":
            assert not run.exists()
        else:
            summary = json.loads((run / "summary.json").read_text())
            assert (summary["status"], summary["error"]) == ("failed", said), stop


@pytest.mark.parametrize("error", ["user", "crash"])
def test_a_ddp_rank_failing_alone_leaves_rank_zeros_run_folder_and_record_alone(tmp_path, monkeypatch, error):
    """Under DDP every rank runs in rank zero's run folder. A non-zero rank that failed alone (a bad frame in its
    shard) removed that folder as an empty failed run (a user error) or wrote its `failed` summary.json over the
    one rank zero writes."""
    from pytorch_lightning.utilities import rank_zero_only

    from bgremover.errors import UserError
    from bgremover.task import run_task

    run = tmp_path / "run"
    cfg = compose_cfg(run, [*TINY_RUN])
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")  # what Hydra wrote for rank zero's run
    monkeypatch.setattr(rank_zero_only, "rank", 1)

    def fails(_):
        raise UserError("bad frame") if error == "user" else RuntimeError("boom")

    with pytest.raises(UserError if error == "user" else RuntimeError):
        run_task(fails, cfg)
    assert (run / ".hydra" / "config.yaml").read_text() == "seed: 1\n" and not (run / "summary.json").exists()


def test_unknown_model_lists_only_real_choices():
    proc = _run("bgremover.train", "model=tiramisu999")
    assert proc.returncode != 0 and "tiramisu103" in proc.stderr and "recipe" not in proc.stderr


def test_a_refused_resume_in_place_leaves_the_run_as_it_was(small_camvid, tmp_path):
    """A resume in place refused before training (here a bad value; also a spent budget or another net) replaced
    the finished run's summary.json with a `failed` stub and its .hydra record with the refused command, and
    appended a traceback to its log: `make compare` then listed the run as failed."""
    run = tmp_path / "run"
    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.max_epochs=1", f"hydra.run.dir={run}"]
    assert _run("bgremover.train", *base).returncode == 0
    record = {p: p.read_bytes() for p in (run / "summary.json", *sorted((run / ".hydra").glob("*.yaml")),
                                          *run.glob("*.log"))}
    assert b'"status": "ok"' in record[run / "summary.json"] and len(record) >= 4
    proc = _run("bgremover.train", *base, f"ckpt_path={run}/checkpoints/last.ckpt", "data.batch_size=-1")
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error: data.batch_size")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in record} == record


def test_a_resume_in_place_that_trained_keeps_its_new_record_when_it_fails_later(tmp_path, monkeypatch):
    """The put-back above is for a resume refused before it trained: one that wrote checkpoints and then failed
    on a user error keeps the record of what it trained, not the old run's summary over its new checkpoints."""
    from bgremover import run_dirs

    monkeypatch.setattr(run_dirs, "_KEPT", {})
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"epoch 1")
    (run / "summary.json").write_text('{"status": "ok", "epochs": 1}')
    run_dirs.keep_run_record([f"hydra.run.dir={run}", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    (run / "summary.json").write_text('{"status": "failed", "epochs": 2}')  # what the resume wrote, and its epoch
    (run / "checkpoints" / "epoch_002.ckpt").write_bytes(b"epoch 2")
    assert run_dirs.restore_run_record() is False
    assert (run / "summary.json").read_text() == '{"status": "failed", "epochs": 2}'


def test_early_errors_import_neither_torch_nor_lightning(small_camvid, tmp_path):
    """"Errors arrive first" took 16 s for a missing checkpoint (a user audit): checking trainer.max_time imported
    Lightning (~10 s on 2 cores) and the optimizer's settings torch, before the checkpoint was looked at. The
    checks up to the checkpoint's now run on the config alone."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from bgremover import checks, config\n"
        "from bgremover.errors import UserError\n"
        f"with initialize_config_dir(config_dir={str(Path(__file__).parent.parent / 'conf')!r}, version_base='1.3'):\n"
        f"    cfg = compose('train', overrides=['data.root={small_camvid}', 'trainer.max_time=00:00:10:00',\n"
        "                                      'ckpt_path=/nonexistent/last.ckpt'])\n"
        "try:\n"
        "    checks.validate_train(cfg)\n"
        "except UserError as e:\n"
        "    print(e)\n"
        "print(sorted(m for m in ('torch', 'pytorch_lightning') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.splitlines() == ["ckpt_path: checkpoint not found: /nonexistent/last.ckpt", "[]"], out.stderr


def test_full_frames_with_scale_jitter_stay_allowed_where_the_data_crops_them_back(small_camvid, tmp_path):
    """The refusal above is for the albumentations pipelines; the resident datamodule crops every scaled frame back
    to the frame's size, and was refused too (a review)."""
    from bgremover import checks

    cfg = compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={small_camvid}", "data=camvid_resident",
                                         "data.crop_size=null", "data.scale_jitter=0.25", "data.device=cpu"])
    checks.validate_train(cfg)
    assert cfg.data.crop_size is None and cfg.data.scale_jitter == 0.25  # allowed as given, not dropped


def test_full_frames_are_refused_only_where_frames_of_different_sizes_would_be_stacked(small_camvid, tmp_path):
    """The refusal of full frames with scale jitter is for a batch of several differently scaled frames: full
    frames without jitter (every CamVid frame one size), or one frame a batch, train as given."""
    from bgremover import checks

    base = [*TINY_RUN, f"data.root={small_camvid}", "data.crop_size=null"]
    for extra in (["data.scale_jitter=0"], ["data.scale_jitter=0.25", "data.batch_size=1"]):
        cfg = compose_cfg(tmp_path / "run", [*base, *extra])
        checks.validate_train(cfg)
        assert cfg.data.crop_size is None


def test_a_dataset_folder_without_a_splits_labels_is_refused_naming_the_split(small_camvid, tmp_path):
    """val/ there and valannot/ not (a copy stopped half-way): refused before the build, naming the split, not
    a missing-label error once the val loader ran after the first epoch."""
    from bgremover import checks
    from bgremover.errors import UserError

    shutil.rmtree(small_camvid / "valannot")
    with pytest.raises(UserError) as info:  # test=false: a training still validates on val
        checks.validate_train(compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={small_camvid}", "test=false"]))
    assert str(info.value).startswith(f"{small_camvid} has no 'val' split (val/ and valannot/): ")
    # a test-only run reads the test split alone, whatever it trained on: only its checkpoint is at fault here
    for folder in ("val", "train", "trainannot"):
        shutil.rmtree(small_camvid / folder)
    with pytest.raises(UserError) as info:
        checks.validate_train(compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={small_camvid}", "train=false",
                                                             "data.train_split=train+val", "ckpt_path=nope.ckpt"]))
    assert str(info.value) == "ckpt_path: checkpoint not found: nope.ckpt"


@pytest.mark.parametrize(("args", "message"), [
    ([], "error: no checkpoint given: make eval CKPT=path/to/checkpoint.ckpt (python -m bgremover.eval ckpt_path=...)"),
    (["ckpt_path=/nonexistent/last.ckpt"], "error: ckpt_path: checkpoint not found: /nonexistent/last.ckpt"),
])
def test_eval_without_a_checkpoint_is_one_line_before_torch_and_leaves_no_run(tmp_path, args, message):
    """`python -m bgremover.eval` with no ckpt_path said "error: MissingMandatoryValue: ... (traceback in
    .../eval.log)" and left that run folder; a missing checkpoint took ~10 s to say so (torch imported first)."""
    code = ("import runpy, sys\n"
            "try:\n"
            "    runpy.run_module('bgremover.eval', run_name='__main__')\n"
            "finally:\n"
            "    print(sorted(m for m in ('torch', 'pytorch_lightning') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code, *args, f"hydra.run.dir={tmp_path / 'run'}",
                           f"data.root={tmp_path / 'nodata'}"], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 1 and proc.stderr.strip() == message, proc.stderr
    assert proc.stdout.strip() == "[]"  # nothing of torch imported before the answer
    assert not (tmp_path / "run").exists()


def test_eval_of_a_split_it_has_no_numbers_for_or_of_no_dataset_is_refused_before_the_checkpoint_is_read(tmp_path):
    """eval scores the held-out splits only: split=train would score the frames the net learnt from as if they
    were a test."""
    from omegaconf import OmegaConf

    from bgremover import checks
    from bgremover.errors import UserError

    cfg = OmegaConf.create({"split": "train", "ckpt_path": str(tmp_path / "absent.ckpt"), "data": {}, "seed": 1})
    with pytest.raises(UserError) as info:
        checks.validate_eval(cfg)
    assert str(info.value) == "split must be 'test' or 'val', not 'train'"
    # and the dataset it scores is there, before torch is imported and the checkpoint read (seconds)
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"read once the data are found")
    with pytest.raises(UserError) as info:
        checks.validate_eval(compose_cfg(tmp_path / "run", [f"ckpt_path={ckpt}", f"data.root={tmp_path / 'none'}"],
                                         config_name="eval"))
    assert str(info.value).startswith(f"dataset folder not found: {tmp_path / 'none'} (run `make data`")


def test_a_refused_run_leaves_no_empty_folders_in_a_fresh_checkout(tmp_path):
    """A typo in a fresh checkout's first `make train` / `make eval` left logs/train/runs/ (or logs/eval/runs/)
    behind, empty: the run folder went, the folders Hydra made above it stayed. Folders that hold runs stay."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO / "src")}
    for args in (["bgremover.train", "data.batch_size=-1"], ["bgremover.eval"]):
        proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path, env=env)
        assert proc.returncode != 0 and proc.stderr.startswith("error: "), proc.stderr
        assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))
    (tmp_path / "logs" / "train" / "runs" / "earlier").mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "bgremover.train", "data.batch_size=-1"], capture_output=True,
                   timeout=120, cwd=tmp_path, env=env)
    assert [p.name for p in (tmp_path / "logs" / "train" / "runs").iterdir()] == ["earlier"]
    # folders the user made stay, empty as they were (a review: `mine/` went with a refused run below it)
    for mine in ("mine/sub", "own", "logdir"):
        (tmp_path / mine).mkdir(parents=True)
    for arg in ("hydra.run.dir=mine/sub/run1", f"hydra.run.dir={tmp_path / 'own'}", "paths.log_dir=logdir"):
        proc = subprocess.run([sys.executable, "-m", "bgremover.train", "data.batch_size=-1", arg],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
        assert proc.returncode == 1 and proc.stderr.startswith("error: data.batch_size"), proc.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "logs" not in p.parts) == [
        "logdir", "mine", "mine/sub", "own"]


def test_a_refused_run_with_its_own_task_name_leaves_no_empty_folders(tmp_path):
    """`task_name=mine` puts the run under logs/mine/runs/: a refused run there must remove what Hydra made
    (logs/mine/runs/ was noted by the default task's name, logs/train/runs, and stayed behind, empty)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "bgremover.train", "data.batch_size=-1", "task_name=mine"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 1 and proc.stderr.startswith("error: data.batch_size"), proc.stderr
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_a_value_quoted_on_the_command_line_is_left_to_hydra():
    """A value the user quoted is Hydra syntax already: `data.root='/d/a','/d/b'` without --multirun stays as
    typed (Hydra's own "add --multirun"), not quoted again into one folder named with quotes and a comma."""
    from bgremover.config import path_override

    for arg in ("data.root='/d/a','/d/b'", 'ckpt_path="/r/epoch=3-step=10.ckpt"', "data.root='/d/é'"):
        assert path_override(arg) == arg


def test_a_file_given_as_the_dataset_folder_is_called_a_file(small_camvid, tmp_path):
    """`data.root=README.md` said "dataset folder not found: README.md" of a path that is there."""
    from bgremover import checks
    from bgremover.errors import UserError

    readme = REPO / "README.md"
    with pytest.raises(UserError) as info:
        checks.validate_train(compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={readme}"]))
    assert str(info.value) == f"data.root {readme} is a file, not a folder: point it (or DATA_DIR) at the CamVid folder"


@pytest.mark.parametrize("train", ["true", "false"])
def test_a_weights_only_file_as_ckpt_path_says_to_use_ckpt_init(small_camvid, tmp_path, train):
    """`ckpt_path=models/bgremover-camvid.pt` (the shipped weights, made for fine-tuning) resumed or tested as a
    Lightning checkpoint: "KeyError: 'pytorch-lightning_version'" after the build, and a run folder left behind."""
    shipped = REPO / "models" / "bgremover-camvid.pt"
    proc = _run("bgremover.train", f"train={train}", f"ckpt_path={shipped}", f"data.root={small_camvid}",
                "model=deeplabv3plus", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: ckpt_path {shipped} holds weights only (no epoch, optimizer or schedule "
                                   f"to go on from): start a run from them with ckpt_init={shipped}, or test them "
                                   f"with make eval CKPT={shipped}")
    assert not (tmp_path / "train").exists() or not any((tmp_path / "train" / "runs").iterdir())


def test_a_key_the_command_line_adds_is_named_whole_as_the_command_lines(monkeypatch):
    """`+trainer.foo=1` was "foo is not a setting of ...Trainer: the recipe or an override sets it for another choice
    of that config group": the prefix dropped and the cause put on a recipe. The key typed is named, as typed."""
    from hydra.errors import InstantiationException

    from bgremover import utils

    exc = InstantiationException("Error in call to target 'pytorch_lightning.trainer.trainer.Trainer':\nTypeError(...)")
    exc.__cause__ = TypeError("Trainer.__init__() got an unexpected keyword argument 'foo'")
    monkeypatch.setattr(utils, "overrides", lambda: ["trainer=cpu", "+trainer.foo=1"])
    assert utils.error_summary(exc) == ("trainer.foo is not a setting of pytorch_lightning.trainer.trainer.Trainer: "
                                        "the command line adds it (check its spelling)")
    assert utils.is_user_error(exc)
    monkeypatch.setattr(utils, "overrides", lambda: ["data=camvid"])  # a recipe's key: as before
    assert utils.error_summary(exc).startswith("foo is not a setting of pytorch_lightning.trainer.trainer.Trainer: "
                                               "the recipe or an override sets it for another choice")


def test_a_value_a_class_refuses_is_the_users_error_named_with_what_was_being_built():
    """A config value a class refuses (ValueError, as FCDenseNet's dense_blocks=fast) is the user's to fix: one line
    with the message and the target Hydra was building, no type, no traceback pointer; a bug inside it (any other
    error) keeps its type."""
    from hydra.errors import InstantiationException

    from bgremover.utils import error_summary, is_user_error

    target = "bgremover.nets.tiramisu.FCDenseNet"
    for cause, said, users in ((ValueError("dense_blocks must be one of fused, plain, got 'fast'"),
                                f"dense_blocks must be one of fused, plain, got 'fast' (while building {target})", True),
                               (RuntimeError("CUDA error"), f"RuntimeError: CUDA error (while building {target})", False)):
        exc = InstantiationException(f"Error in call to target '{target}':\n{cause!r}")
        exc.__cause__ = cause
        assert (error_summary(exc), is_user_error(exc)) == (said, users)


def test_a_runs_error_line_points_at_the_log_for_a_bug_only(tmp_path, capsys):
    """A run's closing line (utils.print_error): a user's error is its message alone, a bug adds where its
    traceback was logged (the run's log file, Hydra's job logging)."""
    import logging

    from bgremover.errors import UserError
    from bgremover.utils import print_error

    root, handler = logging.getLogger(), logging.FileHandler(tmp_path / "train.log")
    kept, root.handlers = root.handlers, [handler]  # the run's log file alone, as in a run
    try:
        print_error(UserError("data.root /nope: not found"))
        print_error(KeyError("val/mIoU"))
    finally:
        root.handlers = kept
        handler.close()
    assert capsys.readouterr().err.splitlines() == [
        "error: data.root /nope: not found", f"error: KeyError: 'val/mIoU' (traceback in {tmp_path / 'train.log'})"]


def test_an_error_in_a_dataloader_worker_is_summed_up_as_the_workers_own():
    """torch re-raises a worker's error with "Caught X in DataLoader worker process 0." and the worker's traceback as
    its message: the run's one line is the error's own message (a bad file: no type; a bug: its type named), not
    that first line. The wrapped errors are built by torch's own ExceptionWrapper, as a worker's are."""
    from torch._utils import ExceptionWrapper

    from bgremover.errors import UserError
    from bgremover.utils import error_summary

    for error, said in ((UserError("unreadable or truncated image: a.png (OSError)"),
                         "unreadable or truncated image: a.png (OSError)"),
                        (ZeroDivisionError("division by zero"), "ZeroDivisionError: division by zero")):
        try:
            raise error
        except type(error):
            wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
        with pytest.raises(type(error)) as caught:
            wrapped.reraise()
        assert str(caught.value).startswith("Caught ") and error_summary(caught.value) == said


_CTRL_C_AT_IMPORT = """
import os, signal, sys

class CtrlCAt:  # a Ctrl-C that lands as the command imports {module}: the first half second of every command
    def find_spec(self, name, path=None, target=None):
        if name == "{module}":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlCAt())
"""


@pytest.mark.parametrize("command, module", [(["-m", "bgremover.train"], "hydra"),
                                             (["-m", "bgremover.eval"], "hydra"),
                                             ([".venv/bin/bgremover-predict", "x.jpg"], "PIL")])
def test_ctrl_c_while_a_command_imports_is_one_line_and_130(tmp_path, command, module):
    """A Ctrl-C in a command's first half second lands inside its imports (Hydra, Pillow, torch): a
    KeyboardInterrupt traceback from inside importlib, and the process killed by SIGINT. Here it lands in the
    import of `module` (a sitecustomize's import hook sends it), as it would from a terminal."""
    (tmp_path / "sitecustomize.py").write_text(_CTRL_C_AT_IMPORT.replace("{module}", module))
    argv = [str(REPO / command[0]), *command[1:]] if command[0].startswith(".venv") else [sys.executable, *command]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: interrupted by SIGINT while starting: nothing was done"


def test_ctrl_c_while_hydra_composes_the_config_is_one_line_and_130(monkeypatch, capsys):
    """Past the imports, Hydra composes the config before the run handles interrupts: a KeyboardInterrupt there
    was a traceback from inside Hydra's yaml loading (train and eval alike: errors.starting)."""
    from bgremover import eval as ev
    from bgremover import train

    def ctrl_c():
        raise KeyboardInterrupt

    for module in (train, ev):
        monkeypatch.setattr(module, "_main", ctrl_c)
        monkeypatch.setattr(sys, "argv", ["x"])
        with pytest.raises(SystemExit) as stop:
            module.main()
        assert stop.value.code == 130
        assert capsys.readouterr().err.strip() == "error: interrupted by SIGINT while starting: nothing was done"
