"""`python -m bgremover.eval ckpt_path=PATH [split=test|val]` — CamVid metrics of a trained checkpoint.

The checkpoint describes its own net (checkpoint["bgremover"]["net_config"]), so no model= override is needed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from bgremover import checks, config, task, utils
from bgremover.errors import UserError

log = logging.getLogger("bgremover.eval")
CONFIG_DIR = config.CONFIG_DIR


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    checks.validate_eval(cfg)  # before torch is imported: a missing checkpoint is one line at once
    import pytorch_lightning as pl

    from bgremover import checkpoint

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = checkpoint.load_module(cfg.ckpt_path)
    model.val_miou_best.reset()  # split=val reported the training's best beside this evaluation's, as its own
    _training_scale(cfg, model.hparams.get("image_size"))
    _trained_preprocessing(cfg, model.hparams)
    model.tta = hydra.utils.instantiate(cfg.tta) if cfg.get("tta") else None
    if model.tta:
        log.info("test-time augmentation: %d passes per frame (scales %s, flip %s); these numbers are not the "
                 "single-pass ones a run reports", model.tta.passes, model.tta.scales, model.tta.flip)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    _same_classes(cfg, list(model.hparams.class_names), datamodule)
    if task.prepare_wandb(cfg):  # offline by itself without a key, as a training run
        _name_wandb_run(cfg, model.hparams.net_name)
    config_dict = OmegaConf.to_container(cfg, resolve=True)  # after the W&B settings above: as the run ran
    config_dict["model"] = {"net_name": model.hparams.net_name, "net": model.hparams.net_config}  # the checkpoint's
    loggers = utils.instantiate_loggers(cfg.get("logger"))
    for logger in loggers:  # which checkpoint, split and data: the run said nothing of what it evaluated
        logger.log_hyperparams(config_dict)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=[], _convert_="all")
    try:
        if cfg.split == "val":
            results = trainer.validate(model=model, datamodule=datamodule)
        else:
            results = trainer.test(model=model, datamodule=datamodule)
    except SystemExit:  # Lightning's answer to Ctrl-C in the loop: "attempting graceful shutdown", then exit 1
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    frames = utils.test_split_info(metrics, datamodule, cfg.split)
    if not metrics or not frames.get("frames"):  # exited 0 with no number and an eval.json of empty metrics
        raise UserError(f"no {cfg.split} frames were evaluated (trainer.limit_{cfg.split}_batches=0, or "
                        "data.limit_eval_images too small?): there is nothing to report")
    task.mark_split(trainer.loggers, cfg.split, frames)  # the eval run's W&B summary said test/frames=4 alone
    eval_json = Path(cfg.paths.output_dir) / "eval.json"
    utils.write_json_atomic(
        eval_json,
        {"ckpt_path": str(Path(cfg.ckpt_path).resolve()), "split": cfg.split, "metrics": metrics,
         "frames": frames, "net": model.hparams.net_name, "tta": model.tta.describe() if model.tta else None,
         "config": config_dict},
    )
    if cfg.split == "test" and cfg.get("attach_to_run", True):
        if model.tta:
            log.info("test numbers not attached to the run: they are test-time-augmented (eval.json has them)")
        else:
            attach_to_run(Path(cfg.ckpt_path), metrics, datamodule, eval_json, net=model.net)
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer, "frames": frames}


def _name_wandb_run(cfg: DictConfig, net_name: str) -> None:
    """The eval's W&B run: job type "eval" (the logger's default, "train", mixed evals into training runs), named
    and grouped as the run that trained the checkpoint (its summary.json), so that it lies beside that run. Every
    evaluation was "eval-seed42" (eval's own seed, whatever the checkpoint's) in a group "eval" of its own."""
    from bgremover import checkpoint, sweep

    if not config.given("logger.wandb.job_type"):
        cfg.logger.wandb.job_type = "eval"
    path = checkpoint.run_summary(cfg.ckpt_path)
    try:
        trained = json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        trained = {}
    if not config.given("logger.wandb.name"):  # its W&B name (a sweep job's -jobN included), else <net>-seed<S>
        named = (((trained.get("config") or {}).get("logger") or {}).get("wandb") or {}).get("name")
        named = named if isinstance(named, str) and "${" not in named else None  # a failed run's is unresolved
        seed = trained.get("seed")
        cfg.logger.wandb.name = named or (f"{net_name}-seed{seed}" if seed is not None else net_name)
    if cfg.logger.wandb.group is None:
        cfg.logger.wandb.group = trained.get("group") or sweep.sweep_group(cfg)


def attach_to_run(ckpt: Path, metrics: dict[str, float], datamodule, eval_json: Path, net=None) -> Path | None:
    """Test numbers for a run that has none: a run trained with test=false (on a GPU machine given train+val
    only, say) gets this evaluation's test metrics in its summary.json, so `make compare` reports them beside
    its training figures. The run is the folder of the checkpoint or the one above it (run/checkpoints/x.ckpt).
    Numbers a run already has (its own test stage, or an earlier attach) are replaced only by numbers over more
    test frames (a partial test set, then the whole one); either way a line says what happened. A run that did not
    time its CPU inference (`measure_inference=false`, as on a GPU machine) gets it measured here too, with `net`."""
    from bgremover import checkpoint

    summary_path = checkpoint.run_summary(ckpt)
    if summary_path is None or "test/frames" not in metrics:
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):  # a broken summary is the run's own problem; the eval itself succeeded
        log.warning("test numbers not attached: %s is unreadable", summary_path)
        return None
    best = summary.get("best_ckpt")
    # the run's test numbers are its best checkpoint's (its test stage, export and compare say so): another
    # checkpoint's would be credited to the best one
    if not checkpoint.is_runs_best(ckpt, summary):
        log.warning("test numbers not attached: %s is not the run's best checkpoint (%s), whose numbers the run "
                    "reports", ckpt.name, Path(best).name)
        return None
    new = utils.test_split_info(metrics, datamodule)  # what a run's own test stage records
    old = summary.get("test_split") or {}
    if old.get("frames") is not None:
        if new["frames"] <= old["frames"]:
            log.warning("test numbers not attached: %s already has them over %d of %s test frames (this eval: %d)",
                        summary_path, old["frames"], old.get("of"), new["frames"])
            return None
        log.info("test numbers over %d of %s frames replace the run's over %d", new["frames"], new["of"], old["frames"])
        summary["metrics"] = {k: v for k, v in (summary.get("metrics") or {}).items() if not k.startswith("test/")}
    summary["metrics"] = {**(summary.get("metrics") or {}), **metrics}
    summary["test_split"] = new
    # the run's "finish with" command; a stub without its training record (epochs, history) stays interrupted
    if summary.get("status") == "interrupted" and summary.get("stage") == "test" and summary.get("epochs") is not None:
        summary["status"] = "ok"
        for key in ("error", "stage", "epoch"):
            summary.pop(key, None)
        log.info("the run stopped in its test stage is finished: %s", summary_path)
    summary["test_from"] = {"eval": str(eval_json.resolve()), "ckpt": str(ckpt.resolve())}
    if summary.get("infer_ms_480x360") is None and net is not None:
        from bgremover.lit.summary import measure_inference_ms

        summary["infer_ms_480x360"] = measure_inference_ms(net)  # this machine's CPU, like a run's own
    utils.write_json_atomic(summary_path, summary)
    log.info("test numbers attached to the run: %s", summary_path)
    return summary_path


def _training_scale(cfg: DictConfig, image_size: int | None) -> None:
    """Evaluate a folder-trained checkpoint at the scale it was trained and tested at (its `image_size`),
    unless the command line sets data.image_size itself."""
    if image_size is None or "image_size" not in cfg.data:
        return
    if not config.given("data.image_size") and cfg.data.image_size != image_size:
        log.info("data.image_size=%d: the scale the checkpoint was trained at", image_size)
        cfg.data.image_size = int(image_size)


def _same_classes(cfg: DictConfig, trained: list[str], datamodule) -> None:
    """`make eval CKPT=<a make remover run's checkpoint>` (background, foreground) scored it against CamVid's 11
    labels and failed in torch's words ("IndexError: Target 11 is out of bounds"); a CamVid checkpoint on a
    binary folder alike."""
    from bgremover import checkpoint
    from bgremover.data.classes import CLASSES

    data = list(datamodule.label_info()["class_names"] if hasattr(datamodule, "label_info") else CLASSES)
    checkpoint.check_classes(cfg.ckpt_path, trained, data)


def _trained_preprocessing(cfg: DictConfig, hparams) -> None:
    """Frames normalized with the mean/std the checkpoint's net was trained with and padded to its size multiple
    (what export writes for the predictor), not the eval config's defaults: a run trained with its own
    data.mean/std or multiple scored otherwise here."""
    for key, name in (("mean", "mean"), ("std", "std"), ("pad_multiple", "size_multiple")):
        trained = hparams.get(name)
        if trained is None or key not in cfg.data:
            continue
        trained = [float(v) for v in trained] if isinstance(trained, list | tuple) else int(trained)
        if (list(cfg.data[key]) if OmegaConf.is_list(cfg.data[key]) else cfg.data[key]) == trained:
            continue
        if config.given(f"data.{key}"):
            raise UserError(f"data.{key}={cfg.data[key]} is not the checkpoint's {trained}, which its net was "
                            "trained with: drop it (the checkpoint's is used)")
        log.info("data.%s=%s: as the checkpoint was trained", key, trained)
        cfg.data[key] = trained


def main() -> None:
    """`python -m bgremover.eval`: Hydra's command line over conf/eval.yaml."""
    config.hydra_command_line(resumes=False, task="eval")  # an evaluation never resumes a run in place
    model = [a for a in sys.argv[1:] if a.lstrip("+~").split("=")[0].split(".")[0] == "model"]
    if model:  # Hydra would suggest `+model=...`, which would be ignored as silently as model= once was
        from bgremover.errors import report

        sys.exit(report(f"{model[0]}: eval builds the net its checkpoint describes; drop the model override", code=2))
    from bgremover.errors import starting

    with starting():
        _main()


