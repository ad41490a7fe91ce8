"""Per-request sampling parameters (SGLang's `sampling_params` names) and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field

_MAX_STOP_STRINGS = 64
_MAX_STOP_LEN = 512


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: int | None = None
    # structured output: at most one of these
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None

    def verify(self, vocab_size: int) -> None:
        """Raise ValueError (a 400 for the client) on values the sampler cannot honour."""
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1 or self.top_k == 0:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.min_new_tokens < 0 or (self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens):
            raise ValueError("min_new_tokens must be in [0, max_new_tokens]")
        if not 1 <= self.n <= 128:
            raise ValueError(f"n must be in [1, 128], got {self.n}")
        if len(self.stop) > _MAX_STOP_STRINGS:
            raise ValueError(f"at most {_MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not s or len(s) > _MAX_STOP_LEN for s in self.stop):
            raise ValueError(f"stop strings must be 1..{_MAX_STOP_LEN} characters")
        if any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab_size})")
        if sum(x is not None for x in (self.json_schema, self.regex, self.ebnf)) > 1:
            raise ValueError("only one of json_schema, regex and ebnf may be set")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError("seed must be in [0, 2**63)")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
