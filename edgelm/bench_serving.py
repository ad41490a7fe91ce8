"""Load test a serving endpoint: ``python -m edgelm.bench_serving`` (SGLang's bench_serving flags).

Streams requests to an OpenAI-compatible server (``openai-chat``, ``openai-completions``) or the
SGLang/edgelm native ``/generate`` route (``edgelm-native``), at a Poisson request rate and/or a
concurrency cap, and reports request and token throughput and TTFT / ITL / TPOT / end-to-end latency
(mean, median, p90, p99), with the text of every failure. A list of rates or concurrencies runs a
sweep, and ``--plot`` draws latency against load.

    python -m edgelm.bench_serving --backend openai-chat --dataset-name random \\
        --random-input-len 128 --random-output-len 32 --num-prompts 32 \\
        --max-concurrencies 1,4,8 --output-file out.json --plot out.png

The HTTP client is asyncio's streams (no dependency), one connection per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shlex
import ssl
import sys
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from edgelm.bench.workloads import BenchRequest, load_tokenizer, sample_requests

BACKENDS = ("openai-chat", "openai-completions", "edgelm-native")
_ROUTES = {"openai-chat": "/v1/chat/completions", "openai-completions": "/v1/completions",
           "edgelm-native": "/generate"}


# ----------------------------------------------------------------------------- HTTP


class HTTPResponse:
    """A response whose body is read as it arrives (chunked, sized, or until close)."""

    def __init__(self, status: int, headers: dict[str, str], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.status, self.headers, self._reader, self._writer = status, headers, reader, writer

    async def iter_bytes(self):
        r = self._reader
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while True:
                size = int((await r.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await r.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield await r.readexactly(size)
                await r.readline()
        elif "content-length" in self.headers:
            left = int(self.headers["content-length"])
            while left > 0:
                part = await r.read(min(left, 1 << 16))
                if not part:
                    raise ConnectionError("connection closed before the end of the body")
                left -= len(part)
                yield part
        else:
            while part := await r.read(1 << 16):
                yield part

    async def iter_lines(self):
        buf = b""
        async for part in self.iter_bytes():
            buf += part
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode("utf-8", "replace")
        if buf:
            yield buf.rstrip(b"\r").decode("utf-8", "replace")

    async def read(self) -> bytes:
        return b"".join([part async for part in self.iter_bytes()])

    def close(self) -> None:
        self._writer.close()


async def http_request(url: str, payload: dict | None = None, api_key: str | None = None) -> HTTPResponse:
    """POST ``payload`` as JSON (GET when None); returns once the status line and headers are in."""
    u = urllib.parse.urlsplit(url)
    https = u.scheme == "https"
    reader, writer = await asyncio.open_connection(
        u.hostname, u.port or (443 if https else 80), ssl=ssl.create_default_context() if https else None,
        limit=1 << 24)
    body = b"" if payload is None else json.dumps(payload).encode()
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    lines = [f"{'GET' if payload is None else 'POST'} {target} HTTP/1.1", f"Host: {u.netloc}",
             "Connection: close", "Accept: application/json, text/event-stream", "User-Agent: edgelm-bench"]
    if payload is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if api_key:
        lines.append(f"Authorization: Bearer {api_key}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    status_line = (await reader.readline()).decode("latin-1").split()
    if len(status_line) < 2:
        writer.close()
        raise ConnectionError("no HTTP status line in the response")
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    return HTTPResponse(int(status_line[1]), headers, reader, writer)


async def get_json(url: str, api_key: str | None = None) -> dict:
    resp = await http_request(url, api_key=api_key)
    try:
        body = await resp.read()
    finally:
        resp.close()
    if resp.status != 200:
        raise RuntimeError(f"GET {url}: HTTP {resp.status}: {body[:300].decode('utf-8', 'replace')}")
    return json.loads(body)


# ----------------------------------------------------------------------------- one request


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from sending to the first output chunk
    e2e_latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between output chunks
    text: str = ""


def build_payload(backend: str, model: str | None, req: BenchRequest, ignore_eos: bool,
                  extra_body: dict) -> dict:
    prompt = req.prompt
    if backend == "openai-chat":
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        body = {"messages": messages, "max_tokens": req.output_len}
    else:
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        if backend == "edgelm-native":
            params = {"max_new_tokens": req.output_len, "temperature": 0.0}
            if ignore_eos:
                params["ignore_eos"] = True
            return {"text": text, "sampling_params": params, "stream": True, **extra_body}
        body = {"prompt": text, "max_tokens": req.output_len}
    if model:
        body["model"] = model
    body.update(temperature=0.0, stream=True, stream_options={"include_usage": True})
    if ignore_eos:
        body["ignore_eos"] = True
    body.update(extra_body)
    return body


def _error_text(event: dict) -> str | None:
    err = event.get("error")
    if err is None and event.get("object") == "error":
        err = event
    if err is None:
        return None
    return err.get("message", json.dumps(err)) if isinstance(err, dict) else str(err)


def parse_event(backend: str, event: dict, state: dict) -> str:
    """The new output text in one SSE event; fills state['prompt_tokens'/'output_tokens']."""
    if backend == "edgelm-native":
        meta = event.get("meta_info") or {}
        if "prompt_tokens" in meta:
            state["prompt_tokens"] = meta["prompt_tokens"]
        if "completion_tokens" in meta:
            state["output_tokens"] = meta["completion_tokens"]
        text = event.get("text", "")
        seen = state.get("native_text", "")
        state["native_text"] = text if text.startswith(seen) else seen + text  # cumulative or incremental
        return state["native_text"][len(seen):]
    usage = event.get("usage")
    if usage:
        state["prompt_tokens"] = usage.get("prompt_tokens", 0)
        state["output_tokens"] = usage.get("completion_tokens", 0)
    new = ""
    for choice in event.get("choices") or []:
        if backend == "openai-chat":
            delta = choice.get("delta") or {}
            new += (delta.get("reasoning_content") or "") + (delta.get("content") or "")
        else:
            new += choice.get("text") or ""
    return new


async def send_request(url: str, payload: dict, backend: str, api_key: str | None) -> RequestResult:
    res = RequestResult()
    state: dict = {}
    chunks: list[str] = []
    start = last = time.perf_counter()
    resp = None
    try:
        resp = await http_request(url, payload, api_key)
        if resp.status != 200:
            body = (await resp.read()).decode("utf-8", "replace").strip()
            res.error = f"HTTP {resp.status}: {body[:500]}"
            return res
        async for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if (err := _error_text(event)) is not None:
                res.error = f"stream error: {err[:500]}"
                return res
            new = parse_event(backend, event, state)
            if new:
                now = time.perf_counter()
                if not chunks:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
                chunks.append(new)
        res.e2e_latency = time.perf_counter() - start
        res.text = "".join(chunks)
        res.prompt_tokens = int(state.get("prompt_tokens", 0))
        res.output_tokens = int(state.get("output_tokens", 0)) or len(chunks)
        res.success = bool(chunks)
        if not chunks:
            res.error = "the stream ended without output"
    except Exception as e:  # noqa: BLE001 - every failure is a result, with its text
        res.error = f"{type(e).__name__}: {e}"
    finally:
        if resp is not None:
            resp.close()
    return res


# ----------------------------------------------------------------------------- a run


def _dist(name: str, values_s: list[float]) -> dict:
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    if arr.size == 0:
        return {f"{k}_{name}_ms": None for k in ("mean", "median", "p90", "p99", "max")}
    return {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.percentile(arr, 50)),
            f"p90_{name}_ms": float(np.percentile(arr, 90)), f"p99_{name}_ms": float(np.percentile(arr, 99)),
            f"max_{name}_ms": float(arr.max())}


def summarize(results: list[RequestResult], requests: list[BenchRequest], duration: float,
              tokenizer=None) -> dict:
    ok = [(r, q) for r, q in zip(results, requests) if r.success]
    for r, q in ok:
        if not r.prompt_tokens:  # the server sent no usage: count locally
            r.prompt_tokens = q.prompt_len
        if tokenizer is not None and not r.output_tokens:
            r.output_tokens = len(tokenizer.encode(r.text, add_special_tokens=False))
    ins = sum(r.prompt_tokens for r, _ in ok)
    outs = sum(r.output_tokens for r, _ in ok)
    tpot = [(r.e2e_latency - r.ttft) / (r.output_tokens - 1) for r, _ in ok if r.output_tokens > 1]
    errors = Counter(r.error for r in results if not r.success)
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": ins, "total_output_tokens": outs,
        "request_throughput": len(ok) / duration, "input_throughput": ins / duration,
        "output_throughput": outs / duration, "total_throughput": (ins + outs) / duration,
        # average number of requests in flight
        "concurrency": sum(r.e2e_latency for r, _ in ok) / duration,
        **_dist("ttft", [r.ttft for r, _ in ok]), **_dist("itl", [g for r, _ in ok for g in r.itl]),
        **_dist("tpot", tpot), **_dist("e2e_latency", [r.e2e_latency for r, _ in ok]),
        "errors": dict(errors.most_common()),
    }


async def run_benchmark(url: str, backend: str, model: str | None, requests: list[BenchRequest],
                        request_rate: float = math.inf, max_concurrency: int | None = None,
                        ignore_eos: bool = True, extra_body: dict | None = None, seed: int = 0,
                        api_key: str | None = None, tokenizer=None) -> dict:
    """Send ``requests`` (Poisson arrivals at ``request_rate``/s, at most ``max_concurrency`` at once)."""
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    rng = random.Random(seed)

    async def one(req: BenchRequest) -> RequestResult:
        payload = build_payload(backend, model, req, ignore_eos, extra_body or {})
        if sem is None:
            return await send_request(url, payload, backend, api_key)
        async with sem:
            return await send_request(url, payload, backend, api_key)

    start = time.perf_counter()
    tasks = []
    for i, req in enumerate(requests):
        tasks.append(asyncio.create_task(one(req)))
        if math.isfinite(request_rate) and i + 1 < len(requests):
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    summary = summarize(results, requests, time.perf_counter() - start, tokenizer)
    return {"request_rate": request_rate if math.isfinite(request_rate) else "inf",
            "max_concurrency": max_concurrency, "num_prompts": len(requests), **summary}


def print_summary(run: dict) -> None:
    rows = [("Request rate (req/s)", run["request_rate"]), ("Max concurrency", run["max_concurrency"]),
            ("Successful requests", run["completed"]), ("Failed requests", run["failed"]),
            ("Duration (s)", run["duration_s"]), ("Total input tokens", run["total_input_tokens"]),
            ("Total output tokens", run["total_output_tokens"]),
            ("Request throughput (req/s)", run["request_throughput"]),
            ("Input token throughput (tok/s)", run["input_throughput"]),
            ("Output token throughput (tok/s)", run["output_throughput"]),
            ("Concurrency (mean in flight)", run["concurrency"])]
    for name in ("ttft", "itl", "tpot", "e2e_latency"):
        for k in ("mean", "median", "p90", "p99"):
            rows.append((f"{k.capitalize()} {name.upper().replace('_LATENCY', '')} (ms)", run[f"{k}_{name}_ms"]))
    print(f"{' Serving Benchmark Result ':=^60}")
    for k, v in rows:
        print(f"{k:<42}{v:>18.2f}" if isinstance(v, float) else f"{k:<42}{v!s:>18}")
    for err, n in run["errors"].items():
        print(f"  failed x{n}: {err}")
    print("=" * 60)


# ----------------------------------------------------------------------------- plot


def plot_sweep(runs: list[dict], x_key: str, path: str, title: str = "") -> bool:
    """TTFT / ITL / E2E (p50, p99) and output throughput against load; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); no plot written", file=sys.stderr)
        return False
    xs = [float(r[x_key]) for r in runs]
    finite = [x for x in xs if math.isfinite(x)]
    xs = [x if math.isfinite(x) else 2 * max(finite, default=1.0) for x in xs]  # "inf" drawn at the right
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, name, label in zip(axes.flat, ("ttft", "itl", "e2e_latency"), ("TTFT", "ITL", "E2E latency")):
        for q, style in (("median", "o-"), ("p99", "s--")):
            ys = [r[f"{q}_{name}_ms"] for r in runs]
            ax.plot(xs, [math.nan if y is None else y for y in ys], style, label=f"{'p50' if q == 'median' else q}")
        ax.set_title(f"{label} (ms)")
        ax.legend()
    ax = axes.flat[3]
    ax.plot(xs, [r["output_throughput"] for r in runs], "o-", label="output tok/s")
    ax.plot(xs, [r["request_throughput"] * 60 for r in runs], "s--", label="requests/min")
    ax.set_title("Throughput")
    ax.legend()
    for ax in axes.flat:
        ax.set_xlabel("request rate (req/s)" if x_key == "request_rate" else "max concurrency")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- CLI


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgelm.bench_serving", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="openai-chat")
    p.add_argument("--base-url", default=None, help="server URL; default http://HOST:PORT")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="model name in requests; default: the first of /v1/models")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (HF dir, or a .gguf file) for random token prompts and local counts")
    p.add_argument("--dataset-name", choices=("random", "sharegpt", "file"), default="random")
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON, or a JSONL of prompts for 'file'")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are drawn uniformly from [len * ratio, len]")
    p.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="output length for sharegpt/file prompts (default: the dataset's, else --random-output-len)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--request-rates", type=_floats, default=None, help="sweep: comma-separated rates")
    p.add_argument("--max-concurrencies", type=_floats, default=None, help="sweep: comma-separated caps")
    p.add_argument("--disable-ignore-eos", action="store_true",
                   help="do not send ignore_eos (needed for servers that reject it, e.g. api.openai.com)")
    p.add_argument("--extra-request-body", default=None, help="JSON merged into every request body")
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--flush-cache", action="store_true", help="POST /flush_cache before each run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-file", default=None, help="write every run's figures as JSON")
    p.add_argument("--plot", default=None, help="PNG of latency against load (needs matplotlib)")
    return p


