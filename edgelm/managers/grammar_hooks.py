"""The scheduler's side of constrained decoding: compile grammars off the loop, fill the
bitmask of constrained rows each step, advance matchers with the sampled tokens.

Requests whose grammar is still compiling wait in the queue; others keep running, so a slow
schema never stalls the decode loop.

The host work of a step (advance each matcher by its sampled token, fill its bitmask row) runs
after the next forward is launched, while the GPU computes: `accept` only records a token, and
`apply_mask` advances the matchers, then fills. Stop tokens are accepted at once, because they
are the only tokens that can terminate a grammar, and termination decides whether the request
finishes this step.

With `--grammar-workers N` the matchers live in N worker processes instead
(edgelm/constrained/grammar_workers.py): `accept` queues the token at once, `dispatch` (once a
step's tokens are read back) sends each worker its requests' tokens, and the workers advance and
fill in parallel while the GPU computes; `apply_mask` gathers the rows.
"""

from __future__ import annotations

import logging
import time

import torch

from edgelm.constrained import ReasoningGatedGrammar, allocate_vocab_mask, apply_vocab_mask
from edgelm.constrained.grammar_workers import GrammarWorkerPool, WorkerGrammar

logger = logging.getLogger(__name__)


def _worker_handle(grammar) -> WorkerGrammar | None:
    if isinstance(grammar, WorkerGrammar):
        return grammar
    inner = getattr(grammar, "inner", None)  # a reasoning gate around one
    return inner if isinstance(inner, WorkerGrammar) else None


