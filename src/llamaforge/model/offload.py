"""Keep tensors saved for the backward pass in CPU memory, sized to what they hold.

`torch.autograd.graph.save_on_cpu(pin_memory=True)` takes its page-locked buffers from
PyTorch's caching host allocator, which rounds every request up to the next power of two:
at 350,000 tokens a Llama-3.1-8B layer input (2.87 GB) takes a 4 GiB buffer, and 32 of them
ask for 137 GB of host memory for 92 GB of data (measured: the process was killed by the
host's out-of-memory killer on a 125 GiB machine, while 262,144 tokens, exactly 2 GiB a
layer, trained). Here a tensor goes to pinned memory only where that rounding wastes little;
otherwise to ordinary (pageable) memory of its exact size, whose copies are slower but whose
footprint is what the data needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Pinned only if the power-of-two buffer is at most this much larger than the tensor.
MAX_PINNED_WASTE = 1.25
SMALL_BYTES = 1 << 20  # below this, offloading is not worth a copy: keep it where it is


def pinned_size(nbytes: int) -> int:
    """Bytes the caching host allocator reserves for a pinned request of `nbytes`."""
    return 1 << max(0, (nbytes - 1).bit_length())


def use_pinned(nbytes: int) -> bool:
    """Pinned (fast, asynchronous copies) unless its rounding would waste too much memory."""
    return pinned_size(nbytes) <= MAX_PINNED_WASTE * nbytes


def _pack(t: torch.Tensor) -> tuple[torch.device, torch.Tensor, bool] | torch.Tensor:
    nbytes = t.numel() * t.element_size()
    if t.device.type == "cpu" or nbytes < SMALL_BYTES:
        return t
    pinned = use_pinned(nbytes)
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pinned)
    host.copy_(t, non_blocking=pinned)
    return t.device, host, pinned


def _unpack(packed: tuple[torch.device, torch.Tensor, bool] | torch.Tensor) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    dev, host, pinned = packed
    return host.to(dev, non_blocking=pinned)


@contextlib.contextmanager
def offload_saved_tensors() -> Iterator[None]:
    """Within this block, tensors autograd saves go to CPU memory and come back on use."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield
