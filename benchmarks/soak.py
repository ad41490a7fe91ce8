"""Steady-load soak: N concurrent streaming chat clients for D seconds against an edgelm server,
counting completed requests and errors, and sampling the resident memory (RSS) of the HTTP process
and the engine process over time. Prints (and with --out writes) one JSON object.

    python benchmarks/soak.py --launch "" --concurrency 4 --max-tokens 32 --duration 600 \
        --out benchmarks/results/soak_cpu.json          # starts a server (embedded model), stops it after
    python benchmarks/soak.py --url http://127.0.0.1:30000 --duration 60   # a server already running

Every prompt carries a running number, so the prefix cache keeps filling and evicting as it would in
service. The RSS figures come from /proc (Linux) for the pids that /get_server_info reports.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time

import httpx

TOPICS = ["the sea", "a city at night", "an old clock", "mountains", "a small robot", "rain", "a library",
          "the first snow"]


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    return {"p50": round(v[len(v) // 2], 3), "p90": round(v[int(len(v) * 0.9)], 3),
            "p99": round(v[min(int(len(v) * 0.99), len(v) - 1)], 3), "mean": round(statistics.fmean(v), 3)}


def _series_summary(series: list[tuple[float, float | None]], warmup_s: float) -> dict:
    values = [(t, v) for t, v in series if v is not None]
    if not values:
        return {}
    after = [v for t, v in values if t >= warmup_s] or [values[-1][1]]
    return {"start_mb": round(values[0][1], 1), "after_warmup_mb": round(after[0], 1),
            "end_mb": round(values[-1][1], 1), "max_mb": round(max(v for _, v in values), 1),
            "growth_after_warmup_mb": round(values[-1][1] - after[0], 1)}


class Soak:
    def __init__(self, args):
        self.args = args
        self.base = args.url.rstrip("/")
        self.completed = 0
        self.errors: dict[str, int] = {}
        self.error_examples: list[str] = []
        self.tokens = 0
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.counter = 0

    def _error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_examples) < 10:
            self.error_examples.append(f"{kind}: {detail[:300]}")

    async def one_request(self, client: httpx.AsyncClient) -> None:
        self.counter += 1
        n = self.counter
        body = {"model": "soak", "stream": True, "max_tokens": self.args.max_tokens,
                "temperature": self.args.temperature, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"Request {n}: write two sentences about "
                                                         f"{TOPICS[n % len(TOPICS)]}."}]}
        start = time.perf_counter()
        first = None
        usage = None
        done = False
        try:
            async with client.stream("POST", self.base + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    self._error(f"http_{r.status_code}", (await r.aread()).decode(errors="replace"))
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        self._error("stream_error", json.dumps(event))
                        return
                    if event.get("usage"):
                        usage = event["usage"]
                    if first is None and any(c["delta"].get("content") for c in event.get("choices", [])):
                        first = time.perf_counter()
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            self._error(type(exc).__name__, str(exc))
            return
        if not done or usage is None:
            self._error("incomplete_stream", f"done={done} usage={usage}")
            return
        self.completed += 1
        self.tokens += usage["completion_tokens"]
        self.latencies.append(time.perf_counter() - start)
        if first is not None:
            self.ttfts.append(first - start)

    async def client_loop(self, client: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            await self.one_request(client)

    async def run(self) -> dict:
        a = self.args
        async with httpx.AsyncClient(timeout=a.request_timeout) as client:
            info = (await client.get(self.base + "/get_server_info")).json()
            pids = {"http": info.get("pid"), "engine": info.get("engine_pid")}
            samples: list[dict] = []
            t0 = time.monotonic()

            def sample() -> None:
                samples.append({"t_s": round(time.monotonic() - t0, 1), "completed": self.completed,
                                **{f"{k}_rss_mb": _rss_mb(p) for k, p in pids.items()}})

            sample()  # idle, before the load
            deadline = t0 + a.duration
            clients = [asyncio.create_task(self.client_loop(client, deadline)) for _ in range(a.concurrency)]
            while time.monotonic() < deadline:
                await asyncio.sleep(min(a.sample_interval, max(deadline - time.monotonic(), 0.01)))
                sample()
                if a.verbose:
                    print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
            await asyncio.gather(*clients)
            elapsed = time.monotonic() - t0
            sample()
            final = (await client.get(self.base + "/get_server_info")).json()
        return {
            "duration_s": round(elapsed, 1),
            "requests_completed": self.completed,
            "errors": sum(self.errors.values()),
            "error_kinds": self.errors,
            "error_examples": self.error_examples,
            "completion_tokens": self.tokens,
            "output_tok_per_s": round(self.tokens / elapsed, 2),
            "requests_per_min": round(self.completed * 60 / elapsed, 2),
            "latency_s": _percentiles(self.latencies),
            "ttft_s": _percentiles(self.ttfts),
            "rss": {k: _series_summary([(s["t_s"], s[f"{k}_rss_mb"]) for s in samples], a.warmup)
                    for k in pids},
            "pids": pids,
            "model": info.get("engine", {}).get("model_name"),
            "device": info.get("engine", {}).get("device"),
            "max_total_tokens": info.get("engine", {}).get("max_total_tokens"),
            "final_engine_state": (final.get("internal_states") or [None])[0],
            "final_inflight_requests": final.get("num_inflight_requests"),
            "rss_samples": samples,
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(extra: str, log_path: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "edgelm.launch_server", "--port", str(port),
                             *shlex.split(extra)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("the server did not start in 600 s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:30000", help="a running server (ignored with --launch)")
    p.add_argument("--launch", default=None, metavar="ARGS",
                   help="start `python -m edgelm.launch_server ARGS` on a free port, stop it at the end")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--duration", type=float, default=600, help="seconds of load")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--sample-interval", type=float, default=10, help="seconds between RSS samples")
    p.add_argument("--warmup", type=float, default=60, help="seconds before the 'after warm-up' RSS figure")
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--verbose", action="store_true", help="print each RSS sample to stderr")
    args = p.parse_args(argv)

    proc = None
    log_path = "/tmp/edgelm-soak-server.log"
    if args.launch is not None:
        proc, args.url = _launch(args.launch, log_path)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        result = asyncio.run(Soak(args).run())
    finally:
        server_exit = None
        if proc is not None:
            proc.terminate()
            server_exit = proc.wait(60)
    out = {
        "command": "python benchmarks/soak.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
        "date": started,
        "config": {"concurrency": args.concurrency, "duration_s": args.duration, "max_tokens": args.max_tokens,
                   "temperature": args.temperature, "server_args": args.launch},
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        **result,
    }
    if proc is not None:
        out["server_exit_code_after_sigterm"] = server_exit
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
