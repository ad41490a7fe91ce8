"""The server end to end through the unmodified `openai` client, on the embedded model (CPU)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _chat(client, **kw):
    return client.chat.completions.create(model="anything", messages=kw.pop("messages", CHAT), **kw)


def test_chat_greedy_and_usage(client):
    r = _chat(client, temperature=0, max_tokens=24)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = _chat(client, temperature=0, max_tokens=24)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the radix cache served the prompt


def test_stream_equals_non_stream_and_reports_usage(client):
    full = _chat(client, temperature=0, max_tokens=20).choices[0].message.content
    parts, usage, finish = [], None, None
    for chunk in _chat(client, temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == full
    assert usage is not None and usage.completion_tokens > 0 and finish in ("stop", "length")


def test_stream_ends_with_done(server):
    body = {"model": "x", "messages": CHAT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)


def test_n_and_seeds(client):
    kw = dict(temperature=1.0, max_tokens=12, n=3, seed=1234)
    a = [c.message.content for c in _chat(client, **kw).choices]
    b = [c.message.content for c in _chat(client, **kw).choices]
    assert len(a) == 3 and a == b  # the same seed gives the same samples
    c = [c.message.content for c in _chat(client, **{**kw, "seed": 99}).choices]
    assert c != a
    assert len(set(a)) > 1  # the n choices differ from each other


def test_logprobs(client):
    r = _chat(client, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 3
        tops = [t.logprob for t in item.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert abs(item.logprob - tops[0]) < 1e-4  # greedy picks the most likely token


def test_stop_string(client):
    base = _chat(client, temperature=0, max_tokens=24).choices[0].message.content
    words = base.split()
    assert len(words) >= 3
    stop = words[2]
    r = _chat(client, temperature=0, max_tokens=24, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == base[:base.index(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       _chat(client, temperature=0, max_tokens=24, stop=[stop], stream=True) if c.choices)
    assert streamed == base[:base.index(stop)]


def test_completions(client):
    r = client.completions.create(model="x", prompt=["The sky is", "One, two,"], max_tokens=6, temperature=0,
                                  logprobs=2)
    assert len(r.choices) == 2 and all(c.text for c in r.choices)
    assert len(r.choices[0].logprobs.tokens) == len(r.choices[0].logprobs.token_logprobs)
    s = client.completions.create(model="x", prompt="One, two,", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[1].text


@pytest.mark.parametrize("kw, fragment", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 10**7}, "context length"),
    ({"n": 0}, "n"),
    ({"messages": []}, "messages"),
    ({"extra_body": {"top_k": 0}}, "top_k"),
])
def test_bad_values_are_400(client, kw, fragment):
    kw = dict(kw)
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, max_tokens=kw.pop("max_tokens", 4), **kw)
    err = e.value.body
    assert err["type"] == "invalid_request_error" and fragment in err["message"]


def test_bad_json_and_types(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"messages": "hi"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_concurrent_streams(server):
    """32 streams at once: every one completes, and equal prompts give equal greedy text."""
    prompts = ["Say hello.", "What is 2+2?", "Name a fruit.", "Describe the sea."]

    async def one(c, p):
        parts = []
        stream = await c.chat.completions.create(model="x", messages=[{"role": "user", "content": p}],
                                                 temperature=0, max_tokens=12, stream=True)
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
        return p, "".join(parts)

    async def main():
        c = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=600)
        return await asyncio.gather(*(one(c, prompts[i % 4]) for i in range(32)))

    results = asyncio.run(main())
    by_prompt: dict[str, set[str]] = {}
    for p, text in results:
        assert text
        by_prompt.setdefault(p, set()).add(text)
    assert all(len(v) == 1 for v in by_prompt.values()), by_prompt


def test_native_generate(server):
    url = server.base_url + "/generate"
    r = httpx.post(url, json={"text": "The capital of France is",
                              "sampling_params": {"temperature": 0, "max_new_tokens": 8}}, timeout=120).json()
    assert r["text"] and len(r["output_ids"]) == r["meta_info"]["completion_tokens"]
    ids = httpx.post(url, json={"input_ids": r["output_ids"][:2], "sampling_params": {"max_new_tokens": 2}},
                     timeout=120).json()
    assert ids["meta_info"]["prompt_tokens"] == 2
    with httpx.stream("POST", url, json={"text": "The capital of France is", "stream": True,
                                         "sampling_params": {"temperature": 0, "max_new_tokens": 8}},
                      timeout=120) as s:
        events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["text"] == r["text"]
    bad = httpx.post(url, json={"text": "x", "sampling_params": {"temperature": -2}}, timeout=30)
    assert bad.status_code == 400


def test_info_routes_and_pool_drains(server):
    base = server.base_url
    models = httpx.get(base + "/v1/models").json()
    assert models["data"][0]["id"]
    assert httpx.get(base + "/get_model_info").json()["is_generation"] is True
    assert httpx.get(base + "/health_generate", timeout=60).status_code == 200
    info = httpx.get(base + "/get_server_info").json()
    state = info["internal_states"][0]
    assert state["num_running_reqs"] == 0 and state["used_kv_tokens"] == 0
    assert httpx.post(base + "/flush_cache").status_code == 200
    state = httpx.get(base + "/get_server_info").json()["internal_states"][0]
    assert state["available_kv_tokens"] == state["max_total_tokens"]
    log = server.read_log()
    assert "Prefill batch. #new-seq:" in log and "Decode batch. #running-req:" in log


def test_metrics_route(client, server):
    _chat(client, temperature=0, max_tokens=6)
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        if line.startswith("edgelm:") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    assert values["edgelm:num_requests_total"] >= 1
    assert values["edgelm:generation_tokens_total"] >= 1
    assert values["edgelm:time_to_first_token_seconds_count"] >= 1
    assert values["edgelm:time_per_output_token_seconds_count"] >= 1
    assert "edgelm:num_running_reqs" in values and "edgelm:token_usage" in values
