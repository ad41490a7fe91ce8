"""Scratch buffers for kernels whose programs coordinate through memory: arrival counters that the
kernels leave at zero (the last program to arrive resets its counter) and split-K partials that are
written before they are read. One buffer per (device, user, dtype), shared by every launch: the
launches run one after another on the compute stream.

A buffer grows by appending a larger one and is never freed: a CUDA graph that captured an older
buffer keeps using it (zero, as the kernels leave it), and no allocation happens inside a capture
unless a larger buffer is first needed there.
"""

from __future__ import annotations

import torch

_held: dict[tuple[torch.device, str, torch.dtype], list[torch.Tensor]] = {}


def scratch(device: torch.device | str, user: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A zero-initialised buffer of at least `numel` elements, the same one on every call that fits."""
    held = _held.setdefault((torch.device(device), user, dtype), [])
    if not held or held[-1].numel() < numel:
        held.append(torch.zeros(max(numel, 64, 2 * held[-1].numel() if held else 0), dtype=dtype, device=device))
    return held[-1]
