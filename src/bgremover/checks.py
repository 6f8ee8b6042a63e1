"""The checks a composed config must pass before anything is built (`validate_train`, `validate_eval`).

A bad value (`data.batch_size=-1`, a missing dataset, a schedule with no run length) must fail in a second with one
line naming the key, not after the imports, the dataset scan and the net are built, deep inside a DataLoader's
traceback. Where the configs live and the command-line guards (a taken run folder, a resume in place) are
`config.py`; the keys checked against what reads them (a `_target_` node's settings, a key added with `+`) are
`config_keys.py`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from omegaconf import DictConfig, OmegaConf

from bgremover.config import given, overrides
from bgremover.config_keys import as_number, check_added_keys, check_built_nodes, check_settings
from bgremover.errors import UserError, checkpoint_problem
from bgremover.run_dirs import own_folder


def _positive_int(value, key: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key} must be a positive integer, got {value!r}")


def _check_data(data: DictConfig, size_multiple: int | None, splits: Iterable[str], ckpt=None) -> None:
    _positive_int(data.get("batch_size"), "data.batch_size")
    _positive_int(data.get("eval_batch_size"), "data.eval_batch_size", allow_none=True)
    workers = data.get("num_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UserError(f"data.num_workers must be 0 or more, got {workers!r}")
    if size_multiple and "pad_multiple" in data and data.get("pad_multiple") != size_multiple:
        # the test stage pads to the one, the exported model (predict, eval-cutout) to the other
        raise UserError(f"data.pad_multiple={data.get('pad_multiple')} is not model.size_multiple={size_multiple}: "
                        "the test stage would pad frames otherwise than the exported model does; set both")
    jitter = data.get("scale_jitter") or 0
    if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 1:
        # frames are scaled by 1-j..1+j: from j=1 on a scale of 0 or below is drawn now and then, and the run
        # stopped epochs in on cv2.resize's "inv_scale_x > 0" (the resident path drew void or mirrored crops)
        raise UserError(f"data.scale_jitter must be at least 0 and below 1 (frames are scaled by 1-j..1+j), "
                        f"got {jitter!r}" + ("; data=camvid_resident takes data.scale_range=[lo,hi] for wider ranges"
                                             if isinstance(jitter, int | float) and jitter >= 1
                                             and "Folder" not in str(data.get("_target_", "")) else ""))
    crop = data.get("crop_size")
    if crop is not None:
        if isinstance(crop, str) or not isinstance(crop, Iterable):  # 224 was "'int' object is not iterable"
            raise UserError(f"data.crop_size must be [height, width] in pixels or null, got {crop!r}")
        crop = list(crop)
        if len(crop) != 2 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in crop):
            raise UserError(f"data.crop_size must be [height, width] in pixels or null, got {crop!r}")
        if size_multiple and any(c % size_multiple for c in crop):
            raise UserError(f"data.crop_size {crop} must be multiples of {size_multiple} (the net's size multiple)")
    elif (data.get("scale_jitter") or 0) > 0 and (data.get("batch_size") or 1) > 1 \
            and "Resident" not in str(data.get("_target_", "")):  # that one crops every frame back to the frame size
        # albumentations: each frame rescaled by its own factor and nothing cutting it back: "stack expects each
        # tensor to be equal size" at the first batch, after everything was built
        raise UserError(f"data.crop_size=null (full frames) with data.scale_jitter={data.scale_jitter} gives frames "
                        f"of different sizes, which a batch of {data.batch_size} cannot stack: add "
                        "data.scale_jitter=0, or keep a crop size")
    for key in ("limit_images", "limit_eval_images"):
        _positive_int(data.get(key), f"data.{key}", allow_none=True)
    folder = str(data.get("_target_", "")).endswith("FolderDataModule")  # (which trains a short batch instead)
    if not folder and "train" in splits and (data.get("limit_images") or data.batch_size) < data.batch_size:
        # said after the build, below Lightning's "length of the train loader is zero" warnings (a user audit)
        raise UserError(f"training would take no step: data.limit_images={data.limit_images} fills no batch of "
                        f"data.batch_size={data.batch_size} (a short last batch is dropped); lower data.batch_size")
    if folder:  # data=folder: every file decoded and checked
        from bgremover.data.folder import check_config

        if not data.get("root"):
            raise UserError("data.root is not set: data=folder data.root=path/to/your/folder")
        check_config(data, list(splits))
        return
    check_data_root(data.get("root"), splits, ckpt)


def check_data_root(root, splits: Iterable[str], ckpt=None) -> None:
    """The dataset folder and the split folders this task reads exist (contents are checked when loaded)."""
    from bgremover.data.camvid import resolve_root

    path = resolve_root(root)
    hint = (f"checkpoint {ckpt} was trained on an image/mask folder: use it on {own}" if (own := own_folder(ckpt))
            else "run `make data` to download CamVid there, or point DATA_DIR (or data.root) at a copy")
    if path.exists() and not path.is_dir():
        raise UserError(f"data.root {path} is a file, not a folder: point it (or DATA_DIR) at the CamVid folder")
    if not path.is_dir():
        raise UserError(f"dataset folder not found: {path} ({hint})")
    for split in splits:
        if not (path / split).is_dir() or not (path / f"{split}annot").is_dir():
            # an existing folder: `make data` only reads it, and `make remover DATA=<your folder> EXP=cpu_quick`
            # met this too, where the fault is the experiment (a CamVid one), not the folder
            raise UserError(f"{path} has no '{split}' split ({split}/ and {split}annot/): this run reads CamVid "
                            "(its data config is CamVid's) and that is not a CamVid folder; point DATA_DIR (or data.root) at a copy "
                            "(`make data DATA_DIR=<a new folder>` downloads one), or for your own images+masks "
                            "use data=folder (make remover: an EXP that sets it, e.g. the default remover)")


def _check_output_dir() -> None:
    """paths.output_dir is Hydra's run folder (${hydra:runtime.output_dir}); set on its own, it split a run in two:
    checkpoints and summary there, the run's log and config in the folder Hydra made."""
    if given("paths.output_dir"):
        raise UserError("paths.output_dir follows Hydra's run folder: set hydra.run.dir=<folder> instead "
                        "(a sweep: hydra.sweep.dir=<folder>)")


