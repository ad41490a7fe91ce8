"""A request's state inside the scheduler."""

from __future__ import annotations

from typing import Any

import torch

from edgelm.sampling.sampling_params import SamplingParams


class Req:
    def __init__(self, rid: str, input_ids: list[int], sampling_params: SamplingParams, seed: int,
                 return_logprob: bool = False, top_logprobs_num: int = 0):
        self.rid = rid
        self.origin_input_ids = list(input_ids)
        self.output_ids: list[int] = []
        self.sampling_params = sampling_params
        self.seed = seed
        self.return_logprob = return_logprob
        self.top_logprobs_num = top_logprobs_num
        self.penalizer = None
        self.grammar = None  # a Grammar matcher, or a Future of one while it compiles
        self.grammar_pending: int | None = None  # a sampled token the matcher has not advanced by yet
        self.grammar_in_process = False  # with grammar workers: this one matches in the scheduler process
        self.grammar_key: tuple[str, str] | None = None
        self.grammar_after_think = False
        # KV state: tokens [0, len(prefix_indices)) come from the radix cache; fill_ids are all
        # tokens whose KV the request needs (prompt + output so far).
        self.fill_ids: list[int] = []
        self.req_pool_idx: int | None = None
        self.prefix_indices = torch.empty(0, dtype=torch.int64)
        self.last_node: Any = None
        self.computed_len = 0  # tokens of fill_ids whose KV is in the pool
        self.cached_tokens = 0  # prompt tokens served from the prefix cache (reported in usage)
        self.finished_reason: dict[str, Any] | None = None
        self.to_abort = False
        self.sent_len = 0  # output tokens already sent to the tokenizer manager
        self.pending_logprobs: list[float] = []
        self.pending_top_logprobs: list[list[tuple[int, float]]] = []
        self.retractions = 0

    # ------------------------------------------------------------------ lengths
    @property
    def seqlen(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    def init_fill_ids(self) -> None:
        self.fill_ids = self.origin_input_ids + self.output_ids

    @property
    def is_prefilled(self) -> bool:
        return self.req_pool_idx is not None and self.computed_len >= len(self.fill_ids)

    def finished(self) -> bool:
        return self.finished_reason is not None

    # ------------------------------------------------------------------ finish checks
    def check_finished(self, eos_token_ids: set[int], context_len: int, stop_checker) -> None:
        """After appending a token: decide whether the request is done and why."""
        if self.finished_reason is not None:
            return
        params = self.sampling_params
        last = self.output_ids[-1]
        n_out = len(self.output_ids)
        if n_out >= params.min_new_tokens:
            if last in params.stop_token_ids:
                self.finished_reason = {"type": "stop", "matched": last}
                return
            if not params.ignore_eos and last in eos_token_ids:
                self.finished_reason = {"type": "stop", "matched": last}
                return
            if params.stop and stop_checker is not None:
                matched = stop_checker(self)
                if matched is not None:
                    self.finished_reason = {"type": "stop", "matched": matched}
                    return
            if self.grammar is not None and not _is_future(self.grammar) and self.grammar.is_terminated():
                self.finished_reason = {"type": "stop", "matched": None}
                return
        if n_out >= params.max_new_tokens or self.seqlen >= context_len:
            self.finished_reason = {"type": "length", "length": n_out}


def _is_future(obj) -> bool:
    return hasattr(obj, "done") and hasattr(obj, "result")
