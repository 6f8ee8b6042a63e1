"""Ctrl-C or SIGTERM inside a validation, then the printed resume: the resumed run validates that epoch again over
the whole val split. Lightning restores the validation's place, not the metric states of its frames: a Ctrl-C
inside a val batch gave a resume that finished over the frames left (a 2-of-4-frame score picked the exported
remover), one between val batches a resume that skipped the epoch's validation (the epoch missing from the history,
its weights never a candidate) — a `make remover` audit."""

from __future__ import annotations

import pytest
from test_runs import TINY_RUN
from test_train import compose_cfg

from bgremover.lit import SegmentationModule
from bgremover.train import RunInterrupted, train


def _interrupted_in_epoch_1_then_resumed(monkeypatch, hook: str, interrupted, base: list[str], first, second):
    """Train with SegmentationModule's `hook` replaced by `interrupted` (which raises Ctrl-C in epoch 1), then resume
    from the interrupt's last.ckpt with the real hook; the resumed run's objects (train's second value)."""
    real = getattr(SegmentationModule, hook)
    monkeypatch.setattr(SegmentationModule, hook, interrupted)
    with pytest.raises(RunInterrupted) as stop:
        train(compose_cfg(first, base))
    assert stop.value.epoch == 1
    monkeypatch.setattr(SegmentationModule, hook, real)
    _, objects = train(compose_cfg(second, [*base, f"ckpt_path={stop.value.last_ckpt}"]))
    return objects


@pytest.mark.parametrize("hook", ["validation_step", "on_validation_batch_start"])
def test_a_validation_interrupted_is_done_again_whole_on_resume(small_camvid, tmp_path, monkeypatch, hook):
    real = getattr(SegmentationModule, hook)

    def interrupted(self, batch, batch_idx, *args, **kwargs):  # epoch 1's second val frame (of 2)
        if self.current_epoch == 1 and batch_idx == 1 and not self.trainer.sanity_checking:
            raise KeyboardInterrupt
        return real(self, batch, batch_idx, *args, **kwargs)

    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.max_epochs=3",
            "trainer.num_sanity_val_steps=0", "hydra.run.dir=" + str(tmp_path / "run")]
    objects = _interrupted_in_epoch_1_then_resumed(monkeypatch, hook, interrupted, base, tmp_path / "run",
                                                   tmp_path / "run")
    history = objects["model"].history
    assert [h["epoch"] for h in history] == [0, 1, 2], history
    assert [h["val/frames"] for h in history] == [2, 2, 2], history


@pytest.mark.parametrize("hook", ["on_train_batch_end", "on_validation_model_zero_grad"])
def test_a_ctrl_c_between_an_epochs_last_batch_and_its_validation_validates_it_on_resume(small_camvid, tmp_path,
                                                                                       monkeypatch, hook):
    """Ctrl-C in the moment between an epoch's last training batch and its validation: Lightning takes a restart
    there for one checkpointed after that validation, so the resume skipped it (history epochs [0, 2, 3]: epoch 1
    missing, its weights never a best-epoch candidate). SIGTERM waits for the epoch's end, so only Ctrl-C met it."""
    real = getattr(SegmentationModule, hook)

    def interrupted(self, *args, **kwargs):  # after step 4, epoch 1's last (2 steps an epoch)
        if self.global_step == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false", "trainer.max_epochs=4",
            "trainer.num_sanity_val_steps=0"]
    objects = _interrupted_in_epoch_1_then_resumed(monkeypatch, hook, interrupted, base, tmp_path / "a",
                                                   tmp_path / "b")
    history = objects["model"].history
    assert [h["epoch"] for h in history] == [0, 1, 2, 3], history
    assert [h["step"] for h in history] == [2, 4, 6, 8], history
    assert [h["val/frames"] for h in history] == [2, 2, 2, 2], history
    assert objects["trainer"].global_step == 8
