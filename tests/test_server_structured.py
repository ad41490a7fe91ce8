"""Structured output through the server (xgrammar) on the embedded model: JSON schema, json_object,
regex, EBNF, errors, and a batch mixing constrained and free requests."""

from __future__ import annotations

import asyncio
import json
import os
import re

import httpx
import jsonschema
import openai
import pytest

pytest.importorskip("xgrammar")

SCHEMAS = json.load(open(os.path.join(os.path.dirname(__file__), "data", "json_schemas.json")))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)


def _schema_request(client, item, stream: bool):
    kw = dict(model="x", messages=[{"role": "user", "content": item["prompt"] + " Answer in JSON."}],
              temperature=0, max_tokens=96,
              response_format={"type": "json_schema",
                               "json_schema": {"name": item["name"], "schema": item["schema"]}})
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                   if c.choices)


@pytest.mark.parametrize("idx", [0, 5, 11, 17])
def test_json_schema_chat(client, idx):
    item = SCHEMAS[idx]
    text = _schema_request(client, item, stream=False)
    jsonschema.validate(json.loads(text), item["schema"])
    assert _schema_request(client, item, stream=True) == text


def test_json_object_and_completions_regex(client, server):
    assert "matchers in 2 worker processes" in server.read_log()
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Give me a JSON object."}],
                                       temperature=0, max_tokens=64, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    pattern = r"(yes|no), [0-9]{2}"
    c = client.completions.create(model="x", prompt="Answer:", max_tokens=16, temperature=0,
                                  extra_body={"regex": pattern})
    assert re.fullmatch(pattern, c.choices[0].text)


def test_ebnf_and_native_generate(server):
    ebnf = 'root ::= "The answer is " ("red" | "green" | "blue") "."'
    r = httpx.post(server.base_url + "/generate", timeout=120, json={
        "text": "Pick a color.", "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ebnf": ebnf}}).json()
    assert re.fullmatch(r"The answer is (red|green|blue)\.", r["text"])
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["n"]}
    r = httpx.post(server.base_url + "/generate", timeout=120, json={
        "text": "A number:", "sampling_params": {"max_new_tokens": 16, "json_schema": json.dumps(schema)}}).json()
    jsonschema.validate(json.loads(r["text"]), schema)


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objec"}}},
])
def test_invalid_schema_is_400_and_server_keeps_serving(client, fmt):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       response_format=fmt)
    assert "objec" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="x", prompt="x", max_tokens=4, extra_body={"regex": "(unclosed"})
    ok = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert ok.choices[0].message.content is not None


def test_mixed_batch_free_requests_unchanged(server, client):
    """Constrained and free requests decoded together: the free ones equal an unconstrained run."""
    free_prompts = ["Tell me about cats.", "What is rain?"]
    alone = [client.chat.completions.create(model="x", messages=[{"role": "user", "content": p}], temperature=0,
                                            max_tokens=20).choices[0].message.content for p in free_prompts]
    item = SCHEMAS[0]

    async def main():
        c = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
        free = [c.chat.completions.create(model="x", messages=[{"role": "user", "content": p}], temperature=0,
                                          max_tokens=20) for p in free_prompts]
        constrained = [c.chat.completions.create(
            model="x", messages=[{"role": "user", "content": item["prompt"]}], temperature=0, max_tokens=64,
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": item["schema"]}})
            for _ in range(2)]
        return await asyncio.gather(*free, *constrained)

    results = asyncio.run(main())
    assert [r.choices[0].message.content for r in results[:2]] == alone
    for r in results[2:]:
        jsonschema.validate(json.loads(r.choices[0].message.content), item["schema"])
