"""Decode throughput with a JSON-schema constraint against without, through edgelm's scheduler
in-process (grammar compile excluded: the cache is warmed first), batch 1 and 16.

    python benchmarks/grammar_overhead.py --out benchmarks/results/grammar_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

import torch
import zmq

from edgelm.bench_utils import write_json
from edgelm.managers import io_struct as io
from edgelm.managers.grammar_hooks import GrammarHooks
from edgelm.managers.scheduler import Scheduler
from edgelm.managers.tokenizer_utils import load_tokenizer
from edgelm.model_config import ModelConfig
from edgelm.model_executor.model_runner import ModelRunner
from edgelm.model_loader.resolve import resolve_model
from edgelm.sampling.sampling_params import SamplingParams
from edgelm.server_args import ServerArgs

# Two schemas. "typical": a bounded title, an enum, a bounded integer and an array of at least 12 free
# strings, which keeps a request running for all new tokens (checked: every_request_ran_to_the_end),
# so the constrained and free runs decode the same batch.
# "min_length": the story must be 600+ characters, which keeps requests running by construction but
# is xgrammar's costly case: accepting a token inside a length-bounded string costs more the longer
# the string already is (measured here: 16 µs at its start, 200+ µs 70 tokens in), so it is a worst case.
SCHEMAS = {
    "typical": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                                 "genre": {"enum": ["fable", "mystery", "science fiction"]},
                                                 "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
                                                 "paragraphs": {"type": "array", "items": {"type": "string"},
                                                                "minItems": 12}},
                "required": ["title", "genre", "year", "paragraphs"]},
    "min_length": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                                    "story": {"type": "string", "minLength": 600}},
                   "required": ["title", "story"]},
}


class _OverlapProbe:
    """--diagnose: at the start and end of each step's grammar work, whether the GPU had already
    finished the forward it is meant to hide behind (an event recorded after the launch)."""

    def __init__(self, scheduler: Scheduler):
        self.counts = {"steps": 0, "gpu_done_at_fill_start": 0, "gpu_done_at_fill_end": 0}
        self.launch_to_fill_ms = 0.0
        runner, hooks = scheduler.runner, scheduler.grammar
        forward, apply_mask = runner.forward, hooks.apply_mask
        self.event = None

        def probed_forward(fb):
            out = forward(fb)
            if fb.forward_mode.is_decode():
                self.event = torch.cuda.Event()
                self.event.record()
                self.launched = time.perf_counter()
            return out

        def probed_apply(reqs, logits):
            if self.event is not None and any(r.grammar is not None for r in reqs):
                self.counts["steps"] += 1
                self.counts["gpu_done_at_fill_start"] += self.event.query()
                self.launch_to_fill_ms += 1e3 * (time.perf_counter() - self.launched)
                apply_mask(reqs, logits)
                self.counts["gpu_done_at_fill_end"] += self.event.query()
            else:
                apply_mask(reqs, logits)

        runner.forward, hooks.apply_mask = probed_forward, probed_apply

    def report(self) -> dict:
        out = dict(self.counts)
        out["launch_to_fill_ms"] = self.launch_to_fill_ms / max(self.counts["steps"], 1)
        return out


_SENTENCES = [
    "The robot rolled across the shop floor at dawn.", "A cold wind came down from the hills.",
    "Nobody had oiled the old conveyor in years.", "She counted the crates twice before signing.",
    "The camera blinked once, then twice, then stayed dark.", "Rain tapped on the tin roof all night.",
    "He kept the spare parts in a biscuit tin.", "The forklift beeped as it backed into the bay.",
    "Every morning the lights came on one row at a time.", "The map on the wall was older than the building.",
    "A small drone hovered by the loading door.", "The coffee machine had its own opinions.",
    "They found the missing bolt under the bench.", "The night shift left a note about the noise.",
    "Somewhere a motor hummed a little out of tune.", "By noon the whole line was running again.",
]


def replay_documents(schema: str, count: int) -> list[str]:
    """Valid JSON documents for `schema`, different per row: what a trained model would write."""
    docs = []
    for r in range(count):
        sents = _SENTENCES[r % len(_SENTENCES):] + _SENTENCES[:r % len(_SENTENCES)]
        title = f"Shop floor story number {r}"
        if schema == "min_length":
            docs.append(json.dumps({"title": title, "story": " ".join(sents * 2)}))
        else:
            docs.append(json.dumps({"title": title, "genre": ["fable", "mystery", "science fiction"][r % 3],
                                    "year": 1900 + r, "paragraphs": [" ".join(sents[i:i + 2]) for i in range(12)]}))
    return docs


class _Replay:
    """Random weights pick random allowed tokens, which put xgrammar in states no trained model
    reaches (long runs of rare multi-byte pieces: milliseconds a row). With --replay, each row's
    logits get a large bonus on the next token of a valid JSON document before the mask and the
    sampler run, so the grammar sees text like a trained model's; the forward is untouched, and the
    free runs replay the same documents."""

    def __init__(self, scheduler: Scheduler, tokenizer, batch: int):
        self.tokens = {name: [tokenizer.encode(d, add_special_tokens=False) for d in replay_documents(name, batch)]
                       for name in SCHEMAS}
        self.schema = "typical"
        self.followed = self.total = 0  # sampled tokens, and how many were the document's
        self.forced: dict[int, list[int]] = {}  # id(batch list) -> the tokens steered to, until processed
        self.pinned = torch.empty(max(batch, 1), dtype=torch.int64, pin_memory=torch.cuda.is_available())
        launch, process = scheduler.launch_sample, scheduler.process_sample

        def launch_sample(reqs, logits, step_offset=0):
            docs = self.tokens[self.schema]
            forced = [docs[int(r.rid.rsplit("-", 1)[1]) % len(docs)][min(len(r.output_ids) + step_offset,
                                                                     len(docs[0]) - 1)] for r in reqs]
            n = len(forced)
            self.pinned[:n].copy_(torch.tensor(forced, dtype=torch.int64))
            cols = self.pinned[:n].to(logits.device, non_blocking=True)
            logits[torch.arange(n, device=logits.device), cols] += 1e4
            self.forced[id(reqs)] = forced
            return launch(reqs, logits, step_offset)

        def process_sample(reqs, out):
            forced = self.forced.pop(id(reqs), None)
            before = [len(r.output_ids) for r in reqs]
            process(reqs, out)
            for r, b, f in zip(reqs, before, forced or []):
                if len(r.output_ids) > b:
                    self.total += 1
                    self.followed += r.output_ids[b] == f

        scheduler.launch_sample, scheduler.process_sample = launch_sample, process_sample


REPLAY: _Replay | None = None
HOOKS: dict[int, GrammarHooks] = {}  # grammar workers -> the scheduler's grammar hooks for runs with them


def run(scheduler: Scheduler, sink: zmq.Socket, prompt_ids: list[int], batch: int, new_tokens: int,
        constrained: bool, tag: str, workers: int = 0, schema: str = "typical") -> dict:
    hooks = scheduler.grammar = HOOKS[workers]
    if REPLAY is not None:
        REPLAY.schema = schema
    key = ("json", json.dumps(SCHEMAS[schema])) if constrained else None
    for i in range(batch):
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        scheduler.add_request(io.TokenizedGenerateReq(f"{tag}-{i}", list(prompt_ids), params, grammar_key=key))
    while scheduler.waiting or scheduler.chunked_req:  # prefill (and grammar readiness) not timed
        scheduler.step_once()
    replay0 = (REPLAY.followed, REPLAY.total) if REPLAY is not None else (0, 0)
    start, steps = time.perf_counter(), 0
    fill0, apply0, wait0 = hooks.fill_s, hooks.apply_s, hooks.wait_s
    busy0 = hooks.pool.worker_busy_s if hooks.pool is not None else 0.0
    while scheduler.running:
        scheduler.step_once()
        steps += 1
    elapsed = time.perf_counter() - start
    tokens = 0
    while sink.poll(0):
        for out in sink.recv_pyobj().outputs:
            tokens = max(tokens, 0) + len(out.new_token_ids)
    return {"batch": batch, "constrained": constrained, "schema": schema if constrained else None,
            "grammar_workers": workers, "decode_steps": steps, "decode_s": elapsed,
            "step_ms": 1e3 * elapsed / max(steps, 1), "tokens": tokens,
            # a request that finished early would shrink the batch and flatter the constrained run
            "every_request_ran_to_the_end": tokens == batch * new_tokens,
            "replay_followed": ((REPLAY.followed - replay0[0]) / max(REPLAY.total - replay0[1], 1)
                                if REPLAY is not None else None),
            "fill_ms_per_step": 1e3 * (hooks.fill_s - fill0) / max(steps, 1),
            "wait_ms_per_step": 1e3 * (hooks.wait_s - wait0) / max(steps, 1),
            "worker_busy_ms_per_step": 1e3 * ((hooks.pool.worker_busy_s if hooks.pool is not None else 0.0) - busy0)
            / max(steps, 1),
            "apply_ms_per_step": 1e3 * (hooks.apply_s - apply0) / max(steps, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model-path", default=None, help="default: the embedded SmolLM2 GGUF")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--replay", action="store_true", help="steer every row along a valid JSON document (default "
                    "with --load-format dummy; see _Replay)")
    ap.add_argument("--schemas", nargs="+", default=list(SCHEMAS), choices=list(SCHEMAS))
    ap.add_argument("--grammar-workers", type=int, default=None, help="default: the server's on this device")
    ap.add_argument("--diagnose", action="store_true", help="CUDA: report whether the grammar work overlapped the "
                    "forward (not part of the results)")
    ap.add_argument("--profile", choices=("constrained", "free"), default=None,
                    help="print a cProfile of one more run at the largest batch (not part of the results)")
    args = ap.parse_args(argv)
    server_args = ServerArgs(model_path=args.model_path, load_format=args.load_format, max_total_tokens=16384,
                             context_length=2048, cuda_graph_max_bs=32, grammar_workers=0)
    # constrained runs on the scheduler thread, and (when there is more than one core to spare) threaded
    workers = args.grammar_workers if args.grammar_workers is not None else ServerArgs(
        model_path=args.model_path).resolved_grammar_workers(server_args.resolved_device())
    variants = [0] + ([workers] if workers > 0 else [])
    device = server_args.resolved_device()
    resolved = resolve_model(args.model_path)
    runner = ModelRunner(server_args, ModelConfig.load(resolved, "auto", device, 2048), device)
    tokenizer = load_tokenizer(server_args, resolved)
    scheduler, sink, _ = Scheduler.in_process(server_args, runner, tokenizer)
    HOOKS[0] = scheduler.grammar
    global REPLAY
    replay = args.replay or args.load_format == "dummy"
    REPLAY = _Replay(scheduler, tokenizer, max(args.batch_sizes)) if replay else None
    if workers:  # the same scheduler, its grammar hooks swapped per run
        HOOKS[workers] = GrammarHooks.create(dataclasses.replace(server_args, grammar_workers=workers), tokenizer,
                                             scheduler.vocab_size, scheduler.eos_token_ids, device,
                                             max_running=scheduler.max_running)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story as JSON."}],
                                           tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    for name in args.schemas:  # compile each grammar once
        run(scheduler, sink, prompt_ids, 1, 4, True, f"warm-{name}", schema=name)
    rows = []
    for r in range(args.rounds):
        for bs in args.batch_sizes:
            rows.append(run(scheduler, sink, prompt_ids, bs, args.new_tokens, False, f"r{r}-{bs}-free"))
            for name in args.schemas:
                for t in variants:
                    rows.append(run(scheduler, sink, prompt_ids, bs, args.new_tokens, True, f"r{r}-{bs}-{name}-{t}",
                                    t, name))
    if args.diagnose and device == "cuda":
        for t in variants:
            probe = _OverlapProbe(scheduler)
            run(scheduler, sink, prompt_ids, max(args.batch_sizes), args.new_tokens, True, f"diag{t}", t,
                args.schemas[0])
            print(f"overlap probe, {t} grammar workers:", json.dumps(probe.report()))
            scheduler.runner.forward = type(scheduler.runner).forward.__get__(scheduler.runner)
            scheduler.grammar.apply_mask = type(scheduler.grammar).apply_mask.__get__(scheduler.grammar)
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        run(scheduler, sink, prompt_ids, max(args.batch_sizes), args.new_tokens, args.profile == "constrained",
            "profile", variants[-1], args.schemas[0])
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    summary = []
    for bs in args.batch_sizes:
        free = min(x["step_ms"] for x in rows if x["batch"] == bs and not x["constrained"])
        for name in args.schemas:
            for t in variants:
                mine = [x for x in rows if x["batch"] == bs and x["schema"] == name and x["grammar_workers"] == t]
                best = min(mine, key=lambda x: x["step_ms"])
                summary.append({"batch": bs, "schema": name, "grammar_workers": t, "free_step_ms": free,
                                "constrained_step_ms": best["step_ms"], "overhead": best["step_ms"] / free - 1,
                                "fill_ms_per_step": best["fill_ms_per_step"],
                                "wait_ms_per_step": best["wait_ms_per_step"],
                                "worker_busy_ms_per_step": best["worker_busy_ms_per_step"],
                                "apply_ms_per_step": best["apply_ms_per_step"],
                                "every_request_ran_to_the_end": all(x["every_request_ran_to_the_end"] for x in mine)})
    result = {"benchmark": "decode step time with a JSON-schema grammar vs without (best of rounds)",
              "command": "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "load_average": os.getloadavg(), "model": resolved.display_name,
              "token_source": "replayed valid JSON documents (see _Replay)" if replay else "sampled",
              "overlap_schedule": scheduler.overlap,
              "summary": summary, "rows": rows}
    write_json(args.out, result)
    for s in summary:
        print(f"batch {s['batch']} {s['schema']} ({s['grammar_workers']} grammar workers): free {s['free_step_ms']:.1f} ms/step, json-schema {s['constrained_step_ms']:.1f} "
              f"ms/step, overhead {100 * s['overhead']:+.1f}% (host: fill {s['fill_ms_per_step']:.3f} ms "
              f"[waiting {s['wait_ms_per_step']:.3f}; workers busy {s['worker_busy_ms_per_step']:.3f}], "
              f"apply {s['apply_ms_per_step']:.3f} ms per step)")
    for hooks in HOOKS.values():
        hooks.shutdown()
    return result


if __name__ == "__main__":
    main()
