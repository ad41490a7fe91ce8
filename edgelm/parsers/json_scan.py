"""Find the extent of JSON values in text that is still arriving (a model's streamed output)."""

from __future__ import annotations

import json
import re

_WS = re.compile(r"\s*")
_SCALAR = re.compile(r"[^,}\]\s]*")


class ValueEndScanner:
    """Where the JSON object, array or string starting at text[0] ends (one past its last
    character), fed the same growing text again and again; each character is read once."""

    def __init__(self) -> None:
        self.end: int | None = None
        self._pos = 0
        self._depth = 0
        self._in_str = False
        self._escaped = False

    def feed(self, text: str) -> int | None:
        if self.end is not None:
            return self.end
        i, depth, in_str, escaped = self._pos, self._depth, self._in_str, self._escaped
        n = len(text)
        while i < n:
            c = text[i]
            i += 1
            if in_str:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_str = False
                    if depth == 0:
                        self.end = i
                        break
            elif c == '"':
                in_str = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth <= 0:
                    self.end = i
                    break
        self._pos, self._depth, self._in_str, self._escaped = i, depth, in_str, escaped
        return self.end


def _value_end(text: str, start: int) -> int | None:
    if text[start] in '{["':
        end = ValueEndScanner().feed(text[start:])
        return None if end is None else start + end
    end = _SCALAR.match(text, start).end()
    return None if end >= len(text) else end  # a number may go on


def scan_object_members(text: str) -> dict[str, tuple[int, int | None]]:
    """The top-level members of the (possibly unfinished) JSON object starting at text[0]:
    key -> (value_start, value_end or None while the value is unfinished), as far as known."""
    members: dict[str, tuple[int, int | None]] = {}
    n, i = len(text), 1
    while True:
        i = _WS.match(text, i).end()
        if i >= n or text[i] == "}":
            return members
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            return members
        key_end = _value_end(text, i)
        if key_end is None:
            return members
        try:
            key = json.loads(text[i:key_end])
        except ValueError:
            return members
        i = _WS.match(text, key_end).end()
        if i >= n or text[i] != ":":
            return members
        i = _WS.match(text, i + 1).end()
        if i >= n:
            return members
        value_end = _value_end(text, i)
        members[key] = (i, value_end)
        if value_end is None:
            return members
        i = value_end
