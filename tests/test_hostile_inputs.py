"""Bad input never costs a 500 or the server: hostile bodies against the real server, a schemathesis
run against the OpenAPI spec (HTTP layer over a stand-in engine), the API key on every route."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.fake_engine import FakeServer

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def _chat(**kw) -> dict:
    return {"model": "x", "messages": MESSAGES, "max_tokens": 2, "temperature": 0, **kw}


def _raw(extra: bytes) -> bytes:
    """A valid chat body with `extra` spliced in as more fields (for what json.dumps cannot write)."""
    return b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, ' + extra + b"}"


_DEEP_SCHEMA = json.loads('{"type":"object","properties":{"a":' * 200 + '{"type":"string"}' + "}}" * 200)

# name -> (path, raw body or JSON object, expected status)
HOSTILE = {
    "huge_body": (CHAT, b'{"messages": [{"role":"user","content":"' + b"a" * (9 << 20) + b'"}]}', 413),
    "deep_json": (CHAT, b"[" * 100_000 + b"]" * 100_000, 400),
    "deep_json_in_field": (CHAT, _raw(b'"chat_template_kwargs": {"a": ' + b"[" * 900 + b"]" * 900 + b"}"), 400),
    "invalid_utf8": (CHAT, b'{"messages": [{"role":"user","content":"\xff\xfe\xc3"}], "max_tokens": 2}', 400),
    "lone_surrogate": (CHAT, b'{"messages": [{"role":"user","content":"\\ud800x"}], "max_tokens": 2}', 400),
    "lone_surrogate_in_rid": (CHAT, _raw(b'"rid": "\\udfff"'), 400),
    "raw_control_chars": (CHAT, b'{"messages": [{"role":"user","content":"a\x00b"}], "max_tokens": 2}', 400),
    "negative_max_tokens": (CHAT, _chat(max_tokens=-1), 400),
    "enormous_max_tokens": (CHAT, _chat(max_tokens=10**30), 400),
    "negative_n": (CHAT, _chat(n=-5), 400),
    "enormous_n": (CHAT, _chat(n=10**20), 400),
    "enormous_top_logprobs": (CHAT, _chat(logprobs=True, top_logprobs=10**12), 400),
    "negative_seed": (CHAT, _chat(seed=-1), 400),
    "enormous_seed": (CHAT, _chat(seed=10**40), 400),
    "nan_temperature": (CHAT, _raw(b'"temperature": NaN'), 400),
    "infinite_top_p": (CHAT, _raw(b'"top_p": Infinity'), 400),
    "nan_presence_penalty": (CHAT, _raw(b'"presence_penalty": NaN'), 400),
    "overflowing_float": (CHAT, _raw(b'"temperature": 1e400'), 400),
    "enormous_min_tokens": (CHAT, _chat(min_tokens=10**9), 400),
    "wrong_type_max_tokens": (CHAT, _chat(max_tokens="ten"), 400),
    "wrong_type_content": (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400),
    "wrong_role": (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    "message_not_object": (CHAT, {"messages": ["hi"]}, 400),
    "messages_not_list": (CHAT, {"messages": "hi"}, 400),
    "10k_stop_strings": (CHAT, _chat(stop=[f"x{i}" for i in range(10_000)]), 400),
    "empty_stop_string": (CHAT, _chat(stop=[""]), 400),
    "enormous_stop_token_id": (CHAT, _chat(stop_token_ids=[10**20]), 400),
    "empty_messages": (CHAT, {"messages": []}, 400),
    "unsupported_content_part": (CHAT, _chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400),
    "non_object_list": (CHAT, b"[]", 400),
    "non_object_string": (CHAT, b'"hi"', 400),
    "non_object_number": (CHAT, b"123", 400),
    "null_body": (CHAT, b"null", 400),
    "empty_body": (CHAT, b"", 400),
    "bad_regex": (CHAT, _chat(regex="((("), 400),
    "bad_json_schema": (CHAT, _chat(response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}), 400),
    "long_rid": (CHAT, _chat(rid="r" * 1000), 400),
    "completion_token_out_of_vocab": ("/v1/completions", {"prompt": [10**12], "max_tokens": 2}, 400),
    "completion_negative_token": ("/v1/completions", {"prompt": [-1, 2], "max_tokens": 2}, 400),
    "completion_empty_prompt": ("/v1/completions", {"prompt": "", "max_tokens": 2}, 400),
    "generate_neither_text_nor_ids": ("/generate", {}, 400),
    "generate_unknown_sampling_param": ("/generate", {"text": "hi", "sampling_params": {"bogus": 1}}, 400),
    "generate_sampling_params_list": ("/generate", {"text": "hi", "sampling_params": [1, 2]}, 400),
    "generate_enormous_n": ("/generate", {"text": "hi", "sampling_params": {"n": 10**9}}, 400),
    "abort_not_object": ("/abort_request", b"[1, 2]", 400),
    "abort_invalid_utf8": ("/abort_request", b"\xff", 400),
    # odd but valid: answered normally
    "escaped_control_chars": (CHAT, _chat(messages=[{"role": "user", "content": "a\u0000b\u0007\u001b[31m"}]), 200),
    "unknown_fields": (CHAT, _chat(foo=1, bar={"x": [1]}), 200),
    "empty_content": (CHAT, _chat(messages=[{"role": "user", "content": ""}]), 200),
    "deep_json_schema": (CHAT, _chat(response_format={"type": "json_schema",
                                                      "json_schema": {"name": "x", "schema": _DEEP_SCHEMA}}), 200),
}


def _post(base_url: str, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(base_url + path, content=body, headers={"content-type": "application/json"}, timeout=300)
    return httpx.post(base_url + path, json=body, timeout=300)


def _assert_openai_error(r: httpx.Response) -> None:
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"], r.text
    assert err["type"] and err["code"] == r.status_code
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_hostile_inputs_are_4xx_and_the_server_keeps_serving(server):
    wrong = {}
    for name, (path, body, status) in HOSTILE.items():
        r = _post(server.base_url, path, body)
        if r.status_code != status:
            wrong[name] = (r.status_code, r.text[:300])
        elif status >= 400:
            _assert_openai_error(r)
    assert not wrong, wrong
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200
    ok = httpx.post(server.base_url + CHAT, json=_chat(max_tokens=4), timeout=300)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    state = httpx.get(server.base_url + "/get_server_info", timeout=60).json()["internal_states"][0]
    assert state["num_running_reqs"] == 0 and state["used_kv_tokens"] == 0


# ---------------------------------------------------------------------- HTTP layer over a stand-in engine
@pytest.fixture(scope="module")
def fake():
    s = FakeServer()
    yield s
    s.stop()


def test_chunked_body_over_the_limit_is_413(fake):
    def chunks():
        for _ in range(9):
            yield b" " * (1 << 20)

    r = httpx.post(fake.base_url + CHAT, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    _assert_openai_error(r)
    assert fake.post(CHAT, json=_chat()).status_code == 200


def test_hostile_inputs_on_every_route(fake):
    """Every route, with garbage of every shape: never a 500, always an OpenAI-shaped error."""
    garbage = [b"", b"{", b"[]", b"null", b'{"a":' * 50 + b"1" + b"}" * 50, b"\xff\xfe", b'"\\ud800"']
    for path in ("/v1/chat/completions", "/v1/completions", "/generate", "/abort_request", "/flush_cache"):
        for body in garbage:
            r = httpx.post(fake.base_url + path, content=body, headers={"content-type": "application/json"},
                           timeout=30)
            assert r.status_code < 500, (path, body[:20], r.status_code, r.text)
    r = fake.get("/no/such/route")
    assert r.status_code == 404
    _assert_openai_error(r)
    r = httpx.request("PATCH", fake.base_url + CHAT, timeout=30)
    assert r.status_code == 405
    _assert_openai_error(r)


def test_internal_errors_carry_no_stack_trace(fake, monkeypatch):
    def boom(self, body):
        raise KeyError("secret internal detail /etc/passwd")

    monkeypatch.setattr("edgelm.entrypoints.openai.serving_chat.ChatServing.build", boom)
    r = fake.post(CHAT, json=_chat())
    assert r.status_code == 500
    _assert_openai_error(r)
    assert "passwd" not in r.text


def test_schemathesis_finds_no_server_error(fake):
    """Bodies generated from /openapi.json for every route (schemathesis, a bounded number each): no 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup

    schema = schemathesis.openapi.from_url(fake.base_url + "/openapi.json")
    failures, operations = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            case.call_and_validate(checks=[not_a_server_error])

        try:
            run()
        except (Exception, FailureGroup) as exc:  # collect: one report names every route that failed
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:3000])
    assert operations >= 10
    assert not failures, "\n".join(failures)
    assert fake.post(CHAT, json=_chat()).status_code == 200


def test_api_key_on_every_route_but_health():
    s = FakeServer(api_key="sekret")
    try:
        routes = [(m, r.path.replace("{model_id:path}", "x")) for r in s.app.routes for m in getattr(r, "methods", ())
                  if m != "HEAD"]
        assert len(routes) > 10
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                r = httpx.request(method, s.base_url + path, headers=headers, timeout=30)
                if path == "/health":
                    assert r.status_code == 200
                else:
                    assert r.status_code == 401, (method, path, headers)
                    _assert_openai_error(r)
        good = {"Authorization": "Bearer sekret"}
        assert httpx.get(s.base_url + "/v1/models", headers=good, timeout=30).status_code == 200
        r = httpx.post(s.base_url + CHAT, json=_chat(), headers=good, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "abcd"
    finally:
        s.stop()