def number(value: float) -> str:
    """Four decimals, as Lightning's table shows them; a value below 0.001 (a loss, a class IoU after a few steps) in
    three significant figures, which four decimals printed as 0.0000."""
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 or value != value else f"{value:.3g}"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _main(cfg: DictConfig) -> None:
    utils.quiet_libraries()
    try:
        metrics, objects = task.run_task(evaluate, cfg)
    except KeyboardInterrupt:  # as it started, a bare traceback; in its loop, Lightning's exit 1 with no word
        from bgremover.errors import report

        sys.exit(report("interrupted: nothing was evaluated", code=130))
    except Exception as exc:
        utils.print_error(exc)
        sys.exit(1)
    frames = objects["frames"]
    for key, value in sorted(metrics.items()):
        if not key.endswith("/frames"):
            print(f"{key}: {number(value)}")
        elif frames["of"] is None:
            print(f"{key}: {int(value)}")
        else:  # a partial split (limit_test_batches, data.limit_eval_images) is not the split's score: say so
            print(f"{key}: {int(value)} of {frames['of']}" + ("" if frames["complete"] else f" ({utils.PARTIAL})"))
    if objects["model"].tta:
        tta = objects["model"].tta
        print(f"test-time augmentation: {tta.passes} passes per frame (scales {tta.scales}, flip {tta.flip})")


if __name__ == "__main__":
    main()
