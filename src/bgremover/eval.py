"""`python -m bgremover.eval ckpt_path=PATH [split=test|val]` — CamVid metrics of a trained checkpoint.

The checkpoint describes its own net (checkpoint["bgremover"]["net_config"]), so no model= override is needed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from bgremover import checkpoint, config, utils

log = logging.getLogger("bgremover.eval")
CONFIG_DIR = config.CONFIG_DIR


def load_module(ckpt_path: str | Path):
    """SegmentationModule with the checkpoint's net, hyper-parameters and weights (CPU, eval mode)."""
    return checkpoint.load_module(ckpt_path)


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    import pytorch_lightning as pl

    config.validate_eval(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = load_module(cfg.ckpt_path)
    _training_scale(cfg, model.hparams.get("image_size"))
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    loggers = utils.instantiate_dict(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=[], _convert_="all")
    if cfg.split == "val":
        results = trainer.validate(model=model, datamodule=datamodule)
    else:
        results = trainer.test(model=model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    utils.write_json_atomic(
        Path(cfg.paths.output_dir) / "eval.json",
        {"ckpt_path": str(Path(cfg.ckpt_path).resolve()), "split": cfg.split, "metrics": metrics,
         "net": model.hparams.net_name, "config": OmegaConf.to_container(cfg, resolve=True)},
    )
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}


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
