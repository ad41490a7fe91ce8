"""How much memory the KV pool gets.

SGLang's definition of --mem-fraction-static: weights + KV pool take that fraction of the
device's memory; the rest is left for activations, CUDA graphs and (on a Jetson, whose GPU
shares memory with the CPU) the OS and other programs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

GB = 1 << 30


def host_memory_available() -> int:
    """Bytes the OS can still give (MemAvailable), from /proc/meminfo."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_memory(device: str) -> tuple[int, int]:
    """(available, total) bytes on `device`, counted before the weights are loaded."""
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return free, total
    avail = host_memory_available()
    return avail, avail


def default_mem_fraction(device: str) -> float:
    return 0.85 if device == "cuda" else 0.3


@dataclass
class MemoryPlan:
    device: str
    total_bytes: int
    mem_fraction_static: float
    weight_bytes: int
    kv_bytes_per_token: int
    max_total_tokens: int

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.max_total_tokens

    def summary(self) -> str:
        return (f"memory plan: {self.total_bytes / GB:.2f} GB usable × {self.mem_fraction_static:.2f} static → "
                f"weights {self.weight_bytes / GB:.2f} GB, KV pool {self.kv_bytes / GB:.2f} GB "
                f"({self.max_total_tokens} tokens, {self.kv_bytes_per_token / 1024:.1f} KB/token)")


class NotEnoughMemoryError(RuntimeError):
    pass


def plan_kv_pool(device: str, total_bytes: int, available_bytes: int, weight_bytes: int,
                 kv_bytes_per_token: int, mem_fraction_static: float | None, max_total_tokens: int | None,
                 context_len: int) -> MemoryPlan:
    """`available_bytes` is read after the weights are loaded: the pool gets what is left once
    (1 - fraction) of the total is set aside, so memory other processes hold is respected."""
    frac = mem_fraction_static or default_mem_fraction(device)
    budget = available_bytes - int(total_bytes * (1 - frac))
    by_memory = budget // kv_bytes_per_token if budget > 0 else 0
    tokens = min(by_memory, max_total_tokens) if max_total_tokens else by_memory
    if max_total_tokens and max_total_tokens > by_memory:
        logger.warning("--max-total-tokens %d is more than the memory plan allows (%d): using %d",
                       max_total_tokens, by_memory, tokens)
    if tokens < 16:
        raise NotEnoughMemoryError(
            f"no room for a KV cache: {total_bytes / GB:.2f} GB × {frac:.2f} leaves {budget / GB:.2f} GB "
            f"after {weight_bytes / GB:.2f} GB of weights and what other programs hold. Raise --mem-fraction-static, "
            "lower --context-length, or quantize (--torchao-config int4wo-128)")
    if tokens < context_len:
        logger.warning("the KV pool (%d tokens) is smaller than the context length (%d): long requests "
                       "will be refused", tokens, context_len)
    return MemoryPlan(device, total_bytes, frac, weight_bytes, kv_bytes_per_token, tokens)
