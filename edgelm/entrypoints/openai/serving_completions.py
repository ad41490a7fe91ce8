"""/v1/completions and SGLang's native /generate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from edgelm.entrypoints.engine import make_sampling_params
from edgelm.entrypoints.openai.common import (
    expand_n,
    finish_reason_str,
    grammar_key_from,
    matched_stop,
    merged_stream,
    new_id,
    now,
    sampling_params_from,
    sse,
    usage_dict,
)
from edgelm.entrypoints.openai.protocol import CompletionRequest, GenerateRequestBody
from edgelm.managers.tokenizer_manager import GenerateRequest, RequestError, TokenizerManager


class CompletionServing:
    def __init__(self, tm: TokenizerManager):
        self.tm = tm
        self.tokenizer = tm.tokenizer

    def _prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            return [self.tm.tokenize(p)]
        if not p:
            raise RequestError(400, "prompt is empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        if all(isinstance(x, str) for x in p):
            return [self.tm.tokenize(x) for x in p]
        return [list(x) for x in p]

    def build(self, req: CompletionRequest) -> list[GenerateRequest]:
        if req.suffix:
            raise RequestError(400, "suffix is not supported")
        if req.best_of not in (None, 1, req.n):
            raise RequestError(400, "best_of is not supported")
        prompts = self._prompts(req)
        vocab = self.tm.info.vocab_size
        for ids in prompts:
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise RequestError(400, f"prompt token ids must be in [0, {vocab})")
        key = grammar_key_from(req)
        rid = req.rid or new_id("cmpl")
        out = []
        for k, ids in enumerate(prompts):
            params = sampling_params_from(req, req.max_tokens, vocab)
            base = GenerateRequest(ids, params, rid=f"{rid}-p{k}" if len(prompts) > 1 else rid,
                                   return_logprob=req.logprobs is not None, top_logprobs_num=req.logprobs or 0,
                                   grammar_key=key)
            self.tm.check_length(ids, params)
            out.extend(expand_n(base, req.n))
        return out

    def _logprobs(self, items, offset: int) -> dict[str, Any]:
        tokens, lps, tops, offsets = [], [], [], []
        for token_id, lp, top in items:
            tok = self.tokenizer.decode([token_id])
            tokens.append(tok)
            lps.append(lp)
            tops.append({self.tokenizer.decode([t]): v for t, v in top} if top else None)
            offsets.append(offset)
            offset += len(tok)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    async def complete(self, req: CompletionRequest, reqs: list[GenerateRequest]) -> dict[str, Any]:
        texts = [[] for _ in reqs]
        logprobs = [[] for _ in reqs]
        last = [None] * len(reqs)
        async for i, chunk in merged_stream(self.tm, reqs):
            texts[i].append(chunk.text)
            logprobs[i].extend(chunk.logprobs)
            last[i] = chunk
        choices = []
        for i, chunk in enumerate(last):
            prefix = self.tokenizer.decode(reqs[i].input_ids) if req.echo else ""
            choices.append({"index": i, "text": prefix + "".join(texts[i]),
                            "logprobs": self._logprobs(logprobs[i], len(prefix)) if req.logprobs is not None else None,
                            "finish_reason": finish_reason_str(chunk.finish_reason),
                            "matched_stop": matched_stop(chunk.finish_reason)})
        prompt_tokens = sum(len(r.input_ids) for r in reqs[::req.n])
        return {"id": reqs[0].rid, "object": "text_completion", "created": now(), "model": self.tm.info.model_name,
                "choices": choices,
                "usage": usage_dict(prompt_tokens, sum(c.completion_tokens for c in last),
                                    max(c.cached_tokens for c in last))}

    async def stream(self, req: CompletionRequest, reqs: list[GenerateRequest]) -> AsyncIterator[str]:
        created, model, rid = now(), self.tm.info.model_name, reqs[0].rid
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        offsets = [0] * len(reqs)
        finals = [None] * len(reqs)
        if req.echo:
            for i, r in enumerate(reqs):
                text = self.tokenizer.decode(r.input_ids)
                offsets[i] = len(text)
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": None}]})
        async for i, chunk in merged_stream(self.tm, reqs):
            lp = self._logprobs(chunk.logprobs, offsets[i]) if req.logprobs is not None and chunk.logprobs else None
            offsets[i] += len(chunk.text)
            finish = finish_reason_str(chunk.finish_reason)
            if chunk.text or lp or finish:
                choice = {"index": i, "text": chunk.text, "logprobs": lp, "finish_reason": finish}
                if finish is not None:
                    choice["matched_stop"] = matched_stop(chunk.finish_reason)
                    finals[i] = chunk
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [choice]})
        if include_usage:
            done = [c for c in finals if c is not None]
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                       "usage": usage_dict(sum(len(r.input_ids) for r in reqs[::req.n]),
                                           sum(c.completion_tokens for c in done),
                                           max(c.cached_tokens for c in done))})
        yield sse("[DONE]")


class NativeServing:
    """SGLang's /generate: `text` or `input_ids`, `sampling_params`, optional `stream`."""

    def __init__(self, tm: TokenizerManager):
        self.tm = tm

    def build(self, body: GenerateRequestBody) -> tuple[list[GenerateRequest], bool]:
        if (body.text is None) == (body.input_ids is None):
            raise RequestError(400, "give exactly one of text and input_ids")
        if body.text is not None:
            batch = isinstance(body.text, list)
            ids = [self.tm.tokenize(t) for t in (body.text if batch else [body.text])]
        else:
            batch = bool(body.input_ids) and isinstance(body.input_ids[0], list)
            ids = body.input_ids if batch else [body.input_ids]
        sp = dict(body.sampling_params or {})
        sp.setdefault("max_new_tokens", 128)
        try:
            grammar = {k: sp.pop(k) for k in ("json_schema", "regex", "ebnf") if sp.get(k) is not None}
            params_list = []
            for _ in ids:
                p = make_sampling_params(dict(sp), self.tm.info.vocab_size)
                params_list.append(p)
        except (ValueError, TypeError) as exc:
            raise RequestError(400, str(exc)) from None
        if len(grammar) > 1:
            raise RequestError(400, "give only one of json_schema, regex and ebnf")
        key = None
        if grammar:
            kind, value = next(iter(grammar.items()))
            key = ("json" if kind == "json_schema" else kind, value)
        rid = body.rid or new_id("gen")
        reqs = []
        for k, (input_ids, params) in enumerate(zip(ids, params_list)):
            vocab = self.tm.info.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in input_ids):
                raise RequestError(400, f"input_ids must be in [0, {vocab})")
            self.tm.check_length(input_ids, params)
            base = GenerateRequest(list(input_ids), params, rid=f"{rid}-{k}" if batch else rid,
                                   return_logprob=body.return_logprob, top_logprobs_num=body.top_logprobs_num,
                                   grammar_key=key)
            reqs.extend(expand_n(base, params.n))
        return reqs, batch

    @staticmethod
    def _result(r: GenerateRequest, text: str, ids: list[int], chunk, logprobs) -> dict[str, Any]:
        meta = {"id": r.rid, "finish_reason": chunk.finish_reason, "prompt_tokens": chunk.prompt_tokens,
                "completion_tokens": chunk.completion_tokens, "cached_tokens": chunk.cached_tokens}
        if r.return_logprob:
            meta["output_token_logprobs"] = [[lp, t] for t, lp, _ in logprobs]
            meta["output_top_logprobs"] = [[[v, tid] for tid, v in top] for _, _, top in logprobs]
        return {"text": text, "output_ids": ids, "meta_info": meta}

    async def complete(self, reqs: list[GenerateRequest], batch: bool):
        last = [None] * len(reqs)
        texts, ids, lps = [[] for _ in reqs], [[] for _ in reqs], [[] for _ in reqs]
        async for i, chunk in merged_stream(self.tm, reqs):
            texts[i].append(chunk.text)
            ids[i].extend(chunk.token_ids)
            lps[i].extend(chunk.logprobs)
            last[i] = chunk
        results = [self._result(r, "".join(texts[i]), ids[i], last[i], lps[i]) for i, r in enumerate(reqs)]
        return results if batch or len(results) > 1 else results[0]

    async def stream(self, reqs: list[GenerateRequest]) -> AsyncIterator[str]:
        """Like SGLang: each event carries the text so far."""
        texts, ids, lps = [""] * len(reqs), [[] for _ in reqs], [[] for _ in reqs]
        async for i, chunk in merged_stream(self.tm, reqs):
            texts[i] += chunk.text
            ids[i].extend(chunk.token_ids)
            lps[i].extend(chunk.logprobs)
            out = self._result(reqs[i], texts[i], list(ids[i]), chunk, lps[i])
            out["index"] = i
            yield sse(out)
        yield sse("[DONE]")
