"""Training and evaluation end to end on real CamVid crops: every net, learning, W&B, summary, resume, eval."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, REPO, compose_cfg  # noqa: F401  (compose_cfg: other test files import it from here)
from wandb_records import offline_run

from bgremover.train import train

MODELS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml") if not p.stem.startswith("_"))
# A few-thousand-parameter FC-DenseNet: same code path as tiramisu103, seconds instead of minutes on a CPU.
TINY_TIRAMISU = [
    "model=tiramisu56",
    "model.net.down_blocks=[2,2]",
    "model.net.up_blocks=[2,2]",
    "model.net.bottleneck_layers=2",
    "model.net.growth_rate=8",
    "model.net.first_conv_channels=16",
]
SMALL_RUN = [
    "data.num_workers=0",
    "data.batch_size=2",
    "data.eval_batch_size=1",
    "data.crop_size=[64,64]",
    "extras.print_config=false",
    "measure_inference=false",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_every_model_runs_fast_dev_run_on_real_crops(model, camvid_root, tmp_path):
    cfg = compose_cfg(tmp_path, [f"model={model}", f"data.root={camvid_root}", *SMALL_RUN, "debug=fdr"])
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert 0.0 <= metrics["test/mIoU"] <= 1.0 and 0.0 <= metrics["test/acc"] <= 1.0
    assert math.isfinite(metrics["train/loss"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["net"].startswith(model)
    assert summary["params"] == sum(p.numel() for p in objects["model"].net.parameters())
    # the numbers recorded are the ones the test stage measured, over the frames it says
    assert summary["metrics"]["test/mIoU"] == pytest.approx(metrics["test/mIoU"])
    assert summary["test_split"]["frames"] == metrics["test/frames"] > 0


def test_real_learning_overfits_a_few_crops(camvid_root, tmp_path):
    """Four fixed real 64×64 crops learned by heart: train mIoU far above chance (0.825 in 8 s measured here)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from bgremover.data.camvid import CamVidDataset, build_transforms
    from bgremover.lit import SegmentationModule
    from bgremover.nets import FCDenseNet

    pl.seed_everything(0)
    ds = CamVidDataset(camvid_root, "train", build_transforms(True, crop_size=(64, 64), hflip=0.0), limit=4)
    ds.reseed(0)
    x, y = map(torch.stack, zip(*[ds[i] for i in range(4)], strict=True))
    net = FCDenseNet(down_blocks=(2, 2), up_blocks=(2, 2), bottleneck_layers=2, growth_rate=8,
                     first_conv_channels=16, dropout=0.0)
    module = SegmentationModule(net=net, optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
                                channels_last=False)
    trainer = pl.Trainer(max_epochs=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", precision="32-true")
    start = time.time()
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    chance = 1 / 11
    module.eval()
    with torch.no_grad():
        preds = module(x).argmax(1)
    from torchmetrics.functional.classification import multiclass_jaccard_index

    miou = float(multiclass_jaccard_index(preds, y, num_classes=11, ignore_index=11))
    print(f"overfit train mIoU {miou:.3f} after {time.time() - start:.0f}s")
    assert miou > 0.45, f"train mIoU {miou:.3f} after {time.time() - start:.0f}s (chance ≈ {chance:.2f})"
    assert float(trainer.callback_metrics["train/mIoU"]) > 0.3


@pytest.mark.slow
def test_wandb_offline_run_and_summary_agree(camvid_root, tmp_path):
    cfg = compose_cfg(tmp_path, [*TINY_TIRAMISU, f"data.root={camvid_root}", *SMALL_RUN, "trainer.max_epochs=3",
                                 "logger=wandb", "model.log_images_every_n_epochs=1", "tags=[unit]"])
    metrics, _ = train(cfg)
    from bgremover.task import finish_wandb

    finish_wandb()
    run = offline_run(tmp_path / "wandb")
    logged = [h["val/mIoU"] for h in run["history"] if "val/mIoU" in h]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(logged) == 3
    assert logged == pytest.approx(summary["history"]["val/mIoU"], abs=1e-7)
    assert summary["metrics"]["val/mIoU_best"] == pytest.approx(max(logged), abs=1e-7)
    assert summary["metrics"]["test/mIoU"] == pytest.approx(metrics["test/mIoU"])
    assert any("test/mIoU" in h for h in run["history"])
    assert any(k.startswith("val/examples/") for h in run["history"] for k in h)  # the image panel
    # ...at its epoch's own step: it was logged one step later, beside the next epoch's numbers
    val_steps = [h["trainer/global_step"] for h in run["history"] if "val/mIoU" in h]
    panel_steps = [h["trainer/global_step"] for h in run["history"] if any(k.startswith("val/examples") for k in h)]
    assert panel_steps == val_steps, (panel_steps, val_steps)
    assert run["project"] == "bgremover" and run["tags"] == ["unit"] and run["group"] == "train"
    assert run["name"] == "tiramisu56-seed42"  # was empty: W&B's random names for every job of a sweep
    # the summary says how many frames the test numbers cover, of how many (it had test/frames alone)
    assert run["summary"]["test/frames_of"] == summary["test_split"]["of"]
    assert run["summary"]["test/partial"] is (summary["test_split"]["complete"] is False)
    assert run["config"]["model"]["net_name"] == "tiramisu56" and run["config"]["model/params"] == summary["params"]
    for key in ("net", "params", "epochs", "wall_time_s", "best_ckpt", "config"):
        assert summary[key] not in (None, "", {})
    assert summary["epochs"] == 3 and Path(summary["best_ckpt"]).is_file()


def test_eval_normalizes_and_pads_as_the_checkpoint_was_trained(tiny_camvid, tmp_path):
    """`make eval` normalizes frames with the checkpoint's mean/std and pads them to its size multiple, as export
    and the predictor do: it used the eval config's data.mean/std (CamVid's) and data.pad_multiple, so a run
    trained with its own (`python -m bgremover.data stats` prints mean/std) got other test numbers from `make eval`
    than from its own test stage, and attach_to_run kept them."""
    from bgremover.eval import evaluate

    norm = ["data.mean=[0.2,0.6,0.9]", "data.std=[0.05,0.5,0.1]", "data.pad_multiple=16", "model.size_multiple=16"]
    cfg = compose_cfg(tmp_path / "run", [*TINY_TIRAMISU, f"data.root={tiny_camvid}", *SMALL_RUN, *norm,
                                         "trainer.max_epochs=1", "logger=csv", "data.crop_size=[32,32]"])
    metrics, _ = train(cfg)
    best = json.loads((tmp_path / "run" / "summary.json").read_text())["best_ckpt"]
    ecfg = compose_cfg(tmp_path / "eval", [f"data.root={tiny_camvid}", f"ckpt_path={best}", "data.num_workers=0",
                                           "data.eval_batch_size=1", "trainer.limit_test_batches=2",
                                           "extras.print_config=false", "attach_to_run=false"], config_name="eval")
    emetrics, objects = evaluate(ecfg)
    assert list(objects["datamodule"].hparams.mean) == [0.2, 0.6, 0.9]
    assert objects["datamodule"].hparams.pad_multiple == 16  # 48-row frames: 48 as tested, not 64 (eval.yaml's 32)
    assert emetrics["test/loss"] == metrics["test/loss"] and emetrics["test/mIoU"] == metrics["test/mIoU"]


@pytest.mark.slow
def test_train_then_eval_reproduces_test_miou_and_resume_continues(camvid_root, tmp_path):
    from bgremover.eval import evaluate

    run1 = tmp_path / "run1"
    cfg = compose_cfg(run1, [*TINY_TIRAMISU, f"data.root={camvid_root}", *SMALL_RUN, "trainer.max_epochs=1",
                             "logger=csv"])
    metrics, _ = train(cfg)
    summary = json.loads((run1 / "summary.json").read_text())

    ecfg = compose_cfg(tmp_path / "eval", [f"data.root={camvid_root}", f"ckpt_path={summary['best_ckpt']}",
                                           "data.num_workers=0", "data.eval_batch_size=1",
                                           "trainer.limit_test_batches=2", "extras.print_config=false"],
                       config_name="eval")
    emetrics, _ = evaluate(ecfg)
    assert emetrics["test/mIoU"] == metrics["test/mIoU"]  # exactly: same weights, same frames
    assert emetrics["test/acc"] == metrics["test/acc"]

    # Resume from last.ckpt: continues at epoch 1 with the optimizer and scheduler state of epoch 0.
    run2 = tmp_path / "run2"
    cfg2 = compose_cfg(run2, [*TINY_TIRAMISU, f"data.root={camvid_root}", *SMALL_RUN, "trainer.max_epochs=2",
                              "logger=csv", f"ckpt_path={summary['last_ckpt']}"])
    _, objects = train(cfg2)
    s2 = json.loads((run2 / "summary.json").read_text())
    assert s2["epochs"] == 2 and s2["global_step"] == 4  # 2 steps of epoch 0 restored, 2 new ones
    assert s2["history"]["epoch"] == [0, 1]  # epoch 0 came back from the checkpoint
    lr = objects["trainer"].optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-3 * 0.995**2)  # ExponentialLR stepped once per epoch across the resume


