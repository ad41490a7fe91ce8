"""Reasoning and tool-call parsers on model-like outputs: whole-text results, and streams (one
character at a time, token-like pieces, random pieces) that join into the same result."""

import json
import random
import re

import pytest

from edgelm.parsers.json_scan import ValueEndScanner, scan_object_members
from edgelm.parsers.reasoning_parser import ReasoningParser, prompt_opens_reasoning
from edgelm.parsers.tool_call_parser import ToolCallParser, tool_names


def chunkings(text: str):
    yield "chars", list(text)
    # roughly what a BPE detokenizer hands out: words with their leading space, punctuation runs
    yield "tokens", re.findall(r"\s*\w+|\s*[^\w\s]+|\s+", text)
    rng = random.Random(len(text))
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        pieces.append(text[i : i + n])
        i += n
    yield "random", pieces
    yield "whole", [text]


# ---------------------------------------------------------------- reasoning

REASONING_CASES = [
    # (model_type, force_reasoning, output, expected (reasoning, normal))
    ("deepseek-r1", None, "Okay, the user asks 2+2.\nThat is 4.\n</think>\n\nThe answer is **4**.",
     ("Okay, the user asks 2+2.\nThat is 4.", "The answer is **4**.")),
    ("deepseek-r1", None, "<think>\nHmm, a < b and c > d.\n</think>So a<b.", ("Hmm, a < b and c > d.", "So a<b.")),
    ("deepseek-r1", None, "Still thinking about </thin", ("Still thinking about </thin", "")),
    ("deepseek-r1", None, "\n\n</think>\n\nDirect answer.", ("", "Direct answer.")),
    ("qwen3", None, "<think>\nLet me see. The user greets me.\n</think>\n\nHello! How can I help?",
     ("Let me see. The user greets me.", "Hello! How can I help?")),
    ("qwen3", None, "<think>\n\n</think>\n\nHi.", ("", "Hi.")),
    ("qwen3", None, "Hello there, <think> is a tag.", ("", "Hello there, <think> is a tag.")),
    ("qwen3", None, "  <thi", ("", "  <thi")),
    ("qwen3", True, "The user wants a poem.\n</think>\n\nRoses are red.", ("The user wants a poem.", "Roses are red.")),
    ("qwen3", False, "Answer only, 1 < 2.", ("", "Answer only, 1 < 2.")),
]


@pytest.mark.parametrize("model_type, force, text, expected", REASONING_CASES)
def test_reasoning_non_stream(model_type, force, text, expected):
    assert ReasoningParser(model_type, force_reasoning=force).parse_non_stream(text) == expected


@pytest.mark.parametrize("stream_reasoning", [True, False])
@pytest.mark.parametrize("model_type, force, text, expected", REASONING_CASES)
def test_reasoning_stream_matches_non_stream(model_type, force, text, expected, stream_reasoning):
    for how, pieces in chunkings(text):
        parser = ReasoningParser(model_type, stream_reasoning=stream_reasoning, force_reasoning=force)
        outs = [parser.parse_stream_chunk(p) for p in pieces] + [parser.finish()]
        assert ("".join(r for r, _ in outs), "".join(n for _, n in outs)) == expected, how
        if not stream_reasoning:  # the reasoning comes in one piece
            assert sum(bool(r) for r, _ in outs) <= 1, how
        # nothing of the answer is sent before the reasoning is complete
        first_normal = next((i for i, (_, n) in enumerate(outs) if n), len(outs))
        assert all(not r for r, _ in outs[first_normal + 1:]), how


def test_reasoning_streams_early():
    parser = ReasoningParser("deepseek-r1")
    assert parser.parse_stream_chunk("First I") == ("First I", "")
    assert parser.parse_stream_chunk(" add. </th") == (" add.", "")  # a partial tag is held back
    assert parser.parse_stream_chunk("ink>\n\nFour") == ("", "Four")
    assert parser.finish() == ("", "")


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<|Assistant|><think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # enable_thinking=False
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")
    with pytest.raises(ValueError):
        ReasoningParser("gpt-oss")


# ---------------------------------------------------------------- tool calls

TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
         for n in ("get_weather", "get_time", "search")]

