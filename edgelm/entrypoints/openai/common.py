"""What chat, completions and /generate share: OpenAI errors, sampling parameters, grammar keys,
SSE framing, and running n choices as one merged stream."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse

from edgelm.managers.tokenizer_manager import GenerateChunk, GenerateRequest, RequestError, TokenizerManager
from edgelm.sampling.sampling_params import SamplingParams

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
                500: "internal_server_error", 503: "service_unavailable_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code if code is not None else status}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def sampling_params_from(req, max_tokens: int | None, vocab_size: int) -> SamplingParams:
    """OpenAI fields → SamplingParams, checked (ValueError → 400)."""
    if req.logit_bias:
        raise RequestError(400, "logit_bias is not supported by edgelm")
    params = SamplingParams(
        max_new_tokens=max_tokens,
        min_new_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        stop=list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        skip_special_tokens=req.skip_special_tokens,
        no_stop_trim=req.no_stop_trim,
        seed=req.seed,
    )
    try:
        params.verify(vocab_size)
    except ValueError as exc:
        raise RequestError(400, str(exc)) from None
    return params


def grammar_key_from(req) -> tuple[str, str] | None:
    """response_format, or SGLang's regex / ebnf / json_schema fields, as a grammar cache key."""
    keys = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        keys.append(("json_object", ""))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise RequestError(400, "response_format json_schema needs json_schema.schema")
        keys.append(("json", json.dumps(fmt.json_schema.schema_)))
    if req.json_schema:
        keys.append(("json", req.json_schema))
    if req.regex:
        keys.append(("regex", req.regex))
    if req.ebnf:
        keys.append(("ebnf", req.ebnf))
    if len(keys) > 1:
        raise RequestError(400, "give only one of response_format, json_schema, regex and ebnf")
    return keys[0] if keys else None


def expand_n(base: GenerateRequest, n: int) -> list[GenerateRequest]:
    """n choices as n requests; a seeded request gets seeds seed, seed+1, … so choices differ."""
    reqs = []
    for i in range(n):
        params = SamplingParams(**{**base.sampling_params.__dict__, "stop": list(base.sampling_params.stop),
                                   "stop_token_ids": list(base.sampling_params.stop_token_ids)})
        if params.seed is not None:
            params.seed = (params.seed + i) % 2**63
        reqs.append(GenerateRequest(list(base.input_ids), params, rid=f"{base.rid}-{i}" if n > 1 else base.rid,
                                    return_logprob=base.return_logprob, top_logprobs_num=base.top_logprobs_num,
                                    grammar_key=base.grammar_key, grammar_after_think=base.grammar_after_think))
    return reqs


async def merged_stream(tm: TokenizerManager, reqs: list[GenerateRequest]) -> AsyncIterator[tuple[int, GenerateChunk]]:
    """Chunks of several requests as they come, tagged with the request's index. Closing the
    iterator aborts every request still running."""
    if len(reqs) == 1:
        async for chunk in tm.generate(reqs[0]):
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, r: GenerateRequest):
        try:
            async for chunk in tm.generate(r):
                await queue.put((i, chunk))
        except Exception as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        remaining = len(reqs)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def finish_reason_str(reason: dict | None) -> str | None:
    if reason is None:
        return None
    return {"stop": "stop", "length": "length"}.get(reason.get("type"), "abort")


def matched_stop(reason: dict | None):
    return None if reason is None else reason.get("matched")
