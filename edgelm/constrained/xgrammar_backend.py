"""XGrammar backend: compiles JSON schemas, regexes, EBNF grammars and structural tags into
token-level matchers, in a thread pool, once per key."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from edgelm.constrained.base import GRAMMAR_KINDS, Grammar, GrammarBackend, GrammarCompileError, GrammarKey

logger = logging.getLogger(__name__)

try:
    import xgrammar as xgr
except ImportError:  # checked in XGrammarBackend.__init__
    xgr = None

# "[18:21:17] /project/cpp/regex_converter.cc:83: " and "Check failed: (...) is false: " say nothing to a client
_LOG_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")
_CHECK_FAILED = re.compile(r"Check failed: \(.*?\) is false:\s*")


def compiler_message(exc: BaseException) -> str:
    """The compiler's own message, without its C++ source location."""
    text = str(exc).strip()
    text = _LOG_PREFIX.sub("", text)
    return _CHECK_FAILED.sub("", text).strip() or type(exc).__name__


class XGrammarGrammar(Grammar):
    def __init__(self, compiled, stop_token_ids: list[int] | None):
        self._compiled = compiled
        self._stop_token_ids = stop_token_ids
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids)

    def accept_token(self, token_id: int) -> bool:
        return self._matcher.accept_token(int(token_id))

    def fill_vocab_mask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    def copy(self) -> XGrammarGrammar:
        return XGrammarGrammar(self._compiled, self._stop_token_ids)

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)


class XGrammarBackend(GrammarBackend):
    """`max_cache_entries` bounds the compiled grammars kept (least recently used leave first);
    `any_whitespace=False` asks for JSON with fixed separators (", ", ": ") and no free
    whitespace, which keeps small models from looping on spaces."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int], *, any_whitespace: bool = False,
                 max_threads: int = 2, max_cache_entries: int = 512):
        if xgr is None:
            raise ImportError("--grammar-backend xgrammar needs the xgrammar package: pip install xgrammar "
                              "(or edgelm[grammar]), or pass --grammar-backend none")
        vocab_size = max(int(vocab_size), len(tokenizer))
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(set(eos_token_ids))
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=self.eos_token_ids or None)
        self._compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="grammar")
        self._any_whitespace = any_whitespace
        self._cache: OrderedDict[GrammarKey, Future] = OrderedDict()
        self._max_cache_entries = max_cache_entries
        self._lock = threading.Lock()
        self.num_compiles = 0  # keys compiled so far (cache misses)
        self.num_cache_hits = 0
        self.tokenizer_info = info
        self._serialized: OrderedDict[GrammarKey, Future] = OrderedDict()

    def get_serialized_future(self, key: GrammarKey) -> Future[str]:
        """A future of the compiled grammar in xgrammar's serialized form (for a worker process),
        made once per key on the compile threads; raises GrammarCompileError as get_future does."""
        kind, value = key
        future, cached = self._cached(self._serialized, key, Future)
        if cached:
            return future

        def serialize(done: Future) -> None:
            exc = done.exception()
            if exc is not None:
                future.set_exception(GrammarCompileError(str(exc), kind))
                return

            def run() -> None:  # a big grammar takes a fraction of a second (the GIL is released)
                try:
                    future.set_result(done.result().serialize_json())
                except Exception as exc:  # noqa: BLE001 (the request gets the message)
                    future.set_exception(GrammarCompileError(f"cannot serialize the grammar: {exc}", kind))

            self._pool.submit(run)

        self._compiled_future(kind, value).add_done_callback(serialize)
        return future

    def _cached(self, cache: OrderedDict, key: GrammarKey, make) -> tuple[Future, bool]:
        """cache[key], made by `make()` on a miss (least recently used entries leave beyond the
        limit); and whether it was there."""
        with self._lock:
            future = cache.get(key)
            if future is not None:
                cache.move_to_end(key)
                return future, True
            future = cache[key] = make()
            while len(cache) > self._max_cache_entries:
                cache.popitem(last=False)
            return future, False

    def get_future(self, key: GrammarKey) -> Future[Grammar]:
        kind, value = key
        compiled = self._compiled_future(kind, value)
        out: Future[Grammar] = Future()

        def resolve(done: Future) -> None:
            exc = done.exception()
            if exc is not None:
                out.set_exception(GrammarCompileError(str(exc), kind))
            else:
                out.set_result(XGrammarGrammar(done.result(), self.eos_token_ids or None))

        compiled.add_done_callback(resolve)
        return out

    def _compiled_future(self, kind: str, value: str) -> Future:
        if kind not in GRAMMAR_KINDS:
            failed: Future = Future()
            failed.set_exception(GrammarCompileError(f"unknown grammar kind {kind!r}; use one of {GRAMMAR_KINDS}"))
            return failed
        future, cached = self._cached(self._cache, (kind, value),
                                      lambda: self._pool.submit(self._compile, kind, value))
        if cached:
            self.num_cache_hits += 1
        else:
            self.num_compiles += 1
        return future

    def _compile(self, kind: str, value: str):
        try:
            if kind == "json":
                return self._compiler.compile_json_schema(value, any_whitespace=self._any_whitespace)
            if kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=self._any_whitespace,
                                                          strict_mode=False)
            if kind == "regex":
                return self._compiler.compile_regex(value)
            if kind == "ebnf":
                return self._compiler.compile_grammar(value)
            return self._compile_structural_tag(value)
        except Exception as exc:  # the compiler raises RuntimeError for every refused input
            raise GrammarCompileError(compiler_message(exc), kind) from exc

    def _compile_structural_tag(self, value: str):
        try:
            tag = json.loads(value)
        except json.JSONDecodeError as exc:
            raise GrammarCompileError(f"structural_tag is not valid JSON: {exc}", "structural_tag") from exc
        if isinstance(tag, dict) and "structures" in tag:  # SGLang's / OpenAI's older form
            try:
                items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                         for s in tag["structures"]]
            except (KeyError, TypeError) as exc:
                raise GrammarCompileError("each structural_tag structure needs begin, schema and end",
                                          "structural_tag") from exc
            return self._compiler.compile_structural_tag(items, tag.get("triggers", []))
        return self._compiler.compile_structural_tag(value)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def create_grammar_backend(name: str | None, tokenizer, vocab_size: int, eos_token_ids: list[int],
                           **kwargs) -> GrammarBackend | None:
    """The backend `--grammar-backend` names; None for 'none'. Unset picks xgrammar when installed."""
    if name is None:
        name = "xgrammar" if xgr is not None else "none"
    if name == "none":
        return None
    if name == "xgrammar":
        return XGrammarBackend(tokenizer, vocab_size, eos_token_ids, **kwargs)
    raise ValueError(f"unknown grammar backend {name!r}; use xgrammar or none")
