"""One way to read a training checkpoint, with one safety rule.

Checkpoints are read with `torch.load(weights_only=True)` only — a checkpoint never runs code — and the net is
rebuilt through `bgremover.nets.BY_TARGET`, the registry of classes this project trains, never from an arbitrary
`_target_` found in the file. Train (resume, `ckpt_init`), eval, export and the comparison grid all come through here, so they
agree on what a valid checkpoint is and fail with the same one-line messages.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bgremover.errors import UserError, checkpoint_problem
from bgremover.run_dirs import own_folder, run_data, run_summary

CHECKPOINT_KEY = "bgremover"  # where a checkpoint keeps what inference needs (written by SegmentationModule)
REQUIRED_META = ("net_config", "classes", "mean", "std")


def epochs_trained(ckpt: dict[str, Any], unfinished: bool = False) -> int:
    """Epochs a training checkpoint holds. Lightning's loop counter says it for a checkpoint written at an epoch's
    end (its "epoch" is that epoch's index) and at the end of training (its "epoch" already counts the last one)
    alike; an older file without loop state: its "epoch" + 1.

    Finished epochs (what a resume goes on from), or with `unfinished` every epoch it trained in: one that
    `trainer.max_steps` or a time budget stopped inside counts, as summary.json's `epochs` (Lightning's epoch count
    at the end of fit) counts it. A run's records say the latter: a test-only run of that checkpoint and its model's
    provenance said one epoch fewer than the run's own summary, of the same weights."""
    progress = (((ckpt.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}).get("current")
    if not progress:
        return int(ckpt.get("epoch", -1)) + 1
    return max(int(progress["processed"]), int(progress.get("started") or 0) if unfinished else 0)


def provenance(path: str | os.PathLike, ckpt: dict[str, Any]) -> dict[str, Any]:
    """Where a checkpoint's weights came from, for the models made of it (nanoGPT-style self-description): its
    epochs and steps, and from its run's summary.json, when found, the run, experiment, seed, data, training time,
    hardware and code commit. A weights-only copy (save_weights) keeps what its source said. Unknowns are left out."""
    import json

    kept = (ckpt.get(CHECKPOINT_KEY) or {}).get("trained")
    if isinstance(kept, dict):
        # and the copy its weights came through: a model exported from models/bgremover-camvid.pt named the run's
        # checkpoint alone, though its weights are that file's float16 rounding (logits up to 0.04 apart) and it
        # has no test score of its own
        half = any(isinstance(v, torch.Tensor) and v.dtype == torch.float16
                   for v in (ckpt.get("state_dict") or {}).values())
        return {**kept, "via": Path(path).name + (" (float16 weights)" if half else "")}
    trained: dict[str, Any] = {"checkpoint": Path(path).name}
    if "global_step" in ckpt:
        trained.update(epochs=epochs_trained(ckpt, unfinished=True), global_step=int(ckpt["global_step"]))
    # the W&B run its curves and panels are in (on_save_checkpoint keeps it for resumes): the model named its run
    # folder only, which is on the machine that trained it
    wandb = {"id": ckpt.get("wandb_run_id"), "name": ckpt.get("wandb_run_name"), "offline": ckpt.get("wandb_run_offline")}
    if wandb["id"]:
        trained["wandb"] = {k: v for k, v in wandb.items() if v is not None}
    found = run_summary(path)
    try:
        summary = json.loads(found.read_text()) if found is not None else {}
    except (OSError, ValueError):
        summary = {}
    if not isinstance(summary, dict):
        return trained
    config = summary.get("trained_config") or summary.get("config") or {}
    project = ((config.get("logger") or {}).get("wandb") or {}).get("project")
    if "wandb" in trained and project:
        trained["wandb"]["project"] = project
    data = config.get("data") or {}
    run = {
        "run": _run_name(Path(str(summary["run_dir"]))) if summary.get("run_dir") else None,
        "experiment": summary.get("experiment"),
        "seed": summary.get("seed"),
        "data": Path(str(data["root"])).name if data.get("root") else None,
        "train_split": data.get("train_split"),
        # a run on data.limit_images=4 said "data CamVid (train)", as if trained on the whole split
        "train_limit": data.get("limit_images") or None,
        # the weights it started from (make remover: the shipped CamVid net): "20 epochs, 60 s" was not all it had
        "init": Path(str(config["ckpt_init"])).name if config.get("ckpt_init") else None,
        "run_wall_time_s": summary.get("wall_time_s"),  # the whole run's training (resumes included)
        # and its epochs: a best epoch 75 of 87 read "75 epochs, 271 s of training" as if 271 s made those 75
        "run_epochs": summary.get("epochs"),
        "hardware": summary.get("hardware"),
        "commit": summary.get("commit"),
    }
    return {**trained, **{k: v for k, v in run.items() if v is not None}}


def _run_name(run_dir: Path) -> str:
    """The run's folder name; a sweep job's with its sweep folder: the job's own is its number alone
    (conf/hydra/default.yaml), and its model said "run 3", which every sweep has."""
    return f"{run_dir.parent.name}/{run_dir.name}" if run_dir.name.isdigit() and run_dir.parent.name else run_dir.name


def is_runs_best(path: str | os.PathLike, summary: dict[str, Any]) -> bool:
    """Whether checkpoint `path` is its run's best one, whose numbers the run's test stage reported (export,
    eval's attach step and compare credit them to it). The same file by name (runs move between machines), the
    copied-out `<run>/best.ckpt` beside summary.json, or the same training state (epoch and step) as the best
    file where that still exists. No best recorded: the run tested what it had."""
    best = summary.get("best_ckpt")
    if not best:
        return True
    from bgremover.config import SUMMARY_NAME

    p, b = Path(path), Path(best)
    if b.name in (p.name, p.resolve().name) or (p.name == "best.ckpt" and (p.parent / SUMMARY_NAME).is_file()):
        return True
    if not b.is_file():
        return False
    try:
        state = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in (p, b)]
    except Exception:  # unreadable: not provably the best
        return False
    ids = [(c.get("epoch"), c.get("global_step")) if isinstance(c, dict) else None for c in state]
    return ids[0] is not None and ids[0] == ids[1]