class GrammarHooks:
    def __init__(self, backend, vocab_size: int, device: str, think_end_ids: list[int] | None = None,
                 workers: int = 0, max_matchers: int = 256, in_process_first: int = 1):
        self.backend = backend
        self.vocab_size = vocab_size
        self.device = device
        self.think_end_ids = think_end_ids or []
        self.bitmask: torch.Tensor | None = None
        # tokens that can end a grammar: accepted at once (None: the backend's default, so never deferred)
        eos = getattr(backend, "eos_token_ids", None)
        self.stop_ids: frozenset[int] | None = frozenset(eos) if eos else None
        self.pool: GrammarWorkerPool | None = None
        # with workers, this many constrained requests still match in-process (a lone request pays a
        # worker round trip and saves nothing); in_process_live counts those running now
        self.in_process_first = in_process_first
        self.in_process_live = 0
        if backend is not None and workers > 0:
            self.pool = GrammarWorkerPool(workers, backend.tokenizer_info, backend.vocab_size,
                                          backend.eos_token_ids, max_matchers)
        # host time in apply_mask, for benchmarks: advance + fill as the scheduler waited for it,
        # and the mask's copy + apply
        self.fill_s = self.apply_s = 0.0
        self.wait_s = 0.0  # of fill_s: waiting for the workers' replies

    @classmethod
    def create(cls, server_args, tokenizer, vocab_size: int, eos_token_ids, device: str,
               max_running: int = 256) -> GrammarHooks:
        name = server_args.grammar_backend
        if name == "none":
            return cls(None, vocab_size, device)
        workers = server_args.resolved_grammar_workers(device)
        from edgelm.constrained import create_grammar_backend

        try:
            backend = create_grammar_backend(name, tokenizer, vocab_size, sorted(eos_token_ids))
        except ImportError as exc:
            raise RuntimeError(str(exc)) from exc
        if backend is None:
            logger.info("structured output off: xgrammar is not installed (pip install xgrammar)")
            return cls(None, vocab_size, device)
        think_end = tokenizer.encode("</think>", add_special_tokens=False) if server_args.reasoning_parser else []
        hooks = cls(backend, vocab_size, device, think_end, workers=workers, max_matchers=max_running + 8)
        logger.info("structured output: xgrammar, matchers %s", f"in {workers} worker processes" if workers
                    else "in the scheduler process")
        return hooks

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def start(self, req) -> str | None:
        """Begin compiling a request's grammar; returns an error message if it cannot be served."""
        if self.backend is None:
            return "structured output needs a grammar backend: start the server with --grammar-backend xgrammar"
        if self.pool is not None:
            req.grammar = self.backend.get_serialized_future(req.grammar_key)
        else:
            req.grammar = self.backend.get_future(req.grammar_key)
        return None

    def ready(self, req) -> bool:
        """True when the request can be scheduled (no grammar, or compiled, and with workers: its
        first mask filled). A failed compile finishes the request with a 400 and also returns True,
        so the caller sees it finished."""
        g = req.grammar
        if g is None:
            return True
        if not (hasattr(g, "done") and hasattr(g, "result")):
            handle = _worker_handle(g)
            if handle is None or (handle.loaded and not handle.rejected):
                return True
            self.pool.poll()  # a worker still loading it (or filling its first mask)
            if handle.rejected:  # the worker failed to load it, or exited: match in-process instead
                handle.release()
                self._install(req, self._in_process(req))
                return True
            return handle.loaded
        if not g.done():
            return False
        try:
            grammar = g.result()
        except Exception as exc:  # the compiler's message goes back to the client
            req.grammar = None
            req.finished_reason = {"type": "abort", "error": (400, f"invalid grammar: {exc}")}
            return True
        if self.pool is not None:  # `grammar` is the serialized form: hand it to a worker...
            handle = None
            if self.in_process_live >= self.in_process_first:
                handle = self.pool.new_matcher(req.grammar_key, grammar)
            # ...unless it is the only one (a round trip would cost more than the work saved), or
            # every worker slot is taken: then it matches in-process
            grammar = handle if handle is not None else self._in_process(req)
        self._install(req, grammar)
        return self.ready(req) if _worker_handle(grammar) is not None else True

    def _in_process(self, req):
        """A matcher in this process (the key is compiled already: the future is done)."""
        if self.pool is not None:
            self.in_process_live += 1
            req.grammar_in_process = True
        return self.backend.get_future(req.grammar_key).result()

    def _install(self, req, grammar) -> None:
        if req.grammar_after_think and self.think_end_ids:
            grammar = ReasoningGatedGrammar(grammar, self.think_end_ids, in_reasoning=True)
        req.grammar = grammar

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
        gather_rows, gather_slots = [], []
        if self.pool is not None:
            handles = [h for h in (_worker_handle(r.grammar) for _, r in work) if h is not None]
            if handles:
                self.pool.wait(handles)
            self.wait_s += time.perf_counter() - start
        for i, req in work:
            self.flush(req)
            if not req.finished():
                if isinstance(req.grammar, WorkerGrammar):  # its row is in the workers' shared bitmask
                    if req.grammar.rejected:
                        self._reject(req, self._why(req.grammar))
                    else:
                        gather_rows.append(i)
                        gather_slots.append(req.grammar.slot)
                    continue
                handle = _worker_handle(req.grammar)  # a reasoning gate: fills -1 itself while thinking
                if handle is not None and handle.rejected:
                    self._reject(req, self._why(handle))
                    continue
                req.grammar.fill_vocab_mask(self.bitmask, i)
        if gather_rows:  # one gather for every worker-filled row; numpy: single-threaded, where torch
            # would spread 100 KB over its intra-op threads and wait for cores the workers are using
            self.bitmask.numpy()[gather_rows] = self.pool.shared_mask.numpy()[gather_slots]
        now = time.perf_counter()
        self.fill_s += now - start
        rows = [i for i, r in work if not r.finished()]
        # every row constrained: no row list to send (cheaper launch)
        apply_vocab_mask(logits, self.bitmask[:len(reqs)], None if len(rows) == len(reqs) else rows)
        self.apply_s += time.perf_counter() - now

    def dispatch(self, reqs) -> None:
        """After sampling: send the workers the tokens just accepted, so they advance and fill
        while this process gets on with the step."""
        if self.pool is None:
            return
        handles = [h for h in (_worker_handle(r.grammar) for r in reqs if not r.finished()) if h is not None]
        if handles:
            self.pool.step(handles)

    def accept(self, req, token_id: int) -> None:
        """Record a sampled token. Tokens that cannot end the grammar are applied to the matcher at
        the next `apply_mask` (off the critical path); stop tokens at once."""
        if req.grammar is None:
            return
        if _worker_handle(req.grammar) is not None:  # queuing is all it costs here
            self._advance(req, token_id)
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
            self._reject(req)

    def _why(self, handle: WorkerGrammar) -> str:
        if handle.worker in self.pool.dead:
            return "the grammar worker holding this request's matcher exited"
        return "the grammar rejected a sampled token"

    @staticmethod
    def _reject(req, why: str = "the grammar rejected a sampled token") -> None:
        req.finished_reason = {"type": "abort", "error": (500, why)}

    def release(self, req) -> None:
        handle = _worker_handle(req.grammar)
        if handle is not None:
            handle.release()
        if getattr(req, "grammar_in_process", False):
            req.grammar_in_process = False
            self.in_process_live -= 1
        req.grammar = None
        req.grammar_pending = None

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