async def _resolve_model(base: str, args) -> str | None:
    if args.model:
        return args.model
    try:
        return (await get_json(base + "/v1/models", args.api_key))["data"][0]["id"]
    except Exception as e:  # noqa: BLE001
        if args.backend == "edgelm-native":
            return None
        raise SystemExit(f"cannot read the model name from {base}/v1/models ({e}); pass --model") from e


async def main_async(args, argv: list[str]) -> dict:
    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    url = base + _ROUTES[args.backend]
    if args.request_rates and args.max_concurrencies:
        raise SystemExit("sweep either --request-rates or --max-concurrencies, not both")
    if args.request_rates:
        loads = [(r, args.max_concurrency) for r in args.request_rates]
    elif args.max_concurrencies:
        loads = [(args.request_rate, int(c)) for c in args.max_concurrencies]
    else:
        loads = [(args.request_rate, args.max_concurrency)]
    model = await _resolve_model(base, args)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    extra = json.loads(args.extra_request_body) if args.extra_request_body else {}
    common = dict(backend=args.backend, model=model, ignore_eos=not args.disable_ignore_eos, extra_body=extra,
                  api_key=args.api_key, tokenizer=tokenizer)

    if args.warmup_requests > 0:
        warm = sample_requests(args, args.warmup_requests, tokenizer, seed=args.seed + 10_000)
        w = await run_benchmark(url, requests=warm, **common)
        print(f"warm-up: {w['completed']}/{len(warm)} ok" + (f", errors {w['errors']}" if w["failed"] else ""))
    runs = []
    for i, (rate, conc) in enumerate(loads):
        if args.flush_cache:
            try:
                (await http_request(base + "/flush_cache", {})).close()
            except Exception as e:  # noqa: BLE001
                print(f"flush_cache failed: {e}", file=sys.stderr)
        # Fresh prompts per run, so that a prefix cache does not serve a later run from an earlier one.
        reqs = sample_requests(args, args.num_prompts, tokenizer, seed=args.seed + i)
        run = await run_benchmark(url, requests=reqs, request_rate=rate, max_concurrency=conc,
                                  seed=args.seed + i, **common)
        print_summary(run)
        runs.append(run)
    return {"backend": args.backend, "base_url": base, "model": model, "dataset_name": args.dataset_name,
            "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
            "random_range_ratio": args.random_range_ratio, "ignore_eos": not args.disable_ignore_eos,
            "command": "python -m edgelm.bench_serving " + shlex.join(argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    result = asyncio.run(main_async(args, argv))
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot and len(result["runs"]) > 0:
        x_key = "request_rate" if args.request_rates else "max_concurrency"
        title = (f"{result['model']} · {args.backend} · {args.dataset_name} in={args.random_input_len} "
                 f"out={args.random_output_len}")
        plot_sweep(result["runs"], x_key, args.plot, title)
    return result


if __name__ == "__main__":
    main()
