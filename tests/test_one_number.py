"""One number per checkpoint and frame set: the test stage, `make eval`, the exported ONNX model and
`make eval-cutout` pad, normalise and score the same way, so they agree on real CamVid frames."""

from __future__ import annotations

import json

import pytest
from test_train import TINY_TIRAMISU, compose_cfg

FRAMES = 6  # evenly spaced real test frames: several sequences, a few seconds per stage


@pytest.mark.slow
def test_test_stage_eval_onnx_and_cutout_eval_agree_on_real_frames(camvid_root, tmp_path):
    from bgremover import cutout_eval
    from bgremover.eval import evaluate
    from bgremover.export import export_onnx, load_checkpoint_net
    from bgremover.train import train

    common = [f"data.root={camvid_root}", "data.num_workers=0", "data.eval_batch_size=2",
              f"data.limit_eval_images={FRAMES}", "extras.print_config=false"]
    cfg = compose_cfg(tmp_path / "run", [*TINY_TIRAMISU, *common, "data.batch_size=2", "data.crop_size=[64,64]",
                                         "trainer.max_epochs=2", "trainer.limit_train_batches=3",
                                         "measure_inference=false", "logger=csv"])
    metrics, _ = train(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_split"] == {"frames": FRAMES, "of": 233, "complete": False}

    ecfg = compose_cfg(tmp_path / "eval", [*common, f"ckpt_path={summary['best_ckpt']}"], config_name="eval")
    emetrics, _ = evaluate(ecfg)
    assert emetrics["test/mIoU"] == pytest.approx(metrics["test/mIoU"], abs=1e-6)

    net, meta = load_checkpoint_net(summary["best_ckpt"])
    onnx = tmp_path / "tiny.onnx"
    export_onnx(net, meta, onnx)
    remover = cutout_eval.load_remover(onnx, threads=2)
    report = cutout_eval.evaluate(remover, cutout_eval.find_pairs(camvid_root, "test", FRAMES))
    # onnxruntime and PyTorch differ by ~1e-6 in the logits: an argmax may flip on a handful of pixels
    assert report["mIoU"] == pytest.approx(metrics["test/mIoU"], abs=2e-4)
    assert report["pixel_accuracy"] == pytest.approx(metrics["test/acc"], abs=2e-4)
