"""The server under load, faults and hang-ups: client disconnects free their KV, back-pressure,
request timeouts, a KV pool too small for the load (retraction), a failing forward pass, the
watchdog, and SIGTERM drain.

The HTTP-layer cases run against the real app over a stand-in engine (tests/fake_engine.py, fast);
the engine cases against real servers (embedded model, CPU): the shared `server` fixture, and two
more started together for this module — one small-pool server with fault injection (ended by the
watchdog test), one that the SIGTERM test stops.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.fake_engine import FakeProc, FakeServer
from tests.server_fixture import ServerProcess

CHAT = "/v1/chat/completions"


def _chat(content: str = "hi", **kw) -> dict:
    return {"model": "x", "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}


def _process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _pool_state(base_url: str) -> dict:
    return httpx.get(base_url + "/get_server_info", timeout=60).json()["internal_states"][0]


def _wait_pool_empty(base_url: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        state = _pool_state(base_url)
        if state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 0 and state["used_kv_tokens"] == 0:
            return state
        assert time.monotonic() < deadline, f"requests still hold KV after {timeout_s} s: {state}"
        time.sleep(0.5)


# ====================================================================== HTTP layer (stand-in engine)
def test_back_pressure_is_exact_503_with_retry_after():
    """max_running_requests (2) + --max-queued-requests (1) in flight; the 4th and later get a 503."""
    s = FakeServer(max_queued_requests=1)
    s.engine.token_delay_s = 0.5  # each request takes 2 s: all 6 are in flight together
    try:
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: s.post(CHAT, json=_chat(max_tokens=4)), range(6)))
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 200, 200, 503, 503, 503], codes
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "service_unavailable_error"
        assert s.get("/get_server_info").json()["num_inflight_requests"] == 0
        # streams count while they stream
        s.engine.tokens = 1000
        with httpx.Client(timeout=30) as c, c.stream("POST", s.base_url + CHAT, json=_chat(stream=True)) as r1, \
                c.stream("POST", s.base_url + CHAT, json=_chat(stream=True)) as r2, \
                c.stream("POST", s.base_url + CHAT, json=_chat(stream=True)) as r3:
            assert {r1.status_code, r2.status_code, r3.status_code} == {200}
            assert s.post(CHAT, json=_chat()).status_code == 503
        s.engine.tokens = 4
        deadline = time.monotonic() + 10
        while s.get("/get_server_info").json()["num_inflight_requests"]:  # the hung-up streams are noticed
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert s.post(CHAT, json=_chat()).status_code == 200
    finally:
        s.stop()


def test_request_timeout_is_504_and_aborts():
    s = FakeServer(request_timeout=0.5)
    try:
        r = s.post(CHAT, json=_chat(rid="never-1"))
        assert r.status_code == 504
        err = r.json()["error"]
        assert err["type"] == "timeout_error" and "timeout" in err["message"]
        r = s.post(CHAT, json=_chat(rid="never-2", stream=True))
        events = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert '"timeout_error"' in events[-2] and events[-1] == "data: [DONE]"
        deadline = time.monotonic() + 10
        while not {"never-1", "never-2"} <= set(s.engine.aborted):
            assert time.monotonic() < deadline, s.engine.aborted
            time.sleep(0.1)
        assert s.post(CHAT, json=_chat()).status_code == 200  # others are not affected
    finally:
        s.stop()


def test_watchdog_on_a_silent_engine():
    """The engine stops answering: requests in flight get a 503, /health says so, the engine process is
    killed and the launcher is told to exit."""
    proc = FakeProc()
    s = FakeServer(engine_proc=proc, watchdog_timeout=1.0)
    try:
        assert s.get("/health").status_code == 200
        assert s.post(CHAT, json=_chat()).status_code == 200
        result = {}
        t = threading.Thread(target=lambda: result.update(r=s.post(CHAT, json=_chat(rid="never-1"))))
        t.start()
        time.sleep(0.5)
        s.engine.silent = True
        t.join(15)
        assert result["r"].status_code == 503 and "watchdog" in result["r"].json()["error"]["message"]
        health = s.get("/health")
        assert health.status_code == 503 and "watchdog" in health.json()["error"]["message"]
        assert proc.killed
        assert s.post(CHAT, json=_chat()).status_code == 503
        time.sleep(2.5)
        assert len(s.fatal) == 1 and "no progress" in s.fatal[0]
    finally:
        s.stop()


def test_watchdog_on_a_dead_engine():
    proc = FakeProc()
    s = FakeServer(engine_proc=proc, watchdog_timeout=30)
    try:
        proc.alive, proc.exitcode = False, -11
        assert s.get("/health").status_code == 503
        deadline = time.monotonic() + 10
        while not s.fatal:
            assert time.monotonic() < deadline, "the launcher was not told to exit"
            time.sleep(0.2)
        assert "exited (code -11)" in s.fatal[0]
        assert s.post(CHAT, json=_chat()).status_code == 503
    finally:
        s.stop()


def test_disconnect_frees_the_in_flight_slot():
    s = FakeServer(max_queued_requests=1)
    s.engine.tokens, s.engine.token_delay_s = 1000, 0.05
    try:
        for _ in range(5):  # hang up on long streams: the count goes back down each time
            with httpx.stream("POST", s.base_url + CHAT, json=_chat(stream=True), timeout=30) as r:
                next(r.iter_lines())
        deadline = time.monotonic() + 10
        while s.get("/get_server_info").json()["num_inflight_requests"] or len(s.engine.aborted) < 5:
            assert time.monotonic() < deadline, s.engine.aborted
            time.sleep(0.1)
        assert len(s.engine.aborted) == 5
    finally:
        s.stop()


# ====================================================================== the real engine: shared server
def test_streaming_clients_hanging_up_free_their_kv(server):
    """100 concurrent streams; a third hang up after their first tokens. Every other one finishes
    normally (finish_reason, usage matching what was streamed) with the same greedy text as its
    prompt gives alone, and afterwards no request holds KV: the hung-up ones were aborted long
    before their 200 tokens could have been generated."""
    prompts = ["Name a color.", "Say hi.", "Count to three."]
    base = server.base_url
    clients = 100

    async def stream(c, prompt, max_tokens, hang_up):
        parts, events, finish, usage = [], 0, None, None
        body = _chat(prompt, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
        async with c.stream("POST", base + CHAT, json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                events += 1
                if hang_up and events >= 3:
                    return None
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    parts.append(choice["delta"].get("content") or "")
                    finish = choice.get("finish_reason") or finish
        return "".join(parts), finish, usage

    async def main():
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 8)) as c:
            refs = [await stream(c, p, 8, False) for p in prompts]
            jobs = [stream(c, prompts[i % 3], 200 if i % 3 == 0 else 8, i % 3 == 0) for i in range(clients)]
            return refs, await asyncio.gather(*jobs)

    refs, results = asyncio.run(main())
    completed = 0
    for i, result in enumerate(results):
        if i % 3 == 0:
            assert result is None
            continue
        text, finish, usage = result
        ref_text, ref_finish, ref_usage = refs[i % 3]
        assert text == ref_text, (i, text, ref_text)
        assert finish == ref_finish and finish in ("stop", "length"), (i, finish)
        assert usage["completion_tokens"] == ref_usage["completion_tokens"] <= 8, (i, usage)
        completed += 1
    assert completed == clients - len(range(0, clients, 3))
    _wait_pool_empty(base, 30)


def test_non_streaming_disconnect_and_abort_request(server):
    base = server.base_url
    with pytest.raises(httpx.TimeoutException):  # the client gives up; the server must notice
        # ignore_eos: the greedy answer is 55 tokens, about 3 s here; 300 tokens outlast the client
        httpx.post(base + CHAT, json=_chat("Tell me a long story.", max_tokens=300, ignore_eos=True), timeout=3)
    _wait_pool_empty(base, 30)

    out = {}

    def run():
        with httpx.stream("POST", base + CHAT, json=_chat("Tell me a long story.", max_tokens=300, stream=True,
                                                          rid="abort-me"), timeout=300) as r:
            out["lines"] = [ln for ln in r.iter_lines() if ln.startswith("data: ")]

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 120
    while _pool_state(base)["num_running_reqs"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert httpx.post(base + "/abort_request", json={"rid": "abort-me"}, timeout=30).status_code == 200
    t.join(60)
    assert not t.is_alive() and out["lines"][-1] == "data: [DONE]"
    assert '"finish_reason": "abort"' in out["lines"][-2]
    assert httpx.post(base + "/abort_request", json={"rid": "abort-me"}, timeout=30).status_code == 404
    _wait_pool_empty(base, 30)


# ====================================================================== the real engine: own servers
@pytest.fixture(scope="module")
def own_servers():
    """Started together (each start is slow on a busy CPU): 'small' has a 200-token KV pool, fault
    injection and a 40 s watchdog; 'plain' is for the SIGTERM test."""
    os.environ["EDGELM_FAULT_INJECT"] = "1"
    try:
        with ThreadPoolExecutor(2) as pool:
            small = pool.submit(ServerProcess, "--max-total-tokens", "200", "--random-seed", "0",
                                "--watchdog-timeout", "40", "--decode-log-interval", "10")
            plain = pool.submit(ServerProcess, "--random-seed", "0")
            servers = {"small": small.result(), "plain": plain.result()}
    finally:
        os.environ.pop("EDGELM_FAULT_INJECT", None)
    yield servers
    for s in servers.values():
        s.stop()


def _generate(base_url: str, input_ids: list[int], max_new_tokens: int, **kw) -> httpx.Response:
    return httpx.post(base_url + "/generate", json={"input_ids": input_ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}, **kw}, timeout=600)


def test_pool_too_small_retracts_and_keeps_greedy_output(own_servers):
    """6 requests of 40 prompt + 12 output tokens at once on a 200-token KV pool: admission takes 4,
    decode runs out of room and retracts; every request still gives the tokens it gives alone."""
    s = own_servers["small"]
    prompts = [[(1000 + 37 * i + 11 * k) % 40000 + 100 for k in range(40)] for i in range(6)]
    alone = [_generate(s.base_url, p, 12).json()["output_ids"] for p in prompts]
    httpx.post(s.base_url + "/flush_cache", timeout=60)
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: _generate(s.base_url, p, 12), prompts))
    assert [r.status_code for r in together] == [200] * 6
    assert [r.json()["output_ids"] for r in together] == alone
    assert "retracting request" in s.read_log()
    _wait_pool_empty(s.base_url, 30)


def test_a_failing_forward_fails_only_its_batch(own_servers):
    s = own_servers["small"]
    base = s.base_url
    r = _generate(base, [1, 2, 3], 4, rid="fault-1")
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "internal_server_error" and "injected fault" in err["message"]
    assert "Traceback" not in r.text
    # a fault in decode after a few streamed tokens: the stream ends with an error event
    r = httpx.post(base + CHAT, json=_chat(max_tokens=12, stream=True, rid="faultdecode-1"), timeout=300)
    events = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert "injected fault" in events[-2] and events[-1] == "data: [DONE]"
    # a request running while another one's prefill fails is not affected
    out = {}
    t = threading.Thread(target=lambda: out.update(r=_generate(base, [5, 6, 7, 8], 24)))
    t.start()
    deadline = time.monotonic() + 120
    while _pool_state(base)["num_running_reqs"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert _generate(base, [9, 10, 11], 4, rid="fault-2").status_code == 500
    t.join(300)
    assert out["r"].status_code == 200 and len(out["r"].json()["output_ids"]) == 24
    _wait_pool_empty(base, 30)
    assert "a batch of 1 requests failed" in s.read_log()


def test_watchdog_exits_on_a_hung_engine(own_servers):
    """A forward pass that never returns: /health turns 503, the request gets a 503, the server exits
    non-zero (for a supervisor to restart it). This ends the 'small' server."""
    s = own_servers["small"]
    out = {}
    t = threading.Thread(target=lambda: out.update(r=_generate(s.base_url, [1, 2, 3], 4, rid="hang-1")))
    t.start()
    deadline = time.monotonic() + 120
    while httpx.get(s.base_url + "/health", timeout=30).status_code == 200:
        assert time.monotonic() < deadline, "the watchdog did not fire"
        time.sleep(0.3)
    t.join(30)
    assert out["r"].status_code == 503 and "watchdog" in out["r"].json()["error"]["message"]
    assert s.proc.wait(60) != 0
    assert "made no progress" in s.read_log()


def test_sigterm_drains_requests_in_flight(own_servers):
    s = own_servers["plain"]
    base = s.base_url
    engine_pid = httpx.get(base + "/get_server_info", timeout=60).json()["engine_pid"]
    lines = []
    with httpx.stream("POST", base + "/generate", json={"text": "Once upon a time", "stream": True, "sampling_params": {
            "temperature": 0, "max_new_tokens": 16, "ignore_eos": True}}, timeout=300) as r:
        it = r.iter_lines()
        for line in it:
            if line.startswith("data: "):
                lines.append(line)
                break
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(httpx.ConnectError):  # no new connections while draining
            httpx.get(base + "/health", timeout=5)
        lines += [ln for ln in it if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert '"completion_tokens": 16' in lines[-2]
    assert s.proc.wait(60) is not None
    deadline = time.monotonic() + 15
    while _process_alive(engine_pid):
        assert time.monotonic() < deadline, "the engine process outlived the server"
        time.sleep(0.3)
