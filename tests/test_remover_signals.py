"""`make remover` stopped by SIGTERM after its training (a job scheduler, `kill`): as Ctrl-C, one line with the
commands that finish the run, exit 143 — it was passed on to the finished training and ignored, so the export and
the scoring went on and the run exited 0 (a `make remover` audit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from test_folder import finished_training, write_folder


@pytest.mark.parametrize("stage", ["export", "score"])
def test_sigterm_after_the_training_stops_the_export_or_the_scoring(tmp_path, monkeypatch, capsys, stage):
    from bgremover import export, train_remover

    folder, run = write_folder(tmp_path / "data"), tmp_path / "run"
    best = run / "checkpoints" / "epoch_003.ckpt"

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError(f"the {stage} went on after SIGTERM")

    monkeypatch.setattr(subprocess, "Popen", finished_training(run, best))
    if stage == "export":  # inside the real export: it reported an Exception as its failure, exit 1
        monkeypatch.setattr(export, "load_checkpoint_net", lambda path: (torch.nn.Identity(), {}))
        monkeypatch.setattr(export, "onnx_metadata", lambda meta: {})
        monkeypatch.setattr(export, "_write_onnx", terminated)
    else:
        monkeypatch.setattr(export, "load_checkpoint_net", lambda path: (None, {}))
        monkeypatch.setattr(export, "export_onnx", lambda *a: {"path": run / "remover.onnx", "agreement": ""})
        monkeypatch.setattr(train_remover, "score_held_out", terminated)
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert train_remover.main([str(folder), "--run-dir", str(run)]) == 143
    finally:
        signal.signal(signal.SIGTERM, before)
    (line,) = capsys.readouterr().err.strip().splitlines()[1:]
    assert line == ("error: interrupted by SIGTERM after training finished; finish with: "
                    + train_remover.finish_command(run, folder.resolve(), str(best)))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "summary.json"]  # no remover.onnx, whole or half


def test_a_camvid_experiment_on_your_folder_names_the_experiment_not_make_data(tmp_path):
    """`make remover DATA=<your folder> EXP=cpu_quick` (a CamVid experiment) said "has no 'train' split ... run
    `make data` to download CamVid there", advice for the wrong problem: the folder is fine, the EXP is not."""
    data = write_folder(tmp_path / "mine")
    proc = subprocess.run([sys.executable, "-m", "bgremover.train_remover", str(data), "--exp", "cpu_quick",
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode != 0
    line = proc.stderr.strip().splitlines()[-1]
    assert "has no 'train' split" in line and "run `make data` to download CamVid there" not in line, line
    assert "data=folder" in line and "remover" in line, line
