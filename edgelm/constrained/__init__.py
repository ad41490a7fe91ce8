"""Structured output: grammar backends (xgrammar), the vocabulary bitmask, the reasoning gate."""

from edgelm.constrained.base import (
    GRAMMAR_KINDS,
    Grammar,
    GrammarBackend,
    GrammarCompileError,
    GrammarKey,
    grammar_key,
)
from edgelm.constrained.bitmask import (
    allocate_vocab_mask,
    apply_vocab_mask,
    fill_vocab_masks,
    reset_vocab_mask,
)
from edgelm.constrained.reasoning_gate import ReasoningGatedGrammar
from edgelm.constrained.xgrammar_backend import create_grammar_backend

__all__ = [
    "GRAMMAR_KINDS", "Grammar", "GrammarBackend", "GrammarCompileError", "GrammarKey", "ReasoningGatedGrammar",
    "allocate_vocab_mask", "apply_vocab_mask", "create_grammar_backend", "fill_vocab_masks", "grammar_key",
    "reset_vocab_mask",
]
