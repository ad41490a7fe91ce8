"""Messages between the tokenizer manager (HTTP process) and the scheduler (engine process).

They travel over ZMQ as pickles; keep them plain dataclasses of Python values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgelm.sampling.sampling_params import SamplingParams


@dataclass
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    # ("json" | "json_object" | "regex" | "ebnf", value) or None
    grammar_key: tuple[str, str] | None = None
    # the prompt ends inside a <think> block (reasoning models): the grammar waits for </think>
    grammar_after_think: bool = False


@dataclass
class AbortReq:
    rid: str


@dataclass
class FlushCacheReq:
    pass


@dataclass
class GetInternalStateReq:
    pass


@dataclass
class InternalState:
    """A snapshot of the engine, for /get_server_info and the tests."""

    num_running_reqs: int
    num_waiting_reqs: int
    max_total_tokens: int
    available_kv_tokens: int
    evictable_kv_tokens: int
    used_kv_tokens: int
    cache_hit_rate: float
    last_gen_throughput: float
    step: int


@dataclass
class FlushCacheOut:
    success: bool
    message: str = ""


@dataclass
class ReqOutput:
    """New output of one request since its last message."""

    rid: str
    new_token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # None while running; else {"type": "stop" | "length" | "abort", "matched": str | int | None, ...}
    finish_reason: dict[str, Any] | None = None
    # per new token: logprob, and top (token_id, logprob) pairs
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # an error that fails this request only: (HTTP status, message)
    error: tuple[int, str] | None = None


@dataclass
class BatchOutput:
    outputs: list[ReqOutput] = field(default_factory=list)
    # periodic engine statistics for /metrics (a SchedulerStats, or None)
    stats: Any = None


@dataclass
class EngineInfo:
    """What the engine tells the HTTP process once it is ready."""

    model_name: str
    model_path: str
    dtype: str
    device: str
    attention_backend: str
    max_total_tokens: int
    max_running_requests: int
    context_len: int
    vocab_size: int
    weight_gb: float  # GiB (2**30 bytes), as every start-up line
    grammar_backend: str | None
    extra: dict[str, Any] = field(default_factory=dict)
