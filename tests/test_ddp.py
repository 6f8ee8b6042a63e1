"""DDP on CPU with gloo: two ranks must compute what one process computes on their combined data.

One pair of ranks is spawned for the whole module (spawning costs seconds, the cases themselves do not): it
runs every case below and saves what each rank saw; the tests compare that with the same case run here in
one process, without a process group, on the concatenated batch. The last cases are Lightning's own DDP
(evaluation on a tiny synthetic CamVid; the train batches each rank augments), with the ranks started outside
Lightning as torchrun or SLURM would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CONF_DIR, REPO, randomise_bn, write_camvid
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from bgremover.data.classes import VOID
from bgremover.nets.tiramisu import DenseBlock, FCDenseNet

WORLD = 2
BATCH = 5  # split 3 + 2: the ranks' pixel counts differ, so a plain average of per-rank stats would be wrong
TINY = {"down_blocks": (2, 3), "up_blocks": (3, 2), "bottleneck_layers": 2, "growth_rate": 4,
        "first_conv_channels": 8, "dropout": 0.0}  # dropout masks are per process: off, to compare exactly
TOL = {"atol": 1e-10, "rtol": 1e-9}


def _rows(rank: int, world: int, n: int = BATCH) -> slice:
    """Rank's share of the global batch: contiguous, the first ranks one sample longer."""
    sizes = [n // world + (r < n % world) for r in range(world)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])




class _AllReduceBN(nn.BatchNorm2d):
    """Synced BN for the transitions in the CPU test (nn.SyncBatchNorm refuses CPU tensors): plain autograd
    through torch.distributed.nn's differentiable all_reduce of (count, sum, sum of squares) -- an independent
    reference, not the dense blocks' code. Without a process group it is nn.BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not dist.is_initialized():
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        total = all_reduce(torch.cat([x.new_tensor([x.numel() / c]), x.sum((0, 2, 3)), (x * x).sum((0, 2, 3))]))
        n, mean = total[0], total[1 : c + 1] / total[0]
        var = total[c + 1 :] / n - mean * mean
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return x * scale.view(1, -1, 1, 1) + (self.bias - mean * scale).view(1, -1, 1, 1)


def _recording_stats(block: DenseBlock, record: dict) -> None:
    """Keep the batch mean/var and pixel count the block hands to its running-statistics update."""
    update = block._update_running_stats

    def wrapped(mean, var, count):
        record.update(mean=mean.clone(), var=var.clone(), count=count)
        return update(mean, var, count)

    block._update_running_stats = wrapped


def _ddp_grads(module: nn.Module, world: int) -> dict[str, torch.Tensor]:
    """Parameter gradients averaged over the ranks as DDP does, times the world size: the gradient of the sum
    of the ranks' losses, which is what one process computes on the combined batch."""
    grads = {}
    for name, p in module.named_parameters():
        if world > 1:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        grads[name] = p.grad * world
    return grads


def block_case(rank: int, world: int, sync: bool = True, memory_efficient: bool = False,
               channels_last: bool = False, rows: slice | None = None) -> dict:
    """One training step of a two-input dense block (like the up path's) on this rank's rows, float64."""
    torch.manual_seed(0)  # the conv weights: same in every process, whatever ran before
    block = DenseBlock(6, 3, 4, dropout=0.0, memory_efficient=memory_efficient).double()
    randomise_bn(block)
    if sync:
        nn.SyncBatchNorm.convert_sync_batchnorm(block)  # what Lightning's sync_batchnorm=True does
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(BATCH, c, 6, 7, generator=g, dtype=torch.float64) for c in (4, 2))
    weight = torch.randn(BATCH, block.out_channels, 6, 7, generator=g, dtype=torch.float64)
    rows = rows or _rows(rank, world)
    a, b = a[rows].clone(), b[rows].clone()
    if channels_last:
        a, b = a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)
    a.requires_grad_()
    b.requires_grad_()
    stats: dict = {}
    _recording_stats(block, stats)
    out = block(a, b)
    (out * weight[rows]).sum().backward()
    return {"out": out.detach(), "grad_a": a.grad, "grad_b": b.grad, **stats,
            "param_grads": _ddp_grads(block, world),
            "state": {k: v.clone() for k, v in block.state_dict().items()}}


