"""How much memory the KV pool gets, and whether a model fits at all.

SGLang's definition of --mem-fraction-static: weights + KV pool take that fraction of the
device's memory; the rest is left for activations, CUDA graphs and other programs.

On a Jetson the GPU has no memory of its own: it allocates from the RAM that the OS, the desktop
and every other program share. There "the device's memory" is what the OS can give when edgelm
starts (MemAvailable in /proc/meminfo), and the plan is

    what the OS can give = weights + KV pool            (× mem_fraction_static)
                         + CUDA graphs + activations + OS reserve   (the rest)

`preflight_check` runs the same plan before any weight is loaded, from an estimate of the
weights' size, and refuses a model that cannot fit with the numbers that say why.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

GB = 1 << 30
MIN_KV_TOKENS = 16


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


def host_memory_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@functools.lru_cache(maxsize=1)
def cuda_is_integrated() -> bool:
    """True when CUDA device 0 shares the host's RAM (Jetson; torch's `is_integrated`)."""
    import torch

    if not torch.cuda.is_available():
        return False
    return bool(getattr(torch.cuda.get_device_properties(0), "is_integrated", False))


def device_memory(device: str, unified_memory: bool | None = None) -> tuple[int, int]:
    """(available, total) bytes on `device`, counted before the weights are loaded.

    On an integrated GPU (Jetson) both come from /proc/meminfo: cudaMemGetInfo there leaves out
    reclaimable page cache and swap, while MemAvailable is the kernel's own estimate of what it
    can hand out."""
    if device == "cuda":
        if unified_memory is None:
            unified_memory = cuda_is_integrated()
        if unified_memory:
            return host_memory_available(), host_memory_total()
        import torch

        free, total = torch.cuda.mem_get_info()
        return free, total
    avail = host_memory_available()
    return avail, avail


def default_mem_fraction(device: str, unified_memory: bool = False) -> float:
    if device != "cuda":
        return 0.3
    return 0.8 if unified_memory else 0.85


def default_os_reserve(total_bytes: int) -> int:
    """RAM kept free for the OS (page cache, daemons, the tokenizer process) on unified memory:
    5% of the total, at least 0.5 GB and at most 2 GB."""
    return int(min(2 * GB, max(GB // 2, 0.05 * total_bytes)))


@dataclass
class MemoryPlan:
    device: str
    total_bytes: int
    mem_fraction_static: float
    weight_bytes: int
    kv_bytes_per_token: int
    max_total_tokens: int
    unified_memory: bool = False
    givable_bytes: int = 0  # unified: what the OS could give at start-up; else total_bytes
    cuda_graph_bytes: int = 0
    activation_bytes: int = 0
    os_reserve_bytes: int = 0
    headroom_bytes: int = 0  # what weights + KV leave free
    notes: list[str] = field(default_factory=list)

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.max_total_tokens

    @property
    def static_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def summary_lines(self) -> list[str]:
        g = lambda b: f"{b / GB:.2f} GB"  # noqa: E731
        kv = (f"KV pool {g(self.kv_bytes)} ({self.max_total_tokens:,} tokens × "
              f"{self.kv_bytes_per_token / 1024:.1f} KB)")
        rest = (f"CUDA graphs {g(self.cuda_graph_bytes)} + activations {g(self.activation_bytes)}")
        if self.unified_memory:
            lines = [
                f"memory plan (unified memory: GPU and CPU share {g(self.total_bytes)} of RAM)",
                f"  the OS can give   {g(self.givable_bytes)}  "
                f"({g(self.total_bytes - self.givable_bytes)} held by the OS and other programs)",
                f"  static × {self.mem_fraction_static:.2f}     {g(self.static_bytes)}  = weights "
                f"{g(self.weight_bytes)} + {kv}",
                f"  left free         {g(self.headroom_bytes)}  for {rest} + OS reserve "
                f"{g(self.os_reserve_bytes)}",
            ]
        else:
            lines = [
                f"memory plan ({self.device}: {g(self.total_bytes)} total, static × "
                f"{self.mem_fraction_static:.2f})",
                f"  static            {g(self.static_bytes)}  = weights {g(self.weight_bytes)} + {kv}",
                f"  left free         {g(self.headroom_bytes)}  for {rest} and other processes",
            ]
        return lines + [f"  note: {n}" for n in self.notes]

    def summary(self) -> str:
        return "\n".join(self.summary_lines())


class NotEnoughMemoryError(RuntimeError):
    pass


def plan_kv_pool(device: str, total_bytes: int, available_bytes: int, weight_bytes: int,
                 kv_bytes_per_token: int, mem_fraction_static: float | None, max_total_tokens: int | None,
                 context_len: int, *, unified_memory: bool | None = None, cuda_graph_bytes: int = 0,
                 activation_bytes: int = 0, os_reserve_bytes: int | None = None,
                 quantize: str | None = "int4wo-128") -> MemoryPlan:
    """Size the KV pool. `available_bytes` is read after the weights are loaded. `quantize`: the
    --torchao-config a refusal suggests (None: the weights are quantized already, suggest none).

    Discrete GPU / CPU: the pool gets what is left once (1 - fraction) × total is set aside, so
    memory other processes hold is respected. Unified memory (Jetson): the fraction applies to
    what the OS could give before the weights (available + weights), not to MemTotal, because a
    desktop or other programs may hold several GB of the shared RAM. Either way the part left
    free is at least CUDA graphs + activations (+ the OS reserve on unified memory)."""
    if unified_memory is None:
        unified_memory = device == "cuda" and cuda_is_integrated()
    frac = mem_fraction_static or default_mem_fraction(device, unified_memory)
    if unified_memory:
        givable = available_bytes + weight_bytes
        os_reserve = default_os_reserve(total_bytes) if os_reserve_bytes is None else os_reserve_bytes
        left_by_fraction = int(givable * (1 - frac))
    else:
        givable = total_bytes
        os_reserve = os_reserve_bytes or 0
        left_by_fraction = int(total_bytes * (1 - frac))
    must_leave = cuda_graph_bytes + activation_bytes + os_reserve
    notes = []
    if must_leave > left_by_fraction:
        notes.append(f"--mem-fraction-static {frac:.2f} would leave {left_by_fraction / GB:.2f} GB, less than the "
                     f"{must_leave / GB:.2f} GB that CUDA graphs, activations and the OS need: the KV pool is "
                     "smaller to make room")
    budget = available_bytes - max(left_by_fraction, must_leave)
    by_memory = budget // kv_bytes_per_token if budget > 0 else 0
    tokens = min(by_memory, max_total_tokens) if max_total_tokens else by_memory
    if max_total_tokens and max_total_tokens > by_memory:
        logger.warning("--max-total-tokens %d is more than the memory plan allows (%d): using %d",
                       max_total_tokens, by_memory, tokens)
    if tokens < MIN_KV_TOKENS:
        raise NotEnoughMemoryError(_refusal(device, unified_memory, total_bytes, givable, frac, weight_bytes,
                                            budget, must_leave, left_by_fraction, quantize))
    if tokens < context_len:
        logger.warning("the KV pool (%d tokens) is smaller than the context length (%d): long requests "
                       "will be refused", tokens, context_len)
    kv = tokens * kv_bytes_per_token
    headroom = available_bytes - kv
    return MemoryPlan(device, total_bytes, frac, weight_bytes, kv_bytes_per_token, int(tokens),
                      unified_memory=unified_memory, givable_bytes=givable, cuda_graph_bytes=cuda_graph_bytes,
                      activation_bytes=activation_bytes, os_reserve_bytes=os_reserve, headroom_bytes=headroom,
                      notes=notes)


def _refusal(device: str, unified: bool, total: int, givable: int, frac: float, weights: int, budget: int,
             must_leave: int, left_by_fraction: int, quantize: str | None = "int4wo-128") -> str:
    g = lambda b: f"{b / GB:.2f} GB"  # noqa: E731
    if unified:
        where = (f"the OS can give {g(givable)} of the {g(total)} of RAM that the GPU shares; "
                 f"× {frac:.2f} static = {g(givable * frac)}")
    else:
        where = f"{device} has {g(total)}; × {frac:.2f} static = {g(total * frac)}"
    keep = max(must_leave, left_by_fraction)
    return (f"not enough memory for this model: {where}; the weights take {g(weights)}, {g(keep)} stays free "
            f"(CUDA graphs, activations{', OS' if unified else ''}), which leaves {g(max(budget, 0))} "
            f"for the KV cache (short by {g(max(0, -budget))}; at least {MIN_KV_TOKENS} tokens are needed). "
            + (f"Quantize (--torchao-config {quantize}), pick a smaller model, " if quantize
               else "Pick a smaller model, ")
            + ("stop other programs (the desktop: `sudo systemctl isolate multi-user.target`), "
               if unified else "")
            + "or raise --mem-fraction-static")


def preflight_check(memory, weight_bytes: int, kv_bytes_per_token: int, context_len: int,
                    mem_fraction_static: float | None = None, *, device: str | None = None,
                    unified_memory: bool | None = None, max_total_tokens: int | None = None,
                    cuda_graph_bytes: int = 0, activation_bytes: int = 0,
                    os_reserve_bytes: int | None = None,
                    alternatives: dict[str, int] | None = None, quantize: str | None = "int4wo-128") -> MemoryPlan:
    """The memory plan the server would make, computed before loading anything.

    `memory` is a PlatformFacts (edgelm.platform.detect_platform) or an (available, total) pair
    as from device_memory(). `alternatives` maps a --torchao-config value to the weights' size
    with it, named in the refusal when it would fit, in the mapping's order (the caller's preference);
    `quantize` as plan_kv_pool's. Raises NotEnoughMemoryError with the numbers."""
    if isinstance(memory, tuple):
        available, total = memory
        device = device or "cuda"
        if unified_memory is None:
            unified_memory = False
    else:  # PlatformFacts
        facts = memory
        device = device or facts.device
        if unified_memory is None:
            unified_memory = facts.unified_memory and device == "cuda"
        if device == "cuda" and not unified_memory:
            total = facts.gpu.total_memory
            available = facts.gpu.free_memory or total
        else:
            available, total = facts.mem_available_bytes, facts.mem_total_bytes
            if device == "cpu":
                total = available
    kwargs = dict(unified_memory=unified_memory, cuda_graph_bytes=cuda_graph_bytes,
                  activation_bytes=activation_bytes, os_reserve_bytes=os_reserve_bytes)
    try:
        return plan_kv_pool(device, total, available - weight_bytes, weight_bytes, kv_bytes_per_token,
                            mem_fraction_static, max_total_tokens, context_len, quantize=quantize, **kwargs)
    except NotEnoughMemoryError as exc:
        fits = []
        for name, alt_bytes in (alternatives or {}).items():
            try:
                plan = plan_kv_pool(device, total, available - alt_bytes, alt_bytes, kv_bytes_per_token,
                                    mem_fraction_static, max_total_tokens, context_len, **kwargs)
            except NotEnoughMemoryError:
                continue
            fits.append(f"--torchao-config {name} ({alt_bytes / GB:.2f} GB of weights, "
                        f"{plan.max_total_tokens:,} KV tokens)")
        hint = f" It would fit with {' or '.join(fits)}." if fits else ""
        raise NotEnoughMemoryError(f"{exc}.{hint}") from None