@pytest.mark.parametrize("encoder", ["mobilenet_v2", "tu-resnet18"])
def test_imagenet_weights_offline_fail_fast_with_one_line(tmp_path, tiny_camvid, encoder):
    """Hermetic: the hub is declared offline (HF_HUB_OFFLINE) and its cache is an empty folder, so the answer
    does not depend on whether this machine has a network. A timm encoder (`tu-`, which the encoder error offers)
    was not checked: timm's own download retried for ~45 s offline and ended in a line naming no setting."""
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "bgremover.train", "model=deeplabv3plus", "model.net.encoder_weights=imagenet",
         f"model.net.encoder_name={encoder}", "logger=csv", "extras.print_config=false", f"paths.log_dir={tmp_path}", f"data.root={tiny_camvid}",
         "data.crop_size=[32,32]"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": "1"},
    )
    elapsed = time.time() - start
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "imagenet" in errors[0] and "encoder_weights=null" in errors[0]
    assert "Traceback" not in proc.stderr
    assert elapsed < 60  # imports included


def test_hydra_job_chdir_reads_relative_paths_from_where_the_command_started(tmp_path, small_camvid):
    """`hydra.job.chdir=true` (Hydra's run-in-the-output-folder switch) with a relative data.root or ckpt_path: the
    run stopped on "dataset folder not found: CamVid", a folder that was there, looked for inside the run folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "WANDB_MODE": "offline"}
    env.pop("DATA_DIR", None)
    common = ["hydra.job.chdir=true", "data.root=CamVid", "logger=csv", "extras.print_config=false"]
    proc = subprocess.run([sys.executable, "-m", "bgremover.train", *TINY_TIRAMISU, *SMALL_RUN, *common,
                           "trainer.max_epochs=1", "hydra.run.dir=run"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["test_split"]["frames"] == 2
    proc = subprocess.run([sys.executable, "-m", "bgremover.eval", "ckpt_path=run/checkpoints/last.ckpt", *common,
                           "data.num_workers=0", "hydra.run.dir=ev"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["frames"]["frames"] == 3


def test_pretrained_check_itself_takes_seconds(monkeypatch, tmp_path):
    import socket

    from bgremover.nets import PretrainedWeightsUnavailable, ensure_pretrained_available

    def no_network(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)  # hermetic: the probe fails as offline would
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    start = time.time()
    for encoder in ("resnet34", "tu-resnet18", "tu-resnet18.a1_in1k"):
        with pytest.raises(PretrainedWeightsUnavailable, match=f"encoder '{encoder}' .*model.net.encoder_weights=null"):
            ensure_pretrained_available({"_target_": "segmentation_models_pytorch.DeepLabV3Plus",
                                         "encoder_name": encoder, "encoder_weights": "imagenet"})
    assert time.time() - start < 5
    ensure_pretrained_available({"_target_": "segmentation_models_pytorch.DeepLabV3Plus", "encoder_weights": None})


def test_soft_dice_loss_scores_the_foreground_overlap_and_skips_void():
    import torch

    from bgremover.lit.module import soft_dice_loss

    target = torch.tensor([[[0, 1], [1, 2]]])  # background, foreground ×2, void (2)
    sure = torch.tensor([[[[9.0, -9.0], [-9.0, -9.0]], [[-9.0, 9.0], [9.0, 9.0]]]])  # 2 classes, void pixel says fg
    assert soft_dice_loss(sure, target, [1], ignore_index=2).item() < 1e-3  # the void pixel's answer is not counted
    assert soft_dice_loss(-sure, target, [1], ignore_index=2).item() > 0.6  # every answer wrong
    half = torch.zeros(1, 2, 2, 2)  # P = 0.5 everywhere: Dice = (2·1 + 1) / (1.5 + 2 + 1)
    assert soft_dice_loss(half, target, [1], ignore_index=2).item() == pytest.approx(1 - 3 / 4.5)


class _FixedLogits(torch.nn.Module):
    """A 'net' that answers with given logits, so the module's metrics can be checked on a known prediction."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # the test stage looks at the parameters' dtype

    def forward(self, x):
        return self.logits + 0 * self.anchor