def net_case(rank: int, world: int) -> dict:
    """One training step of a tiny FC-DenseNet in float64.

    Gradients are averaged by hand (``_ddp_grads``): DistributedDataParallel refuses CPU modules that hold
    nn.SyncBatchNorm layers, and convert_sync_batchnorm is how the dense blocks are told to sync (as Lightning
    does on GPUs).
    """
    torch.manual_seed(0)
    net = FCDenseNet(**TINY).double()
    randomise_bn(net)
    for down in net.trans_down:
        ref = _AllReduceBN(down.norm.num_features).double()
        ref.load_state_dict(down.norm.state_dict())
        down.norm = ref
    for m in list(net.modules()):
        if isinstance(m, DenseBlock):
            nn.SyncBatchNorm.convert_sync_batchnorm(m)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, 3, 16, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(BATCH, 11, 16, 16, generator=g, dtype=torch.float64)
    rows = _rows(rank, world)
    x = x[rows].clone().requires_grad_()
    out = net(x)
    (out * weight[rows]).sum().backward()
    return {"out": out.detach(), "grad_x": x.grad, "param_grads": _ddp_grads(net, world),
            "state": {k: v.clone() for k, v in net.state_dict().items()}}


class _PixelsSeen(pl.Callback):
    """The test pixels this rank's metrics counted, read before the module's epoch end syncs and resets them."""

    pixels = 0

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pixels = int(pl_module.test_class_iou.confmat.sum())


