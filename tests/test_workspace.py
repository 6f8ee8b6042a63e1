"""The dense block's reusable training memory (bgremover.nets.workspace): reuse only when free, same results."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomise_bn

from bgremover.nets import dense_block
from bgremover.nets.tiramisu import DenseBlock
from bgremover.nets.workspace import Workspace

_REF_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_tiramisu.py"
_spec = importlib.util.spec_from_file_location("reference_tiramisu", _REF_PATH)
ref = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("reference_tiramisu", ref)
_spec.loader.exec_module(ref)

CPU = torch.device("cpu")


def test_a_free_slot_is_reused_and_a_held_one_is_not() -> None:
    ws = Workspace()
    a = ws.empty("x", (2, 3, 4, 5), torch.float32, CPU)
    ptr = a.data_ptr()
    a.fill_(7.0)
    b = ws.empty("x", (2, 3, 4, 5), torch.float32, CPU)  # `a` still alive: new memory, `a` untouched
    assert b.data_ptr() != ptr
    b.fill_(1.0)
    assert torch.equal(a, torch.full_like(a, 7.0))
    del a, b
    c = ws.empty("x", (2, 3, 4, 5), torch.float32, CPU)  # free again: the slot's memory, reused from now on
    ptr = c.data_ptr()
    del c
    assert ws.empty("x", (2, 3, 4, 5), torch.float32, CPU).data_ptr() == ptr
    view = ws.empty("x", (2, 3, 4, 5), torch.float32, CPU)[:, 1]  # a view still holds the storage
    assert ws.empty("x", (2, 3, 4, 5), torch.float32, CPU).data_ptr() != ptr
    assert ws.nbytes() == 2 * 3 * 4 * 5 * 4
    del view


def test_reuse_takes_the_same_memory_and_grows_when_needed() -> None:
    ws = Workspace()
    ptr = ws.empty("x", (4, 8), torch.float32, CPU).data_ptr()
    assert ws.empty("x", (8, 4), torch.float32, CPU).data_ptr() == ptr
    assert ws.empty("x", (16, 4), torch.bfloat16, CPU).data_ptr() == ptr  # same bytes, another dtype
    assert ws.empty("x", (8, 8), torch.float32, CPU).data_ptr() != ptr  # larger: new storage
    assert ws.nbytes() == 8 * 8 * 4


def test_channels_last_strides_and_clear() -> None:
    ws = Workspace()
    t = ws.empty("x", (2, 5, 3, 4), torch.bfloat16, CPU, torch.channels_last)
    assert t.shape == (2, 5, 3, 4) and t.dtype == torch.bfloat16
    assert t.stride() == torch.empty(2, 5, 3, 4, memory_format=torch.channels_last).stride()
    ws.clear()
    assert ws.nbytes() == 0


def test_block_reuses_its_buffer_across_training_steps_and_frees_it_for_eval() -> None:
    block = DenseBlock(4, 3, 2, dropout=0.0)
    x = torch.randn(2, 4, 6, 5)
    out = block(x)
    ptr = out.data_ptr()
    out.sum().backward()
    del out
    out = block(x)
    assert out.data_ptr() == ptr  # the second step wrote into the first step's buffer
    assert block.workspace.nbytes() > 0
    held = out  # an output still held: the next step must not write into it
    before = held.detach().clone()
    out2 = block(x * 2)
    assert out2.data_ptr() != held.data_ptr() and torch.equal(held.detach(), before)
    block.eval()
    assert block.workspace.nbytes() == 0
    copied = copy.deepcopy(block.train())
    assert copied.workspace is not block.workspace


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_two_forwards_before_one_backward_match_the_reference(memory_efficient: bool) -> None:
    """Reuse must never change a result: the first forward's buffers are still in use by its graph when the
    second runs (as with a loss over two passes), and both backwards equal the torch.cat block's."""
    ours = DenseBlock(5, 3, 4, dropout=0.0, memory_efficient=memory_efficient).double()
    randomise_bn(ours)
    theirs = ref.RefDenseBlock(5, 3, 4, dropout=0.0).double()
    theirs.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(4)
    x1, x2 = (torch.randn(2, 5, 6, 7, dtype=torch.float64, generator=gen) for _ in range(2))
    for model in (ours, theirs):
        for _ in range(2):  # the second step runs on reused memory
            model.zero_grad()
            loss = (model(x1) * 3).sum() + model(x2).square().sum()
            loss.backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


