"""Overlap scheduling (a decode step's samples feed the next forward before the host reads them)
gives the same outputs as the synchronous loop: greedy and seeded sampling, stop tokens, length
limits, a grammar, a request arriving mid-decode, an abort, and no KV slot leaked. The embedded
model, in-process scheduler, on the CPU (where the overlapped path runs, just without a GPU to
overlap with)."""

from __future__ import annotations

import pytest

from edgelm.managers import io_struct as io
from edgelm.managers.scheduler import Scheduler
from edgelm.managers.tokenizer_utils import load_tokenizer
from edgelm.model_config import ModelConfig
from edgelm.model_executor.model_runner import ModelRunner
from edgelm.model_loader.resolve import resolve_model
from edgelm.sampling.sampling_params import SamplingParams
from edgelm.server_args import ServerArgs


@pytest.fixture(scope="module")
def parts():
    server_args = ServerArgs(max_total_tokens=4096, context_length=512, grammar_workers=0)
    resolved = resolve_model(None)
    runner = ModelRunner(server_args, ModelConfig.load(resolved, "auto", "cpu", 512), "cpu")
    return server_args, runner, load_tokenizer(server_args, resolved)


def _scheduler(parts, overlap: bool, tag: str):
    scheduler, sink, ctx = Scheduler.in_process(*parts, name=tag)
    scheduler.overlap = overlap
    return scheduler, sink, ctx


def _run(parts, overlap: bool, tag: str):
    _, runner, tokenizer = parts
    ids = tokenizer.encode("The robot on the shop floor said", add_special_tokens=False)
    other = tokenizer.encode("Three facts about rain:", add_special_tokens=False)
    scheduler, sink, ctx = _scheduler(parts, overlap, tag)
    free_before = runner.allocator.available_size() + scheduler.tree_cache.evictable_size()
    stop_id = tokenizer.encode(" the", add_special_tokens=False)[0]
    reqs = [
        ("greedy-long", ids, SamplingParams(max_new_tokens=14, temperature=0)),
        ("greedy-short", other, SamplingParams(max_new_tokens=3, temperature=0)),
        ("seeded", ids, SamplingParams(max_new_tokens=9, temperature=0.8, seed=7)),
        ("stop-token", other, SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[stop_id])),
        ("abort-me", ids, SamplingParams(max_new_tokens=30, temperature=0)),
    ]
    for rid, prompt, params in reqs:
        scheduler.add_request(io.TokenizedGenerateReq(rid, list(prompt), params))
    scheduler.add_request(io.TokenizedGenerateReq(
        "regex", list(other), SamplingParams(max_new_tokens=12, temperature=0),
        grammar_key=("regex", "(yes|no), [0-9]{3}")))
    outputs: dict[str, list[int]] = {}
    finish: dict[str, dict] = {}
    steps = 0
    while scheduler.has_work() and steps < 200:
        scheduler.step_once()
        steps += 1
        if steps == 4:  # a request arriving while the others decode
            scheduler.add_request(io.TokenizedGenerateReq("late", list(other),
                                                          SamplingParams(max_new_tokens=6, temperature=0)))
        if steps == 6:
            scheduler.abort("abort-me")
        while sink.poll(0):
            for out in sink.recv_pyobj().outputs:
                outputs.setdefault(out.rid, []).extend(out.new_token_ids)
                if out.finish_reason is not None:
                    finish[out.rid] = out.finish_reason
    assert not scheduler.has_work() and scheduler.pending is None
    free_after = runner.allocator.available_size() + scheduler.tree_cache.evictable_size()
    ctx.destroy(linger=0)
    assert (scheduler.overlapped_steps > 5) if overlap else (scheduler.overlapped_steps == 0)
    return outputs, finish, free_before, free_after


def test_overlap_schedule_equals_synchronous(parts):
    sync_out, sync_finish, before, after = _run(parts, False, "sync")
    assert before == after  # every KV slot back (free or evictable)
    ov_out, ov_finish, before, after = _run(parts, True, "overlap")
    assert before == after
    for rid in ("greedy-long", "greedy-short", "seeded", "stop-token", "regex", "late"):
        assert ov_out[rid] == sync_out[rid], rid
        assert ov_finish[rid]["type"] == sync_finish[rid]["type"], rid
    assert len(sync_out["greedy-long"]) == 14 and len(sync_out["greedy-short"]) == 3
    assert sync_finish["stop-token"]["type"] == "stop"
    assert ov_finish["abort-me"]["type"] == "abort" and sync_finish["abort-me"]["type"] == "abort"
    # the aborted request's tokens before the abort agree as far as both got
    n = min(len(ov_out["abort-me"]), len(sync_out["abort-me"]))
    assert n > 0 and ov_out["abort-me"][:n] == sync_out["abort-me"][:n]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_overlap_schedule_tiny_model(device, tmp_path):
    """The same on a tiny random Llama; on CUDA through the captured graphs, where the in-flight
    samples reach the next step by a device copy into the graph's input block."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from types import SimpleNamespace

    from tests.tiny_models import make_checkpoint

    make_checkpoint("llama3", tmp_path)
    args = ServerArgs(model_path=str(tmp_path), device=device, dtype="float32", max_total_tokens=4096,
                      context_length=256, grammar_backend="none", cuda_graph_max_bs=8)
    runner = ModelRunner(args, ModelConfig.load(resolve_model(str(tmp_path)), "float32", device, 256), device)
    assert (runner.cuda_graph_runner is not None) == (device == "cuda")
    tokenizer = SimpleNamespace(eos_token_id=None)  # greedy, no stop strings, no grammar: never used
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 384, (int(n),), generator=gen).tolist() for n in (5, 9, 14, 3, 7)]  # vocab 384
    results = {}
    for overlap in (False, True):
        scheduler, sink, ctx = Scheduler.in_process(args, runner, tokenizer, name=f"{device}-{overlap}")
        scheduler.overlap = overlap
        for i, p in enumerate(prompts):
            params = (SamplingParams(max_new_tokens=9, temperature=0.9, seed=11, ignore_eos=True) if i == 2 else
                      SamplingParams(max_new_tokens=4 + 3 * i, temperature=0, ignore_eos=True))
            scheduler.add_request(io.TokenizedGenerateReq(f"r{i}", p, params))
        out: dict[str, list[int]] = {}
        steps = 0
        while scheduler.has_work():
            scheduler.step_once()
            steps += 1
            if steps == 3:
                scheduler.add_request(io.TokenizedGenerateReq("late", prompts[0][:4], SamplingParams(
                    max_new_tokens=6, temperature=0, ignore_eos=True)))
            while sink.poll(0):
                for o in sink.recv_pyobj().outputs:
                    out.setdefault(o.rid, []).extend(o.new_token_ids)
        assert (scheduler.overlapped_steps > 3) if overlap else scheduler.overlapped_steps == 0
        # every token but each request's first (its prefill's) came from a decode step; under overlap
        # the row a finished request still has in the next step is not counted
        assert scheduler.decode_tokens_total == sum(len(t) - 1 for t in out.values())
        results[overlap] = out
        ctx.destroy(linger=0)
    assert results[True] == results[False]
    assert [len(results[True][f"r{i}"]) for i in range(5)] == [4, 7, 9, 13, 16] and len(results[True]["late"]) == 6