def lightning_case(rank: int, world: int, spec: dict) -> dict:
    """trainer.validate and trainer.test of a tiny FC-DenseNet with Lightning's DDP strategy on ``world`` ranks
    (one process when world is 1): the history, logged metrics and test pixels that this rank ends up with."""
    if world > 1:  # the ranks exist already: Lightning joins the process group instead of launching children
        os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
    model = instantiate(spec["model"], _convert_="all")
    model.load_state_dict(torch.load(spec["weights"], weights_only=True))
    datamodule = instantiate(spec["data"], _convert_="all")
    seen = _PixelsSeen()
    trainer = instantiate(spec["trainer"], devices=world, strategy="ddp" if world > 1 else "auto", callbacks=[seen],
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
    trainer.validate(model, datamodule=datamodule, verbose=False)
    val = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.test(model, datamodule=datamodule, verbose=False)
    return {"history": list(model.history), "val": val, "test_pixels": seen.pixels,
            "test": {k: float(v) for k, v in trainer.callback_metrics.items()}}


class _Batches(pl.LightningModule):
    """Keeps the train batches it is given; one weight, so DDP has a gradient to reduce."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0].clone())
        return (self.w * batch[0]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


AUGMENT = {"batch_size": 1, "crop_size": (32, 32), "hflip": 0.5, "scale_jitter": 0.3, "color_jitter": 0.3,
           "persistent_workers": False, "seed": 7}


def augmentation_case(rank: int, world: int, root: str) -> dict[int, torch.Tensor]:
    """The first train batches this rank's loader gives in Lightning's DDP, with num_workers 0 and 1, on frames
    that are all one image: only the augmentation can tell them apart."""
    from bgremover.data import CamVidDataModule

    seen = {}
    for workers in (0, 1):
        model = _Batches()
        trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_epochs=1,
                             limit_train_batches=2, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, datamodule=CamVidDataModule(root=root, num_workers=workers, **AUGMENT))
        seen[workers] = torch.stack(model.seen)
    return seen


def failure_case(rank: int, world: int) -> dict:
    """Rank 1 crashes (not a user error) and rank zero then fails on gloo's consequence, as when rank 1's exit
    closed the connection: what each rank's run ends with (lit/ddp.py)."""
    from types import SimpleNamespace

    from bgremover.lit import ddp
    from bgremover.train import RunInterrupted

    trainer = SimpleNamespace(world_size=world, global_rank=rank, strategy=SimpleNamespace(launcher=None))
    if rank:
        settled = ddp.settle(trainer, ZeroDivisionError("division by zero"))
        dist.barrier()  # handed over before rank zero fails
    else:
        dist.barrier()
        settled = ddp.settle(trainer, RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer"))
    dist.barrier()  # rank zero has read rank 1's cause
    # then SIGTERM, which reaches every rank: each has its RunInterrupted (rank 1's handed over, as any error)
    interrupt = RunInterrupted(15, None, 3, 3, stage="start")
    stopped = ddp.settle(trainer, interrupt)
    return {"type": type(settled).__name__, "message": str(settled), "code": getattr(settled, "code", None),
            "interrupt": "same" if stopped is interrupt else type(stopped).__name__,
            "interrupt_code": getattr(stopped, "code", None)}


CASES = {
    "block": lambda r, w: block_case(r, w),
    "block_memory_efficient_channels_last": lambda r, w: block_case(r, w, memory_efficient=True, channels_last=True),
    "block_not_converted": lambda r, w: block_case(r, w, sync=False),
    "net": net_case,
}


def _worker(rank: int, world: int, port: int, out_dir: str, spec: dict) -> None:
    torch.set_num_threads(1)  # two ranks on a shared CPU
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: case(rank, world) for name, case in CASES.items()}
        results["lightning"] = lightning_case(rank, world, spec)
        results["augmentation"] = augmentation_case(rank, world, spec["one_frame_root"])
        results["failure"] = failure_case(rank, world)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lightning_spec(tmp_path_factory) -> dict:
    """Resolved data/model/trainer configs of a tiny FC-DenseNet run on a synthetic CamVid whose val and test
    splits (3 frames) do not divide among 2 ranks, and the net's weights, shared by every process."""
    tmp = tmp_path_factory.mktemp("lightning")
    root = write_camvid(tmp / "CamVid", counts={"train": 2, "val": 3, "test": 3})
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "model=tiramisu56", "model.net.down_blocks=[2,2]", "model.net.up_blocks=[2,2]",
            "model.net.bottleneck_layers=2", "model.net.growth_rate=8", "model.net.first_conv_channels=16",
            f"data.root={root}", "data.num_workers=0", "data.eval_batch_size=1", "trainer=cpu",
            "trainer.precision=32-true", f"paths.output_dir={tmp}",
        ])
    GlobalHydra.instance().clear()
    spec = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "model", "trainer")}
    spec["model"].update(mean=spec["data"]["mean"], std=spec["data"]["std"])
    torch.manual_seed(0)
    spec["weights"] = str(tmp / "weights.pt")
    torch.save(instantiate(spec["model"], _convert_="all").state_dict(), spec["weights"])
    labels = [np.asarray(Image.open(p)) for p in sorted((root / "testannot").glob("*.png"))]
    spec["test_pixels"] = int(sum((lab != VOID).sum() for lab in labels))
    # a CamVid whose train frames are copies of one: every rank's batches differ by their augmentation only
    one_frame = write_camvid(tmp / "OneFrame", counts={"train": 4, "val": 1, "test": 1})
    for image in sorted((one_frame / "train").glob("*.png"))[1:]:
        shutil.copy(one_frame / "train" / "train_000.png", image)
        shutil.copy(one_frame / "trainannot" / "train_000.png", one_frame / "trainannot" / image.name)
    spec["one_frame_root"] = str(one_frame)
    return spec


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, lightning_spec) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out), lightning_spec), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def _same_as_one_process(got: list[dict], ref: dict, batch_keys: tuple[str, ...]) -> None:
    for key in batch_keys:  # per-sample tensors: the ranks' rows, in order, are the combined batch
        _close(torch.cat([r[key] for r in got]), ref[key], key)
    for r, rank_result in enumerate(got):
        for name, grad in ref["param_grads"].items():
            _close(rank_result["param_grads"][name], grad, f"rank {r} grad of {name}")
        for name, value in ref["state"].items():  # running statistics and num_batches_tracked
            _close(rank_result["state"][name].double(), value.double(), f"rank {r} {name}")


@pytest.mark.parametrize("case", ["block", "block_memory_efficient_channels_last"])
def test_synced_dense_block_matches_one_process_on_combined_batch(ranks, case: str) -> None:
    ref = CASES[case](0, 1)
    got = [r[case] for r in ranks]
    _same_as_one_process(got, ref, ("out", "grad_a", "grad_b"))
    for r, rank_result in enumerate(got):
        _close(rank_result["mean"], ref["mean"], f"rank {r} batch mean")
        _close(rank_result["var"], ref["var"], f"rank {r} batch variance")
        assert rank_result["count"] == ref["count"] == BATCH * 6 * 7


