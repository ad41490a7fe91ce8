"""The grammar interface the scheduler sees: a per-request matcher (`Grammar`) and a backend that
compiles grammar keys into matchers in the background (`GrammarBackend`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future

import torch

# (kind, value): ("json", schema), ("json_object", ""), ("regex", pattern), ("ebnf", grammar),
# ("structural_tag", json)
GrammarKey = tuple[str, str]
GRAMMAR_KINDS = ("json", "json_object", "regex", "ebnf", "structural_tag")


class GrammarCompileError(ValueError):
    """A schema, regex or grammar the compiler refused; str() is the compiler's message."""

    def __init__(self, message: str, kind: str = ""):
        super().__init__(message)
        self.kind = kind


class Grammar(ABC):
    """One request's matcher state over token ids."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar forbids it (state unchanged)."""

    @abstractmethod
    def fill_vocab_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (host int32, bit 1 = allowed)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token has been accepted."""

    @abstractmethod
    def copy(self) -> Grammar:
        """A fresh matcher at the start state, sharing the compiled grammar (for n > 1)."""

    def rollback(self, num_tokens: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot roll back")


class GrammarBackend(ABC):
    vocab_size: int  # columns of the bitmask: the model's (padded) logits vocabulary

    @abstractmethod
    def get_future(self, key: GrammarKey) -> Future[Grammar]:
        """A future of a fresh matcher for `key`; compiled once per key, in the background. A
        refused key makes the future raise GrammarCompileError."""

    def shutdown(self) -> None:  # noqa: B027 (optional: backends without workers have nothing to stop)
        """Stop compiling; pending futures are cancelled."""


def grammar_key(json_schema: str | None = None, regex: str | None = None, ebnf: str | None = None,
                structural_tag: str | None = None, json_object: bool = False) -> GrammarKey | None:
    """The key of a request's constraint, or None when it has none. At most one may be set."""
    keys = [("json", json_schema), ("regex", regex), ("ebnf", ebnf), ("structural_tag", structural_tag)]
    keys = [(k, v) for k, v in keys if v is not None]
    if json_object:
        keys.append(("json_object", ""))
    if len(keys) > 1:
        raise ValueError("only one of json_schema, regex, ebnf, structural_tag and json_object may be set")
    return keys[0] if keys else None