TOOL_CASES = [
    # (parser, output, expected normal text, expected [(name, arguments as a dict)])
    ("llama3", '{"name": "get_weather", "parameters": {"location": "San Francisco, CA", "unit": "fahrenheit"}}',
     "", [("get_weather", {"location": "San Francisco, CA", "unit": "fahrenheit"})]),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"location": "Paris"}}; '
               '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}',
     "", [("get_weather", {"location": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})]),
    ("llama3", '\n{"name": "search", "arguments": {"query": "a \\"quoted\\" {brace}; semi", "n": [1, {"x": null}]}}',
     "", [("search", {"query": 'a "quoted" {brace}; semi', "n": [1, {"x": None}]})]),
    ("llama3", '{"type": "function", "name": "get_time", "parameters": {}}', "", [("get_time", {})]),
    ("llama3", '{"name": "get_time"}', "", [("get_time", {})]),
    ("llama3", "The weather in Paris is sunny, 22 °C.", "The weather in Paris is sunny, 22 °C.", []),
    ("llama3", '{"temperature": 20, "unit": "C"}', '{"temperature": 20, "unit": "C"}', []),
    ("llama3", '{"name": "Alice", "age": 30}', '{"name": "Alice", "age": 30}', []),
    ("qwen25", "I'll look that up.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
               "{\"location\": \"Berlin\", \"days\": 3}}\n</tool_call>",
     "I'll look that up.\n", [("get_weather", {"location": "Berlin", "days": 3})]),
    ("qwen25", '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Tokyo"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "search", "arguments": {"query": "</tool_call> in a string"}}\n</tool_call>',
     "", [("get_weather", {"location": "Tokyo"}), ("search", {"query": "</tool_call> in a string"})]),
    ("qwen25", '<tool_call>\n{"name": "get_time", "arguments": "{\\"timezone\\": \\"UTC\\"}"}\n</tool_call>',
     "", [("get_time", {"timezone": "UTC"})]),
    ("qwen25", '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>', []),
    ("qwen25", "Plain answer with a < sign and <tool_ca", "Plain answer with a < sign and <tool_ca", []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "Paris"}}, '
                '{"name": "search", "arguments": {"query": "Paris, France"}}]',
     "", [("get_weather", {"location": "Paris"}), ("search", {"query": "Paris, France"})]),
    ("mistral", '[{"name": "get_time", "arguments": {"timezone": "UTC"}}]', "", [("get_time", {"timezone": "UTC"})]),
    ("mistral", "Sure.[TOOL_CALLS]get_weather[ARGS]{\"location\": \"Oslo\", \"unit\": \"celsius\"}",
     "Sure.", [("get_weather", {"location": "Oslo", "unit": "celsius"})]),
    ("mistral", "[1, 2, 3] are the first numbers.", "[1, 2, 3] are the first numbers.", []),
    ("mistral", "No tools needed: 2 + 2 = 4.", "No tools needed: 2 + 2 = 4.", []),
]


def _collect(parser, pieces):
    normal, calls, ids = "", {}, {}
    for out in [parser.parse_stream_chunk(p) for p in pieces] + [parser.finish()]:
        normal += out[0]
        for d in out[1]:
            if d.name is not None:  # a call's first delta carries its id and name, exactly once
                assert d.index not in calls and d.index == len(calls) and d.id.startswith("call_")
                calls[d.index], ids[d.index] = [d.name, ""], d.id
            else:
                assert d.id is None and d.index in calls
            calls[d.index][1] += d.arguments_delta
    assert len(set(ids.values())) == len(ids)
    return normal, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("name, text, normal, expected", TOOL_CASES)
def test_tool_calls_non_stream(name, text, normal, expected):
    got_normal, calls = ToolCallParser(name, TOOLS).parse_non_stream(text)
    assert got_normal == normal
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
    assert all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("name, text, normal, expected", TOOL_CASES)
def test_tool_calls_stream_matches_non_stream(name, text, normal, expected):
    whole_normal, whole_calls = ToolCallParser(name, TOOLS).parse_non_stream(text)
    for how, pieces in chunkings(text):
        got = _collect(ToolCallParser(name, TOOLS), pieces)
        assert got == (whole_normal, [(c.name, c.arguments) for c in whole_calls]), how


def test_tool_call_arguments_stream_as_they_arrive():
    parser = ToolCallParser("qwen25", TOOLS)
    normal, deltas = parser.parse_stream_chunk('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"loc')
    assert normal == "Checking.\n"
    assert [(d.index, d.name, d.arguments_delta) for d in deltas] == [(0, "get_weather", '{"loc')]
    normal, deltas = parser.parse_stream_chunk('ation": "Rome"}}\n</tool_')
    assert normal == "" and [(d.index, d.name, d.arguments_delta) for d in deltas] == [(0, None, 'ation": "Rome"}')]
    assert parser.parse_stream_chunk("call>") == ("", [])
    assert parser.finish() == ("", [])


def test_truncated_call_keeps_partial_arguments():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Par'
    normal, calls = ToolCallParser("qwen25", TOOLS).parse_non_stream(text)
    assert normal == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"location": "Par')]
    for _, pieces in chunkings(text):
        assert _collect(ToolCallParser("qwen25", TOOLS), pieces) == ("", [("get_weather", '{"location": "Par')])


def test_any_name_without_tools_and_tool_names():
    _, calls = ToolCallParser("llama3", []).parse_non_stream('{"name": "anything", "parameters": {"a": 1}}')
    assert [(c.name, c.arguments) for c in calls] == [("anything", '{"a": 1}')]
    assert tool_names(TOOLS + [{"name": "bare"}, {"type": "function"}]) == {"get_weather", "get_time", "search", "bare"}
    with pytest.raises(ValueError):
        ToolCallParser("hermes2", TOOLS)


def test_json_scan():
    text = '{"a": "x}\\"", "b": [1, {"c": 2}], "n": 12, "d": {"e'
    members = scan_object_members(text)
    assert list(members) == ["a", "b", "n", "d"]
    assert text[members["b"][0]:members["b"][1]] == '[1, {"c": 2}]'
    assert text[members["n"][0]:members["n"][1]] == "12"
    assert members["d"][1] is None
    scanner = ValueEndScanner()
    assert scanner.feed('{"a": "}') is None
    assert scanner.feed('{"a": "}"} tail') == len('{"a": "}"}')