def test_unconverted_block_keeps_per_rank_statistics(ranks) -> None:
    """Without convert_sync_batchnorm (sync_batchnorm off) every rank is one process on its own rows."""
    combined = block_case(0, 1, sync=False)
    for r, got in enumerate(r["block_not_converted"] for r in ranks):
        alone = block_case(0, 1, sync=False, rows=_rows(r, WORLD))
        _close(got["out"], alone["out"], f"rank {r} output")
        _close(got["mean"], alone["mean"], f"rank {r} batch mean")
        assert got["count"] == alone["count"] < combined["count"]


def test_ddp_net_matches_one_process_on_combined_batch(ranks) -> None:
    _same_as_one_process([r["net"] for r in ranks], net_case(0, 1), ("out", "grad_x"))


@pytest.fixture(scope="module")
def one_process(lightning_spec) -> dict:
    return lightning_case(0, 1, lightning_spec)


def test_lightning_ddp_tests_every_frame_once_and_logs_one_process_metrics(ranks, lightning_spec, one_process) -> None:
    one = one_process
    got = [r["lightning"] for r in ranks]
    # Every test frame on exactly one rank: no frame repeated to pad the ranks to equal length.
    assert sum(r["test_pixels"] for r in got) == lightning_spec["test_pixels"] == one["test_pixels"]
    for r, rank_result in enumerate(got):
        assert rank_result["test"]["test/frames"] == 3
        assert rank_result["test"].keys() == one["test"].keys()
        for key, value in one["test"].items():  # confusion-matrix metrics exactly, the loss up to summation order
            assert rank_result["test"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), f"rank {r} {key}"
        for key, value in one["val"].items():
            assert rank_result["val"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), f"rank {r} {key}"


def test_lightning_ddp_history_is_the_one_process_history(ranks, one_process) -> None:
    one = one_process["history"]
    for r, rank_result in enumerate(ranks):
        history = rank_result["lightning"]["history"]
        assert len(history) == len(one) == 1
        assert history[0].keys() == one[0].keys()
        for key, value in one[0].items():
            assert history[0][key] == pytest.approx(value, rel=1e-6, abs=1e-7), f"rank {r} {key}"


def test_ddp_ranks_train_the_frames_and_draws_of_one_process_between_them(ranks, lightning_spec) -> None:
    """Lightning swapped the train sampler for its DistributedSampler, whose plain indices drew each rank's crops,
    flips and jitter on from the dataset's seed (and began a resumed epoch over). Now each rank takes its stride of
    the epoch one process draws, frames and augmentation seeds alike: rank 0 its batches 0 and 2, rank 1 its 1 and
    3, with num_workers 0 and 1, and no two ranks draw alike."""
    from bgremover.data import CamVidDataModule

    for workers in (0, 1):
        dm = CamVidDataModule(root=lightning_spec["one_frame_root"], num_workers=workers, **AUGMENT)
        dm.setup("fit")
        one = torch.stack([x for x, _ in dm.train_dataloader()])  # one process, no trainer: epoch 0
        first, second = (r["augmentation"][workers] for r in ranks)
        assert first.shape == second.shape == (2, 1, 3, 32, 32) and one.shape == (4, 1, 3, 32, 32)
        assert torch.equal(first, one[0::2]), f"num_workers={workers}: rank 0 did not train one process's 0 and 2"
        assert torch.equal(second, one[1::2]), f"num_workers={workers}: rank 1 did not train one process's 1 and 3"
        for k in range(2):
            assert not torch.equal(first[k], second[k]), f"num_workers={workers}: batch {k} drawn alike on both ranks"


def test_a_crash_on_rank_1_is_what_rank_zero_reports_and_rank_1_stays_quiet(ranks) -> None:
    """Rank zero's summary.json and error line said gloo's "Connection closed by peer" (its own consequence of rank
    1's exit), and rank 1 printed its own line beside it: rank 1 now exits 1 quietly (its traceback in the log)
    and rank zero ends the run with rank 1's cause."""
    quiet, zero = ranks[1]["failure"], ranks[0]["failure"]
    assert quiet["type"] == "SystemExit" and quiet["code"] == 1
    assert zero["type"] == "RankFailed" and zero["message"] == "DDP rank 1 failed with ZeroDivisionError: division by zero"
    # an interrupt: rank zero says its own (and records the run as interrupted), rank 1 exits 143 without a line
    # (each said 'interrupted by SIGTERM ...; resume with', or rank zero 'RankFailed: ... RunInterrupted')
    assert zero["interrupt"] == "same" and (quiet["interrupt"], quiet["interrupt_code"]) == ("SystemExit", 143)
    from bgremover.errors import RankFailed
    from bgremover.utils import error_summary, is_user_error

    assert not is_user_error(RankFailed(zero["message"]))  # a crash: its summary.json kept, its type named
    assert error_summary(RankFailed(zero["message"])) == "RankFailed: " + zero["message"]


