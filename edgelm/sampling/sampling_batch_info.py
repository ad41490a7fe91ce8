"""The sampling parameters of a batch, as tensors the sampler applies in one pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from edgelm.managers.schedule_batch import Req


@dataclass
class SamplingBatchInfo:
    # the six per-request tensors are None when every request is greedy (the sampler's argmax path
    # reads none of them, and building them is six host-to-device copies a step)
    temperatures: torch.Tensor | None  # [B, 1] float32; 0 = greedy
    top_ps: torch.Tensor | None  # [B]
    top_ks: torch.Tensor | None  # [B] int64; vocab size = off
    min_ps: torch.Tensor | None  # [B]
    seeds: torch.Tensor | None  # [B] int64
    steps: torch.Tensor | None  # [B] int64: index of the token being sampled in the request's output
    is_all_greedy: bool
    need_top_p_top_k: bool
    need_min_p: bool
    # penalties (None when no request in the batch uses them)
    repetition_penalties: torch.Tensor | None = None  # [B, 1]
    frequency_penalties: torch.Tensor | None = None  # [B, 1]
    presence_penalties: torch.Tensor | None = None  # [B, 1]
    output_counts: torch.Tensor | None = None  # [B, V] times each token was generated
    seen_mask: torch.Tensor | None = None  # [B, V] token in prompt or output
    # grammar: [B, ceil(V / 32)] int32 bitmask of allowed tokens, or None
    vocab_mask: torch.Tensor | None = None
    # logprobs
    return_logprob: bool = False
    top_logprobs_num: int = 0

    @classmethod
    def from_reqs(cls, reqs: list[Req], vocab_size: int, device: str, step_offset: int = 0) -> SamplingBatchInfo:
        """`step_offset`: tokens each request has sampled beyond its output_ids (overlap scheduling:
        the step in flight)."""
        params = [r.sampling_params for r in reqs]
        greedy = [p.is_greedy for p in params]
        top_ks = [vocab_size if p.top_k in (-1, None) else min(p.top_k, vocab_size) for p in params]

        def dev(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        if all(greedy):
            per_request = dict.fromkeys(("temperatures", "top_ps", "top_ks", "min_ps", "seeds", "steps"))
        else:
            per_request = dict(
                temperatures=dev([0.0 if g else p.temperature for g, p in zip(greedy, params)],
                                 torch.float32).view(-1, 1),
                top_ps=dev([p.top_p for p in params], torch.float32),
                top_ks=dev(top_ks, torch.int64),
                min_ps=dev([p.min_p for p in params], torch.float32),
                seeds=dev([r.seed for r in reqs], torch.int64),
                steps=dev([len(r.output_ids) + step_offset for r in reqs], torch.int64))
        info = cls(
            **per_request,
            is_all_greedy=all(greedy),
            need_top_p_top_k=any(not g and (p.top_p < 1 or k < vocab_size) for g, p, k in zip(greedy, params, top_ks)),
            need_min_p=any(not g and p.min_p > 0 for g, p in zip(greedy, params)),
            return_logprob=any(r.return_logprob for r in reqs),
            top_logprobs_num=max((r.top_logprobs_num for r in reqs), default=0),
        )
        if any(r.penalizer is not None for r in reqs):
            info._add_penalties(reqs, vocab_size, device)
        return info

    def _add_penalties(self, reqs: list[Req], vocab_size: int, device: str) -> None:
        def col(values):
            return torch.tensor(values, dtype=torch.float32).view(-1, 1).to(device, non_blocking=True)

        params = [r.sampling_params for r in reqs]
        self.repetition_penalties = col([p.repetition_penalty for p in params])
        self.frequency_penalties = col([p.frequency_penalty for p in params])
        self.presence_penalties = col([p.presence_penalty for p in params])
        zeros = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.output_counts = torch.stack([r.penalizer.output_counts if r.penalizer else zeros for r in reqs])
        self.seen_mask = torch.stack([r.penalizer.seen_mask if r.penalizer else zeros.bool() for r in reqs])


class Penalizer:
    """A request's token statistics for repetition / frequency / presence penalties, updated
    one token per step (never recounted from the whole output)."""

    def __init__(self, prompt_ids: list[int], output_ids: list[int], vocab_size: int, device: str):
        self.output_counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.seen_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if prompt_ids:
            self.seen_mask[torch.tensor(prompt_ids, device=device)] = True
        for t in output_ids:
            self.add(t)

    def add(self, token_id: int) -> None:
        self.output_counts[token_id] += 1
        self.seen_mask[token_id] = True
