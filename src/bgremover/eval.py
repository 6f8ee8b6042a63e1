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

from bgremover import checkpoint, config, utils

log = logging.getLogger("bgremover.eval")
CONFIG_DIR = config.CONFIG_DIR


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    import pytorch_lightning as pl

    config.validate_eval(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = checkpoint.load_module(cfg.ckpt_path)
    _training_scale(cfg, model.hparams.get("image_size"))
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    loggers = utils.instantiate_dict(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=[], _convert_="all")
    if cfg.split == "val":
        results = trainer.validate(model=model, datamodule=datamodule)
    else:
        results = trainer.test(model=model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    eval_json = Path(cfg.paths.output_dir) / "eval.json"
    utils.write_json_atomic(
        eval_json,
        {"ckpt_path": str(Path(cfg.ckpt_path).resolve()), "split": cfg.split, "metrics": metrics,
         "net": model.hparams.net_name, "config": OmegaConf.to_container(cfg, resolve=True)},
    )
    if cfg.split == "test" and cfg.get("attach_to_run", True):
        attach_to_run(Path(cfg.ckpt_path), metrics, datamodule, eval_json, net=model.net)
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}


def attach_to_run(ckpt: Path, metrics: dict[str, float], datamodule, eval_json: Path, net=None) -> Path | None:
    """Test numbers for a run that has none: a run trained with test=false (on a GPU machine given train+val
    only, say) gets this evaluation's test metrics in its summary.json, so `make compare` reports them beside
    its training figures. The run is the folder of the checkpoint or the one above it (run/checkpoints/x.ckpt).
    Numbers a run already has (its own test stage, or an earlier attach) are never replaced. A run that did not
    time its CPU inference (`measure_inference=false`, as on a GPU machine) gets it measured here too, with `net`."""
    summary_path = checkpoint.run_summary(ckpt)
    if summary_path is None or "test/frames" not in metrics:
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):  # a broken summary is the run's own problem; the eval itself succeeded
        log.warning("test numbers not attached: %s is unreadable", summary_path)
        return None
    if (summary.get("test_split") or {}).get("frames") is not None:
        return None
    from bgremover.train import test_split_info  # what a run's own test stage records

    summary["metrics"] = {**(summary.get("metrics") or {}), **metrics}
    summary["test_split"] = test_split_info(metrics, datamodule)
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
    from hydra.core.hydra_config import HydraConfig

    if image_size is None or "image_size" not in cfg.data:
        return
    given = HydraConfig.initialized() and any(
        o.lstrip("+").startswith("data.image_size=") for o in HydraConfig.get().overrides.task)
    if not given and cfg.data.image_size != image_size:
        log.info("data.image_size=%d: the scale the checkpoint was trained at", image_size)
        cfg.data.image_size = int(image_size)


def main() -> None:
    """`python -m bgremover.eval`: Hydra's command line over conf/eval.yaml."""
    config.hydra_command_line()
    _main()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _main(cfg: DictConfig) -> None:
    utils.quiet_libraries()
    try:
        metrics, _ = utils.run_task(evaluate, cfg)
    except Exception as exc:
        utils.print_error(exc)
        sys.exit(1)
    for key, value in sorted(metrics.items()):
        print(f"{key}: {int(value)}" if key.endswith("/frames") else f"{key}: {value:.4f}")


if __name__ == "__main__":
    main()