def test_training_with_spawned_ranks_is_refused_before_anything_starts(tmp_path) -> None:
    """trainer.strategy=ddp_spawn trained in the spawned ranks, whose steps, history and best epoch never came back:
    the run then ended "error: training took no step" with a failed run folder (a resumed one recorded step 0 and
    no history; a Ctrl-C said "interrupted at epoch 0, step 0" with last.ckpt at step 50). Now one line at the start,
    naming the strategy that works, and no run folder; ddp (re-run per rank) and one process are not refused."""
    from test_runs import TINY_RUN

    root = write_camvid(tmp_path / "CamVid", counts={"train": 4, "val": 2, "test": 2}, size=(32, 64))
    run = tmp_path / "logs" / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "bgremover.train", *TINY_RUN, *CPU_DDP, "trainer.strategy=ddp_spawn",
         f"data.root={root}", f"hydra.run.dir={run}"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "ranks) is not supported" in errors[0] and "use trainer=ddp" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not run.exists()


def test_runs_and_evals_with_multiprocessing_ranks_are_refused(tmp_path) -> None:
    """An eval under ddp_spawn counted its 2 test frames as 4 (each rank scored both) and called them PARTIAL."""
    from bgremover import checks
    from bgremover.errors import UserError

    root = write_camvid(tmp_path / "CamVid", counts={"train": 4, "val": 2, "test": 2}, size=(32, 64))
    base = [f"data.root={root}", "data.crop_size=[32,32]", *CPU_DDP]
    for strategy in ("ddp", "auto", "ddp_find_unused_parameters_true"):
        checks.validate_train(_trainer_cfg(tmp_path, [*base, f"trainer.strategy={strategy}"]))
    for strategy, said in [("ddp_spawn", "ddp_spawn (spawned"), ("ddp_fork", "ddp_fork (forked"),
                           ("ddp_notebook_find_unused_parameters_true", "parameters_true (forked"),
                           ("{_target_:pytorch_lightning.strategies.DDPStrategy,start_method:spawn}", "(spawned")]:
        with pytest.raises(UserError, match=re.escape(said)):
            checks.validate_train(_trainer_cfg(tmp_path, [*base, f"trainer.strategy={strategy}"]))
    ckpt = tmp_path / "any.ckpt"
    ckpt.write_bytes(b"x")  # the strategy is refused before the checkpoint is read
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"paths.output_dir={tmp_path}", f"ckpt_path={ckpt}",
                                                     f"data.root={root}", *CPU_DDP, "trainer.strategy=ddp_spawn"])
    GlobalHydra.instance().clear()
    with pytest.raises(UserError, match=re.escape("trainer.strategy=ddp_spawn (spawned ranks) is not supported")):
        checks.validate_eval(cfg)


def test_eval_loaders_give_each_rank_its_frames_without_repeats(tmp_path) -> None:
    """The datamodule's own val/test sampler under DDP (no process group needed: the ranks are simulated)."""
    from types import SimpleNamespace

    from bgremover.data import CamVidDataModule
    from bgremover.data.camvid import CamVidError

    root = write_camvid(tmp_path / "CamVid", counts={"train": 1, "val": 5, "test": 5})
    dm = CamVidDataModule(root=str(root), num_workers=0, eval_batch_size=2)
    for loader in (dm.val_dataloader, dm.test_dataloader):
        per_rank = []
        for rank in range(3):
            dm.trainer = SimpleNamespace(world_size=3, global_rank=rank)
            per_rank.append([int(i) for batch in loader().batch_sampler for i in batch])
        assert per_rank == [[0, 3], [1, 4], [2]]  # 5 frames over 3 ranks: nothing padded, nothing repeated
    dm.trainer = SimpleNamespace(world_size=6, global_rank=0)
    with pytest.raises(CamVidError, match="5 frames, fewer than the 6 DDP processes"):
        dm.test_dataloader()
    dm.trainer = None
    assert list(dm.test_dataloader().sampler) == [0, 1, 2, 3, 4]


