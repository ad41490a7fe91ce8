"""The HTTP server: OpenAI routes, SGLang's native routes, auth, limits and error shapes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

import edgelm
from edgelm.entrypoints.http_guard import GuardMiddleware
from edgelm.entrypoints.openai.common import error_body, error_response, sse
from edgelm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequestBody
from edgelm.entrypoints.openai.serving_chat import ChatServing
from edgelm.entrypoints.openai.serving_completions import CompletionServing, NativeServing
from edgelm.managers.tokenizer_manager import GenerateRequest, RequestError, TokenizerManager
from edgelm.sampling.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# after the watchdog fires: seconds /health answers 503 before the server exits
_FATAL_GRACE_S = 2.0


def _error_dict(status: int, message: str) -> dict:
    body = error_body(status, message)
    if status == 504:
        body["error"]["type"] = "timeout_error"
    return body


def _api_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(_error_dict(status, message), status_code=status, headers=headers)


def _has_bad_unicode(value) -> bool:
    """Whether a request holds a string UTF-8 cannot encode (a lone surrogate from a \\ud800 escape)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, BaseModel):
            stack.extend(v.__dict__.values())
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)) and v and not isinstance(v[0], int):
            stack.extend(v)
    return False


class _MetricsAdapter:
    """Feeds the engine's periodic state and per-request timings into the Prometheus collectors."""

    def __init__(self, server_metrics):
        from edgelm.metrics import SchedulerStats

        self.m = server_metrics
        self.stats_cls = SchedulerStats

    def log_engine_state(self, s) -> None:
        self.m.scheduler.log_stats(self.stats_cls(
            num_running_reqs=s.num_running_reqs, num_queue_reqs=s.num_waiting_reqs,
            num_used_tokens=s.used_kv_tokens, max_total_num_tokens=s.max_total_tokens,
            token_usage=s.used_kv_tokens / max(s.max_total_tokens, 1), cache_hit_rate=s.cache_hit_rate,
            gen_throughput=s.last_gen_throughput))

    def __getattr__(self, name):
        return getattr(self.m.tokenizer, name)


