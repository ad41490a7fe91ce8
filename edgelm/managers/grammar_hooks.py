"""The scheduler's side of constrained decoding: compile grammars off the loop, fill the
bitmask of constrained rows each step, advance matchers with the sampled tokens.

Requests whose grammar is still compiling wait in the queue; others keep running, so a slow
schema never stalls the decode loop.

The host work of a step (advance each matcher by its sampled token, fill its bitmask row) runs
after the next forward is launched, while the GPU computes: `accept` only records a token, and
`apply_mask` advances the matchers, then fills. Stop tokens are accepted at once, because they
are the only tokens that can terminate a grammar, and termination decides whether the request
finishes this step.

That work is split across a small thread pool when a step has enough of it: xgrammar releases
the GIL inside `accept_token` and `fill_next_token_bitmask`, and some states cost 100-300 µs a
row (a length-bounded JSON string is one), so 16 constrained rows on one thread can take longer
than the forward they hide behind. Cheap steps stay on the scheduler thread, where a hand-off
would cost more than it saves.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from edgelm.constrained import ReasoningGatedGrammar, allocate_vocab_mask, apply_vocab_mask

logger = logging.getLogger(__name__)

# a step whose rows are expected to cost less than this on one thread is not handed to the pool
_THREADED_MIN_S = 80e-6


class GrammarHooks:
    def __init__(self, backend, vocab_size: int, device: str, think_end_ids: list[int] | None = None,
                 fill_threads: int = 0):
        self.backend = backend
        self.vocab_size = vocab_size
        self.device = device
        self.think_end_ids = think_end_ids or []
        self.bitmask: torch.Tensor | None = None
        # tokens that can end a grammar: accepted at once (None: the backend's default, so never deferred)
        eos = getattr(backend, "eos_token_ids", None)
        self.stop_ids: frozenset[int] | None = frozenset(eos) if eos else None
        self.fill_threads = fill_threads if backend is not None and fill_threads > 1 else 0
        self._pool = (ThreadPoolExecutor(self.fill_threads, thread_name_prefix="grammar-fill")
                      if self.fill_threads else None)
        self._row_cost_s = 0.0  # running estimate of one row's advance + fill on one thread
        # host time in apply_mask, for benchmarks: advance + fill as the scheduler waited for it,
        # the same work summed over threads, and the mask's copy + apply
        self.fill_s = self.fill_work_s = self.apply_s = 0.0
        self.threaded_steps = 0

    @classmethod
    def create(cls, server_args, tokenizer, vocab_size: int, eos_token_ids, device: str) -> GrammarHooks:
        name = server_args.grammar_backend
        if name == "none":
            return cls(None, vocab_size, device)
        threads = server_args.resolved_grammar_fill_threads()
        from edgelm.constrained import create_grammar_backend

        try:
            backend = create_grammar_backend(name, tokenizer, vocab_size, sorted(eos_token_ids))
        except ImportError as exc:
            raise RuntimeError(str(exc)) from exc
        if backend is None:
            logger.info("structured output off: xgrammar is not installed (pip install xgrammar)")
            return cls(None, vocab_size, device)
        think_end = tokenizer.encode("</think>", add_special_tokens=False) if server_args.reasoning_parser else []
        return cls(backend, vocab_size, device, think_end, fill_threads=threads)

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def start(self, req) -> str | None:
        """Begin compiling a request's grammar; returns an error message if it cannot be served."""
        if self.backend is None:
            return "structured output needs a grammar backend: start the server with --grammar-backend xgrammar"
        req.grammar = self.backend.get_future(req.grammar_key)
        return None

    def ready(self, req) -> bool:
        """True when the request can be scheduled (no grammar, or compiled). A failed compile
        finishes the request with a 400 and also returns True, so the caller sees it finished."""
        g = req.grammar
        if g is None or not (hasattr(g, "done") and hasattr(g, "result")):
            return True
        if not g.done():
            return False
        try:
            grammar = g.result()
        except Exception as exc:  # the compiler's message goes back to the client
            req.grammar = None
            req.finished_reason = {"type": "abort", "error": (400, f"invalid grammar: {exc}")}
            return True
        if req.grammar_after_think and self.think_end_ids:
            grammar = ReasoningGatedGrammar(grammar, self.think_end_ids, in_reasoning=True)
        req.grammar = grammar
        return True

    def apply_mask(self, reqs, logits: torch.Tensor) -> None:
        """Advance the matchers by their deferred tokens, then mask the logits rows of constrained
        requests, in place; free rows are untouched. A request whose deferred token the grammar
        rejects is finished here (its row is left unmasked; the caller drops what it samples)."""
        if self.backend is None or not any(r.grammar is not None for r in reqs):
            return
        if self.bitmask is None or self.bitmask.shape[0] < len(reqs):
            self.bitmask = allocate_vocab_mask(self.backend.vocab_size, max(len(reqs), 64))
        work = [(i, r) for i, r in enumerate(reqs) if r.grammar is not None]
        start = time.perf_counter()
        threads = min(self.fill_threads, len(work))
        if threads > 1 and len(work) * self._row_cost_s >= _THREADED_MIN_S:
            futures = [self._pool.submit(self._advance_and_fill, work[k::threads]) for k in range(threads)]
            spent = sum(f.result() for f in futures)
            self.threaded_steps += 1
        else:
            spent = self._advance_and_fill(work)
        now = time.perf_counter()
        self.fill_s += now - start
        self.fill_work_s += spent
        cost = spent / len(work)
        self._row_cost_s = cost if self._row_cost_s == 0.0 else 0.7 * self._row_cost_s + 0.3 * cost
        rows = [i for i, r in work if not r.finished()]
        # every row constrained: no row list to send (cheaper launch)
        apply_vocab_mask(logits, self.bitmask[:len(reqs)], None if len(rows) == len(reqs) else rows)
        self.apply_s += time.perf_counter() - now

    def _advance_and_fill(self, work) -> float:
        """Advance each request's matcher by its deferred token, then fill its bitmask row; the
        seconds it took. Runs on a pool thread for part of a step's rows (each request is touched
        by one thread only)."""
        start = time.perf_counter()
        for i, req in work:
            self.flush(req)
            if not req.finished():
                req.grammar.fill_vocab_mask(self.bitmask, i)
        return time.perf_counter() - start

    def accept(self, req, token_id: int) -> None:
        """Record a sampled token. Tokens that cannot end the grammar are applied to the matcher at
        the next `apply_mask` (off the critical path); stop tokens at once."""
        if req.grammar is None:
            return
        if self.stop_ids is not None and token_id not in self.stop_ids:
            req.grammar_pending = token_id
            return
        self.flush(req)
        self._advance(req, token_id)

    def flush(self, req) -> None:
        token_id = req.grammar_pending
        if token_id is not None:
            req.grammar_pending = None
            if req.grammar is not None and not req.finished():
                self._advance(req, token_id)

    def _advance(self, req, token_id: int) -> None:
        if not req.grammar.is_terminated() and not req.grammar.accept_token(token_id):
            logger.warning("request %s: grammar rejected token %d", req.rid, token_id)
            req.finished_reason = {"type": "abort", "error": (500, "the grammar rejected a sampled token")}

    def release(self, req) -> None:
        req.grammar = None
        req.grammar_pending = None

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