# while a command's set-up reads (read_once): the checkpoints read, by file and its state when read
_KEPT: dict[tuple, dict[str, Any]] | None = None


@contextlib.contextmanager
def read_once():
    """Within, `read` of a file read before and unchanged since gives the dict it gave then: a resume's set-up
    read its checkpoint five times over (each a full torch.load: FC-DenseNet103's with its optimizer state is
    110 MB). Left before a fit, so no dict is held through training; callers only read what it gives."""
    global _KEPT
    _KEPT = {}
    try:
        yield
    finally:
        _KEPT = None


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint as a dict, loaded on CPU with weights_only=True; UserError names the file otherwise."""
    path = Path(path)
    if problem := checkpoint_problem(path):
        raise UserError(problem)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if _KEPT is not None and key in _KEPT:
        return _KEPT[key]
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's own text may suggest weights_only=False: never pass that on
        import pickle

        if _looks_foreign(path):
            kind = "not a PyTorch checkpoint"
        elif isinstance(exc, pickle.UnpicklingError):  # weights_only refused an object: never unpickled here
            kind = "unsafe checkpoint (holds objects that only full unpickling, which can run code, would rebuild)"
        else:  # a cut-off copy or download read "unreadable or unsafe": it is the former
            kind = "unreadable checkpoint (truncated or damaged)"
        raise UserError(f"{kind}: {path} ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"not a training checkpoint (holds a {type(ckpt).__name__}, not a dict): {path}")
    if _KEPT is not None:
        _KEPT[key] = ckpt
    return ckpt


def _looks_foreign(path: Path) -> bool:
    """True unless the file starts like a torch.save archive (zip) or a legacy pickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return True
    return not (head.startswith(b"PK") or head[:1] == b"\x80")


def meta(ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint") -> dict[str, Any]:
    """The self-description SegmentationModule writes into every checkpoint, checked for what inference needs."""
    info = ckpt.get(CHECKPOINT_KEY)
    if not isinstance(info, dict):
        raise UserError(f"not a bgremover checkpoint (no '{CHECKPOINT_KEY}' entry): {path}")
    missing = [k for k in REQUIRED_META if k not in info]
    if missing:
        raise UserError(f"bgremover checkpoint {path} lacks {', '.join(missing)}")
    return info


def check_classes(path: str | os.PathLike, trained: list[str], data: list[str]) -> None:
    """A checkpoint is tested or trained on only with data of its own classes (as train.build gives a net its
    data's); else one line with both lists and the data that fits: its run's folder (data=folder), or CamVid."""
    if list(trained) == list(data):
        return
    if folder := own_folder(path):  # the data its run was trained on, for the command that uses it there
        how = folder
    elif str(run_data(path).get("_target_", "")).endswith("CamVidDataModule"):
        how = "CamVid, the default data (no data= override)"
    else:
        how = 'data of those classes (ARGS="data=folder data.root=<folder>")'
    raise UserError(f"checkpoint {path} segments {', '.join(trained)}, but the data's classes are "
                    f"{', '.join(data)}: use it on {how}")


def build_net(net_config: dict[str, Any]) -> nn.Module:
    """A fresh net from a `model.net` config, through the registry (the `_target_` must be a known class)."""
    from bgremover.nets import BY_TARGET

    cfg = dict(net_config)
    target = str(cfg.pop("_target_", ""))
    builder = BY_TARGET.get(target)
    if builder is None:
        raise UserError(f"unknown net '{target}' in checkpoint; known: {', '.join(sorted(BY_TARGET))}")
    if "encoder_weights" in cfg:  # the checkpoint holds every weight: asking smp for pretrained ones would download
        cfg["encoder_weights"] = None
    try:
        return builder(**cfg)
    # a keyword the class lacks (TypeError), or a value it refuses: FCDenseNet's ValueErrors, smp's KeyError for an
    # encoder its version lacks (a checkpoint of another version, an edited one) were tracebacks from export and eval
    except (TypeError, ValueError, KeyError) as exc:
        said = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # a KeyError's str() is its repr
        detail = " ".join(str(said).split())[:300]
        raise UserError(f"cannot build {target} from the checkpoint's config: {detail}") from None


def net_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The net's weights from a LightningModule state dict (`net.` keys, torch.compile's `_orig_mod.` removed)."""
    out = {}
    for key, value in (ckpt.get("state_dict") or {}).items():
        k = key.replace("_orig_mod.", "")
        if k.startswith("net."):
            out[k[len("net."):]] = value
    return out


def load_net(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(net in eval mode, fp32, CPU; its checkpoint meta; the whole checkpoint) from a bgremover checkpoint."""
    ckpt = read(path)
    info = meta(ckpt, path)
    state = net_state(ckpt)
    if not state:
        raise UserError(f"checkpoint {path} has no 'net.' weights in its state_dict")
    net = build_net(info["net_config"])
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"checkpoint weights do not fit {info['net_config'].get('_target_')}: {detail}") from None
    return net.float().eval(), info, ckpt


