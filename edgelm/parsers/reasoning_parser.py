"""Split a reasoning model's output into its thinking (`<think> ... </think>`) and its answer,
whole or as a stream of deltas.

DeepSeek-R1 distills' chat template ends the prompt with `<think>\\n`, so their output starts
inside the thinking and only closes it; Qwen3 opens `<think>` itself (or not at all, e.g. with
`enable_thinking=False`, whose template puts an empty think block in the prompt). Whitespace
around the reasoning and before the answer is dropped, so the stream's pieces join into exactly
what `parse_non_stream` returns.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"
MODEL_TYPES = ("deepseek-r1", "qwen3")


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt leaves the model inside a think block (it ends with `<think>`
    and no `</think>` after it): then the parser needs force_reasoning=True."""
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """`force_reasoning`: the output starts inside the thinking (None: the model type's default,
    True for deepseek-r1, False for qwen3; pass `prompt_opens_reasoning(prompt)` when the
    prompt is at hand). `stream_reasoning=False` holds the reasoning back and sends it in one
    piece when the thinking ends."""

    def __init__(self, model_type: str, stream_reasoning: bool = True, force_reasoning: bool | None = None):
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown reasoning parser {model_type!r}; use one of {MODEL_TYPES}")
        self.model_type = model_type
        self.stream_reasoning = stream_reasoning
        self.force_reasoning = model_type == "deepseek-r1" if force_reasoning is None else force_reasoning
        self._buf = ""
        self._state = "opening" if self.force_reasoning else "start"
        self._reasoning_started = False  # leading whitespace of the reasoning is dropped
        self._held_reasoning: str | None = ""  # stream_reasoning=False: the reasoning so far

    def parse_non_stream(self, text: str) -> tuple[str, str]:
        """(reasoning_text, normal_text) of a whole output; this parser's stream state is untouched."""
        parser = ReasoningParser(self.model_type, self.stream_reasoning, self.force_reasoning)
        r1, n1 = parser.parse_stream_chunk(text)
        r2, n2 = parser.finish()
        return r1 + r2, n1 + n2

    def parse_stream_chunk(self, delta: str) -> tuple[str, str]:
        """(reasoning_delta, normal_delta) for the next piece of output text."""
        self._buf += delta
        reasoning, normal = [], []
        while self._step(reasoning, normal):
            pass
        return self._reasoning_out("".join(reasoning)), "".join(normal)

    def finish(self) -> tuple[str, str]:
        """What is still held back (a partial tag, trailing whitespace) once the output ends."""
        buf, self._buf = self._buf, ""
        reasoning = normal = ""
        if self._state in ("start", "normal"):
            normal = buf
        elif self._state in ("opening", "reasoning"):
            reasoning = buf.rstrip() if self._reasoning_started else buf.strip()
        self._state = "done"
        return self._reasoning_out(reasoning), normal

    @property
    def in_reasoning(self) -> bool:
        return self._state in ("opening", "reasoning")

    def _reasoning_out(self, text: str) -> str:
        if self.stream_reasoning:
            return text
        if self._held_reasoning is None:  # already sent
            return ""
        self._held_reasoning += text
        if self._state in ("after_end", "normal", "done"):  # the thinking is over: send it whole
            out, self._held_reasoning = self._held_reasoning, None
            return out
        return ""

    def _step(self, reasoning: list[str], normal: list[str]) -> bool:
        """Consume what the current state can from the buffer; False when it needs more text."""
        buf = self._buf
        if self._state == "start":  # does the output open a think block?
            head = buf.lstrip()
            if head.startswith(THINK_START):
                self._buf = head[len(THINK_START):]
                self._state = "reasoning"
                return True
            if THINK_START.startswith(head):  # empty, or a partial <think>
                return False
            self._state = "normal"
            return True
        if self._state == "opening":  # forced: skip whitespace and a <think> the model repeats
            head = buf.lstrip()
            if head.startswith(THINK_START):
                self._buf = head[len(THINK_START):]
            elif THINK_START.startswith(head):
                return False
            self._state = "reasoning"
            return True
        if self._state == "reasoning":
            if not self._reasoning_started:
                buf = self._buf = buf.lstrip()
                if not buf:
                    return False
                self._reasoning_started = True
            end = buf.find(THINK_END)
            if end >= 0:
                reasoning.append(buf[:end].rstrip())
                self._buf = buf[end + len(THINK_END):]
                self._state = "after_end"
                return True
            # hold back a partial </think> and trailing whitespace (dropped if </think> follows)
            keep = _partial_suffix(buf, THINK_END)
            body = buf[: len(buf) - keep]
            stripped = body.rstrip()
            reasoning.append(stripped)
            self._buf = body[len(stripped):] + buf[len(buf) - keep:]
            return False
        if self._state == "after_end":
            self._buf = buf.lstrip()
            if not self._buf:
                return False
            self._state = "normal"
            return True
        if self._state == "normal":
            normal.append(buf)
            self._buf = ""
        return False
