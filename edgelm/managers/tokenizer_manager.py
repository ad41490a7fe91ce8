"""The tokenizer manager (HTTP process): tokenizes requests, sends them to the engine, and turns
the token ids that come back into text, with stop strings and logprobs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from edgelm.managers import io_struct as io
from edgelm.managers.tokenizer_utils import IncrementalDetokenizer, StopStringFilter
from edgelm.sampling.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the engine refused or failed; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class GenerateRequest:
    input_ids: list[int]
    sampling_params: SamplingParams
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    grammar_key: tuple[str, str] | None = None
    grammar_after_think: bool = False


@dataclass
class GenerateChunk:
    """What a request produced since the previous chunk."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: dict[str, Any] | None = None
    # (token_id, logprob, [(token_id, logprob), ...]) per new token
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


class _ReqState:
    def __init__(self, tokenizer, params: SamplingParams):
        self.queue: asyncio.Queue[io.ReqOutput] = asyncio.Queue()
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens,
                                            params.spaces_between_special_tokens)
        self.stops = StopStringFilter(params.stop, keep_stop=params.no_stop_trim)
        self.finished = False
        self.created = time.perf_counter()
        self.first_token_time: float | None = None
        self.last_time = self.created


class TokenizerManager:
    def __init__(self, server_args, engine_info: io.EngineInfo, tokenizer, port_args):
        self.server_args = server_args
        self.info = engine_info
        self.tokenizer = tokenizer
        self.port_args = port_args
        self.ctx = zmq.asyncio.Context(2)
        self.send_sock = self.ctx.socket(zmq.PUSH)
        self.send_sock.connect(port_args.scheduler_input)
        self.recv_sock = self.ctx.socket(zmq.PULL)
        self.recv_sock.bind(port_args.tokenizer_input)
        self.states: dict[str, _ReqState] = {}
        self.pending_state: deque[asyncio.Future] = deque()
        self.pending_flush: deque[asyncio.Future] = deque()
        self.last_stats: io.InternalState | None = None
        self.metrics = None  # set by the HTTP server when --enable-metrics
        self.loop_task: asyncio.Task | None = None
        self.last_output_time = time.monotonic()
        self.num_inflight = 0  # HTTP generation requests being served (counted by the HTTP server)
        self.dead: str | None = None  # why the engine can no longer serve (watchdog), else None

    # ------------------------------------------------------------------ engine I/O
    def start(self) -> None:
        if self.loop_task is None:
            self.loop_task = asyncio.get_running_loop().create_task(self._recv_loop())

    async def _recv_loop(self) -> None:
        while True:
            msg = await self.recv_sock.recv_pyobj()
            self.last_output_time = time.monotonic()
            try:
                self._dispatch(msg)
            except Exception:
                logger.exception("error dispatching an engine message")

    def _dispatch(self, msg) -> None:
        if isinstance(msg, io.BatchOutput):
            for out in msg.outputs:
                state = self.states.get(out.rid)
                if state is not None:
                    state.queue.put_nowait(out)
            if msg.stats is not None:
                self.last_stats = msg.stats
                if self.metrics is not None:
                    self.metrics.log_engine_state(msg.stats)
        elif isinstance(msg, io.InternalState):
            self.last_stats = msg
            if self.pending_state:
                self.pending_state.popleft().set_result(msg)
        elif isinstance(msg, io.FlushCacheOut):
            if self.pending_flush:
                self.pending_flush.popleft().set_result(msg)

    async def _ask(self, msg, pending: deque, timeout: float = 10.0):
        fut = asyncio.get_running_loop().create_future()
        pending.append(fut)
        await self.send_sock.send_pyobj(msg)
        return await asyncio.wait_for(fut, timeout)

    async def get_internal_state(self) -> io.InternalState:
        return await self._ask(io.GetInternalStateReq(), self.pending_state)

    async def flush_cache(self) -> io.FlushCacheOut:
        return await self._ask(io.FlushCacheReq(), self.pending_flush)

    async def abort(self, rid: str) -> bool:
        if rid not in self.states:
            return False
        self._send_nowait(io.AbortReq(rid))
        return True

    def _send_nowait(self, msg) -> None:
        """Send without awaiting: safe in `finally` blocks of a cancelled task (a client that hung up)."""
        def report(fut) -> None:
            if not fut.cancelled() and fut.exception() is not None:
                logger.error("could not send %s: %s", type(msg).__name__, fut.exception())

        self.send_sock.send_pyobj(msg).add_done_callback(report)

    def fail_all(self, status: int, message: str) -> None:
        """Fail every request in flight (the engine died or stalled)."""
        for rid, state in list(self.states.items()):
            state.queue.put_nowait(io.ReqOutput(rid, [], 0, 0, 0, {"type": "abort"}, error=(status, message)))

    async def watch_engine(self, engine_proc, timeout_s: float, on_fatal) -> None:
        """The watchdog: the engine loop reports at least once a second (statistics); if it is silent
        for `timeout_s`, or its process is gone, fail the requests in flight and call `on_fatal(reason)`."""
        period = min(1.0, timeout_s / 4)
        last_tick = time.monotonic()
        while self.dead is None:
            await asyncio.sleep(period)
            now = time.monotonic()
            if now - last_tick > max(2 * period, 1.0):  # this event loop itself was blocked: look again
                last_tick = now
                continue
            last_tick = now
            if engine_proc is not None and not engine_proc.is_alive():
                reason = f"the engine process exited (code {engine_proc.exitcode})"
            elif now - self.last_output_time > timeout_s:
                reason = f"the engine loop made no progress for {now - self.last_output_time:.0f} s (watchdog)"
            else:
                continue
            self.dead = reason
            logger.error("%s: failing %d requests in flight; the server will exit", reason, len(self.states))
            self.fail_all(503, f"the server is restarting: {reason}")
            on_fatal(reason)

    # ------------------------------------------------------------------ requests
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_length(self, input_ids: list[int], params: SamplingParams) -> None:
        """Fit max_new_tokens into the context; refuse prompts that cannot fit (a 400)."""
        n, ctx = len(input_ids), self.info.context_len
        limit = min(ctx, self.info.max_total_tokens)
        if n == 0:
            raise RequestError(400, "the prompt is empty")
        if n >= limit:
            raise RequestError(400, f"the prompt has {n} tokens; this server's context length is {ctx} "
                                    f"and its KV pool holds {self.info.max_total_tokens} tokens")
        if params.max_new_tokens is None:
            params.max_new_tokens = limit - n
        elif n + params.max_new_tokens > ctx:
            raise RequestError(400, f"the prompt ({n} tokens) plus max_tokens ({params.max_new_tokens}) is "
                                    f"more than this model's context length ({ctx})")
        params.max_new_tokens = min(params.max_new_tokens, limit - n)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream one request's output. Closing the iterator early aborts the request in the engine;
        a request still running after --request-timeout seconds fails with a 504."""
        self.start()
        if self.dead is not None:
            raise RequestError(503, f"the server is restarting: {self.dead}")
        params = req.sampling_params
        self.check_length(req.input_ids, params)
        state = _ReqState(self.tokenizer, params)
        self.states[req.rid] = state
        msg = io.TokenizedGenerateReq(req.rid, req.input_ids, params, req.return_logprob, req.top_logprobs_num,
                                      req.grammar_key, req.grammar_after_think)
        if self.server_args.log_requests:
            logger.info("request %s: %d prompt tokens, %s", req.rid, len(req.input_ids), params)
        timeout = getattr(self.server_args, "request_timeout", None)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            await self.send_sock.send_pyobj(msg)
            while True:
                if deadline is None:
                    out = await state.queue.get()
                else:
                    try:
                        out = await asyncio.wait_for(state.queue.get(), max(deadline - time.monotonic(), 0))
                    except asyncio.TimeoutError:
                        raise RequestError(504, f"the request ran longer than the server's request timeout "
                                                f"({timeout:g} s) and was aborted") from None
                chunk = self._to_chunk(state, out)
                if chunk.finish_reason is not None:
                    state.finished = True
                    self._observe_finished(state, chunk)
                yield chunk
                if state.finished:
                    return
        finally:
            self.states.pop(req.rid, None)
            if not state.finished:
                try:
                    self._send_nowait(io.AbortReq(req.rid))
                except Exception:
                    logger.exception("could not abort %s", req.rid)
                if self.metrics is not None:
                    self.metrics.inc_aborted()

    def _to_chunk(self, state: _ReqState, out: io.ReqOutput) -> GenerateChunk:
        if out.error is not None:
            state.finished = True
            raise RequestError(*out.error)
        finish = out.finish_reason
        final = finish is not None
        text = state.stops.feed(state.detok.add(out.new_token_ids, final=final), final=final)
        if state.stops.stopped is not None and finish is None:
            # the text hit a stop string the engine has not seen yet (e.g. across a token boundary)
            finish = {"type": "stop", "matched": state.stops.stopped}
            self._send_nowait(io.AbortReq(out.rid))
        elif finish is not None and finish.get("type") == "stop" and isinstance(finish.get("matched"), str):
            finish = dict(finish, matched=state.stops.stopped or finish["matched"])
        now = time.perf_counter()
        if out.new_token_ids and self.metrics is not None:
            if state.first_token_time is None:
                self.metrics.observe_time_to_first_token(now - state.created)
            else:
                self.metrics.observe_inter_token_latency(now - state.last_time, len(out.new_token_ids))
        if out.new_token_ids:
            state.first_token_time = state.first_token_time or now
            state.last_time = now
        logprobs = []
        if out.logprobs:
            tops = out.top_logprobs or [[] for _ in out.logprobs]
            logprobs = [(t, lp, top) for t, lp, top in zip(out.new_token_ids, out.logprobs, tops)]
        return GenerateChunk(text, out.new_token_ids, out.prompt_tokens, out.completion_tokens, out.cached_tokens,
                             finish, logprobs)

    def _observe_finished(self, state: _ReqState, chunk: GenerateChunk) -> None:
        if self.server_args.log_requests:
            logger.info("finished: %d prompt + %d completion tokens, %s, output %r", chunk.prompt_tokens,
                        chunk.completion_tokens, chunk.finish_reason, state.stops.text[:2000])
        if self.metrics is not None:
            ttft = None if state.first_token_time is None else state.first_token_time - state.created
            self.metrics.observe_one_finished_request(chunk.prompt_tokens, chunk.completion_tokens,
                                                      time.perf_counter() - state.created, cached_tokens=chunk.cached_tokens,
                                                      time_to_first_token=ttft)

    async def generate_full(self, req: GenerateRequest) -> GenerateChunk:
        """Run a request to the end and return it as one chunk (text, ids and logprobs joined)."""
        text, ids, logprobs, last = [], [], [], None
        async for chunk in self.generate(req):
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            logprobs.extend(chunk.logprobs)
            last = chunk
        return dataclasses.replace(last, text="".join(text), token_ids=ids, logprobs=logprobs)

    def close(self) -> None:
        if self.loop_task is not None:
            self.loop_task.cancel()
        self.send_sock.close(0)
        self.recv_sock.close(0)
        self.ctx.term()
