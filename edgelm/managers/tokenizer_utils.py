"""Tokenizer loading, chat templates and incremental detokenization."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def load_tokenizer(server_args, resolved):
    """The tokenizer of --tokenizer-path, else the model's (from its directory or its GGUF)."""
    from transformers import AutoTokenizer

    if server_args.tokenizer_path:
        tok = AutoTokenizer.from_pretrained(server_args.tokenizer_path,
                                            trust_remote_code=server_args.trust_remote_code)
    elif resolved.gguf_file:
        tok = AutoTokenizer.from_pretrained(resolved.directory, gguf_file=resolved.gguf_file)
    else:
        tok = AutoTokenizer.from_pretrained(resolved.directory, trust_remote_code=server_args.trust_remote_code)
    if server_args.chat_template:
        tok.chat_template = read_chat_template(server_args.chat_template)
    return tok


def read_chat_template(value: str) -> str:
    """--chat-template is a file path, or the template itself."""
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if "{%" in value or "{{" in value:
        return value
    raise ValueError(f"--chat-template {value!r}: no such file, and not a Jinja template")


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas. A token that ends inside a multi-byte
    character is held back until the character completes; only a short window of ids is decoded
    per step, so the cost does not grow with the output."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.kwargs = {"skip_special_tokens": skip_special_tokens}
        if not spaces_between_special_tokens:
            self.kwargs["spaces_between_special_tokens"] = False
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self.kwargs)

    def add(self, new_ids: list[int], final: bool = False) -> str:
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            delta = new_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return delta
        return ""


class StopStringFilter:
    """Cuts the text at the first stop string and holds back a tail that could still become one,
    so a streamed response never shows any part of a stop string."""

    def __init__(self, stops: list[str], keep_stop: bool = False):
        self.stops = [s for s in stops if s]
        self.keep_stop = keep_stop
        self.text = ""
        self.sent = 0
        self.stopped: str | None = None

    def feed(self, delta: str, final: bool = False) -> str:
        """Returns the text that may be shown now."""
        if self.stopped is not None:
            return ""
        self.text += delta
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        longest = max(len(s) for s in self.stops)
        search_from = max(0, self.sent - longest)
        hits = [(self.text.find(s, search_from), s) for s in self.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            pos, stop = min(hits)
            end = pos + len(stop) if self.keep_stop else pos
            self.stopped = stop
            out = self.text[self.sent:end] if end > self.sent else ""
            self.sent = max(self.sent, end)
            return out
        hold = 0 if final else self._partial_stop_len()
        end = len(self.text) - hold
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _partial_stop_len(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
