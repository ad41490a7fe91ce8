"""/v1/chat/completions: chat template → generate → (reasoning / tool-call parsing) → OpenAI JSON or SSE."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

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
from edgelm.entrypoints.openai.protocol import ChatCompletionRequest
from edgelm.managers.tokenizer_manager import GenerateRequest, RequestError, TokenizerManager


def _message_dicts(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for m in req.messages:
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(400, f"message content part of type {part.get('type')!r} is not supported "
                                            "(this model takes text)")
                texts.append(part["text"])
            d["content"] = "".join(texts)
        else:
            d["content"] = m.content if m.content is not None else ""
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            value = getattr(m, key)
            if value is not None:
                d[key] = value
        if d.get("tool_calls"):  # templates expect arguments as objects
            d["tool_calls"] = [_tool_call_for_template(tc) for tc in d["tool_calls"]]
        out.append(d)
    return out


def _tool_call_for_template(tc: dict) -> dict:
    fn = dict(tc.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            pass
    return {**tc, "function": fn}


class ChatServing:
    def __init__(self, tm: TokenizerManager, server_args):
        self.tm = tm
        self.args = server_args
        self.tokenizer = tm.tokenizer

    # ------------------------------------------------------------------ request → engine request
    def build(self, req: ChatCompletionRequest) -> tuple[GenerateRequest, dict[str, Any]]:
        if self.tokenizer.chat_template is None:
            raise RequestError(400, "this model has no chat template: pass --chat-template, or use /v1/completions")
        use_tools = bool(req.tools) and req.tool_choice != "none"
        kwargs = dict(req.chat_template_kwargs or {})
        if use_tools:
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        try:
            prompt = self.tokenizer.apply_chat_template(
                _message_dicts(req), tokenize=False, add_generation_prompt=not req.continue_final_message,
                continue_final_message=req.continue_final_message, **kwargs)
        except RequestError:
            raise
        except Exception as exc:  # template errors are the request's fault (e.g. roles out of order)
            raise RequestError(400, f"chat template failed: {exc}") from None
        input_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling_params_from(req, max_tokens, self.tm.info.vocab_size)
        parsers = self._parser_factory(req, prompt, use_tools)
        if parsers["tools"] is not None:
            params.skip_special_tokens = False  # tool-call markers are often special tokens
        grammar_key = grammar_key_from(req)
        if use_tools and req.tool_choice not in (None, "auto") and grammar_key is None:
            grammar_key = self._tool_choice_grammar(req)
        gen = GenerateRequest(input_ids, params, rid=req.rid or new_id("chatcmpl"),
                              return_logprob=req.logprobs, top_logprobs_num=req.top_logprobs or 0,
                              grammar_key=grammar_key,
                              grammar_after_think=parsers["prompt_in_think"])
        return gen, parsers

    def _parser_factory(self, req: ChatCompletionRequest, prompt: str, use_tools: bool) -> dict[str, Any]:
        reasoning = tools = None
        in_think = False
        if self.args.reasoning_parser and req.separate_reasoning:
            from edgelm.parsers.reasoning_parser import ReasoningParser, prompt_opens_reasoning
            in_think = prompt_opens_reasoning(prompt)
            reasoning = (ReasoningParser, dict(model_type=self.args.reasoning_parser,
                                               stream_reasoning=req.stream_reasoning, force_reasoning=in_think))
        if use_tools and self.args.tool_call_parser:
            from edgelm.parsers.tool_call_parser import ToolCallParser
            tools = (ToolCallParser, dict(name=self.args.tool_call_parser,
                                          tools=[t.model_dump(exclude_none=True) for t in req.tools]))
        return {"reasoning": reasoning, "tools": tools, "prompt_in_think": in_think}

    def _tool_choice_grammar(self, req: ChatCompletionRequest) -> tuple[str, str] | None:
        """tool_choice 'required' or a named function: constrain the output to a JSON call."""
        tools = req.tools
        if isinstance(req.tool_choice, dict) or hasattr(req.tool_choice, "function"):
            tools = [t for t in req.tools if t.function.name == req.tool_choice.function.name]
            if not tools:
                raise RequestError(400, f"tool_choice names {req.tool_choice.function.name!r}, which is not in tools")
        variants = [{"type": "object", "properties": {
            "name": {"const": t.function.name},
            "arguments": t.function.parameters or {"type": "object"}}, "required": ["name", "arguments"]}
            for t in tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": variants}} if len(variants) > 1 or \
            req.tool_choice == "required" else variants[0]
        return ("json", json.dumps(schema))

    @staticmethod
    def _make(spec):
        return None if spec is None else spec[0](**spec[1])

    # ------------------------------------------------------------------ non-streaming
    async def complete(self, req: ChatCompletionRequest, gen: GenerateRequest, parsers: dict) -> dict[str, Any]:
        reqs = expand_n(gen, req.n)
        texts = [[] for _ in reqs]
        ids = [[] for _ in reqs]
        logprobs = [[] for _ in reqs]
        last = [None] * len(reqs)
        async for i, chunk in merged_stream(self.tm, reqs):
            texts[i].append(chunk.text)
            ids[i].extend(chunk.token_ids)
            logprobs[i].extend(chunk.logprobs)
            last[i] = chunk
        choices = []
        forced_tools = req.tool_choice not in (None, "auto", "none") and bool(req.tools)
        for i, chunk in enumerate(last):
            text = "".join(texts[i])
            message: dict[str, Any] = {"role": "assistant", "content": text}
            finish = finish_reason_str(chunk.finish_reason)
            reasoning = self._make(parsers["reasoning"])
            if reasoning is not None:
                reasoning_text, text = reasoning.parse_non_stream(text)
                message["reasoning_content"] = reasoning_text or None
                message["content"] = text
            tool_parser = self._make(parsers["tools"])
            calls = []
            if forced_tools:
                calls = _calls_from_forced_json(text)
            elif tool_parser is not None:
                text, calls = tool_parser.parse_non_stream(text)
            if calls:
                message["content"] = text or None
                message["tool_calls"] = [{"id": getattr(c, "id", None) or new_id("call"), "type": "function",
                                          "index": k,
                                          "function": {"name": c.name, "arguments": c.arguments}}
                                         for k, c in enumerate(calls)]
                if finish == "stop":
                    finish = "tool_calls"
            choices.append({"index": i, "message": message,
                            "logprobs": self._logprobs(logprobs[i]) if req.logprobs else None,
                            "finish_reason": finish, "matched_stop": matched_stop(chunk.finish_reason)})
        prompt_tokens = last[0].prompt_tokens
        completion = sum(c.completion_tokens for c in last)
        cached = max(c.cached_tokens for c in last)
        return {"id": gen.rid, "object": "chat.completion", "created": now(), "model": self._model_name(req),
                "choices": choices, "usage": usage_dict(prompt_tokens, completion, cached)}

    # ------------------------------------------------------------------ streaming
    async def stream(self, req: ChatCompletionRequest, gen: GenerateRequest, parsers: dict) -> AsyncIterator[str]:
        reqs = expand_n(gen, req.n)
        created, model = now(), self._model_name(req)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        reasoners = [self._make(parsers["reasoning"]) for _ in reqs]
        tool_parsers = [self._make(parsers["tools"]) for _ in reqs]
        saw_tool_call = [False] * len(reqs)
        finals = [None] * len(reqs)

        def chunk_json(i: int, delta: dict, finish=None, logprobs=None, matched=None) -> str:
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["matched_stop"] = matched
            return sse({"id": gen.rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [choice], "usage": None})

        for i in range(len(reqs)):
            yield chunk_json(i, {"role": "assistant", "content": ""})
        async for i, chunk in merged_stream(self.tm, reqs):
            text = chunk.text
            delta: dict[str, Any] = {}
            if reasoners[i] is not None and text:
                reasoning_delta, text = reasoners[i].parse_stream_chunk(text)
                if reasoning_delta:
                    delta["reasoning_content"] = reasoning_delta
            if tool_parsers[i] is not None and text:
                text, call_deltas = tool_parsers[i].parse_stream_chunk(text)
                if call_deltas:
                    saw_tool_call[i] = True
                    delta["tool_calls"] = [_call_delta_json(d) for d in call_deltas]
            if text:
                delta["content"] = text
            finish = finish_reason_str(chunk.finish_reason)
            if finish is not None:  # flush what the parsers held back
                if reasoners[i] is not None:
                    r_tail, n_tail = reasoners[i].finish()
                    if r_tail:
                        delta["reasoning_content"] = delta.get("reasoning_content", "") + r_tail
                    if tool_parsers[i] is not None and n_tail:
                        n_tail, more = tool_parsers[i].parse_stream_chunk(n_tail)
                        if more:
                            saw_tool_call[i] = True
                            delta.setdefault("tool_calls", []).extend(_call_delta_json(d) for d in more)
                    text += n_tail
                if tool_parsers[i] is not None:
                    t_tail, more = tool_parsers[i].finish()
                    if more:
                        saw_tool_call[i] = True
                        delta.setdefault("tool_calls", []).extend(_call_delta_json(d) for d in more)
                    text += t_tail
                if text:
                    delta["content"] = text
            if finish == "stop" and saw_tool_call[i]:
                finish = "tool_calls"
            lp = self._logprobs(chunk.logprobs) if req.logprobs and chunk.logprobs else None
            if delta or lp:
                yield chunk_json(i, delta, logprobs=lp)
            if finish is not None:
                finals[i] = chunk
                yield chunk_json(i, {}, finish=finish, matched=matched_stop(chunk.finish_reason))
        if include_usage:
            done = [c for c in finals if c is not None]
            usage = usage_dict(done[0].prompt_tokens, sum(c.completion_tokens for c in done),
                               max(c.cached_tokens for c in done))
            yield sse({"id": gen.rid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage})
        yield sse("[DONE]")

    # ------------------------------------------------------------------ helpers
    def _model_name(self, req) -> str:
        return self.tm.info.model_name

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprobs(self, items) -> dict[str, Any]:
        content = []
        for token_id, lp, top in items:
            tok = self._token_str(token_id)
            content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")),
                            "top_logprobs": [{"token": (t := self._token_str(tid)), "logprob": tlp,
                                              "bytes": list(t.encode("utf-8"))} for tid, tlp in top]})
        return {"content": content}


def _call_delta_json(d) -> dict[str, Any]:
    out: dict[str, Any] = {"index": d.index, "function": {}}
    if d.name is not None:
        out["id"] = d.id or new_id("call")
        out["type"] = "function"
        out["function"]["name"] = d.name
    out["function"]["arguments"] = d.arguments_delta or ""
    return out


class _Call:
    def __init__(self, name: str, arguments: str):
        self.name, self.arguments = name, arguments


def _calls_from_forced_json(text: str) -> list[_Call]:
    """Output constrained by tool_choice: one {"name", "arguments"} object, or a list of them."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    items = value if isinstance(value, list) else [value]
    return [_Call(it["name"], json.dumps(it.get("arguments", {}), ensure_ascii=False))
            for it in items if isinstance(it, dict) and "name" in it]
