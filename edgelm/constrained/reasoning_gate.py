"""A grammar that lets a reasoning model think freely and constrains only its answer: every token
is allowed until the think-end token sequence (`</think>`) has been generated, then the inner
grammar applies."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgelm.constrained.base import Grammar


class ReasoningGatedGrammar(Grammar):
    """`think_end_ids`: the token ids of `</think>` in order (one id for models where it is a
    special token). `in_reasoning`: whether generation starts inside a think block (the prompt
    ends with `<think>` or the model opens one itself); False makes this the inner grammar."""

    def __init__(self, inner: Grammar, think_end_ids: int | Sequence[int], in_reasoning: bool = True):
        ids = (think_end_ids,) if isinstance(think_end_ids, int) else tuple(think_end_ids)
        if not ids:
            raise ValueError("think_end_ids must name at least one token")
        self.inner = inner
        self.think_end_ids = ids
        self.starts_in_reasoning = in_reasoning
        self.in_reasoning = in_reasoning
        self._reasoning_ids: list[int] = []  # tokens accepted while thinking (for the match and rollback)
        self._inner_accepted = 0

    def accept_token(self, token_id: int) -> bool:
        if not self.in_reasoning:
            ok = self.inner.accept_token(token_id)
            self._inner_accepted += ok
            return ok
        self._reasoning_ids.append(int(token_id))
        n = len(self.think_end_ids)
        if tuple(self._reasoning_ids[-n:]) == self.think_end_ids:
            self.in_reasoning = False
        return True

    def fill_vocab_mask(self, bitmask: torch.Tensor, row: int) -> None:
        if self.in_reasoning:
            bitmask[row].fill_(-1)
        else:
            self.inner.fill_vocab_mask(bitmask, row)

    def is_terminated(self) -> bool:
        return not self.in_reasoning and self.inner.is_terminated()

    def copy(self) -> ReasoningGatedGrammar:
        return ReasoningGatedGrammar(self.inner.copy(), self.think_end_ids, self.starts_in_reasoning)

    def rollback(self, num_tokens: int) -> None:
        from_inner = min(num_tokens, self._inner_accepted)  # the answer's tokens go first
        if from_inner:
            self.inner.rollback(from_inner)
            self._inner_accepted -= from_inner
        rest = num_tokens - from_inner
        if rest > len(self._reasoning_ids):
            raise ValueError(f"cannot roll back {num_tokens} tokens: fewer were accepted")
        if rest:
            del self._reasoning_ids[-rest:]
            self.in_reasoning = True
