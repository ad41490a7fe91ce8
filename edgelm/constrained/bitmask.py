"""The vocabulary bitmask: filled on the host by each request's grammar, applied to the logits on
the device once per step.

Layout: `[batch, ceil(vocab / 32)]` int32, bit `t % 32` of word `t // 32` set = token t allowed.
Columns of the logits beyond the bitmask's last bit (a padded lm-head vocabulary) count as
forbidden in every masked row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgelm.constrained.base import Grammar

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

try:  # its single-threaded C++ loop beats torch ops on a busy CPU
    from xgrammar import apply_token_bitmask_inplace as _xgr_apply
except ImportError:
    _xgr_apply = None

_BLOCK = 1024  # logits columns per Triton program (32 bitmask words)


def allocate_vocab_mask(vocab_size: int, batch_size: int, pin_memory: bool | None = None) -> torch.Tensor:
    """A host bitmask `[batch_size, ceil(vocab_size / 32)]` int32 with every token allowed. Pinned
    when CUDA is present, so the per-step copy to the device is asynchronous."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    mask = torch.full((batch_size, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    return mask.pin_memory() if pin_memory else mask


def reset_vocab_mask(bitmask: torch.Tensor) -> None:
    bitmask.fill_(-1)


def fill_vocab_masks(grammars: Sequence[Grammar | None], bitmask: torch.Tensor) -> list[int]:
    """Fill row i of `bitmask` from grammars[i]; the rows that have a grammar (to pass to
    apply_vocab_mask). Other rows are left as they are.

    Row by row on the calling thread. xgrammar's threaded BatchGrammarMatcher was slower where it
    was measured (H100 host, 16 cores: 535-751 µs for 16 rows against 31-91 µs serially,
    benchmarks/results/grammar_apply_h100.json), and xgrammar holds the GIL while it fills, so a
    Python thread of our own cannot overlap it with the scheduler either."""
    rows = []
    for i, grammar in enumerate(grammars):
        if grammar is not None:
            grammar.fill_vocab_mask(bitmask, i)
            rows.append(i)
    return rows


def apply_vocab_mask(logits: torch.Tensor, bitmask: torch.Tensor,
                     rows: Sequence[int] | torch.Tensor | None = None) -> None:
    """Set `logits[r, t]` to -inf for every row r in `rows` (all rows when None) and every token t
    not allowed by `bitmask[r]`; other rows stay untouched. logits [B, V] on any device, bitmask
    [>= B, W] int32 on the host or that device (copied without blocking)."""
    if rows is not None and len(rows) == 0:
        return
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    if logits.is_cuda and triton is not None:
        _apply_triton(logits, bitmask, rows)
    elif logits.device.type == "cpu" and _xgr_apply is not None and logits.dim() == 2:
        _apply_xgrammar_cpu(logits, bitmask, rows)
    else:
        _apply_torch(logits, bitmask, rows)


def _apply_xgrammar_cpu(logits: torch.Tensor, bitmask: torch.Tensor, rows) -> None:
    covered = min(logits.shape[-1], bitmask.shape[1] * 32)
    row_list = list(range(logits.shape[0])) if rows is None else [int(r) for r in rows]
    _xgr_apply(logits, bitmask, vocab_size=covered, indices=row_list)
    if covered < logits.shape[-1]:  # columns past the bitmask: a padded lm head
        logits[row_list, covered:] = float("-inf")


def _apply_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows) -> None:
    vocab = logits.shape[-1]
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.int64, device=logits.device)
        bitmask = bitmask.index_select(0, rows)
    else:
        bitmask = bitmask[: logits.shape[0]]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)  # [R, W * 32]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    blocked = ~allowed[:, :vocab]
    if rows is None:
        logits.masked_fill_(blocked, float("-inf"))
    else:
        logits.index_copy_(0, rows, logits.index_select(0, rows).masked_fill_(blocked, float("-inf")))


def _apply_triton(logits: torch.Tensor, bitmask: torch.Tensor, rows) -> None:
    assert logits.stride(-1) == 1 and bitmask.stride(-1) == 1 and bitmask.dtype == torch.int32
    if rows is None:
        num_rows, rows_t = logits.shape[0], bitmask  # rows_t unused
    else:
        rows_t = torch.as_tensor(rows, dtype=torch.int32)
        rows_t = rows_t.to(logits.device, non_blocking=True)
        num_rows = rows_t.numel()
    vocab = logits.shape[-1]
    grid = (num_rows, triton.cdiv(vocab, _BLOCK))
    _apply_vocab_mask_kernel[grid](logits, bitmask, rows_t, vocab, bitmask.shape[1], logits.stride(0),
                                   bitmask.stride(0), HAS_ROWS=rows is not None, BLOCK=_BLOCK)


if triton is not None:

    @triton.jit
    def _apply_vocab_mask_kernel(logits_ptr, mask_ptr, rows_ptr, vocab, mask_words, logits_stride, mask_stride,
                                 HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """logits [B, vocab] (any float dtype), mask [B, mask_words] int32, rows [num_rows] int32.
        Program (r, b) writes -inf into the blocked columns b * BLOCK ... of row rows[r] (or r)."""
        r = tl.program_id(0)
        b = tl.program_id(1)
        if HAS_ROWS:
            row = tl.load(rows_ptr + r).to(tl.int64)
        else:
            row = r.to(tl.int64)
        words = b * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
        packed = tl.load(mask_ptr + row * mask_stride + words, mask=words < mask_words, other=0)
        bits = (packed[:, None] >> tl.arange(0, 32)[None, :]) & 1
        blocked = tl.reshape(bits == 0, (BLOCK,))
        cols = b * BLOCK + tl.arange(0, BLOCK)
        tl.store(logits_ptr + row * logits_stride + cols, float("-inf"), mask=(cols < vocab) & blocked)