def _trainer_cfg(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.output_dir={tmp_path}", *overrides])
    GlobalHydra.instance().clear()
    return cfg


def test_relaunch_check_tells_subprocess_ddp_from_what_can_run_in_a_sweep(tmp_path, monkeypatch) -> None:
    from bgremover.train import ddp_relaunch_conflict

    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true"]
    message = ddp_relaunch_conflict(_trainer_cfg(tmp_path, [*ddp, "trainer.devices=2"]))
    assert message and "-m" in message and "tasks_per_node=2" in message
    assert ddp_relaunch_conflict(_trainer_cfg(tmp_path, [*ddp, "trainer.devices=1"])) is None
    assert ddp_relaunch_conflict(_trainer_cfg(tmp_path, [*ddp, "trainer.devices=2", "trainer.strategy=ddp_spawn"])) is None
    # ranks started by the cluster (torchrun, SLURM tasks) are not re-launched by Lightning
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert ddp_relaunch_conflict(_trainer_cfg(tmp_path, [*ddp, "trainer.devices=2"])) is None


def test_sweep_with_subprocess_ddp_is_refused_in_seconds(tiny_camvid, tmp_path) -> None:
    """`make sweep ... ARGS="trainer=ddp"` on two CPU processes: before the check, rank 1 re-ran the whole sweep."""
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "bgremover.train", "-m", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.precision=32-true", "trainer.sync_batchnorm=false", f"data.root={tiny_camvid}", "logger=csv",
         f"paths.log_dir={tmp_path}", "seed=1,2"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    elapsed = time.time() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "under -m" in errors[0] and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("summary.json"))  # no job ran
    assert len(list(tmp_path.glob("*/multiruns/*"))) == 1  # and no rank started a sweep of its own
    assert elapsed < 60


CPU_DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.sync_batchnorm=false",
           "trainer.precision=32-true"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, rank", [("ddp", 0), ("ddp", 1)])