def _check_schedule(model, trainer) -> None:
    """The scheduler's interval is one Lightning takes, and a schedule over the whole run (`total_iters: null`, the
    DeepLab and speed-run recipes) has a run length to span. `trainer.max_epochs=-1` (Lightning's endless training,
    as is no max_epochs beside trainer.max_time) failed after the build ("cannot convert float infinity to
    integer"); per epoch, such a schedule was planned for one epoch and sat at its end from the second on."""
    interval = model.get("scheduler_interval", "epoch")
    if interval not in ("step", "epoch"):  # Lightning's MisconfigurationException came after the build
        raise UserError(f"model.scheduler_interval must be step or epoch, got {interval!r}")
    scheduler = model.get("scheduler")
    if isinstance(scheduler, DictConfig) and str(scheduler.get("_target_")).endswith("ReduceLROnPlateau") \
            and trainer.get("limit_val_batches") == 0:  # Lightning's "metric val/loss which is not available", after epoch 0
        raise UserError("model.scheduler ReduceLROnPlateau steps on a val metric, and this run never validates "
                        "(trainer.limit_val_batches=0): drop one of the two")
    if not isinstance(scheduler, DictConfig) or "total_iters" not in scheduler or scheduler.total_iters is not None:
        return
    epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps")
    steps = None if steps in (None, -1) else steps
    if epochs is None:  # Lightning's rule: 1000 epochs, unless max_steps or max_time ends the run instead
        epochs = 1000 if steps is None and trainer.get("max_time") is None else -1
    if epochs == -1 and (interval == "epoch" or steps is None):
        needs = "trainer.max_epochs" if interval == "epoch" else "trainer.max_epochs or trainer.max_steps"
        given = trainer.get("max_epochs")
        endless = "trainer.max_epochs=-1" if given is not None else "no trainer.max_epochs, which beside " + \
            ("trainer.max_steps" if steps else "trainer.max_time") + " Lightning takes as no limit"
        raise UserError(f"model.scheduler.total_iters=null spans the run's {interval}s, and this run sets no number of "
                        f"them ({endless}): give {needs}, or model.scheduler.total_iters=N")


def _check_seed(cfg: DictConfig) -> None:
    seed = cfg.get("seed")  # Lightning's int() said "invalid literal for int() with base 10: 'abc'", naming nothing
    if seed is None:  # the lightning-hydra-template's `seed: null` (unseeded), or ~seed: it failed after the build
        # on "unsupported operand type(s) for %: 'NoneType' and 'int'" (the data draw their order and crops from it)
        raise UserError("seed must be an integer, got null: every run here is seeded (its data order and crops are "
                        "drawn from it); for another draw, give another integer")
    if isinstance(seed, bool) or not isinstance(as_number(seed), int):
        raise UserError(f"seed must be an integer, got {seed!r}")


