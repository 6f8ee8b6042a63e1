"""`python -m bgremover.eval ckpt_path=PATH [split=test|val]` — CamVid metrics of a trained checkpoint.

The checkpoint describes its own net (checkpoint["bgremover"]["net_config"]), so no model= override is needed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from bgremover import utils

log = logging.getLogger("bgremover.eval")
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def load_module(ckpt_path: str | Path):
    """SegmentationModule with the checkpoint's net, hyper-parameters and weights (CPU, eval mode)."""
    from bgremover.lit import CHECKPOINT_KEY, SegmentationModule

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"not a readable checkpoint: {path} ({str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt:
        raise ValueError(f"not a bgremover checkpoint (no '{CHECKPOINT_KEY}' entry): {path}")
    meta = ckpt[CHECKPOINT_KEY]
    hparams = dict(ckpt.get("hyper_parameters", {}))
    hparams.pop("compile", None)
    net = hydra.utils.instantiate(meta["net_config"])
    module = SegmentationModule(net=net, optimizer=None, **hparams)
    module.load_state_dict(ckpt["state_dict"])
    module.history = list(ckpt.get("history", []))
    return module.eval()


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True)
    model = load_module(cfg.ckpt_path)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    loggers = utils.instantiate_dict(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=[], _convert_="all")
    if cfg.split == "val":
        results = trainer.validate(model=model, datamodule=datamodule)
    elif cfg.split == "test":
        results = trainer.test(model=model, datamodule=datamodule)
    else:
        raise ValueError(f"split must be 'test' or 'val', not '{cfg.split}'")
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    utils.write_json_atomic(
        Path(cfg.paths.output_dir) / "eval.json",
        {"ckpt_path": str(Path(cfg.ckpt_path).resolve()), "split": cfg.split, "metrics": metrics,
         "net": model.hparams.net_name, "config": OmegaConf.to_container(cfg, resolve=True)},
    )
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        metrics, _ = utils.run_task(evaluate, cfg)
    except Exception as exc:
        utils.print_error(exc)
        sys.exit(1)
    for key, value in sorted(metrics.items()):
        print(f"{key}: {value:.4f}")


if __name__ == "__main__":
    main()