def save_weights(path: str | os.PathLike, out: str | os.PathLike, half: bool = True) -> Path:
    """A weights-only copy of a checkpoint, what `ckpt_init=` and `make export` read like any checkpoint: the
    net's tensors (float16 unless ``half=False``: half the size, and fine-tuning starts from them anyway) and the
    self-description, without optimizer state or history. Written atomically."""
    ckpt = read(path)
    info = meta(ckpt, path)
    # 1-D tensors (BatchNorm scales, shifts and running statistics, biases) stay float32: a few KB, and float16
    # would move the logits most through them (a running variance near 0 loses its digits)
    state = {f"net.{k}": (v.half() if half and v.is_floating_point() and v.dim() > 1 else v)
             for k, v in net_state(ckpt).items()}
    if not state:
        raise UserError(f"checkpoint {path} has no 'net.' weights in its state_dict")
    from bgremover.files import replacing

    with replacing(out) as tmp:  # where the weights came from travels with them (models/*.pt, exported later)
        torch.save({"state_dict": state, CHECKPOINT_KEY: {**info, "trained": provenance(path, ckpt)}}, tmp)
    return Path(out)


def load_module(path: str | os.PathLike):
    """SegmentationModule with the checkpoint's net, hyper-parameters, weights and history (CPU, eval mode)."""
    from bgremover.lit import SegmentationModule

    net, info, ckpt = load_net(path)
    hparams = dict(ckpt.get("hyper_parameters", {}))
    hparams.pop("compile", None)  # evaluation never compiles
    # a weights-only copy (save_weights: models/*.pt) has no hyper-parameters: its self-description has them
    for key, name in (("net_name", "net_name"), ("net_config", "net_config"), ("class_names", "classes"),
                      ("mean", "mean"), ("std", "std"), ("size_multiple", "size_multiple"),
                      ("default_foreground", "default_foreground"), ("ignore_index", "ignore_index"),
                      ("image_size", "image_size")):
        if key not in hparams and info.get(name) is not None:
            hparams[key] = info[name]
    module = SegmentationModule(net=net, optimizer=None, **hparams)
    module.load_state_dict(ckpt["state_dict"], strict=False)  # metric states etc. are not in older files
    module.on_load_checkpoint(ckpt)
    return module.eval()


def init_from(module: nn.Module, path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Copy into `module.net` every weight of the checkpoint's net whose name and shape fit; returns
    (loaded, skipped) names. A new stage (fine-tuning, another class list) starts from these weights.

    Only the classifier may differ (a new class list: the same tensor with this module's class count as its
    first dimension). Any other difference is another architecture, refused: FC-DenseNet56's stage 1 given to
    the FC-DenseNet103 fine-tune fitted 56 of 686 tensors (the stem and some BatchNorms) and trained the rest
    from random weights, with only a log line saying so."""
    ckpt = read(path)
    info = meta(ckpt, path)
    state = net_state(ckpt)
    own = module.net.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fits:
        raise UserError(f"no weight of {path} fits this net (is it the same architecture?)")
    n_classes = getattr(module, "num_classes", None)
    new_classes = {k for k, v in state.items() if k in own and k not in fits and v.dim() == own[k].dim()
                   and v.shape[1:] == own[k].shape[1:] and own[k].shape[0] == n_classes}
    misfits = sorted((set(own) ^ set(state)) | (set(state) - set(fits) - new_classes))
    if misfits:
        theirs = info.get("net_name") or (info.get("net_config") or {}).get("_target_", "another net")
        ours = module.hparams.get("net_name", "this run's net")
        raise UserError(f"ckpt_init={path} holds {theirs} weights, which do not fit {ours}: {len(misfits)} "
                        f"tensors are missing on one side or shaped otherwise (first: {misfits[0]}); start from a "
                        "checkpoint of the same net, pick that checkpoint's net (model=...) or train from scratch (ckpt_init=null)")
    module.net.load_state_dict(fits, strict=False)
    return sorted(fits), sorted(set(own) - set(fits))