def _check_search_objective(cfg: DictConfig, trainer) -> None:
    """An Optuna trial reads its objective from validation (optimized_metric: val/...): a run that never validates
    trained and tested in full for every trial, each job said "ok", and the study ended with no trial finished."""
    from hydra.core.hydra_config import HydraConfig

    metric = str(cfg.get("optimized_metric") or "")
    sweeper = str(HydraConfig.get().sweeper.get("_target_") or "") if HydraConfig.initialized() else ""
    if "optuna" not in sweeper.lower() or not metric.startswith("val/"):
        return
    if trainer.get("limit_val_batches") == 0:
        raise UserError(f"optimized_metric={metric} (the Optuna objective) comes from validation, and this run never "
                        "validates (trainer.limit_val_batches=0): every trial would train for nothing; drop "
                        "trainer.limit_val_batches=0")


def _check_not_a_sweep() -> None:
    """`make train EXP=compare_models` ran one job of the base config (FC-DenseNet103 for 100 epochs, hours on a
    CPU), the sweep's lists dropped without a word. A job of the sweep (each swept key given: what a sweep job's
    resume command gives) is a run like any other."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or str(HydraConfig.get().mode) == "RunMode.MULTIRUN":
        return
    swept = [str(k) for k in (HydraConfig.get().sweeper.get("params") or {})]
    if missing := [k for k in swept if not given(k)]:
        exp = next((o.split("=", 1)[1] for o in overrides() if o.lstrip("+").startswith("experiment=")), None)
        name, sweep = (f"experiment={exp}", f"make sweep EXP={exp}") if exp else ("this config", "make sweep")
        raise UserError(f"{name} is a sweep over {', '.join(swept)} (hydra.sweeper.params): one run would train "
                        f"only its defaults; run the sweep with {sweep} (-m), or pick its job: "
                        + " ".join(f"{k}=..." for k in missing))


def validate_train(cfg: DictConfig) -> None:
    """Everything `python -m bgremover.train` can check without building anything."""
    _check_output_dir()
    check_added_keys(cfg)
    check_built_nodes(cfg)
    _check_not_a_sweep()
    _check_seed(cfg)
    model = cfg.get("model") or {}
    # a time budget ends training (TimeToMIoU): 0 or less never ended it (the run went on for all its epochs)
    budgets = [(k, cfg.get(k)) for k in ("speedrun_budget_s", "remover_budget_s") if k in cfg]
    budgets += [(f"callbacks.{name}.budget_s", cb.get("budget_s")) for name, cb in (cfg.get("callbacks") or {}).items()
                if isinstance(cb, DictConfig) and "budget_s" in cb]
    for key, value in budgets:
        number = as_number(value)
        if value is not None and (isinstance(value, bool) or not isinstance(number, int | float) or not number > 0):
            raise UserError(f"{key} must be a positive number of seconds (or null: no time budget), got {value!r}")
    splits = [s for s, on in (("train", cfg.get("train", True)), ("val", cfg.get("train", True)),
                              ("test", cfg.get("test", True))) if on]
    if "root" in cfg.data:  # a CamVid-layout dataset; other datamodules check their own folders
        if "train_split" in cfg.data and cfg.get("train", True):
            from bgremover.data.camvid import train_splits

            parts = train_splits(cfg.data.train_split)
            splits = [*parts, *(s for s in splits if s not in parts and s != "train")]
        _check_data(cfg.data, model.get("size_multiple"), splits, cfg.get("ckpt_path"))
    trainer = cfg.get("trainer") or {}
    epochs = trainer.get("max_epochs")
    if epochs is not None and epochs != -1:
        _positive_int(epochs, "trainer.max_epochs")
    max_time_s(cfg)  # Lightning refused a bad one only while building the Trainer, after the config was printed
    # each failed after the build, leaving a failed run folder ("'<' not supported between instances of 'str' and
    # 'int'", "division by zero"), or trained nothing and wrote an "ok" run that compare counted (a user audit)
    steps = trainer.get("max_steps")
    if steps is not None and steps != -1:
        _positive_int(steps, "trainer.max_steps")
    _positive_int(trainer.get("accumulate_grad_batches"), "trainer.accumulate_grad_batches", allow_none=True)
    clip = trainer.get("gradient_clip_val")  # Lightning takes a negative one as "no clipping", without a word
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float) or clip < 0):
        raise UserError(f"trainer.gradient_clip_val must be a non-negative number (0 or null: no clipping), got {clip!r}")
    if cfg.get("train", True) and trainer.get("limit_train_batches") in (0, 0.0):
        raise UserError("trainer.limit_train_batches=0 trains nothing: to test a checkpoint, use train=false "
                        "ckpt_path=<checkpoint> (or make eval CKPT=<checkpoint>)")
    # 0 was "ZeroDivisionError: integer modulo by zero" after everything was built
    _positive_int(trainer.get("check_val_every_n_epoch"), "trainer.check_val_every_n_epoch", allow_none=True)
    _check_search_objective(cfg, trainer)
    _check_strategy(trainer)
    if trainer.get("sync_batchnorm") and trainer.get("accelerator") == "cpu" and "ddp" in str(trainer.get("strategy")):
        # torch's DistributedDataParallel refuses SyncBatchNorm modules on CPU, after everything was built
        raise UserError("trainer.sync_batchnorm=true needs GPUs (torch's DDP refuses SyncBatchNorm on CPU): "
                        "add trainer.sync_batchnorm=false for CPU processes")
    for key in ("ckpt_path", "ckpt_init"):  # before the settings' check, which imports torch (seconds)
        value = cfg.get(key)
        if value in ("last", "best", "hpc", "registry"):  # Lightning's shorthands: "checkpoint not found: last"
            raise UserError(f"{key}={value}: give the checkpoint's path (a run's last one: <run>/checkpoints/"
                            "last.ckpt); Lightning's shorthands do not name a run here")
        if value and (problem := checkpoint_problem(value)):
            raise UserError(f"{key}: {problem}")
    check_added_keys(cfg, settings=True)  # here, not first: it imports the classes (before the settings' check)
    lr = ((model.get("optimizer") or {}).get("lr"))  # as text, a number (check_settings passes it on as one)
    if lr is not None and (isinstance(lr, bool) or not (isinstance(as_number(lr), int | float) and as_number(lr) > 0)):
        raise UserError(f"model.optimizer.lr must be a positive number, got {lr!r}")
    for key in ("optimizer", "scheduler"):  # a misspelt setting failed at fit time, after the W&B run started
        check_settings(f"model.{key}", model.get(key))
    _check_schedule(model, trainer)
    for name, node in (cfg.get("callbacks") or {}).items():  # their names are checked when they are built
        check_settings(f"callbacks.{name}", node, names=False)
    if isinstance(model.get("net"), DictConfig):  # smp's KeyError came while building the net, a run folder made
        from bgremover.nets import check_encoder

        check_encoder(model.net)
        # DeepLabV3's image-pooling branch (ASPP) pools each image to one value per channel before a BatchNorm,
        # which refuses that in training with a batch of one: it came at the first step, after the build
        if "DeepLab" in str(model.net.get("_target_", "")) and cfg.get("train", True) \
                and (cfg.get("data") or {}).get("batch_size") == 1:
            raise UserError(f"data.batch_size=1 cannot train {model.net._target_.rsplit('.', 1)[-1]}: its image-pooling "
                            "branch normalises one value per channel, which BatchNorm refuses in training; use 2 or more")
    if cfg.get("ckpt_path"):
        from bgremover import resume

        resume.check(cfg, model)
    if not cfg.get("train", True) and not cfg.get("ckpt_path"):
        raise UserError("train=false needs ckpt_path=<checkpoint> to test")
    # settings a recipe cannot run without (`requires: {key: what to give}`): a `???` in an experiment file does
    # not override the base config's null, so the fine-tune stage trained from random weights without a word
    for key, what in (cfg.get("requires") or {}).items():
        if OmegaConf.select(cfg, key) is None:
            raise UserError(f"{cfg.get('experiment_name') or 'this recipe'} needs {key}=...: {what}")
    _check_gpu(cfg)  # a test-only run (train=false) builds the same Trainer


def _check_strategy(trainer) -> None:
    """Lightning's multiprocessing strategies (ddp_spawn, ddp_fork, ddp_notebook and their *_find_unused_* forms, a
    DDPStrategy node's start_method) run the fit or test in ranks this process starts, and what they keep stays
    there: every ddp_spawn training ended "training took no step" with a failed run folder (a Ctrl-C said step 0
    with last.ckpt at step 50), and an eval counted its 2 test frames as 4. `ddp` re-runs the command per rank."""
    strategy = (trainer or {}).get("strategy")
    if isinstance(strategy, DictConfig):  # a strategy node: its start_method says (popen: the command re-run)
        name, method = f"{strategy.get('_target_')}(start_method=...)", str(strategy.get("start_method") or "")
    else:  # a registered name: ddp_spawn, ddp_fork, ddp_notebook_find_unused_parameters_true, ...
        name = method = str(strategy or "")
    if any(m in method for m in ("spawn", "fork", "notebook")):
        start = "spawn" if "spawn" in method else "fork"
        raise UserError(f"trainer.strategy={name} ({start}ed ranks) is not supported: what the ranks Lightning starts "
                        "train and count stays in them; use trainer=ddp (strategy ddp: this command re-run per rank)")


def _check_gpu(cfg: DictConfig) -> None:
    """A GPU trainer on a machine without one: Lightning says "No supported gpu backend found!" after the build."""
    accelerator = str((cfg.get("trainer") or {}).get("accelerator"))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(_no_gpu_message(cfg, accelerator))


def _no_gpu_message(cfg: DictConfig, accelerator: str) -> str:
    """Names what asked for the GPU: `trainer=ddp` typed on a CPU machine was blamed on the default recipe."""
    from hydra.core.hydra_config import HydraConfig

    chosen = HydraConfig.get().runtime.choices.get("trainer") if HydraConfig.initialized() else None
    typed = given("trainer")
    who = f"trainer={chosen}" if typed or not cfg.get("experiment_name") else cfg.experiment_name
    # the override as the command was typed: make passes it in ARGS (make sets MAKELEVEL for what it runs)
    cpu = 'ARGS="trainer=cpu"' if os.environ.get("MAKELEVEL") else "trainer=cpu"
    fix = ('for DDP over CPU processes add trainer.accelerator=cpu trainer.devices=2 trainer.sync_batchnorm=false'
           if chosen == "ddp" else f"add {cpu} to run it here")
    if given("trainer.accelerator"):  # typed: it was blamed on the recipe (cpu_quick, a CPU recipe), and the
        # `add trainer=cpu` offered left the typed override in force (a group is applied before a key's value)
        return (f"trainer.accelerator={accelerator} asks for a GPU and this machine has none: put {cpu} in its "
                "place to run it here")
    return f"{who} trains on a GPU (trainer.accelerator={accelerator}) and this machine has none: {fix}"


def max_time_s(cfg: DictConfig) -> float | None:
    """trainer.max_time in seconds (None: no limit), read as Lightning reads it (DD:HH:MM:SS, or a dict of
    timedelta's arguments); a form it refuses is a UserError naming the setting."""
    value = (cfg.get("trainer") or {}).get("max_time")
    if value is None:
        return None
    import datetime
    import re

    # Lightning's Timer's own rule, not Lightning: importing it (~10 s on 2 cores) made every check after this one
    # (a missing checkpoint, sync_batchnorm on CPU) take seconds where it should take none
    try:
        if isinstance(value, DictConfig):
            seconds = datetime.timedelta(**OmegaConf.to_container(value)).total_seconds()
        else:
            match = re.fullmatch(r"(\d+):(\d\d):(\d\d):(\d\d)", str(value).strip())
            days, hours, minutes, secs = (int(g) for g in match.groups())  # type: ignore[union-attr]
            seconds = datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=secs).total_seconds()
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:  # no match, or timedelta(**bad dict)
        raise UserError(f"trainer.max_time must be DD:HH:MM:SS (e.g. 00:00:10:00) or {{minutes: 10}}, got "
                        f"{value!r}") from exc
    if not seconds or seconds <= 0:
        raise UserError(f"trainer.max_time must be a positive duration, got {value!r}")
    return seconds


def validate_eval(cfg: DictConfig) -> None:
    """Everything `python -m bgremover.eval` can check before torch is imported (seconds) and its run folder kept."""
    _check_output_dir()
    check_added_keys(cfg)
    check_built_nodes(cfg)
    _check_seed(cfg)
    if cfg.split not in ("test", "val"):
        raise UserError(f"split must be 'test' or 'val', not '{cfg.split}'")
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:  # eval.yaml's `???`: reading it raised
        raise UserError("no checkpoint given: make eval CKPT=path/to/checkpoint.ckpt (python -m bgremover.eval ckpt_path=...)")
    if problem := checkpoint_problem(cfg.ckpt_path):
        raise UserError(f"ckpt_path: {problem}")
    check_added_keys(cfg, settings=True)  # after the cheap checks: it imports the classes (check_added_keys)
    from bgremover import resume

    resume.adopt_split(cfg, cfg.ckpt_path)  # a folder run's own split, before its data is checked
    if "root" in cfg.data:
        _check_data(cfg.data, None, [cfg.split], cfg.ckpt_path)
    _check_strategy(cfg.get("trainer"))
    _check_gpu(cfg)  # `make eval ARGS="trainer=gpu"` here: Lightning's line, after the checkpoint was loaded
