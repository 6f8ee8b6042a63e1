"""callbacks=ema: the checkpoints hold the weight average for testing and export, and the raw weights to resume
from; an EMA decay too slow for the run is called out."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from test_runs import TINY_RUN, _Scored
from test_train import compose_cfg

from bgremover.lit.checkpoints import LastCheckpoint
from bgremover.train import train


def test_ema_decay_too_slow_for_the_run_is_called_out(tmp_path, caplog):
    from bgremover.lit.callbacks import EMAWeights

    def fit(decay: float) -> list[str]:
        caplog.clear()
        trainer = pl.Trainer(max_epochs=3, callbacks=[EMAWeights(decay=decay)], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                             default_root_dir=tmp_path)
        with caplog.at_level("WARNING", logger="bgremover.train"):
            trainer.fit(_Scored([0.1, 0.2, 0.3]))
        return [r.getMessage() for r in caplog.records if "callbacks.ema.decay" in r.getMessage()]

    # 3 epochs × 2 steps = 6 steps, against an average over ~1000
    assert fit(0.999) == ["callbacks.ema.decay=0.999 averages over ~1000 steps, and this run plans 6: the average "
                          "keeps much of the early weights; for this length use callbacks.ema.decay=0.1667"]
    assert fit(0.5) == []  # ~2 steps: fine for 6
    # ~4 steps: 6 steps leave 0.75^6 ≈ 18% of the first weights in the average; called out below 3 spans (5%)
    assert [m.split(":")[0] for m in fit(0.75)] == ["callbacks.ema.decay=0.75 averages over ~4 steps, and this run plans 6"]

    def fit_steps(steps: int) -> list[str]:
        caplog.clear()
        trainer = pl.Trainer(max_steps=steps, callbacks=[EMAWeights(decay=0.999)], logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             num_sanity_val_steps=0, default_root_dir=tmp_path)
        with caplog.at_level("WARNING", logger="bgremover.train"):
            trainer.fit(_Scored([0.1, 0.2, 0.3]))
        return [r.getMessage() for r in caplog.records if "callbacks.ema.decay" in r.getMessage()]

    # 4 steps: it said "use callbacks.ema.decay=0.0000" (a user audit)
    assert fit_steps(4) == ["callbacks.ema.decay=0.999 averages over ~1000 steps, and this run plans 4: the average "
                            "keeps much of the early weights; for this length train without callbacks=ema"]



def _net_tensors(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("net.") and v.is_floating_point()}



def test_callbacks_ema_checkpoints_the_average_and_resumes_from_the_raw_weights(small_camvid, tmp_path):
    """callbacks=ema: each checkpoint's state_dict (what test, eval, export and ship read) is the moving average
    and the raw weights travel in current_model_state; the fitted module holds the average; decay 0 makes the
    average the raw weights; a resumed run goes on and keeps averaging."""
    from bgremover import checkpoint

    ema = [*TINY_RUN, f"data.root={small_camvid}", "callbacks=ema"]
    _, objects = train(compose_cfg(tmp_path / "a", [*ema, "trainer.max_epochs=2", "callbacks.ema.decay=0.5"]))
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    ckpt = torch.load(s["last_ckpt"], weights_only=False)
    avg, raw = _net_tensors(ckpt["state_dict"]), _net_tensors(ckpt["current_model_state"])
    assert avg.keys() == raw.keys() and len(avg) > 10
    assert sum(not torch.equal(avg[k], raw[k]) for k in avg) > len(avg) // 2  # averaged, not copied
    # BatchNorm statistics averaged too (use_buffers): without, the average kept the fresh net's 0s and 1s and
    # normalised every layer of the tested and exported net with them
    stats = [k for k in avg if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(avg[k], raw[k]) for k in stats)
    assert all(not torch.equal(avg[k], torch.zeros_like(avg[k])) for k in stats if k.endswith("running_mean"))
    best = torch.load(s["best_ckpt"], weights_only=False)
    best_avg = _net_tensors(best["state_dict"])
    assert any(not torch.equal(best_avg[k], v) for k, v in _net_tensors(best["current_model_state"]).items())
    fitted = {f"net.{k}": v for k, v in objects["model"].net.state_dict().items()}
    assert all(torch.equal(fitted[k], best_avg[k]) for k in best_avg)  # the test stage ran the best average
    net, _, _ = checkpoint.load_net(s["best_ckpt"])  # export / ship / ckpt_init read the average
    assert all(torch.equal(net.state_dict()[k[4:]], v) for k, v in best_avg.items())

    _, _ = train(compose_cfg(tmp_path / "b", [*ema, "trainer.max_epochs=3", "callbacks.ema.decay=0.5",
                                              f"ckpt_path={s['last_ckpt']}"]))  # fmt: skip
    s2 = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s2["history"]["epoch"] == [0, 1, 2] and s2["status"] == "ok"

    train(compose_cfg(tmp_path / "c", [*ema, "trainer.max_epochs=1", "callbacks.ema.decay=0.0"]))
    last = torch.load(json.loads((tmp_path / "c" / "summary.json").read_text())["last_ckpt"], weights_only=False)
    avg, raw = _net_tensors(last["state_dict"]), _net_tensors(last["current_model_state"])
    assert all(torch.equal(avg[k], raw[k]) for k in avg)  # decay 0: the average is the last step's weights



def test_a_resume_without_callbacks_ema_is_refused_and_with_it_trains_on_from_the_raw_weights(small_camvid, tmp_path):
    """An EMA checkpoint resumed without callbacks=ema trained on from the average (the state_dict Lightning loads),
    with the raw weights' optimizer moments, and its checkpoints dropped the raw weights: silently. Now it is one
    line naming callbacks=ema; with callbacks=ema the first step starts from the raw weights."""
    from bgremover import checks
    from bgremover.errors import UserError
    from bgremover.lit.module import SegmentationModule

    base = [*TINY_RUN, f"data.root={small_camvid}", "test=false"]
    train(compose_cfg(tmp_path / "a", [*base, "callbacks=ema", "callbacks.ema.decay=0.5", "trainer.max_epochs=2"]))
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    more = [*base, "trainer.max_epochs=3", f"ckpt_path={last}"]
    for callbacks in ("callbacks=default", "callbacks=none"):
        with pytest.raises(UserError) as info:
            checks.validate_train(compose_cfg(tmp_path / "b", [*more, callbacks]))
        assert str(info.value) == (f"ckpt_path {last} was trained with callbacks=ema (its weights are the moving "
                                   "average, the raw ones kept beside them): add callbacks=ema to resume it, or start "
                                   f"a new run from the average with ckpt_init={last}")
    assert not (tmp_path / "b").exists()

    ckpt = torch.load(last, weights_only=False)
    raw, avg = _net_tensors(ckpt["current_model_state"]), _net_tensors(ckpt["state_dict"])
    start: dict = {}
    real = SegmentationModule.training_step

    def first_step(self, batch, batch_idx):
        if not start:  # the weights the first step trains from
            start.update(_net_tensors({k: v.detach().clone() for k, v in self.state_dict().items()}))
        return real(self, batch, batch_idx)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SegmentationModule, "training_step", first_step)
        train(compose_cfg(tmp_path / "c", [*more, "callbacks=ema", "callbacks.ema.decay=0.5"]))
    assert start.keys() == raw.keys() and all(torch.equal(start[k], raw[k]) for k in raw)
    assert any(not torch.equal(raw[k], avg[k]) for k in raw)  # the two differ: the start tells them apart


def test_last_ckpt_at_the_end_keeps_the_raw_weights_beside_the_ema_average(tmp_path):
    """every_epoch=False saved at on_train_end, after callbacks=ema had copied the average over the raw weights:
    the checkpoint's current_model_state (what a resume trains on) was the average too."""
    from bgremover.lit.callbacks import EMAWeights

    ckpt_dir = tmp_path / "checkpoints"
    trainer = pl.Trainer(max_epochs=3, callbacks=[EMAWeights(decay=0.5), LastCheckpoint(str(ckpt_dir), every_epoch=False)],
                         logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(_Scored([0.1, 0.2, 0.3]))
    state = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert state["global_step"] == 6
    raw, avg = state["current_model_state"]["layer.weight"], state["state_dict"]["layer.weight"]
    assert not torch.equal(raw, avg)


def test_an_interrupt_inside_validation_saves_the_average_and_the_raw_weights_in_their_places(tmp_path):
    """Ctrl-C or SIGTERM while validating (the module then holds the average, the AveragedModel the raw weights):
    last.ckpt had them swapped, so a resume trained on from the average and eval read the raw weights."""
    from bgremover.lit.callbacks import EMAWeights

    raw: list[torch.Tensor] = []

    class Stopped(_Scored):
        def on_train_batch_end(self, *_):
            raw.append(self.layer.weight.detach().clone())

        def validation_step(self, batch, _):
            if self.current_epoch == 1:
                raise KeyboardInterrupt

    ema = EMAWeights(decay=0.5)
    trainer = pl.Trainer(max_epochs=3, callbacks=[ema, LastCheckpoint(str(tmp_path / "checkpoints"))], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    torch.manual_seed(0)
    model = Stopped([0.1, 0.2, 0.3])
    with pytest.raises(SystemExit):  # Lightning's exit after a handled Ctrl-C: the interrupt did happen
        trainer.fit(model)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    expected = raw[0]
    for w in raw[1:]:  # the first update copies, then avg = 0.5 avg + 0.5 w
        expected = 0.5 * expected + 0.5 * w
    assert torch.allclose(state["current_model_state"]["layer.weight"], raw[-1])
    assert torch.allclose(state["state_dict"]["layer.weight"], expected)
    assert not torch.equal(raw[-1], expected)
    assert torch.equal(model.layer.weight.detach(), raw[-1])  # the module is left with the raw weights
