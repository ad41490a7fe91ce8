"""The scheduler's side of constrained decoding: compile grammars off the loop, fill the
bitmask of constrained rows each step, advance matchers with the sampled tokens.

Requests whose grammar is still compiling wait in the queue; others keep running, so a slow
schema never stalls the decode loop.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


class GrammarHooks:
    def __init__(self, backend, vocab_size: int, device: str, think_end_ids: list[int] | None = None):
        self.backend = backend
        self.vocab_size = vocab_size
        self.device = device
        self.think_end_ids = think_end_ids or []

    @classmethod
    def create(cls, server_args, tokenizer, vocab_size: int, eos_token_ids, device: str) -> GrammarHooks:
        name = server_args.grammar_backend
        if name == "none":
            return cls(None, vocab_size, device)
        try:
            from edgelm.constrained.xgrammar_backend import create_grammar_backend
            backend = create_grammar_backend(name or "xgrammar", tokenizer, vocab_size, sorted(eos_token_ids))
        except ImportError as exc:
            if name == "xgrammar":
                raise RuntimeError(f"--grammar-backend xgrammar needs the xgrammar package ({exc}); "
                                   "pip install xgrammar, or pass --grammar-backend none") from exc
            logger.info("structured output off: xgrammar is not installed")
            return cls(None, vocab_size, device)
        think_end = []
        if server_args.reasoning_parser:
            ids = tokenizer.encode("</think>", add_special_tokens=False)
            think_end = ids if len(ids) == 1 else []
        return cls(backend, vocab_size, device, think_end)

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
        grammar = grammar.copy() if hasattr(grammar, "copy") else grammar
        if req.grammar_after_think and self.think_end_ids:
            from edgelm.constrained.reasoning_gate import ReasoningGate
            grammar = ReasoningGate(grammar, self.think_end_ids)
        req.grammar = grammar
        return True

    def build_mask(self, reqs, logits_vocab: int) -> torch.Tensor | None:
        if self.backend is None or not any(r.grammar is not None for r in reqs):
            return None
        words = (logits_vocab + 31) // 32
        mask = torch.full((len(reqs), words), -1, dtype=torch.int32)
        for i, req in enumerate(reqs):
            if req.grammar is not None:
                req.grammar.fill_vocab_mask(mask, i)
        return mask.to(self.device, non_blocking=True)

    def accept(self, req, token_id: int) -> None:
        if req.grammar is not None and not req.grammar.is_terminated():
            if not req.grammar.accept_token(token_id):
                logger.warning("request %s: grammar rejected token %d", req.rid, token_id)

    def release(self, req) -> None:
        req.grammar = None