def test_a_bad_frame_on_one_ddp_rank_is_one_error_line_naming_it(tmp_path, strategy, rank) -> None:
    """A truncated val frame in one rank's shard (the unpadded sampler deals val frame r to rank r). Rank 1's:
    rank zero said and recorded gloo's "Connection closed by peer", no cause. Rank zero's: it removed the run folder while rank 1 went on
    and printed that gloo error too, with a traceback "in" a train.log that was gone. Now: the frame, once, and no
    folder, as one process says a bad frame."""
    from test_runs import TINY_RUN

    root = write_camvid(tmp_path / "CamVid", counts={"train": 4, "val": 2, "test": 2}, size=(32, 64))
    bad = root / "val" / f"val_{rank:03d}.png"
    bad.write_bytes(bad.read_bytes()[:200])
    run = tmp_path / "logs" / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "bgremover.train", *TINY_RUN, *CPU_DDP, f"trainer.strategy={strategy}",
         f"data.root={root}", f"hydra.run.dir={run}"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"})
    errors = [line[line.index("error:"):] for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert errors == [f"error: unreadable or truncated image: {bad} (image file is truncated)"], proc.stderr[-3000:]
    time.sleep(2)  # a rank left running would write into the folder after rank zero removed it
    assert not run.exists(), sorted(run.rglob("*"))



class SignalOnRank(pl.Callback):
    """At training step `step`: SIGTERM from rank `rank` to itself alone (a scheduler stopping one task, `kill` of
    one pid), at a point of its own in the step; or, with `ctrl_c`, SIGINT from rank 0 to the run's process group,
    as a terminal's Ctrl-C reaches every rank, each wherever it is."""

    def __init__(self, rank: int, step: int, ctrl_c: bool = False) -> None:
        self.rank, self.step, self.ctrl_c = rank, step, ctrl_c

    def on_train_batch_end(self, trainer, *_) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            import signal

            if self.ctrl_c:
                os.killpg(os.getpgrp(), signal.SIGINT)
            else:
                os.kill(os.getpid(), signal.SIGTERM)


def _ddp_run(args: list[str], root: Path, run: Path) -> subprocess.CompletedProcess:
    from test_runs import TINY_RUN

    env = {**os.environ, "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(  # a session of its own: the process group a Ctrl-C reaches is the run's
        [sys.executable, "-m", "bgremover.train", *TINY_RUN, *CPU_DDP, "trainer.max_epochs=3", "test=false",
         f"data.root={root}", f"hydra.run.dir={run}", *args],
        capture_output=True, text=True, timeout=240, cwd=REPO, env=env, start_new_session=True)


def _data_path(data: str) -> list[str]:
    return [f"data={data}", "data.num_workers=0", "data.batch_size=2", "data.eval_batch_size=1",
            "data.crop_size=[32,32]"] + (["data.cache=false"] if data == "camvid_resident" else [])


@pytest.fixture(scope="module")
def left_alone(tmp_path_factory):
    """A tiny CamVid whose 3 val frames the ranks validate in 2 and 1 batches (the unpadded sampler, so a
    collective per val batch hangs), and a 2-rank run of 3 epochs on it left alone, per data path."""
    tmp = tmp_path_factory.mktemp("alone")
    root = write_camvid(tmp / "CamVid", counts={"train": 8, "val": 3, "test": 2}, size=(32, 64))
    runs: dict[str, Path] = {}

    def run(data: str) -> Path:
        if data not in runs:
            runs[data] = tmp / data
            proc = _ddp_run(_data_path(data), root, runs[data])
            assert proc.returncode == 0, proc.stderr[-3000:]
            # the plan says the batch of a step: data.batch_size is each rank's (it said "batch 2")
            assert "batch 2 of 32×32 crops per rank × 2 ranks" in (runs[data] / "train.log").read_text()
        return runs[data]

    return root, run


@pytest.mark.slow
@pytest.mark.parametrize("sig, rank, step, data", [("SIGTERM", 0, 4, "camvid"), ("SIGTERM", 1, 3, "camvid_resident"),
                                                   ("SIGINT", 0, 3, "camvid")])
def test_a_signal_to_ddp_ranks_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path, left_alone, sig, rank,
                                                                              step, data) -> None:
    """Lightning's SIGTERM handler broadcasts from inside the handler, wherever the signal landed: its broadcast
    paired with another collective of the other rank (the next step's, a gradient all-reduce), so one rank stopped
    and the other waited on it (rank 1 alone: rank zero then failed on gloo's "Connection closed by peer" and named
    rank 1's interrupt as a crash). A terminal's Ctrl-C stopped each rank wherever it was. Now every rank stops
    where the same step ends, and the run says its interrupt and its resume line once, exit 143 (130), as one
    process does.

    And its last.ckpt is the step it stopped at (it was the last epoch's end: step 2, the steps after it lost), and
    the printed resume line trains on to the weights and val history of the run left alone, bit for bit (they
    differed in 80 of 92 tensors: Lightning's DistributedSampler began the epoch over, with augmentations drawn on
    from the dataset's seed). Step 4 ends an epoch, with its validation due: the ranks stop before it (2 and 1 val
    batches, which Lightning's per-val-batch check cut short on one rank only), and the resume validates first."""
    root, alone = left_alone
    run = tmp_path / "run"
    start = time.monotonic()
    proc = _ddp_run([*_data_path(data), "+callbacks.stop._target_=test_ddp.SignalOnRank", f"+callbacks.stop.rank={rank}",
                     f"+callbacks.stop.step={step}", f"+callbacks.stop.ctrl_c={sig == 'SIGINT'}"], root, run)
    elapsed = time.monotonic() - start
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == {"SIGTERM": 143, "SIGINT": 130}[sig], proc.stderr[-3000:]
    assert len(errors) == 1 and f"interrupted by {sig} at epoch" in errors[0] and "resume with" in errors[0], \
        proc.stderr[-3000:]
    assert "RankFailed" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["global_step"] == step, summary
    assert elapsed < 120, f"{elapsed:.0f} s: a rank waited on a collective the other never joined"
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == step

    import shlex

    (args,) = [w.removeprefix("ARGS=") for w in shlex.split(errors[0].split("resume with: ")[1])
               if w.startswith("ARGS=")]
    resumed = _ddp_run(shlex.split(args), root, run)  # the printed line (its own data and stop settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
                 for r in (run, alone(data)))
    assert got["global_step"] == want["global_step"] == 6
    differ = [k for k, v in want["state_dict"].items() if not torch.equal(got["state_dict"][k], v)]
    assert not differ, f"{len(differ)} of {len(want['state_dict'])} tensors differ from the run left alone"
    history = [json.loads((r / "summary.json").read_text())["history"] for r in (run, alone(data))]
    assert history[0]["val/mIoU"] == history[1]["val/mIoU"] and len(history[1]["val/mIoU"]) == 3