def create_app(server_args, engine_info, tokenizer, port_args, engine_proc=None, on_fatal=None) -> FastAPI:
    """The FastAPI app. `engine_proc`: the engine's process (watched by the watchdog when given);
    `on_fatal(reason)`: called when the engine died or stalled (the launcher then exits non-zero)."""
    state: dict = {}

    def fatal(reason: str) -> None:
        state["fatal"] = reason
        if engine_proc is not None and engine_proc.is_alive():
            engine_proc.kill()  # stalled: a restart is the way out
        if on_fatal is not None:
            asyncio.get_running_loop().call_later(_FATAL_GRACE_S, on_fatal, reason)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tm = TokenizerManager(server_args, engine_info, tokenizer, port_args)
        tm.start()
        watchdog = None
        if engine_proc is not None:
            watchdog = asyncio.get_running_loop().create_task(
                tm.watch_engine(engine_proc, server_args.watchdog_timeout, fatal))
        if server_args.enable_metrics:
            from edgelm.metrics import ServerMetrics

            state["metrics"] = ServerMetrics(engine_info.model_name)
            tm.metrics = _MetricsAdapter(state["metrics"])
        state.update(tm=tm, chat=ChatServing(tm, server_args), completions=CompletionServing(tm),
                     native=NativeServing(tm))
        yield
        if watchdog is not None:
            watchdog.cancel()
        tm.close()

    app = FastAPI(title="edgelm", version=edgelm.__version__, lifespan=lifespan)
    max_inflight = None
    if server_args.max_queued_requests is not None:
        max_inflight = engine_info.max_running_requests + server_args.max_queued_requests
    app.add_middleware(GuardMiddleware, api_key=server_args.api_key, max_inflight=max_inflight,
                       get_tm=lambda: state.get("tm"))

    # ------------------------------------------------------------------ errors

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = f"{'.'.join(loc) + ': ' if loc else ''}{first.get('msg', 'invalid request')}"
        return error_response(400, message, param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")

    # ------------------------------------------------------------------ helpers
    async def run_or_disconnect(request: Request, coro):
        """Run a non-streaming request; if the client goes away, cancel it (aborting in the engine)."""
        task = asyncio.ensure_future(coro)
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return Response(status_code=499)

    async def sse_guard(gen):
        """Errors after the stream started become an error event, then [DONE]."""
        try:
            async for item in gen:
                yield item
        except RequestError as exc:
            yield sse(_error_dict(exc.status, exc.message))
            yield sse("[DONE]")
        except Exception as exc:
            logger.exception("error while streaming")
            yield sse(error_body(500, f"internal error: {type(exc).__name__}"))
            yield sse("[DONE]")

    def streaming(gen) -> StreamingResponse:
        return StreamingResponse(sse_guard(gen), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def check_body(body) -> None:
        if _has_bad_unicode(body):
            raise RequestError(400, "the request holds text that is not valid Unicode (a lone surrogate)")

    def request_error(exc: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return _api_error(exc.status, exc.message, headers=headers)

    # ------------------------------------------------------------------ OpenAI routes
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            check_body(body)
            gen, parsers = state["chat"].build(body)
            state["tm"].check_length(gen.input_ids, gen.sampling_params)
            if body.stream:
                return streaming(state["chat"].stream(body, gen, parsers))
            return await run_or_disconnect(request, state["chat"].complete(body, gen, parsers))
        except RequestError as exc:
            return request_error(exc)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        try:
            check_body(body)
            reqs = state["completions"].build(body)
            if body.stream:
                return streaming(state["completions"].stream(body, reqs))
            return await run_or_disconnect(request, state["completions"].complete(body, reqs))
        except RequestError as exc:
            return request_error(exc)

    @app.get("/v1/models")
    async def models():
        info = engine_info
        return {"object": "list", "data": [{"id": info.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "edgelm", "root": info.model_path,
                                            "max_model_len": info.context_len}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        data = (await models())["data"][0]
        return data if model_id == data["id"] else error_response(404, f"model {model_id!r} not found")

    # ------------------------------------------------------------------ SGLang native routes
    @app.post("/generate")
    async def generate(body: GenerateRequestBody, request: Request):
        try:
            check_body(body)
            reqs, batch = state["native"].build(body)
            if body.stream:
                return streaming(state["native"].stream(reqs))
            return await run_or_disconnect(request, state["native"].complete(reqs, batch))
        except RequestError as exc:
            return request_error(exc)

    @app.get("/health")
    async def health():
        if "fatal" in state:
            return error_response(503, f"unhealthy: {state['fatal']}")
        if engine_proc is not None and not engine_proc.is_alive():
            return error_response(503, "the engine process is not running")
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate():
        tm = state["tm"]
        bos = getattr(tokenizer, "bos_token_id", None)
        req = GenerateRequest([bos if bos is not None else 0], SamplingParams(max_new_tokens=1, temperature=0),
                              rid=f"health-{time.monotonic_ns()}")
        try:
            await asyncio.wait_for(tm.generate_full(req), timeout=30)
        except Exception as exc:
            return error_response(503, f"generation failed: {type(exc).__name__}: {exc}")
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def get_model_info():
        return {"model_path": engine_info.model_path,
                "tokenizer_path": server_args.tokenizer_path or engine_info.model_path,
                "is_generation": True, "served_model_name": engine_info.model_name}

    @app.get("/get_server_info")
    async def get_server_info():
        try:
            internal = dataclasses.asdict(await state["tm"].get_internal_state())
        except asyncio.TimeoutError:
            internal = None
        args = dataclasses.asdict(server_args)
        args.pop("api_key", None)
        return {**args, "version": edgelm.__version__, "engine": dataclasses.asdict(engine_info),
                "internal_states": [internal], "num_inflight_requests": state["tm"].num_inflight,
                "pid": os.getpid(), "engine_pid": engine_proc.pid if engine_proc is not None else None}

    @app.get("/flush_cache")
    @app.post("/flush_cache")
    async def flush_cache():
        out = await state["tm"].flush_cache()
        return Response(content=out.message, status_code=200 if out.success else 400)

    @app.post("/abort_request")
    async def abort_request(request: Request):
        try:
            rid = (await request.json()).get("rid")
        except (ValueError, AttributeError):  # bad JSON or UTF-8, or not an object
            rid = None
        if not isinstance(rid, str):
            return error_response(400, "give the request id as {\"rid\": ...}")
        found = await state["tm"].abort(rid) or any([await state["tm"].abort(f"{rid}-{i}") for i in range(16)])
        return Response(status_code=200 if found else 404)

    if server_args.enable_metrics:
        @app.get("/metrics", include_in_schema=False)
        async def metrics():
            body, content_type = state["metrics"].render()
            return Response(content=body, media_type=content_type)

    return app


def launch_server(server_args) -> None:
    """Start the engine, then serve HTTP until SIGINT / SIGTERM."""
    import uvicorn

    from edgelm.managers.engine_process import (
        PortArgs,
        configure_logging,
        spawn_engine_process,
        wait_engine_ready,
    )
    from edgelm.managers.tokenizer_utils import load_tokenizer
    from edgelm.model_loader.resolve import resolve_model

    configure_logging(server_args.log_level)
    port_args = PortArgs.new()
    proc, conn = spawn_engine_process(server_args, port_args)
    try:
        # the tokenizer loads here while the engine loads the model
        tokenizer = load_tokenizer(server_args, resolve_model(server_args.model_path, server_args.revision))
        info = wait_engine_ready(proc, conn)
        fatal: list[str] = []
        server = None

        def on_fatal(reason: str) -> None:
            fatal.append(reason)
            server.should_exit = True

        app = create_app(server_args, info, tokenizer, port_args, engine_proc=proc, on_fatal=on_fatal)
        logger.info("serving %s on http://%s:%d (OpenAI API at /v1)", info.model_name, server_args.host,
                    server_args.port)
        # SIGTERM / SIGINT: uvicorn stops accepting, lets requests in flight finish (up to 30 s), then exits
        server = uvicorn.Server(uvicorn.Config(app, host=server_args.host, port=server_args.port,
                                               log_level="warning", timeout_graceful_shutdown=30,
                                               timeout_keep_alive=30))
        server.run()
        if fatal:
            raise SystemExit(f"edgelm: exiting after a fatal engine error: {fatal[0]}")
    finally:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
            proc.join(10)
        if proc.is_alive():
            proc.kill()