def _module_scoring(pred: torch.Tensor):
    from bgremover.lit import SegmentationModule

    logits = 5.0 * torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    return SegmentationModule(net=_FixedLogits(logits), optimizer=None, class_names=("A", "B", "C", "D"),
                              ignore_index=4, default_foreground=("B",), channels_last=False)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # no Trainer: _log_epoch's values are returned
def test_the_modules_test_metrics_by_hand():
    """One 2x4 frame, class D absent, one void pixel (4) the net calls A. Over the 7 labelled pixels: A tp 1 of
    gt 3, pred 1 -> 1/3; B tp 3, gt 3, pred 4 -> 3/4; C tp 1, gt 1, pred 2 -> 1/2; D has no IoU (NaN) and stays out
    of mIoU = (1/3 + 3/4 + 1/2) / 3 = 19/36; accuracy 5/7. Foreground B: IoU 3/4; alpha P(B) = e^5/(e^5+3) where B
    is predicted, 1/(e^5+3) elsewhere: MAE (3(1 - hi) + hi + 3 lo) / 7."""
    y = torch.tensor([[[0, 0, 1, 1], [2, 4, 1, 0]]]).repeat(2, 1, 1)  # a batch of the frame twice: ratios stay
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 1, 2]]]).repeat(2, 1, 1)
    module = _module_scoring(pred)
    module._step((torch.zeros(2, 3, 2, 4), y), "test", 0)
    got = module._log_epoch("test")
    assert got["test/mIoU"] == pytest.approx(19 / 36)
    assert got["test/acc"] == pytest.approx(5 / 7)
    assert got["test/frames"] == 2
    per_class = module.test_class_iou.compute().tolist()
    assert per_class[:3] == pytest.approx([1 / 3, 3 / 4, 1 / 2]) and math.isnan(per_class[3])
    hi, lo = math.exp(5) / (math.exp(5) + 3), 1 / (math.exp(5) + 3)
    assert got["test/fg_iou"] == pytest.approx(3 / 4)
    assert got["test/alpha_mae"] == pytest.approx((3 * (1 - hi) + hi + 3 * lo) / 7, rel=1e-5)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_an_all_void_split_reports_nan_not_zero():
    """No labelled pixel: mIoU and accuracy are undefined (NaN), not the 0.0 that reads as 'all wrong'."""
    module = _module_scoring(torch.zeros(1, 2, 2, dtype=torch.long))
    module._step((torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 4)), "val", 0)
    got = module._log_epoch("val")
    assert math.isnan(got["val/mIoU"]) and math.isnan(got["val/acc"])
