"""Sampling from logits: penalties, grammar mask, temperature, top-k / top-p / min-p, seeds.

Random draws come from a counter-based hash of (request seed, output position, token id)
rather than a stateful generator: a request with a seed samples the same tokens whatever
batch it shares, after a retraction, and inside a CUDA graph, and the whole batch draws in one
vectorized pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgelm.layers import triton_ops
from edgelm.sampling.sampling_batch_info import SamplingBatchInfo

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values < 2**32 (multipliers < 2**31 keep
    every product inside int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x4C8F5A7B) & _M32
    return x ^ (x >> 16)


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] uniforms in (0, 1) that depend only on each row's (seed, step) and the column."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    key = _hash32(_hash32(lo ^ _hash32(hi)) ^ (steps & _M32))  # [B]
    cols = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _hash32(_hash32(key[:, None] ^ cols[None, :]) ^ 0x5BD1E995)
    return bits_to_uniform(bits)


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """32 random bits → a float32 strictly inside (0, 1). 23 bits, not 24: (2^24 - 0.5) / 2^24 rounds
    to exactly 1.0 in float32, and a 1.0 makes the race's noise -log(1) = 0, so a zero-probability
    (masked) token scores 0 / 0 = NaN and wins the argmax."""
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set logits of tokens whose bit is 0 in `bitmask` [B, ceil(V / 32)] int32 to -inf, in place."""
    vocab = logits.shape[-1]
    bits = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().view(bitmask.shape[0], -1)[:, :vocab]
    logits.masked_fill_(~allowed, float("-inf"))


@dataclass
class SampleOutput:
    next_token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] log p(chosen token) under the model's distribution
    top_logprobs: torch.Tensor | None = None  # [B, K]
    top_ids: torch.Tensor | None = None  # [B, K]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of [B, V] logits; one Triton launch on CUDA where switched on."""
    if logits.is_cuda and logits.dim() == 2 and logits.stride(-1) == 1 and triton_ops.enabled("argmax"):
        from edgelm.layers.triton_ops.argmax import argmax_rows

        return argmax_rows(logits)
    return logits.argmax(dim=-1)


class Sampler:
    def __call__(self, logits: torch.Tensor, info: SamplingBatchInfo) -> SampleOutput:
        """logits [B, V] float32 (modified in place)."""
        out = SampleOutput(next_token_ids=None)
        if info.return_logprob:
            logprobs = torch.log_softmax(logits, dim=-1)
        if info.repetition_penalties is not None:
            self._apply_penalties(logits, info)
        if info.vocab_mask is not None:
            apply_bitmask(logits, info.vocab_mask)
        if info.is_all_greedy:
            out.next_token_ids = greedy(logits)
        else:
            out.next_token_ids = self._sample(logits, info)
        if info.return_logprob:
            out.logprobs = logprobs.gather(1, out.next_token_ids[:, None]).squeeze(1)
            if info.top_logprobs_num > 0:
                out.top_logprobs, out.top_ids = logprobs.topk(info.top_logprobs_num, dim=-1)
        return out

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, info: SamplingBatchInfo) -> None:
        rep = info.repetition_penalties
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits.copy_(torch.where(info.seen_mask, penalized, logits))
        logits -= info.frequency_penalties * info.output_counts
        logits -= info.presence_penalties * (info.output_counts > 0).float()

    @staticmethod
    def _sample(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        greedy_ids = logits.argmax(dim=-1)
        temps = torch.where(info.temperatures > 0, info.temperatures, torch.ones_like(info.temperatures))
        probs = torch.softmax(logits / temps, dim=-1)
        if info.need_top_p_top_k:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
            drop = (rank >= info.top_ks[:, None]) | (before > info.top_ps[:, None])
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        if info.need_min_p:
            threshold = info.min_ps[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race)
        noise = -torch.log(seeded_uniform(info.seeds, info.steps, probs.shape[-1]))
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(info.temperatures.view(-1) > 0, sampled, greedy_ids)
