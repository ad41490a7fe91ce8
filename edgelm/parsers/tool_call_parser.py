"""Tool calls in a model's output, whole or streamed as OpenAI `tool_calls` deltas.

Formats (`--tool-call-parser`):
  llama3   `{"name": "f", "parameters": {...}}`, optionally after `<|python_tag|>`, several
           joined by `;`; without the tag only when the output starts with `{`.
  qwen25   Hermes style: `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, repeated.
  mistral  `[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]` (also a bare list at the start
           when the tag was detokenized away), or the newer `[TOOL_CALLS]f[ARGS]{...}`.
Either key, "parameters" or "arguments", holds the arguments. A call's arguments are the model's
own JSON text, streamed as it arrives; the first delta of a call carries its id and name. An
object whose name is not among the request's tools is left in the text.

One incremental parser serves both paths: `parse_non_stream` feeds the whole text at once, so a
stream's deltas always join into exactly the non-stream result.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from edgelm.parsers.json_scan import ValueEndScanner, scan_object_members


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str = field(default_factory=new_call_id)


@dataclass
class ToolCallDelta:
    index: int  # which call of this output (0, 1, ...)
    name: str | None = None  # set on a call's first delta only
    arguments_delta: str = ""
    id: str | None = None  # set on a call's first delta only


@dataclass(frozen=True)
class _Format:
    marker: str  # opens a group of calls anywhere in the text
    bare_start: str | None  # opens a group when the output starts with it (the marker was stripped)
    list_open: str | None  # after the marker: the calls are a list
    separator: str | None  # between calls of one group
    group_end: str | None  # closes a group
    named_args: bool = False  # mistral's `name[ARGS]{...}` after the marker


FORMATS = {
    "llama3": _Format("<|python_tag|>", "{", None, ";", None),
    "qwen25": _Format("<tool_call>", None, None, None, "</tool_call>"),
    "mistral": _Format("[TOOL_CALLS]", "[", "[", ",", "]", named_args=True),
}
_ARG_KEYS = ("parameters", "arguments")
_ARGS_TAG = "[ARGS]"
_NAME_CHARS = re.compile(r"\s*[A-Za-z0-9_.\-]*")


def tool_names(tools: list[dict]) -> set[str]:
    """Function names of OpenAI-style tools (`{"type": "function", "function": {"name": ...}}`)."""
    names = set()
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ToolCallParser:
    """`tools`: the request's tools; with none, any name counts as a call."""

    def __init__(self, name: str, tools: list[dict]):
        if name not in FORMATS:
            raise ValueError(f"unknown tool-call parser {name!r}; use one of {tuple(FORMATS)}")
        self.name = name
        self.tools = tools
        self.fmt = FORMATS[name]
        self.names = tool_names(tools)
        self._buf = ""
        self._state = "start" if self.fmt.bare_start else "text"
        self._raw = ""  # text consumed for a group not yet known to hold a call (given back if not)
        self._strip_text = False  # drop whitespace right after a call
        self._index = 0  # calls committed so far
        self._normal: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._reset_call()

    def _reset_call(self) -> None:
        self._obj = ""  # text of the current call object (or of mistral's arguments)
        self._obj_end = ValueEndScanner()
        self._committed = False
        self._args_start: int | None = None  # offset of the arguments value in self._obj
        self._args_end = ValueEndScanner()
        self._args_sent = 0

    # ------------------------------------------------------------------ public
    def parse_non_stream(self, text: str) -> tuple[str, list[ToolCall]]:
        """(normal_text, calls) of a whole output; this parser's stream state is untouched."""
        parser = ToolCallParser(self.name, self.tools)
        normal, deltas = parser.parse_stream_chunk(text)
        normal_tail, tail = parser.finish()
        calls: list[ToolCall] = []
        for d in deltas + tail:
            if d.name is not None:
                calls.append(ToolCall(d.name, "", d.id))
            calls[d.index].arguments += d.arguments_delta
        return normal + normal_tail, calls

    def parse_stream_chunk(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        """(normal_text_delta, tool-call deltas) for the next piece of output text."""
        self._buf += delta
        while self._step():
            pass
        return self._take()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """Flush what is held back once the output ends: a partial tag becomes text again, an
        unfinished call keeps the arguments sent so far."""
        state, buf = self._state, self._buf
        self._buf = ""
        if state == "text":
            self._text(buf)
        elif state == "obj" and self._committed:
            if self._args_start is None:
                self._send_args("{}")
            elif self._args_sent == 0:  # an unfinished string or scalar: as it stands
                self._send_args(self._obj[self._args_start:])
        elif state == "args":
            if self._args_sent == 0:
                self._send_args(self._obj or "{}")
        elif state in ("start", "open", "next_obj", "obj", "name"):
            self._text(self._raw + self._obj + buf)
        self._state = "done"
        return self._take()

    # ------------------------------------------------------------------ output
    def _take(self) -> tuple[str, list[ToolCallDelta]]:
        normal, deltas = "".join(self._normal), []
        for d in self._deltas:  # merge the pieces of one call from this chunk
            if deltas and deltas[-1].index == d.index and d.name is None:
                deltas[-1].arguments_delta += d.arguments_delta
            else:
                deltas.append(d)
        self._normal, self._deltas = [], []
        return normal, deltas

    def _text(self, text: str) -> None:
        if self._strip_text:
            text = text.lstrip()
            self._strip_text = not text
        if text:
            self._normal.append(text)

    def _give_back(self) -> None:
        """What looked like the start of a call is not one: it is text."""
        self._text(self._raw + self._obj)
        self._raw = ""
        self._reset_call()
        self._state = "text"

    def _commit(self, name: str) -> None:
        self._deltas.append(ToolCallDelta(self._index, name, "", new_call_id()))
        self._committed = True
        self._raw = ""

    def _send_args(self, text: str) -> None:
        if text:
            self._deltas.append(ToolCallDelta(self._index, None, text))
            self._args_sent += len(text)

    def _end_call(self, next_state: str) -> None:
        self._index += 1
        self._reset_call()
        self._state = next_state

    def _valid_name(self, name: object) -> bool:
        return isinstance(name, str) and bool(name) and (not self.names or name in self.names)

    # ------------------------------------------------------------------ states
    def _step(self) -> bool:
        """Consume what the current state can; False when it needs more text."""
        fmt, buf, state = self.fmt, self._buf, self._state
        if state in ("start", "open", "next_obj", "after_obj") or (state == "args" and not self._obj):
            head = buf.lstrip()
            if state in ("start", "open", "next_obj"):  # given back if no call follows
                self._raw += buf[: len(buf) - len(head)]
            buf = self._buf = head
            if not head:
                return False
        if state == "start":  # the output's first characters: a call without its marker?
            if len(buf) < len(fmt.marker) and fmt.marker.startswith(buf):
                return False
            if buf.startswith(fmt.bare_start) and not buf.startswith(fmt.marker):
                self._state = "open"
            else:
                self._text(self._raw)
                self._raw, self._state = "", "text"
            return True
        if state == "text":
            at = buf.find(fmt.marker)
            if at >= 0:
                self._text(buf[:at])
                self._buf = buf[at + len(fmt.marker):]
                self._raw, self._state = fmt.marker, "open"
                return True
            keep = _partial_suffix(buf, fmt.marker)
            self._text(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False
        if state == "open":
            if fmt.list_open and buf.startswith(fmt.list_open):
                self._raw += fmt.list_open
                self._buf = buf[len(fmt.list_open):]
                self._state = "next_obj"
            elif fmt.list_open is None:
                self._state = "next_obj"
            elif fmt.named_args:
                self._state = "name"
            else:
                self._give_back()
            return True
        if state == "next_obj":
            if buf.startswith("{"):
                self._state = "obj"
            elif fmt.group_end and fmt.list_open and buf.startswith(fmt.group_end):  # an empty or closed list
                self._buf = buf[len(fmt.group_end):]
                self._raw, self._state, self._strip_text = "", "text", True
            else:
                self._give_back()
            return True
        if state == "obj":
            return self._step_obj()
        if state == "after_obj":
            if fmt.separator and buf.startswith(fmt.separator):
                self._buf = buf[len(fmt.separator):]
                self._state = "next_obj"
                return True
            if fmt.group_end:
                if buf.startswith(fmt.group_end):
                    self._buf = buf[len(fmt.group_end):]
                elif fmt.group_end.startswith(buf):
                    return False
            self._state, self._strip_text = "text", True
            return True
        if state == "name":
            return self._step_name()
        if state == "args":
            return self._step_args()
        return False

    def _step_obj(self) -> bool:
        self._obj += self._buf
        self._buf = ""
        end = self._obj_end.feed(self._obj)
        if end is not None:
            self._buf, self._obj = self._obj[end:], self._obj[:end]
        members = None
        if not self._committed or self._args_start is None or end is not None:
            members = scan_object_members(self._obj)
            if not self._committed:
                name = members.get("name")
                if name is not None and name[1] is not None:
                    name_value = _json_or_none(self._obj[name[0]:name[1]])
                    if not self._valid_name(name_value):
                        self._give_back()
                        return True
                    self._commit(name_value)
                elif end is not None:
                    self._give_back()
                    return True
            for key in _ARG_KEYS:
                if key in members:
                    self._args_start = members[key][0]
                    break
        if self._committed and self._args_start is not None:
            value_end = None
            if end is not None:
                key = next(k for k in _ARG_KEYS if k in members)
                value_end = members[key][1]
                value_end = None if value_end is None else value_end - self._args_start
            self._stream_args(self._obj[self._args_start:], value_end)
        if end is not None:
            if self._args_start is None:
                self._send_args("{}")
            self._end_call("after_obj")
            return True
        return False

    def _stream_args(self, value: str, scalar_end: int | None) -> None:
        """Send the arguments value as far as it is known. A string value (arguments encoded as
        a JSON string) is sent decoded once complete; a scalar once its object ends."""
        if not value:
            return
        if value[0] in "{[":
            end = self._args_end.feed(value)
            self._send_args(value[self._args_sent : len(value) if end is None else end])
        elif self._args_sent == 0:
            end = self._args_end.feed(value) if value[0] == '"' else scalar_end
            if end is not None:
                raw = value[:end]
                decoded = _json_or_none(raw)
                self._send_args(decoded if isinstance(decoded, str) else raw)

    def _step_name(self) -> bool:
        """mistral `[TOOL_CALLS]name[ARGS]{...}`: the name, then the arguments."""
        buf = self._buf
        at = buf.find(_ARGS_TAG)
        if at >= 0:
            name = buf[:at].strip()
            if not self._valid_name(name):
                self._give_back()
                return True
            self._commit(name)
            self._buf = buf[at + len(_ARGS_TAG):]
            self._state = "args"
            return True
        rest = buf[_NAME_CHARS.match(buf).end():]
        if not _ARGS_TAG.startswith(rest):
            self._give_back()
            return True
        return False

    def _step_args(self) -> bool:
        self._obj += self._buf
        self._buf = ""
        if not self._obj.startswith("{"):
            self._send_args("{}")
            self._end_call("text")
            return True
        self._stream_args(self._obj, None)
        end = self._args_end.end
        if end is None:
            return False
        self._buf = self._obj[end:]
        self._strip_text = True
        self._end_call("text")
        return True


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None
