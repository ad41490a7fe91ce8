"""bench_serving against a fake OpenAI-compatible streaming server started in the test."""

import asyncio
import importlib.util
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edgelm import bench_serving
from edgelm.bench.workloads import BenchRequest, file_requests, random_requests

TOKEN_DELAY = 0.004


def _fake_app(state: dict) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    def _fail() -> JSONResponse | None:
        state["n"] += 1
        if state["fail_every"] and state["n"] % state["fail_every"] == 0:
            return JSONResponse({"error": {"message": "fake overload"}}, status_code=500)
        return None

    async def _openai(request: Request, chat: bool):
        body = await request.json()
        state["bodies"].append(body)
        if (resp := _fail()) is not None:
            return resp
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        n_in, n_out = len(prompt.split()), body["max_tokens"]

        async def events():
            for i in range(n_out):
                await asyncio.sleep(TOKEN_DELAY)
                choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            if body.get("stream_options", {}).get("include_usage"):
                usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _openai(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _openai(request, False)

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        state["bodies"].append(body)
        if (resp := _fail()) is not None:
            return resp
        n_in, n_out = len(body["text"].split()), body["sampling_params"]["max_new_tokens"]

        async def events():  # cumulative text, as SGLang's native route streams it
            for i in range(n_out):
                await asyncio.sleep(TOKEN_DELAY)
                out = {"text": "".join(f" t{j}" for j in range(i + 1)),
                       "meta_info": {"prompt_tokens": n_in, "completion_tokens": i + 1}}
                yield f"data: {json.dumps(out)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake_server():
    state = {"n": 0, "fail_every": 0, "bodies": []}
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(_fake_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "fake server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=10)


def _reset(state, fail_every=0):
    state.update(n=0, fail_every=fail_every, bodies=[])


def _check_percentiles(run, name):
    keys = [f"{k}_{name}_ms" for k in ("median", "p90", "p99", "max")]
    values = [run[k] for k in keys]
    assert all(v is not None and v > 0 for v in values), run
    assert values == sorted(values), (name, values)


def test_sweep_concurrency_json_and_plot(fake_server, tmp_path):
    url, state = fake_server
    _reset(state)
    out = tmp_path / "res.json"
    png = tmp_path / "res.png"
    argv = ["--base-url", url, "--backend", "openai-chat", "--dataset-name", "random", "--num-prompts", "6",
            "--random-input-len", "12", "--random-output-len", "5", "--random-range-ratio", "1",
            "--max-concurrencies", "1,3", "--output-file", str(out), "--plot", str(png)]
    bench_serving.main(argv)
    res = json.loads(out.read_text())
    assert res["model"] == "fake-model" and res["backend"] == "openai-chat"
    assert [r["max_concurrency"] for r in res["runs"]] == [1, 3]
    for run in res["runs"]:
        assert run["completed"] == 6 and run["failed"] == 0 and run["errors"] == {}
        assert run["total_input_tokens"] == 6 * 12  # from the server's usage
        assert run["total_output_tokens"] == 6 * 5
        assert run["request_throughput"] > 0 and run["output_throughput"] > 0
        for name in ("ttft", "itl", "tpot", "e2e_latency"):
            _check_percentiles(run, name)
        assert run["median_itl_ms"] >= TOKEN_DELAY * 1000 * 0.8
        assert run["median_ttft_ms"] <= run["median_e2e_latency_ms"]
    # concurrency 1 runs requests one after another, so it averages <= 1 in flight
    assert res["runs"][0]["concurrency"] <= 1.05 < res["runs"][1]["concurrency"]
    body = state["bodies"][-1]
    assert body["ignore_eos"] is True and body["stream"] is True and body["model"] == "fake-model"
    assert body["stream_options"] == {"include_usage": True} and body["max_tokens"] == 5
    assert res["command"].startswith("python -m edgelm.bench_serving --base-url")
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("backend", ["openai-completions", "edgelm-native"])
def test_failures_counted_with_text(fake_server, backend):
    url, state = fake_server
    _reset(state, fail_every=4)  # every 4th request gets HTTP 500
    res = bench_serving.main(["--base-url", url, "--backend", backend, "--num-prompts", "8",
                              "--random-input-len", "8", "--random-output-len", "4", "--random-range-ratio", "1",
                              "--request-rate", "200", "--warmup-requests", "0", "--disable-ignore-eos"])
    (run,) = res["runs"]
    assert run["completed"] == 6 and run["failed"] == 2
    ((err, n),) = run["errors"].items()
    assert n == 2 and err.startswith("HTTP 500") and "fake overload" in err
    assert run["total_output_tokens"] == 6 * 4 and run["total_input_tokens"] == 6 * 8
    _check_percentiles(run, "e2e_latency")
    assert all("ignore_eos" not in json.dumps(b) for b in state["bodies"])


def test_unreachable_server_is_a_failure():
    port = _free_port()
    req = BenchRequest("hello there", 2, 3)
    run = asyncio.run(bench_serving.run_benchmark(f"http://127.0.0.1:{port}/v1/completions", "openai-completions",
                                                  "m", [req, req]))
    assert run["completed"] == 0 and run["failed"] == 2
    assert "Connect" in next(iter(run["errors"]))  # ConnectionRefusedError: ...
    assert run["median_ttft_ms"] is None


def test_workloads(tmp_path):
    reqs = random_requests(5, 20, 7, 0.5, None, seed=3)
    assert len(reqs) == 5 and all(10 <= r.prompt_len <= 20 and 3 <= r.output_len <= 7 for r in reqs)
    assert all(len(r.prompt.split()) == r.prompt_len for r in reqs)
    assert random_requests(5, 20, 7, 0.5, None, seed=3) == reqs  # seeded
    path = tmp_path / "p.jsonl"
    path.write_text('"just text"\n{"prompt": "a b c", "output_len": 9}\n'
                    '{"messages": [{"role": "user", "content": "hi you"}]}\n')
    got = file_requests(str(path), 5, 4, None, seed=0)
    assert len(got) == 5
    assert {(r.prompt_len, r.output_len) for r in got} == {(2, 4), (3, 9)}


class _ToyTokenizer:
    """Token i is the word f"w{i}"; ids 0 and 1 are special."""

    all_special_ids = [0, 1]

    def __len__(self):
        return 50

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [int(w[1:]) for w in text.split()]


def test_random_token_prompts_with_tokenizer():
    reqs = random_requests(4, 16, 3, 1.0, _ToyTokenizer(), seed=0)
    assert [r.prompt_len for r in reqs] == [16] * 4
    assert all(int(w[1:]) >= 2 for r in reqs for w in r.prompt.split())  # no special tokens
