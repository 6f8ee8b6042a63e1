"""Test-time augmentation (`make eval ARGS="tta=flip|multiscale"`): the averaged probabilities are what they claim
to be, every pass sees a size the net accepts, and TTA numbers never pass for a run's single-pass test numbers."""

from __future__ import annotations

import json

import pytest
import torch
from test_runs import TINY_RUN
from test_train import compose_cfg

from bgremover.errors import UserError
from bgremover.lit.tta import TTA
from bgremover.train import train


class _Recorder(torch.nn.Module):
    """A net that is not mirror-symmetric (its logits depend on the column) and records the sizes it saw."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, classes, 3, padding=1)
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        ramp = torch.linspace(-2, 2, x.shape[-1]).expand_as(x[:, :1])
        return self.conv(x) + ramp * torch.arange(3.0).view(1, 3, 1, 1)


def test_flip_tta_is_the_log_of_the_mean_of_both_softmaxes():
    torch.manual_seed(0)
    net, x = _Recorder(), torch.randn(2, 3, 32, 64)
    got = TTA(scales=[1.0], flip=True)(net, x, multiple=32)
    want = ((net(x).softmax(1) + net(x.flip(-1)).flip(-1).softmax(1)) / 2).log()
    assert got.shape == (2, 3, 32, 64)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.allclose(got.exp().sum(1), torch.ones(2, 32, 64), atol=1e-5)  # still probabilities
    # a net that is not mirror-symmetric: the mirrored pass changes the answer (the check above could not hide it)
    assert not torch.allclose(got, net(x).log_softmax(1), atol=1e-3)
    # one scale, no flip: the plain prediction
    torch.testing.assert_close(TTA(scales=[1.0], flip=False)(net, x, 32), net(x).log_softmax(1))


def test_multiscale_passes_are_multiples_of_the_net_size_and_come_back_at_full_size():
    net, x = _Recorder(), torch.randn(1, 3, 96, 128)
    tta = TTA(scales=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75], flip=True)
    out = tta(net, x, multiple=32)
    assert out.shape == (1, 3, 96, 128) and torch.isfinite(out).all()
    assert tta.passes == 12 == len(net.sizes)
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in net.sizes), net.sizes
    # 96×128 at 0.5 is 48×64 → 64×64 (nearest multiple), at 1.75: 168×224 → 160×224
    assert net.sizes[0] == (64, 64) and net.sizes[-1] == (160, 224)
    assert tta.describe() == {"scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "flip": True, "passes": 12}


def test_scaled_sizes_round_to_the_nearest_multiple_and_never_below_one():
    """32×160 at 0.25 is 8×40: 0.25 and 1.25 multiples round to 0 and 1, but the net needs at least one (32×32); at
    0.75 it is 24×120: 0.75 and 3.75 multiples round up to 1 and 4 (32×128), not down to 0 and 3."""
    net = _Recorder()
    out = TTA(scales=[0.25, 0.75], flip=False)(net, torch.randn(1, 3, 32, 160), multiple=32)
    assert net.sizes == [(32, 32), (32, 128)] and out.shape == (1, 3, 32, 160)


def test_a_scaled_copy_is_resized_bilinearly_about_pixel_centres_both_ways():
    """A net that returns its input: one row 0, 4, 8, 16 at scale 0.5 is 2, 12 (the mean of each pair of pixels,
    as half-pixel-centred bilinear resizing gives), and back at full size 2, 4.5, 9.5, 12 (edge pixels clamped).
    Nearest neighbour would give 0, 8 at half size; corner-aligned resizing 0, 16."""
    row = torch.tensor([0.0, 4.0, 8.0, 16.0])
    x = torch.stack([row, torch.zeros(4)]).view(1, 2, 1, 4)  # two "classes": the row's values against 0
    got = TTA(scales=[0.5], flip=False)(lambda t: t, x, multiple=1)
    want = torch.stack([torch.tensor([2.0, 4.5, 9.5, 12.0]), torch.zeros(4)]).view(1, 2, 1, 4).log_softmax(1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("scales", [[], [0.0], [-1.0], [float("nan")]])
def test_bad_scales_are_a_user_error(scales):
    with pytest.raises(UserError, match="tta.scales must be positive"):
        TTA(scales=scales)


def test_eval_with_tta_records_it_and_leaves_the_runs_numbers_alone(small_camvid, tmp_path, capsys):
    from bgremover.eval import evaluate

    run = compose_cfg(tmp_path / "run", [*TINY_RUN, f"data.root={small_camvid}", "trainer.max_epochs=1",
                                         "test=false"])
    train(run)
    summary_path = tmp_path / "run" / "summary.json"
    before = summary_path.read_text()
    best = json.loads(before)["best_ckpt"]

    def evaluate_in(name: str, *extra: str):
        return evaluate(compose_cfg(tmp_path / name, [f"data.root={small_camvid}", "data.num_workers=0", *extra,
                                                      f"ckpt_path={best}"], config_name="eval"))

    metrics, _ = evaluate_in("flip", "tta=flip")
    record = json.loads((tmp_path / "flip" / "eval.json").read_text())
    assert record["tta"] == {"scales": [1.0], "flip": True, "passes": 2}
    assert record["metrics"]["test/mIoU"] == pytest.approx(metrics["test/mIoU"]) and 0 <= metrics["test/mIoU"] <= 1
    assert record["frames"] == {"frames": 3, "of": 3, "complete": True}
    assert summary_path.read_text() == before  # not attached: the run's test numbers are single-pass ones

    plain, _ = evaluate_in("plain")
    assert json.loads((tmp_path / "plain" / "eval.json").read_text())["tta"] is None
    assert "test/mIoU" in json.loads(summary_path.read_text())["metrics"]  # a single-pass eval attaches
    assert plain["test/frames"] == metrics["test/frames"] == 3