_FAULTS = """
import resource, torch
x = torch.randn(2, 96, 224, 224, requires_grad=True)  # 37 MiB tensors: over glibc's 32 MiB mmap ceiling
def faults_of_a_step():  # forward and backward through elementwise ops: the allocations of a step, not its FLOPs
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    (x * 1.5).relu().square().mean().backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_step(), faults_of_a_step()
print(min(faults_of_a_step() for _ in range(3)))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="glibc/Linux allocator behaviour")
def test_keep_memory_env_stops_refaulting_large_tensors() -> None:
    """What `make train` / `make remover` run training with: after warm-up a forward and backward pass over
    2x96x224x224 tensors faults in no new pages (glibc's default: ~85,000 4-KiB pages every step; a conv net's
    step took 4x the time to show the same)."""
    import os
    import subprocess

    from bgremover.utils import KEEP_MEMORY_ENV

    def faults(extra: dict[str, str]) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | extra
        out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, env=env, check=True)
        return int(out.stdout.split()[-1])

    assert faults({}) > 20_000  # fewer only where huge pages back the mappings
    # a second measurement where the first saw one tensor's pages (9408 once, on a 2-core machine at load 7): the
    # default allocator faults ~85,000 in each of them
    kept = faults(KEEP_MEMORY_ENV)
    assert (kept if kept < 1000 else faults(KEEP_MEMORY_ENV)) < 1000


def test_make_train_and_remover_training_keep_memory(monkeypatch, tmp_path) -> None:
    import subprocess

    from bgremover import train_remover
    from bgremover.utils import KEEP_MEMORY_ENV

    make = subprocess.run(["make", "-n", "train", "sweep", "reproduce-default", "speedruns", "EXP=x"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=True).stdout
    trains = [line for line in make.splitlines() if "-m bgremover.train" in line]
    assert len(trains) == 4
    assert all(f"{k}={v}" in line for line in trains for k, v in KEEP_MEMORY_ENV.items())

    seen: list[dict] = []

    class FakeTraining:  # records the environment the training process would get, then "fails"
        def __init__(self, cmd, env):
            seen.append(env)

        def wait(self):
            return 3

    monkeypatch.setattr(train_remover.subprocess, "Popen", FakeTraining)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()  # the layout is checked before the training starts
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "7")  # a caller's own setting wins
    assert train_remover.main([str(tmp_path), "--run-dir", str(tmp_path / "run")]) == 3
    assert seen[0]["MALLOC_MMAP_MAX_"] == "7"
    assert seen[0]["MALLOC_TRIM_THRESHOLD_"] == KEEP_MEMORY_ENV["MALLOC_TRIM_THRESHOLD_"]


def test_make_remover_keep_memory_empty_leaves_glibcs_defaults(tmp_path, monkeypatch):
    """`make remover KEEP_MEMORY=` trained with MALLOC_MMAP_MAX_=0 all the same (train_remover added the settings
    back), while `make train KEEP_MEMORY=` leaves glibc's defaults: now both do; the default still sets them."""
    import subprocess

    from bgremover import train_remover
    from bgremover.utils import KEEP_MEMORY_ENV

    folder, seen = tmp_path / "data", []
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()  # the layout is checked before the training starts

    class Stop(Exception):
        """Raised by the stand-in training: the environment it was given is all this test needs."""

    def popen(cmd, env):
        seen.append(env)
        raise Stop

    for key in KEEP_MEMORY_ENV:
        monkeypatch.delenv(key, raising=False)
    make = {keep: subprocess.run(["make", "-n", "remover", f"DATA={folder}", *keep], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                                 text=True, timeout=60).stdout.split("train_remover", 1)[1].split()
            for keep in ((), ("KEEP_MEMORY=",))}
    monkeypatch.setattr(subprocess, "Popen", popen)  # after make -n, which runs through it
    for keep, words in make.items():
        with pytest.raises(Stop):
            train_remover.main([w.strip('"') for w in words if w != "\\"] + ["--run-dir", str(tmp_path / "run")])
        env = seen.pop()
        assert all(env.get(k) == (None if keep else v) for k, v in KEEP_MEMORY_ENV.items()), (keep, words)
        assert ("KEEP_MEMORY= " in env[train_remover.RESUME_ENV]) == bool(keep)


@pytest.mark.parametrize("native_bf16", [False, True])  # the routes of CPUs with and without bf16 units
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_a_second_training_step_takes_all_its_memory_from_the_first_steps_slots(memory_efficient: bool,
                                                                                native_bf16: bool, monkeypatch) -> None:
    """The point of the workspace: from the second step on, a block's buffer, saved activations and (in bf16) its
    gradient buffer reuse the previous step's memory. Two of them sharing a name (one slot for every layer's
    activation, or the gradient buffer in the block buffer's slot, still held) got fresh memory every step, each
    faulted in afresh, and no test noticed: every number stays the same, only the speed is lost."""
    monkeypatch.setattr(dense_block, "_CPU_NATIVE_BF16", native_bf16)
    block = DenseBlock(4, 3, 2, dropout=0.0, memory_efficient=memory_efficient).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 6, 5).contiguous(memory_format=torch.channels_last)

    def step() -> dict[str, int]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
        out.float().sum().backward()
        return {k: s.data_ptr() for k, s in block.workspace._slots.items()}

    first = step()
    # the gradient buffer is kept where it is 16-bit (native bf16); emulated bf16 holds it in fp32, freed each step
    assert ("grad" in first) is native_bf16 and ("act0" in first) is not memory_efficient
    assert step() == first and step() == first