# ---------------------------------------------------------------------------- estimates
def estimate_activation_bytes(hidden_size: int, intermediate_size: int, vocab_size: int, q_size: int,
                              kv_size: int, chunk_tokens: int, max_running_requests: int,
                              dtype_bytes: int = 2) -> int:
    """Peak memory of one forward pass outside weights and KV: one layer's activations for a
    prefill chunk (layers run one at a time, nothing is kept for backward), plus float32 logits
    and sampling buffers for every running request, ×1.5 for the allocator's rounding."""
    per_token = (3 * hidden_size + q_size + 2 * kv_size + 3 * intermediate_size) * dtype_bytes
    logits = max(chunk_tokens // 64, max_running_requests) * vocab_size * 4 * 3
    return int(1.5 * (chunk_tokens * per_token + logits))


def estimate_cuda_graph_bytes(max_bs: int, num_graphs: int, hidden_size: int, intermediate_size: int,
                              vocab_size: int, dtype_bytes: int = 2) -> int:
    """Decode graphs share one memory pool sized by the largest batch: its activations and float32
    logits, plus a few MB per captured graph."""
    if max_bs <= 0 or num_graphs <= 0:
        return 0
    pool = max_bs * ((4 * hidden_size + 3 * intermediate_size) * dtype_bytes + vocab_size * 4 * 2)
    return int(pool + num_graphs * 4 * (1 << 20))
