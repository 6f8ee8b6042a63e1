"""Memory that a dense block's large per-step tensors reuse from one training step to the next, on CPU.

Why: glibc hands every block over 32 MiB back to the kernel when it is freed (``mmap``), so a tensor of that
size allocated afresh each step is page-faulted in afresh each step, and the kernel zeroes every page first.
An FC-DenseNet103 block buffer at 2 x 256 x 224 x 224 in bf16 is 51 MiB; its saved activations, its gradient
buffer and the convolutions' input gradients are of the same order. On a 2-core EPYC with AVX-512-BF16 that
faulting cost 13 % of an FC-DenseNet103 bf16 training step (1.69 vs 1.47 s at 2x224x224, measured against a run
whose allocator keeps freed memory, as ``benchmarks/tiramisu_speed.py --malloc tuned`` does). A GPU's caching
allocator never pays it; this is the same idea for the few tensors a block allocates by name.

A slot is reused only when nothing but the workspace holds its storage: the previous step's outputs, saved
tensors and gradients are gone. Otherwise (two forwards before one backward, a caller still holding an
output) the slot gets new memory and the old storage lives on with its users, so reuse never changes a
result. The memory stays resident between steps, as in a caching allocator; ``clear()`` gives it back, and
the block clears its workspace when it leaves training mode. A slot holds its memory after its tensor's last
use, so a block gives the workspace the tensors that are alive at the step's peak anyway (its buffer and saved
activations) and, only in 16 bits, its gradient buffer: kept until the next step, fp32 gradient buffers put 18 %
on the peak of FC-DenseNet103 at 2x224x224 (970 vs 1148 MiB, ``--bf16-route emulated``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # private; a torch without it never reuses


def _use_count(storage: torch.UntypedStorage) -> int:
    """Tensors and storage objects holding ``storage`` (1: only the workspace's own reference)."""
    return 2 if _STORAGE_USE_COUNT is None else _STORAGE_USE_COUNT(storage._cdata)


class Workspace:
    """Named slots of reusable storage; ``empty(key, ...)`` is ``torch.empty`` that reuses the slot's memory."""

    def __init__(self) -> None:
        self._slots: dict[str, torch.UntypedStorage] = {}

    def empty(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> Tensor:
        if device.type != "cpu" or torch.compiler.is_compiling():  # caching allocators (CUDA), traced graphs
            return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
        nbytes = math.prod(shape) * dtype.itemsize
        storage = self._slots.get(key)
        if storage is None or storage.nbytes() < nbytes or _use_count(storage) > 1:
            storage = torch.UntypedStorage(nbytes, device=device)
            self._slots[key] = storage
        stride = torch.empty(shape, device="meta", memory_format=memory_format).stride()
        return torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape, stride)

    def nbytes(self) -> int:
        """Bytes the workspace holds."""
        return sum(s.nbytes() for s in self._slots.values())

    def clear(self) -> None:
        """Drop every slot (memory still in use is freed when its last user lets go)."""
        self._slots.clear()

    def __deepcopy__(self, memo: dict) -> Workspace:  # a copied module starts empty instead of copying scratch
        return Workspace()

    def __getstate__(self) -> dict:
        return {"_slots": {}}
