"""Grammar backend (xgrammar) with the embedded model's tokenizer, the vocabulary bitmask, and the
reasoning gate."""

import json
import os
import time

import pytest
import torch

from edgelm.constrained import (
    GrammarCompileError,
    ReasoningGatedGrammar,
    allocate_vocab_mask,
    apply_vocab_mask,
    create_grammar_backend,
    fill_vocab_masks,
    grammar_key,
    xgrammar_backend,
)
from edgelm.constrained import bitmask as bitmask_mod

TIMEOUT = 60


@pytest.fixture(scope="session")
def tokenizer(embedded_gguf):
    pytest.importorskip("xgrammar")  # every test that needs a tokenizer needs xgrammar too
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(embedded_gguf), gguf_file=os.path.basename(embedded_gguf))


@pytest.fixture(scope="session")
def backend(tokenizer):
    backend = create_grammar_backend("xgrammar", tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    yield backend
    backend.shutdown()


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def _allowed(grammar, vocab_size, token_id) -> bool:
    mask = allocate_vocab_mask(vocab_size, 1, pin_memory=False)
    grammar.fill_vocab_mask(mask, 0)
    return bool((mask[0, token_id // 32] >> (token_id % 32)) & 1)


def _accepts(grammar, ids) -> bool:
    return all(grammar.accept_token(t) for t in ids)


SCHEMA = ('{"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, '
          '"required": ["name", "age"]}')


def test_json_schema_matcher(backend, tokenizer):
    grammar = backend.get_future(("json", SCHEMA)).result(TIMEOUT)
    eos = tokenizer.eos_token_id
    assert not _allowed(grammar, backend.vocab_size, eos)
    assert _accepts(grammar, _ids(tokenizer, '{"name": "Ann", "age": 31}'))
    assert not grammar.is_terminated()
    mask = allocate_vocab_mask(backend.vocab_size, 1, pin_memory=False)
    grammar.fill_vocab_mask(mask, 0)
    allowed = [t for t in range(backend.vocab_size) if (mask[0, t // 32] >> (t % 32)) & 1]
    assert allowed == [eos]  # a complete object: only the end of sequence
    assert grammar.accept_token(eos) and grammar.is_terminated()

    fresh = grammar.copy()
    assert not fresh.is_terminated()
    assert not _accepts(fresh, _ids(tokenizer, '{"age": 31}'))  # "name" must come first and is required


def test_regex_ebnf_and_json_object(backend, tokenizer):
    regex = backend.get_future(("regex", r"\d{3}-[a-z]+")).result(TIMEOUT)
    assert _accepts(regex, _ids(tokenizer, "123-abc"))
    assert not regex.copy().accept_token(_ids(tokenizer, "x")[0])

    ebnf = backend.get_future(("ebnf", 'root ::= "yes" | "no"')).result(TIMEOUT)
    assert _accepts(ebnf, _ids(tokenizer, "no"))
    assert ebnf.accept_token(tokenizer.eos_token_id) and ebnf.is_terminated()

    obj = backend.get_future(("json_object", "")).result(TIMEOUT)
    assert _accepts(obj, _ids(tokenizer, '{"anything": [1, 2]}'))
    assert not obj.copy().accept_token(_ids(tokenizer, "[")[0])


def test_structural_tag(backend, tokenizer):
    tag = ('{"type": "structural_tag", "structures": [{"begin": "<f>", "schema": {"type": "object", '
           '"properties": {"x": {"type": "integer"}}, "required": ["x"]}, "end": "</f>"}], "triggers": ["<f>"]}')
    grammar = backend.get_future(("structural_tag", tag)).result(TIMEOUT)
    assert _accepts(grammar, _ids(tokenizer, 'Sure. <f>{"x": 5}</f> Done.'))  # free text around the tag
    inside = grammar.copy()
    assert _accepts(inside, _ids(tokenizer, "<f>"))
    assert not _accepts(inside, _ids(tokenizer, '{"y": 5}'))  # the schema holds inside the tag


def test_cache_hit_gives_fresh_matchers(backend, tokenizer):
    schema = '{"type": "array", "items": {"type": "boolean"}, "maxItems": 3}'
    compiles = backend.num_compiles
    first = backend.get_future(("json", schema)).result(TIMEOUT)
    hits = backend.num_cache_hits
    second = backend.get_future(("json", schema)).result(TIMEOUT)
    assert backend.num_compiles == compiles + 1 and backend.num_cache_hits == hits + 1
    assert first is not second
    assert _accepts(first, _ids(tokenizer, "[true"))
    assert _accepts(second, _ids(tokenizer, "[false, true]"))  # its own state


@pytest.mark.parametrize("key, message", [
    (("json", '{"type": "objec"}'), 'Unsupported type "objec"'),
    (("json", "{not json"), "Failed to parse JSON"),
    (("regex", "a(b"), "parenthesis is not closed"),
    (("ebnf", 'root ::= "a" | missing'), 'Rule "missing" is not defined'),
    (("yaml", "a: 1"), "unknown grammar kind"),
])
def test_bad_grammar_raises_compiler_message(backend, key, message):
    future = backend.get_future(key)
    with pytest.raises(GrammarCompileError) as info:
        future.result(TIMEOUT)
    assert message in str(info.value)
    assert ".cc:" not in str(info.value)  # no C++ source location for the client
    assert info.value.kind == key[0]
    with pytest.raises(GrammarCompileError):  # the refusal is cached too
        backend.get_future(key).result(TIMEOUT)


def test_grammar_key_and_factory(tokenizer):
    assert grammar_key() is None
    assert grammar_key(json_schema="{}") == ("json", "{}")
    assert grammar_key(json_object=True) == ("json_object", "")
    with pytest.raises(ValueError):
        grammar_key(regex="a", ebnf="b")
    assert create_grammar_backend("none", tokenizer, 10, [0]) is None
    with pytest.raises(ValueError):
        create_grammar_backend("outlines", tokenizer, 10, [0])


def test_missing_xgrammar_is_a_clear_error(tokenizer, monkeypatch):
    monkeypatch.setattr(xgrammar_backend, "xgr", None)
    with pytest.raises(ImportError, match="pip install xgrammar"):
        create_grammar_backend("xgrammar", tokenizer, len(tokenizer), [0])
    assert create_grammar_backend(None, tokenizer, len(tokenizer), [0]) is None


def test_padded_model_vocab(tokenizer):
    """The lm head has more rows than the tokenizer: padded ids are never allowed."""
    padded = len(tokenizer) + 64
    backend = create_grammar_backend("xgrammar", tokenizer, padded, [tokenizer.eos_token_id])
    try:
        grammar = backend.get_future(("regex", "[a-z]+")).result(TIMEOUT)
        mask = allocate_vocab_mask(backend.vocab_size, 1, pin_memory=False)
        grammar.fill_vocab_mask(mask, 0)
        logits = torch.zeros(1, padded)
        apply_vocab_mask(logits, mask)
        assert torch.isinf(logits[0, len(tokenizer):]).all()
        assert torch.isfinite(logits[0]).sum() > 100
    finally:
        backend.shutdown()


def _reference_mask(logits, bitmask, rows):
    out = logits.clone()
    for r in rows:
        for t in range(out.shape[1]):
            word = t // 32
            if word >= bitmask.shape[1] or not (int(bitmask[r, word]) >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


@pytest.mark.parametrize("impl", ["torch", "xgrammar_cpu", "triton"])
@pytest.mark.parametrize("rows", [None, [0, 2], []])
def test_apply_vocab_mask_mixed_rows(impl, rows):
    if (impl == "triton" and bitmask_mod.triton is None) or (impl == "xgrammar_cpu" and bitmask_mod._xgr_apply is None):
        pytest.skip(f"{impl} is not installed")
    if impl == "triton" and torch.cuda.is_available():
        pytest.skip("host tensors run through the Triton interpreter only; test_apply_vocab_mask_cuda covers the GPU")
    torch.manual_seed(0)
    vocab_in_mask, vocab_logits = 70, 100  # logits wider than the mask: padded columns get -inf
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, (vocab_in_mask + 31) // 32), dtype=torch.int32)
    bitmask[:, -1] |= -1 << (vocab_in_mask % 32)  # junk bits past the vocab, as a filled mask may have
    logits = torch.randn(3, vocab_logits)
    expected = _reference_mask(logits, bitmask, range(3) if rows is None else rows)
    if impl == "xgrammar_cpu":
        apply_vocab_mask(logits, bitmask, rows)  # the CPU default when xgrammar is installed
    elif rows == []:
        pass
    elif impl == "torch":
        bitmask_mod._apply_torch(logits, bitmask, rows)
    else:
        bitmask_mod._apply_triton(logits, bitmask, rows)
    assert torch.equal(logits, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [None, [1, 3, 4, 10]])
def test_apply_vocab_mask_cuda(dtype, rows):
    """The Triton kernel against the torch path, a host bitmask, a padded 128k vocabulary."""
    torch.manual_seed(0)
    batch, vocab_in_mask, vocab_logits = 16, 128256, 128256 + 64
    bitmask = allocate_vocab_mask(vocab_in_mask, batch)
    bitmask.copy_(torch.randint(-(2**31), 2**31 - 1, bitmask.shape, dtype=torch.int32))
    logits = torch.randn(batch, vocab_logits, device="cuda", dtype=dtype)
    expected = logits.clone()
    bitmask_mod._apply_torch(expected, bitmask.cuda(), rows)
    apply_vocab_mask(logits, bitmask, rows)
    assert torch.equal(logits, expected)
    assert torch.isinf(logits[1, vocab_in_mask:]).all()


def test_fill_vocab_masks(backend, tokenizer):
    grammar = backend.get_future(("ebnf", 'root ::= "yes" | "no"')).result(TIMEOUT)
    mask = allocate_vocab_mask(backend.vocab_size, 3, pin_memory=False)
    rows = fill_vocab_masks([None, grammar, None], mask)
    assert rows == [1]
    assert (mask[0] == -1).all() and (mask[2] == -1).all() and not (mask[1] == -1).all()
    logits = torch.zeros(3, backend.vocab_size)
    apply_vocab_mask(logits, mask, rows)
    assert torch.isfinite(logits[[0, 2]]).all()
    assert torch.isfinite(logits[1, [_ids(tokenizer, "yes")[0], _ids(tokenizer, "no")[0]]]).all()
    assert torch.isinf(logits[1, _ids(tokenizer, "Hello")[0]])


def test_reasoning_gate(backend, tokenizer):
    inner = backend.get_future(("json", SCHEMA)).result(TIMEOUT)
    end_ids = _ids(tokenizer, "</think>")
    gate = ReasoningGatedGrammar(inner, end_ids, in_reasoning=True)
    thought = _ids(tokenizer, "Let me think: no JSON here! ") + end_ids[:-1]
    assert _accepts(gate, thought)
    assert gate.in_reasoning and _allowed(gate, backend.vocab_size, tokenizer.eos_token_id)
    assert gate.accept_token(end_ids[-1]) and not gate.in_reasoning
    assert not _allowed(gate, backend.vocab_size, _ids(tokenizer, "Hello")[0])  # the answer is constrained
    answer = _ids(tokenizer, '{"name": "A", "age": 1}')
    assert _accepts(gate, answer[:2])
    gate.rollback(3)  # two answer tokens and the last piece of </think>
    assert gate.in_reasoning
    assert _accepts(gate, [end_ids[-1]] + answer) and gate.accept_token(tokenizer.eos_token_id)
    assert gate.is_terminated()

    fresh = gate.copy()
    assert fresh.in_reasoning and not fresh.is_terminated()
    direct = ReasoningGatedGrammar(inner.copy(), end_ids, in_reasoning=False)
    assert not direct.accept_token(_ids(tokenizer, "Hello")[0])


def test_mixed_batch_fill_equals_row_by_row(backend, tokenizer):
    """A batch of xgrammar, gated and free rows: the same bits as one row at a time."""
    from edgelm.constrained import ReasoningGatedGrammar

    keys = [("json", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})),
            ("regex", "(yes|no)[0-9]{2}"), ("json_object", "")]
    grammars = [backend.get_future(k).result() for k in keys]
    grammars[0].accept_token(_ids(tokenizer, '{"a"')[0])
    gated = ReasoningGatedGrammar(backend.get_future(keys[1]).result(), _ids(tokenizer, "</think>"), in_reasoning=True)
    batch = [grammars[0], None, grammars[1], gated, grammars[2]]
    together = allocate_vocab_mask(backend.vocab_size, len(batch), pin_memory=False)
    rows = fill_vocab_masks(batch, together)
    assert rows == [0, 2, 3, 4]
    one_by_one = allocate_vocab_mask(backend.vocab_size, len(batch), pin_memory=False)
    for i, g in enumerate(batch):
        if g is not None:
            g.fill_vocab_mask(one_by_one, i)
    assert torch.equal(together, one_by_one)
    assert not torch.equal(together[0], together[2])


class _Req:
    def __init__(self, grammar):
        self.rid, self.grammar, self.grammar_pending, self.finished_reason = "r", grammar, None, None

    def finished(self):
        return self.finished_reason is not None


def test_hooks_defer_accept_until_the_next_mask(backend, tokenizer):
    """`accept` only records an ordinary token; `apply_mask` (run while the GPU computes the next
    step) advances the matcher, then masks. A stop token is accepted at once: it ends the grammar."""
    from edgelm.managers.grammar_hooks import GrammarHooks

    hooks = GrammarHooks(backend, backend.vocab_size, "cpu")
    req = _Req(backend.get_future(("regex", "(yes|no)")).result(TIMEOUT))
    yes = _ids(tokenizer, "yes")
    assert len(yes) == 1
    hooks.accept(req, yes[0])
    assert req.grammar_pending == yes[0]
    assert not _allowed(req.grammar, backend.vocab_size, tokenizer.eos_token_id)  # not advanced yet
    logits = torch.zeros(1, backend.vocab_size)
    hooks.apply_mask([req], logits)
    assert req.grammar_pending is None
    assert torch.isfinite(logits[0, tokenizer.eos_token_id]) and torch.isinf(logits[0, yes[0]])
    hooks.accept(req, tokenizer.eos_token_id)  # a stop token: accepted now
    assert req.grammar_pending is None and req.grammar.is_terminated()

    bad = _Req(backend.get_future(("regex", "(yes|no)")).result(TIMEOUT))
    hooks.accept(bad, _ids(tokenizer, "Hello")[0])  # a token the mask would have forbidden
    hooks.apply_mask([bad], torch.zeros(1, backend.vocab_size))
    assert bad.finished() and bad.finished_reason["error"][0] == 500


class _QueuedReq(_Req):
    def __init__(self, key):
        super().__init__(None)
        self.grammar_key, self.grammar_after_think = key, False


def _admit(hooks, keys):
    """Requests through start + ready, as the scheduler admits them."""
    reqs = [_QueuedReq(key) for key in keys]
    for req in reqs:
        if req.grammar_key is not None:
            assert hooks.start(req) is None
    deadline = time.monotonic() + TIMEOUT
    while not all(hooks.ready(r) for r in reqs):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return reqs


def test_hooks_grammar_workers_equal_in_process(backend, tokenizer):
    """With matchers in worker processes, each step's masked logits, termination and the
    rejection of a bad token are the same as with the matchers in-process; slots are recycled."""
    from edgelm.constrained.grammar_workers import WorkerGrammar
    from edgelm.managers.grammar_hooks import GrammarHooks

    schema = json.dumps({"type": "object", "properties": {"title": {"type": "string", "maxLength": 20},
                                                           "n": {"type": "integer"}}, "required": ["title", "n"]})
    ids = _ids(tokenizer, '{"title": "A small robot", "n": 42}') + [tokenizer.eos_token_id]
    keys = [("json", schema), ("regex", "(yes|no)"), None, ("json", schema), ("json", schema)]
    local = GrammarHooks(backend, backend.vocab_size, "cpu")
    pooled = GrammarHooks(backend, backend.vocab_size, "cpu", workers=2, max_matchers=6, in_process_first=0)
    try:
        a, b = _admit(local, keys), _admit(pooled, keys)
        assert all(isinstance(r.grammar, WorkerGrammar) for r in b if r.grammar_key is not None)
        assert {r.grammar.worker for r in b if r.grammar is not None} == {0, 1}  # spread over both
        for step, token in enumerate(ids):
            for hooks, reqs in ((local, a), (pooled, b)):
                logits = torch.zeros(len(reqs), backend.vocab_size)
                hooks.apply_mask(reqs, logits)
                if hooks is local:
                    expect = logits
                else:
                    assert torch.equal(logits, expect), f"step {step}"
                for req in reqs:
                    if req.grammar is not None and not req.finished():
                        # row 1 (a regex for yes|no) gets the JSON's tokens: rejected at the next mask
                        hooks.accept(req, token)
                hooks.dispatch(reqs)
        for x, y in zip(a, b):
            assert x.finished() == y.finished()
        assert b[1].finished() and b[1].finished_reason["error"][0] == 500
        assert b[0].grammar.is_terminated() and a[0].grammar.is_terminated()  # the JSON, then EOS
        assert pooled.fill_s > 0
        for req in b:
            pooled.release(req)
        # every slot is free again: six more matchers fit, and their first masks are right
        c = _admit(pooled, [("regex", "(yes|no)")] * 6)
        logits = torch.zeros(6, backend.vocab_size)
        pooled.apply_mask(c, logits)
        yes = _ids(tokenizer, "yes")[0]
        assert torch.isfinite(logits[:, yes]).all() and torch.isinf(logits[:, tokenizer.eos_token_id]).all()
        # a seventh does not fit in the workers' slots: it matches in-process
        d = _admit(pooled, [("regex", "(yes|no)")])
        assert d[0].grammar is not None and not isinstance(d[0].grammar, WorkerGrammar)
        assert pooled.in_process_live == 1
        pooled.release(d[0])
        assert pooled.in_process_live == 0
        # by default the first constrained request matches in-process, the next ones in workers
        pooled.in_process_first = 1
        for req in c:
            pooled.release(req)
        e = _admit(pooled, [("regex", "(yes|no)")])
        f = _admit(pooled, [("regex", "(yes|no)")])
        assert not isinstance(e[0].grammar, WorkerGrammar) and isinstance(f[0].grammar, WorkerGrammar)
    finally:
        pooled.shutdown()
        local.shutdown()


def test_grammar_worker_exit_fails_only_its_requests(backend, tokenizer):
    """A worker that dies (killed, out of memory) fails the requests whose matchers it held, with a
    500 that says so; free and in-process rows of the same batch go on, and new requests are
    admitted on the other worker."""
    from edgelm.constrained.grammar_workers import WorkerGrammar
    from edgelm.managers.grammar_hooks import GrammarHooks

    hooks = GrammarHooks(backend, backend.vocab_size, "cpu", workers=2, max_matchers=8)
    try:
        reqs = _admit(hooks, [("regex", "(yes|no)")] * 3 + [None])
        assert not isinstance(reqs[0].grammar, WorkerGrammar)  # the first matches in-process
        on = {r.grammar.worker: r for r in reqs[1:3]}
        assert set(on) == {0, 1}
        hooks.pool._procs[0].kill()
        hooks.pool._procs[0].join(10)
        yes = _ids(tokenizer, "yes")[0]
        for r in reqs[:3]:  # the step's sampled tokens, sent to the workers
            hooks.accept(r, yes)
        hooks.dispatch(reqs)
        logits = torch.zeros(4, backend.vocab_size)
        hooks.apply_mask(reqs, logits)
        victim = on[0]
        assert victim.finished() and "exited" in victim.finished_reason["error"][1]
        assert torch.isfinite(logits[reqs.index(victim)]).all()  # its row is left unmasked
        for r in (reqs[0], on[1]):  # after "yes" only the end is allowed
            row = logits[reqs.index(r)]
            assert not r.finished() and torch.isinf(row[yes]) and torch.isfinite(row[tokenizer.eos_token_id])
        assert torch.isfinite(logits[3]).all()  # the free row
        hooks.release(victim)
        late = _admit(hooks, [("regex", "(yes|no)")])[0]
        assert isinstance(late.grammar, WorkerGrammar) and late.grammar.worker == 1
    finally:
        hooks.shutdown()


def test_grammar_worker_rollback_refills_the_mask(backend, tokenizer):
    from edgelm.constrained.grammar_workers import WorkerGrammar
    from edgelm.managers.grammar_hooks import GrammarHooks

    hooks = GrammarHooks(backend, backend.vocab_size, "cpu", workers=1, max_matchers=4, in_process_first=0)
    try:
        (req,) = _admit(hooks, [("regex", "(yes|no)")])
        assert isinstance(req.grammar, WorkerGrammar)
        yes = _ids(tokenizer, "yes")[0]
        hooks.accept(req, yes)
        hooks.dispatch([req])
        logits = torch.zeros(1, backend.vocab_size)
        hooks.apply_mask([req], logits)
        assert torch.isinf(logits[0, yes]) and torch.isfinite(logits[0, tokenizer.eos_token_id])
        req.grammar.rollback(1)  # the token already sent: the worker rolls back and refills
        logits = torch.zeros(1, backend.vocab_size)
        hooks.apply_mask([req], logits)
        assert torch.isfinite(logits[0, yes]) and torch.isinf(logits[0, tokenizer.eos_token_id])
    finally:
        hooks.shutdown()
